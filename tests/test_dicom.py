"""Tests for brainmirror.dicom: demo MR series round trip, SEG/SR/key-image output, validity."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from brainmirror import NOT_FOR_CLINICAL_USE
from brainmirror import dicom as bmd
from brainmirror.result import Assessment, Finding, NotAssessed

pytestmark = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")

SHAPE = (40, 48, 30)
SPACING = 2.0
ORIGIN = np.array([-40.0, -48.0, -30.0])
BLOB_CENTER_RAS = np.array([16.0, 2.0, 4.0])  # mm, patient right of the midline
BLOB_RADIUS = 7.0  # mm
VERSION = "0.1.0-test"


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates (..., 3) of every voxel of an array with the given affine."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _blob(world_ras: np.ndarray) -> np.ndarray:
    return np.linalg.norm(world_ras - BLOB_CENTER_RAS, axis=-1) <= BLOB_RADIUS


def _walk(items):
    """All SR content items, depth first."""
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _sr_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    return list(_walk(ds.ContentSequence))


def _codes(ds: pydicom.Dataset) -> set[tuple[str, str]]:
    return {
        (i.ConceptCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodingSchemeDesignator)
        for i in _sr_items(ds)
        if i.ValueType == "CODE"
    }


def _nums(ds: pydicom.Dataset) -> dict[str, float]:
    return {
        i.ConceptNameCodeSequence[0].CodeMeaning: float(i.MeasuredValueSequence[0].NumericValue)
        for i in _sr_items(ds)
        if i.ValueType == "NUM"
    }


def _texts(ds: pydicom.Dataset) -> dict[str, str]:
    return {
        i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue
        for i in _sr_items(ds)
        if i.ValueType == "TEXT"
    }


def _by_prefix(paths: list[Path], prefix: str) -> list[Path]:
    return [p for p in paths if p.name.startswith(prefix + "_")]


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A synthetic 2 mm RAS head with a bright blob, written as a DICOM MR series and read back."""
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    world = _world(affine, SHAPE)
    head = ((world / np.array([36.0, 44.0, 26.0])) ** 2).sum(-1) <= 1.0
    data = np.where(head, 100.0, 0.0).astype(np.float32)
    data[_blob(world)] = 400.0
    image = nib.Nifti1Image(data, affine)

    mr_dir = tmp_path_factory.mktemp("mr")
    study_uid = hd.UID()
    paths = bmd.write_mr_series(
        image, mr_dir, patient_id="BM001", patient_name="Demo^Brain", study_instance_uid=study_uid,
        accession_number="A1",
    )
    datasets = [pydicom.dcmread(p) for p in paths]
    volume = bmd.read_series(datasets)
    return dict(image=image, paths=paths, datasets=datasets, volume=volume, study_uid=study_uid)


def _assessment(volume: hd.Volume, abnormal: bool) -> Assessment:
    """An assessment built by hand: the blob (found in world coordinates) is the one finding."""
    world_ras = _world(volume.get_affine("RAS"), volume.spatial_shape)
    blob = _blob(world_ras)
    anomaly_map = np.where(blob & abnormal, 3.0, 0.2).astype(np.float32)
    slice_scores = anomaly_map.mean(axis=(1, 2)).astype(np.float64)
    slice_scores[0] = np.nan  # a slice without brain
    if not abnormal:
        return Assessment(
            verdict="normal", study_score=0.42, threshold=1.0, false_positive_rate=0.05,
            voxel_threshold=1.0, voxel_false_positive_rate=0.001, configuration="combined",
            slice_scores=slice_scores, anomaly_map=anomaly_map,
            segmentation=np.zeros(volume.spatial_shape, np.uint8), findings=[],
            model_version="m-test",
        )
    ijk = np.argwhere(blob)
    finding = Finding(
        label=1,
        volume_ml=float(blob.sum() * volume.voxel_volume / 1000.0),
        hemisphere="right",
        slice_range=(int(ijk[:, 0].min()), int(ijk[:, 0].max())),
        peak_score=3.0,
        centroid_ijk=tuple(float(v) for v in ijk.mean(axis=0)),
    )
    return Assessment(
        verdict="abnormal", study_score=2.75, threshold=1.0, false_positive_rate=0.05,
        voxel_threshold=1.0, voxel_false_positive_rate=0.001, configuration="combined",
        slice_scores=slice_scores, anomaly_map=anomaly_map, segmentation=blob.astype(np.uint8),
        findings=[finding], model_version="m-test", notes=["synthetic test data"],
    )


@pytest.fixture(scope="module")
def abnormal(demo, tmp_path_factory):
    assessment = _assessment(demo["volume"], abnormal=True)
    out = tmp_path_factory.mktemp("abnormal")
    paths = bmd.write_assessment(
        demo["datasets"], demo["volume"], assessment, out, algorithm_version=VERSION
    )
    return {"assessment": assessment, "paths": paths, "out": out}


@pytest.fixture(scope="module")
def normal(demo, tmp_path_factory):
    assessment = _assessment(demo["volume"], abnormal=False)
    out = tmp_path_factory.mktemp("normal")
    paths = bmd.write_assessment(
        demo["datasets"], demo["volume"], assessment, out, algorithm_version=VERSION
    )
    return {"assessment": assessment, "paths": paths, "out": out}


# --- demo MR series ----------------------------------------------------------------------


def _round_trip(image: nib.Nifti1Image, tmp_path: Path) -> nib.Nifti1Image:
    paths = bmd.write_mr_series(image, tmp_path, patient_id="RT", patient_name="Round^Trip")
    assert len(paths) in image.shape  # one file per slice
    return bmd.volume_to_nifti(bmd.read_series([pydicom.dcmread(p) for p in paths]))


def _assert_same_image(expected: nib.Nifti1Image, actual: nib.Nifti1Image, atol: float) -> None:
    """Same voxels at the same world positions: compare in the closest canonical (RAS) layout."""
    expected, actual = nib.as_closest_canonical(expected), nib.as_closest_canonical(actual)
    np.testing.assert_allclose(actual.affine, expected.affine, atol=1e-3)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.get_fdata(), expected.get_fdata(), atol=atol)


def test_round_trip_ras_1mm(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(500.0, 120.0, size=(24, 28, 20)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 3] = [-12.0, -14.0, -9.5]
    image = nib.Nifti1Image(data, affine)
    result = _round_trip(image, tmp_path)
    step = float(np.ptp(data)) / 32767.0
    _assert_same_image(image, result, atol=step)
    # axial slices: the slice axis of the series is the input's S axis
    assert result.shape == (20, 28, 24)
    assert nib.aff2axcodes(result.affine)[0] in ("S", "I")


def test_round_trip_oblique_anisotropic(tmp_path):
    def rotation(axis: int, degrees: float) -> np.ndarray:
        a = np.deg2rad(degrees)
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        return r

    affine = np.eye(4)
    affine[:3, :3] = rotation(2, 17.0) @ rotation(0, -11.0) @ np.diag([0.9, 1.2, 3.0])
    affine[:3, 3] = [-10.3, 20.7, -5.1]
    x = np.linspace(0, 1, 22)[:, None, None]
    y = np.linspace(0, 1, 26)[None, :, None]
    z = np.linspace(0, 1, 9)[None, None, :]
    data = (1000 * x + 300 * y**2 - 200 * z + 7).astype(np.int16)  # integer values: no rescale
    image = nib.Nifti1Image(data, affine)
    result = _round_trip(image, tmp_path)
    _assert_same_image(image, result, atol=1e-6)


def test_demo_series_is_valid_mr(demo):
    datasets, volume = demo["datasets"], demo["volume"]
    assert len(datasets) == SHAPE[2]  # one file per axial slice
    first = datasets[0]
    assert first.SOPClassUID == pydicom.uid.MRImageStorage
    assert first.Modality == "MR" and first.BodyPartExamined == "BRAIN"
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND"]
    assert first.PixelRepresentation == 1 and first.BitsAllocated == 16
    assert "RescaleSlope" not in first  # integral input values need no rescale
    assert {ds.StudyInstanceUID for ds in datasets} == {demo["study_uid"]}
    for path in demo["paths"][:: max(1, len(demo["paths"]) // 5)]:
        assert bmd.validate(path) == [], path
    # same values, same place as the input NIfTI
    _assert_same_image(demo["image"], bmd.volume_to_nifti(volume), atol=0)


def test_read_series_rejects_bad_input(demo):
    datasets = demo["datasets"]
    with pytest.raises(ValueError, match="cannot form a volume"):
        bmd.read_series([])
    gap = datasets[:10] + datasets[12:]
    with pytest.raises(ValueError, match="cannot form a volume") as info:
        bmd.read_series(gap)
    assert "\n" not in str(info.value)
    other = pydicom.dcmread(demo["paths"][0])
    other.SeriesInstanceUID = hd.UID()
    with pytest.raises(ValueError, match="cannot form a volume"):
        bmd.read_series(datasets[1:] + [other])


def test_read_series_enhanced_multiframe(demo, tmp_path):
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        demo["datasets"], series_instance_uid=hd.UID(), series_number=2,
        sop_instance_uid=hd.UID(), instance_number=1,
    )
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    volume = bmd.read_series([pydicom.dcmread(tmp_path / "enhanced.dcm")])
    np.testing.assert_array_equal(volume.array, demo["volume"].array)
    np.testing.assert_allclose(volume.affine, demo["volume"].affine, atol=1e-6)


def test_volume_to_nifti_keeps_axes(demo):
    volume = demo["volume"]
    image = bmd.volume_to_nifti(volume)
    assert image.shape == volume.spatial_shape
    np.testing.assert_array_equal(np.asarray(image.dataobj), volume.array)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(image.affine, lps_to_ras @ volume.affine)


# --- assessment output -------------------------------------------------------------------


def test_abnormal_writes_sr_seg_and_three_key_images(abnormal):
    paths = abnormal["paths"]
    assert len(_by_prefix(paths, "SR")) == 1
    assert len(_by_prefix(paths, "SEG")) == 1
    assert len(_by_prefix(paths, "KEY")) == 3
    assert sorted(p.name for p in abnormal["out"].iterdir()) == sorted(p.name for p in paths)
    for path in paths:
        ds = pydicom.dcmread(path)
        assert path.name == f"{path.name.split('_')[0]}_{ds.SOPInstanceUID}.dcm"
        assert NOT_FOR_CLINICAL_USE in ds.SeriesDescription


def test_all_outputs_pass_dciodvfy(abnormal, normal, tmp_path, demo):
    na = bmd.write_not_assessed(
        demo["datasets"][:1], NotAssessed(reason="No 3D T1 series.", code="no-suitable-series"),
        tmp_path, algorithm_version=VERSION,
    )
    for path in [*abnormal["paths"], *normal["paths"], *na]:
        assert bmd.validate(path) == [], path.name


def test_same_study_for_all_outputs(abnormal, demo):
    series = set()
    for path in abnormal["paths"]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == demo["study_uid"]
        assert ds.PatientID == "BM001"
        assert ds.SeriesInstanceUID != demo["datasets"][0].SeriesInstanceUID
        series.add((ds.Modality, ds.SeriesInstanceUID))
    assert len(series) == 3  # SR, SEG and key images each in their own series


def test_sr_content(abnormal, demo):
    sr = pydicom.dcmread(_by_prefix(abnormal["paths"], "SR")[0])
    seg = pydicom.dcmread(_by_prefix(abnormal["paths"], "SEG")[0], stop_before_pixels=True)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ("263654008", "SCT") in _codes(sr)  # Abnormal
    assert ("17621005", "SCT") not in _codes(sr)
    nums = _nums(sr)
    assert nums["Anomaly score"] == pytest.approx(2.75)
    assert nums["Anomaly score threshold"] == pytest.approx(1.0)
    assert nums["Study-level false positive rate"] == pytest.approx(0.05)
    finding = abnormal["assessment"].findings[0]
    assert nums["Volume"] == pytest.approx(finding.volume_ml, rel=1e-6)
    assert nums["Peak anomaly score"] == pytest.approx(3.0)
    assert _texts(sr)["Scoring configuration"] == "combined"
    assert "slices {}-{}".format(*finding.slice_range) in _texts(sr)["Slice range"]
    assert ("24028007", "SCT") in _codes(sr)  # laterality: Right
    # the finding's measurement group references segment 1 of the SEG
    refs = [
        i.ReferencedSOPSequence[0]
        for i in _sr_items(sr)
        if i.ValueType == "IMAGE" and i.ConceptNameCodeSequence[0].CodeValue == "121191"
    ]
    referenced = [(r.ReferencedSOPInstanceUID, r.ReferencedSegmentNumber) for r in refs]
    assert referenced == [(seg.SOPInstanceUID, 1)]
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    # highdicom reads it back as a TID 1500 report with one volumetric group
    report = hd.sr.srread(_by_prefix(abnormal["paths"], "SR")[0]).content
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1 and groups[0].referenced_segment is not None


def test_sr_dsrdump(abnormal):
    if shutil.which("dsrdump") is None:
        pytest.skip("dcmtk dsrdump not installed")
    path = _by_prefix(abnormal["paths"], "SR")[0]
    result = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=True)
    assert "Abnormal" in result.stdout
    assert "Anomaly score" in result.stdout


def test_seg_geometry(abnormal, demo):
    volume, datasets = demo["volume"], demo["datasets"]
    labels = abnormal["assessment"].segmentation
    seg = hd.seg.segread(_by_prefix(abnormal["paths"], "SEG")[0])
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == demo["study_uid"]
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "brainmirror" and algorithm.AlgorithmVersion == VERSION
    assert seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"

    # every frame is derived from the source instance at the same position
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        expected = [float(v) for v in by_uid[source].ImagePositionPatient]
        np.testing.assert_allclose(position, expected, atol=1e-3)

    # voxels per source instance, in the order of the volume's slices, equal the labels
    order = bmd._slice_datasets(datasets, volume)
    uids = [order[i][0].SOPInstanceUID for i in range(volume.spatial_shape[0])]
    pixels = seg.get_pixels_by_source_instance(
        uids, segment_numbers=[1], assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(pixels[..., 0], labels)

    # and the segment sits where the blob is in the input NIfTI (world coordinates)
    seg_volume = seg.get_volume(combine_segments=True)
    centroid_ijk = np.argwhere(seg_volume.array > 0).mean(axis=0)
    centroid_ras = seg_volume.get_affine("RAS") @ np.append(centroid_ijk, 1.0)
    np.testing.assert_allclose(centroid_ras[:3], BLOB_CENTER_RAS, atol=SPACING / 2)


def test_key_images(abnormal, demo):
    volume, assessment = demo["volume"], abnormal["assessment"]
    keys = [pydicom.dcmread(p) for p in _by_prefix(abnormal["paths"], "KEY")]
    keys.sort(key=lambda ds: ds.InstanceNumber)
    order = bmd._slice_datasets(demo["datasets"], volume)
    scores = np.nan_to_num(assessment.slice_scores, nan=-np.inf)
    expected = [order[i][0].SOPInstanceUID for i in np.argsort(-scores, kind="stable")[:3]]
    assert [k.SourceImageSequence[0].ReferencedSOPInstanceUID for k in keys] == expected
    for key in keys:
        assert key.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert key.PhotometricInterpretation == "RGB" and key.BurnedInAnnotation == "YES"
        rgb = key.pixel_array
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and max(rgb.shape[:2]) == 512
        below_text = rgb[64:].astype(int)
        red_yellow = (below_text[..., 0] > 200) & (below_text[..., 0] - below_text[..., 2] > 100)
        assert red_yellow.sum() > 100  # the anomaly overlay is visible


def test_normal_assessment(normal, demo):
    paths = normal["paths"]
    assert _by_prefix(paths, "SEG") == []
    assert len(_by_prefix(paths, "KEY")) == 1
    sr = pydicom.dcmread(_by_prefix(paths, "SR")[0])
    assert ("17621005", "SCT") in _codes(sr)  # Normal
    assert ("263654008", "SCT") not in _codes(sr)
    assert _nums(sr)["Anomaly score"] == pytest.approx(0.42)
    assert not [i for i in _sr_items(sr) if i.ValueType == "IMAGE"]


def test_not_assessed(demo, tmp_path):
    localizer = pydicom.dcmread(demo["paths"][0])
    localizer.SeriesInstanceUID = hd.UID()  # any dataset of the study will do
    outcome = NotAssessed(
        reason="No 3D T1-weighted series in the study.", code="no-suitable-series"
    )
    paths = bmd.write_not_assessed([localizer], outcome, tmp_path, algorithm_version=VERSION)
    assert len(paths) == 1 and paths[0].name.startswith("SR_")
    assert sorted(tmp_path.iterdir()) == paths
    sr = pydicom.dcmread(paths[0])
    assert sr.StudyInstanceUID == demo["study_uid"]
    assert NOT_FOR_CLINICAL_USE in sr.SeriesDescription
    assert ("NOTASSESSED", "99BRAINMIRROR") in _codes(sr)
    texts = _texts(sr)
    assert texts["Reason not assessed"] == outcome.reason
    assert texts["Reason code"] == outcome.code
    assert bmd.validate(paths[0]) == []


def test_failure_mid_write_leaves_nothing(demo, tmp_path, monkeypatch):
    assessment = _assessment(demo["volume"], abnormal=True)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(hd.sc.SCImage, "from_ref_dataset", boom)
    with pytest.raises(RuntimeError, match="boom"):
        bmd.write_assessment(
            demo["datasets"], demo["volume"], assessment, tmp_path, algorithm_version=VERSION
        )
    assert list(tmp_path.iterdir()) == []


def test_failure_while_moving_files_rolls_back(demo, tmp_path, monkeypatch):
    assessment = _assessment(demo["volume"], abnormal=True)
    real_replace, calls = bmd.os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(bmd.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        bmd.write_assessment(
            demo["datasets"], demo["volume"], assessment, tmp_path, algorithm_version=VERSION
        )
    assert list(tmp_path.iterdir()) == []


def test_validate_reports_errors_and_missing_tool(tmp_path, demo, monkeypatch):
    broken = pydicom.dcmread(demo["paths"][0])
    del broken.ImagePositionPatient
    path = tmp_path / "broken.dcm"
    broken.save_as(path, enforce_file_format=True)
    errors = bmd.validate(path)
    assert errors and all("Error" in line for line in errors)
    monkeypatch.setattr(bmd.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="dciodvfy"):
        bmd.validate(path)
