"""Bad and unusual input: every case of docs/bad-input.md, with the outcome that table documents.

Inputs are generated from the demo study (a real anatomy; ``brainmirror.demo``), mostly at 2 mm
for speed: other acquisition planes, oblique and thick slices, compressed transfer syntaxes,
enhanced multi-frame, DICOMDIR file-sets, duplicates, odd headers and odd content, and studies
that are not brain MR at all. Two kinds of test:

- the loading path without the app (``brainmirror.data``, ``read_series``, the selector): one
  case at a time, a fraction of a second each;
- three whole-app runs, marked ``slow``: ``batch`` (one input folder with every study case, plus
  junk files, processed in one run since the app assesses each study of its input on its own),
  ``large_run`` (a 0.5 mm isotropic series, with the peak memory of the process) and a run
  that times out. About 4.5 minutes on 2 CPU cores in all (tests/test_fuzz.py adds one).
"""

from __future__ import annotations

import copy
import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import REPO
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.fileset import FileSet
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)
from pydicom.valuerep import format_number_as_ds
from test_app import (
    APP,
    FINDING,
    NOT_ASSESSED,
    AppRun,
    _code,
    _hashes,
    _sr_items,
    _stack_limit,
    assert_no_traceback,
    referenced_uids,
    sr_finding,
    sr_numbers,
    sr_texts,
)

from brainmirror.data import (
    DicomFileError,
    deduplicate,
    header_view,
    read_dicom_file,
    read_dicom_series,
    scan_dicom_folder,
)
from brainmirror.demo import make_demo_study
from brainmirror.dicom import read_series, validate, volume_to_nifti
from brainmirror.preprocess import PreprocessingError, canonicalise

PATIENT_NAME = "Xylophone^Quokka"  # must never appear in a log
PATIENT_WORDS = ("xylophone", "quokka")
RULES = REPO / "operators" / "series_selection.json"
needs_dciodvfy_here = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
MR_ONLY = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName", "AngioFlag",
           "RepetitionTime", "EchoTime", "InversionTime", "NumberOfAverages", "ImagingFrequency", "ImagedNucleus",
           "EchoNumbers", "MagneticFieldStrength", "EchoTrainLength", "FlipAngle", "SpacingBetweenSlices")


# --- generating inputs ---------------------------------------------------------------------


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


@dataclass
class Demo:
    volume: hd.Volume  # the demo study, 1 mm, float values as read
    template: pydicom.Dataset  # a header of the demo series, without pixel data or per-slice values

    @property
    def small(self) -> hd.Volume:
        """The demo at 2 mm (every other voxel): a quarter of a second to read, same anatomy."""
        return self.volume[::2, ::2, ::2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    folder = tmp_path_factory.mktemp("demo")
    paths, _ = make_demo_study(folder, "normal")
    volume = read_series([pydicom.dcmread(p) for p in paths])
    template = pydicom.dcmread(paths[0], stop_before_pixels=True)
    for keyword in ("SliceLocation", "RescaleType"):
        delattr(template, keyword)
    template.PatientName = PATIENT_NAME
    return Demo(volume, template)


def write_series(
    volume: hd.Volume,
    folder: Path,
    template: pydicom.Dataset,
    *,
    study: str | None = None,
    description: str = "T1 3D",
    acquisition: str = "3D",
    edits: dict | None = None,
    unsigned: bool = False,
    mixed: bool = False,
    scale: float = 1.0,
    encode: Callable[[pydicom.Dataset], None] | None = None,
) -> list[Path]:
    """Write ``volume`` as a single-frame MR series, one slice per index of its first axis.

    The geometry (position, orientation, spacing) is the volume's, whatever its orientation.
    Stored values are the rounded values / ``scale`` (RescaleSlope ``scale``), signed unless
    ``unsigned``; ``mixed`` alternates unsigned and signed slices, each with its own rescale
    slope and intercept (as some scanners write). ``edits`` are set last (None deletes);
    ``encode`` then changes the dataset (compression).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = hd.UID()
    study = study or hd.UID()
    cosines = [_ds(v) for v in volume.direction_cosines]
    paths = []
    for index in range(volume.spatial_shape[0]):
        ds = copy.deepcopy(template)
        plane = np.asarray(volume.array[index], dtype=np.float64)
        slope, intercept = scale, 0.0
        signed = not unsigned
        if mixed:
            signed = index % 2 == 0
            slope = float(_ds((1.0 + 0.1 * (index % 3)) / (3.0 if signed else 6.0)))
            intercept = float(_ds(-1000.0 * slope if signed else -5.0 * (index % 4)))
        stored = np.round((plane - intercept) / slope)
        stored = np.clip(stored, -32768, 32767).astype(np.int16) if signed else \
            np.clip(stored, 0, 65535).astype(np.uint16)
        position = volume.affine[:3, :3] @ np.array([index, 0.0, 0.0]) + volume.affine[:3, 3]
        uid = hd.UID()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SeriesDescription, ds.MRAcquisitionType = description, acquisition
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = cosines
        ds.PixelSpacing = [_ds(v) for v in volume.pixel_spacing]
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(volume.spacing_between_slices)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.set_pixel_data(stored, "MONOCHROME2", 16)
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        for keyword, value in (edits or {}).items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        if encode is not None:
            encode(ds)
        path = folder / f"IM{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def compress(syntax: str) -> Callable[[pydicom.Dataset], None]:
    """pydicom's own encoders: RLE natively, JPEG-LS (pyjpegls), JPEG 2000 (pylibjpeg-openjpeg)."""
    return lambda ds: ds.compress(syntax)


def jpeg_baseline(top: float) -> Callable[[pydicom.Dataset], None]:
    """8-bit lossy JPEG baseline (Pillow), values 0..``top`` mapped to 0..255 with a rescale slope."""

    def encode(ds: pydicom.Dataset) -> None:
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        stored = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
        ds.set_pixel_data(stored, "MONOCHROME2", 8)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.RescaleSlope, ds.RescaleIntercept = _ds(top / 255.0), "0"
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        ds.LossyImageCompressionRatio = _ds(stored.nbytes / len(buffer.getvalue()))

    return encode


def enhanced(paths: list[Path], target: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    """The series as one enhanced multi-frame image (highdicom's legacy converter).

    MRAcquisitionType is added at top level, where scanners' enhanced MR images have it (MR
    Pulse Sequence module) and the legacy converter leaves it out.
    """
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        [pydicom.dcmread(p) for p in paths], series_instance_uid=hd.UID(), series_number=7,
        sop_instance_uid=hd.UID(), instance_number=1, transfer_syntax_uid=syntax,
    )
    image.MRAcquisitionType = pydicom.dcmread(paths[0], stop_before_pixels=True).MRAcquisitionType
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(target, enforce_file_format=True)
    return target


def as_fileset(folders: list[Path], target: Path) -> Path:
    """The files of ``folders`` as a DICOMDIR file-set (PT000000/ST000000/... and DICOMDIR), as on a CD."""
    fileset = FileSet()
    for folder in folders:
        for path in sorted(folder.glob("*.dcm")):
            fileset.add(path)
    target.mkdir(parents=True, exist_ok=True)
    fileset.write(target)
    return target


def rotated(volume: hd.Volume, degrees: float, axis: int = 0) -> hd.Volume:
    """The same voxels with the affine rotated about the volume's centre: an oblique acquisition."""
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    i, j = [a for a in range(3) if a != axis]
    rotation[[i, i, j, j], [i, j, i, j]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
    centre = volume.affine[:3, :3] @ ((np.array(volume.spatial_shape) - 1) / 2) + volume.affine[:3, 3]
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = -centre, centre
    return hd.Volume(volume.array, back @ rotation @ shift @ volume.affine, coordinate_system="PATIENT",
                     frame_of_reference_uid=volume.frame_of_reference_uid)


def upsampled(volume: hd.Volume, factor: int) -> hd.Volume:
    """Each voxel repeated ``factor`` times along each axis: a finer grid over the same head."""
    array = np.asarray(volume.array)
    for axis in range(3):
        array = np.repeat(array, factor, axis=axis)
    affine = volume.affine.copy()
    affine[:3, :3] /= factor
    affine[:3, 3] -= (factor - 1) / (2 * factor) * volume.affine[:3, :3].sum(axis=1)
    return hd.Volume(array, affine, coordinate_system="PATIENT", frame_of_reference_uid=volume.frame_of_reference_uid)


def non_mr(ds: pydicom.Dataset, sop_class: str, modality: str) -> None:
    """Make an MR header another modality's (SOP class, modality, no MR attributes)."""
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = modality
    for keyword in MR_ONLY:
        if keyword in ds:
            delattr(ds, keyword)


# --- the study cases -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Demo, Path, str], None]  # (demo, folder, study instance UID) -> files in folder
    code: str | None  # None: assessed; else the reason code of the "not assessed" SR
    reason: str = ""  # a pattern (regular expression) the reason must contain


def _multi_series(demo: Demo, folder: Path, study: str) -> None:
    """T1 3D, T2 axial, DWI and a localizer, as a DICOMDIR file-set in a folder named after the patient."""
    parts = folder.parent / f".{folder.name}-parts"
    small = demo.small
    write_series(small, parts / "t1", demo.template, study=study, description="t1_mprage_sag_p2_iso")
    write_series(small[::3], parts / "t2", demo.template, study=study, description="t2_tse_tra", acquisition="2D")
    write_series(small[30:50:2], parts / "dwi", demo.template, study=study, description="ep2d_diff_tra_b1000",
                 acquisition="2D")
    write_series(small[40:43], parts / "loc", demo.template, study=study, description="AAHead_Scout",
                 acquisition="2D", edits={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    as_fileset([parts / name for name in ("t1", "t2", "dwi", "loc")], folder / "Xylophone_Quokka")
    shutil.rmtree(parts)


def _enhanced_j2k_sagittal(demo: Demo, folder: Path, study: str) -> None:
    parts = folder.parent / f".{folder.name}-parts"
    sagittal = demo.small.to_patient_orientation("LFP")
    paths = write_series(sagittal, parts, demo.template, study=study, description="T1 3D sag", unsigned=True)
    enhanced(paths, folder / "enhanced.dcm", JPEG2000Lossless)
    shutil.rmtree(parts)


def _coronal_oblique_rle_duplicates(demo: Demo, folder: Path, study: str) -> None:
    """Oblique coronal, RLE, mixed pixel representations and rescales, duplicated instances."""
    coronal = rotated(demo.small.to_patient_orientation("PFL"), 20.0, axis=1)
    paths = write_series(coronal, folder, demo.template, study=study, description="FLAIR 3D cor obl",
                         mixed=True, encode=compress(RLELossless))
    (folder / "copies").mkdir()
    for path in paths[40:45]:  # the same instances again, under other names
        shutil.copy(path, folder / "copies" / f"copy-{path.name}")
    resent = pydicom.dcmread(paths[50])  # a slice sent again, as a new instance of a later acquisition
    resent.SOPInstanceUID = resent.file_meta.MediaStorageSOPInstanceUID = hd.UID()
    resent.AcquisitionNumber = 2
    resent.save_as(folder / "copies" / "resent.dcm", enforce_file_format=True)


def _thick_axial_jpeg(demo: Demo, folder: Path, study: str) -> None:
    """5 mm slices every 6 mm, 8-bit JPEG baseline, spacing tags that disagree with the positions."""
    thick = demo.volume[::6]
    write_series(thick, folder, demo.template, study=study, description="t2_tse_tra_5mm", acquisition="2D",
                 edits={"SliceThickness": "5", "SpacingBetweenSlices": "5"},
                 encode=jpeg_baseline(float(np.max(thick.array))))


def _postop_extreme_jpegls(demo: Demo, folder: Path, study: str) -> None:
    """A large resection cavity; intensities in the millions, hot pixels; JPEG-LS."""
    volume = demo.small
    array = np.array(volume.array, dtype=np.float64)
    k, i, j = np.indices(array.shape)
    centre = np.array(array.shape) // 2 + np.array([-8, 0, 14])  # right hemisphere, above the middle
    cavity = (k - centre[0]) ** 2 + (i - centre[1]) ** 2 + (j - centre[2]) ** 2 <= 12**2  # 24 mm radius
    array[cavity] = 0.05 * np.percentile(array, 99)
    array *= 1000.0
    rng = np.random.default_rng(0)
    hot = tuple(rng.integers(0, n, 40) for n in array.shape)
    array[hot] = 65535 * 40.0
    write_series(volume.with_array(array), folder, demo.template, study=study, description="T1 3D post-op",
                 unsigned=True, scale=40.0, encode=compress(JPEGLSLossless))


def _ct_head(demo: Demo, folder: Path, study: str) -> None:
    def ct(ds: pydicom.Dataset) -> None:
        non_mr(ds, CTImageStorage, "CT")
        ds.BodyPartExamined, ds.ImageType, ds.KVP = "HEAD", ["ORIGINAL", "PRIMARY", "AXIAL"], "120"
        ds.RescaleIntercept, ds.RescaleType = "-1024", "HU"

    write_series(demo.small[::4], folder, demo.template, study=study, description="CT HEAD WO", encode=ct)


def _mr_knee(demo: Demo, folder: Path, study: str) -> None:
    write_series(demo.small[20:40], folder, demo.template, study=study, description="PD FS sag",
                 edits={"BodyPartExamined": "KNEE"})


def _mr_spine(demo: Demo, folder: Path, study: str) -> None:
    write_series(demo.small.to_patient_orientation("LFP")[30:50], folder, demo.template, study=study,
                 description="T2 TSE sag spine", acquisition="2D", edits={"BodyPartExamined": "LSPINE"})


def _ultrasound(demo: Demo, folder: Path, study: str) -> None:
    ds = copy.deepcopy(demo.template)
    non_mr(ds, UltrasoundImageStorage, "US")
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "FrameOfReferenceUID", "PositionReferenceIndicator", "BodyPartExamined", "PatientPosition"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, hd.UID()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = hd.UID()
    ds.SeriesDescription = "Carotid"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8), "RGB", 8)
    folder.mkdir(parents=True)
    ds.save_as(folder / "us.dcm", enforce_file_format=True)


def _secondary_capture(demo: Demo, folder: Path, study: str) -> None:
    def sc(ds: pydicom.Dataset) -> None:
        non_mr(ds, SecondaryCaptureImageStorage, "OT")
        ds.ImageType, ds.ConversionType = ["DERIVED", "SECONDARY"], "WSD"

    write_series(demo.small[40:44], folder, demo.template, study=study, description="Screen capture", encode=sc)


def _localizers_only(demo: Demo, folder: Path, study: str) -> None:
    small = demo.small
    for plane, orientation in (("ax", "FPL"), ("sag", "LFP"), ("cor", "PFL")):
        volume = small.to_patient_orientation(orientation)
        middle = volume.spatial_shape[0] // 2
        write_series(volume[middle:middle + 1], folder / plane, demo.template, study=study, acquisition="2D",
                     description=f"localizer {plane}", edits={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})


def _single_slice(demo: Demo, folder: Path, study: str) -> None:
    write_series(demo.small[45:46], folder, demo.template, study=study, description="T1 SE tra", acquisition="2D")


def _all_zeros(demo: Demo, folder: Path, study: str) -> None:
    volume = demo.small
    write_series(volume.with_array(np.zeros(volume.array.shape, np.float32)), folder, demo.template, study=study)


def _no_brain_in_view(demo: Demo, folder: Path, study: str) -> None:
    """The top of the head above the brain: scalp and skull, 25 slices."""
    write_series(demo.volume[:25], folder, demo.template, study=study, description="T1 3D vertex")


def _no_positions(demo: Demo, folder: Path, study: str) -> None:
    write_series(demo.small, folder, demo.template, study=study, edits={"ImagePositionPatient": None})


def _irregular_spacing(demo: Demo, folder: Path, study: str) -> None:
    paths = write_series(demo.small, folder, demo.template, study=study)
    paths[40].unlink()


ASSESSED_CASES = [
    Case("multi-series-dicomdir", _multi_series, None),
    Case("enhanced-j2k-sagittal", _enhanced_j2k_sagittal, None),
    Case("coronal-oblique-rle-duplicates-mixed", _coronal_oblique_rle_duplicates, None),
    Case("thick-axial-jpeg-inconsistent-tags", _thick_axial_jpeg, None),
    Case("postop-extreme-jpegls", _postop_extreme_jpegls, None),
]
NOT_ASSESSED_CASES = [
    Case("ct-head", _ct_head, "no-suitable-series"),
    Case("mr-knee", _mr_knee, "no-suitable-series"),
    Case("mr-spine", _mr_spine, "no-suitable-series"),
    Case("ultrasound", _ultrasound, "no-suitable-series"),
    Case("secondary-capture", _secondary_capture, "no-suitable-series"),
    Case("localizers-only", _localizers_only, "no-suitable-series"),
    Case("single-slice", _single_slice, "preprocessing-failed", "at least 8 slices"),
    Case("all-zeros", _all_zeros, "preprocessing-failed", "constant"),
    Case("no-brain-in-view", _no_brain_in_view, "partial-coverage", r"covers [1-9] % of a typical brain"),
    Case("no-positions", _no_positions, "invalid-series", "cannot form a volume"),
    Case("irregular-spacing", _irregular_spacing, "invalid-series", "cannot form a volume"),
]
CASES = ASSESSED_CASES + NOT_ASSESSED_CASES


def write_junk(folder: Path, demo: Demo) -> dict[str, str]:
    """Files that are not usable DICOM instances, beside the studies; name -> why it is skipped.

    The random bytes are seeded: about 1 % of random bodies after a DICOM preamble parse far enough
    to be "unreadable" rather than "incomplete", which would make the expected reasons a draw."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (folder / "notes.txt").write_text("scanned by the night shift\n")
    (folder / "empty.dcm").write_bytes(b"")
    (folder / ".DS_Store").write_bytes(rng.bytes(512))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "photo.jpg")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), folder / "volume.nii.gz")
    good = write_series(demo.small[40:41], folder / ".one", demo.template, description="junk source")[0]
    data = good.read_bytes()
    (folder / "truncated-pixels.dcm").write_bytes(data[:-3000])
    (folder / "truncated-header.dcm").write_bytes(data[:400])
    (folder / "garbage.dcm").write_bytes(data[:132] + rng.bytes(2000))
    no_uid = pydicom.dcmread(good)
    del no_uid.StudyInstanceUID
    no_uid.save_as(folder / "no-study-uid.dcm")
    shutil.rmtree(folder / ".one")
    return {"notes.txt": "not DICOM", "empty.dcm": "not DICOM", ".DS_Store": "not DICOM", "photo.jpg": "not DICOM",
            "volume.nii.gz": "not DICOM", "truncated-pixels.dcm": "truncated", "truncated-header.dcm": "incomplete",
            "garbage.dcm": "incomplete", "no-study-uid.dcm": "incomplete"}


# --- running the app -------------------------------------------------------------------------


@dataclass
class MeasuredRun(AppRun):
    peak_rss_mb: float = 0.0


def run_measured(input_dir: Path, output_dir: Path, models: Path, env: dict[str, str] | None = None,
                 timeout: float = 1200) -> MeasuredRun:
    """``python app.py`` once, with its own peak resident memory (wait4), input hashes around it."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HOLOSCAN_", "BRAINMIRROR_"))}
    environment.update(env or {})
    before = _hashes(input_dir)
    log_path = output_dir.parent / f"{output_dir.name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(APP), "-i", str(input_dir), "-o", str(output_dir),
                                 "-m", str(models)], cwd=output_dir.parent, env=environment, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=_stack_limit)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return MeasuredRun(proc.returncode, log_path.read_text(errors="replace"), output_dir,
                       (before, _hashes(input_dir)), usage.ru_maxrss / 1024)


def hashes_equal(run: AppRun) -> bool:
    before, after = run.input_hashes
    return bool(before) and before == after


def sr_codes(ds: pydicom.Dataset, concept: tuple[str, str]) -> set[tuple[str, str]]:
    """Values of every CODE item of ``concept`` in an SR."""
    return {_code(i, "ConceptCodeSequence") for i in _sr_items(ds)
            if i.ValueType == "CODE" and _code(i, "ConceptNameCodeSequence") == concept}


def study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# --- files that are not usable DICOM: the loading path ---------------------------------------


def test_unusable_files_are_skipped_and_counted(demo: Demo, tmp_path: Path) -> None:
    expected = write_junk(tmp_path / "junk", demo)
    fileset = as_fileset([], tmp_path / "fs")  # an empty file-set: a DICOMDIR alone
    shutil.copy(fileset / "DICOMDIR", tmp_path / "junk" / "DICOMDIR")
    expected["DICOMDIR"] = "DICOMDIR"
    for name, kind in expected.items():
        with pytest.raises(DicomFileError) as info:
            read_dicom_file(tmp_path / "junk" / name)
        assert info.value.kind == kind, name
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    folder = scan_dicom_folder(tmp_path / "junk")
    assert folder.studies == {}
    assert sum(folder.skipped.values()) == len(expected)
    assert read_dicom_series(tmp_path / "junk") == {}


def test_truncated_slice_leaves_the_rest_of_its_series(demo: Demo, tmp_path: Path) -> None:
    paths = write_series(demo.small[:12], tmp_path, demo.template)
    paths[-1].write_bytes(paths[-1].read_bytes()[:-100])  # the last slice, cut short
    (datasets,) = read_dicom_series(tmp_path).values()
    assert len(datasets) == 11
    assert read_series(datasets).spatial_shape == (11, 109, 91)


def test_dicomdir_file_set_is_read_through_its_files(demo: Demo, tmp_path: Path) -> None:
    write_series(demo.small[:10], tmp_path / "series", demo.template)
    fileset = as_fileset([tmp_path / "series"], tmp_path / "cd")
    folder = scan_dicom_folder(fileset)
    assert [len(paths) for paths in folder.studies.values()] == [10]
    assert dict(folder.skipped) == {"DICOMDIR": 1}


# --- brain MR in the forms scanners send: the loading path -----------------------------------


def _volume(folder: Path) -> hd.Volume:
    (datasets,) = read_dicom_series(folder).values()
    return read_series(datasets)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=["rle", "jpeg-ls", "jpeg-2000"])
def test_lossless_compression_reads_the_same_volume(syntax: str, demo: Demo, tmp_path: Path) -> None:
    volume = demo.small[30:40]
    write_series(volume, tmp_path / "plain", demo.template, unsigned=True)
    write_series(volume, tmp_path / "compressed", demo.template, unsigned=True, encode=compress(syntax))
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in (tmp_path / "compressed").iterdir()} == {syntax}
    np.testing.assert_array_equal(_volume(tmp_path / "compressed").array, _volume(tmp_path / "plain").array)


def test_jpeg_baseline_reads_a_close_volume(demo: Demo, tmp_path: Path) -> None:
    volume = demo.small[30:40]
    top = float(np.max(volume.array))
    write_series(volume, tmp_path, demo.template, encode=jpeg_baseline(top))
    read = _volume(tmp_path)
    assert np.abs(read.array - np.round(volume.array)).mean() < 0.01 * top  # 8 bits, lossy
    np.testing.assert_allclose(read.affine, volume.affine, atol=1e-4)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless], ids=["native", "jpeg-2000"])
def test_enhanced_multiframe_reads_like_single_frame(syntax: str, demo: Demo, tmp_path: Path) -> None:
    paths = write_series(demo.small[30:40], tmp_path / "single", demo.template, unsigned=True)
    image = read_dicom_file(enhanced(paths, tmp_path / "enhanced.dcm", syntax))
    volume, expected = read_series([image]), _volume(tmp_path / "single")
    np.testing.assert_array_equal(volume.array, expected.array)
    np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-4)
    view = header_view(image)  # what the selection rules see: the frames' geometry at top level
    assert [float(v) for v in view.ImageOrientationPatient] == [float(v) for v in paths and
                                                                 pydicom.dcmread(paths[0]).ImageOrientationPatient]
    assert "ImageOrientationPatient" not in image and "PixelData" not in view


@pytest.mark.parametrize(
    "orientation",
    ["LFP", "PFL", "oblique", "mixed"],
    ids=["sagittal", "coronal", "oblique", "mixed-pixel-representation-and-rescale"],
)
def test_acquisitions_read_with_their_geometry(orientation: str, demo: Demo, tmp_path: Path) -> None:
    source = demo.small[20:60]
    if orientation == "oblique":
        volume = rotated(source, 25.0, axis=2)
    elif orientation == "mixed":
        volume = source
    else:
        volume = source.to_patient_orientation(orientation)
    write_series(volume, tmp_path, demo.template, mixed=orientation == "mixed")
    read = _volume(tmp_path).match_orientation(volume)  # the reader may order slices the other way
    np.testing.assert_allclose(read.affine, volume.affine, atol=1e-3)
    tolerance = 0.5 if orientation == "mixed" else 0.51  # rounding to the stored values' step
    assert np.abs(read.array - volume.array).max() <= tolerance


def test_thick_slices_with_gaps_and_disagreeing_spacing_tags(demo: Demo, tmp_path: Path) -> None:
    """Positions decide: 5 mm slices every 6 mm, SliceThickness and SpacingBetweenSlices saying 5."""
    write_series(demo.volume[::6], tmp_path, demo.template, acquisition="2D",
                 edits={"SliceThickness": "5", "SpacingBetweenSlices": "5"})
    read = _volume(tmp_path)
    assert read.spatial_shape[0] == 31 and read.spacing_between_slices == pytest.approx(6.0)


def test_duplicated_instances_are_dropped(demo: Demo, tmp_path: Path) -> None:
    """Copies (same SOP Instance UID), a re-sent slice (later acquisition wins), a second echo."""
    paths = write_series(demo.small[30:40], tmp_path / "series", demo.template)
    for path in paths[:3]:
        shutil.copy(path, tmp_path / "series" / f"copy-{path.name}")
    resent = pydicom.dcmread(paths[5])
    resent.SOPInstanceUID = resent.file_meta.MediaStorageSOPInstanceUID = hd.UID()
    resent.AcquisitionNumber = 2
    resent.save_as(tmp_path / "series" / "resent.dcm", enforce_file_format=True)
    for path in paths:  # a second echo at every position, in the same series
        echo = pydicom.dcmread(path)
        echo.SOPInstanceUID = echo.file_meta.MediaStorageSOPInstanceUID = hd.UID()
        echo.EchoNumbers, echo.InstanceNumber = 2, echo.InstanceNumber + 100
        echo.save_as(tmp_path / "series" / f"echo2-{path.name}", enforce_file_format=True)
    (datasets,) = read_dicom_series(tmp_path / "series").values()
    assert len(datasets) == 10
    assert {int(ds.get("EchoNumbers", 1)) for ds in datasets} == {1}
    assert str(resent.SOPInstanceUID) in {str(ds.SOPInstanceUID) for ds in datasets}
    assert read_series(datasets).spatial_shape[0] == 10
    assert deduplicate(datasets) == datasets


@pytest.mark.parametrize(
    ("edits", "count", "message"),
    [
        ({"ImagePositionPatient": None}, 12, "ImagePositionPatient missing"),
        ({"PixelSpacing": None}, 12, "PixelSpacing missing"),
        ({"ImageOrientationPatient": None}, 12, "ImageOrientationPatient missing"),
        ({}, 1, None),  # a single 2D slice reads, and fails in preprocessing
    ],
    ids=["no-position", "no-pixel-spacing", "no-orientation", "single-slice"],
)
def test_missing_geometry(edits: dict, count: int, message: str | None, demo: Demo, tmp_path: Path) -> None:
    write_series(demo.small[40:40 + count], tmp_path, demo.template, edits=edits)
    (datasets,) = read_dicom_series(tmp_path).values()
    if message is None:
        with pytest.raises(PreprocessingError, match="at least 8 slices"):
            canonicalise(volume_to_nifti(read_series(datasets)))
        return
    with pytest.raises(ValueError, match=message):
        read_series(datasets)


def test_irregular_slice_spacing_is_refused(demo: Demo, tmp_path: Path) -> None:
    paths = write_series(demo.small[30:50], tmp_path, demo.template)
    paths[7].unlink()
    with pytest.raises(ValueError, match="regularly-spaced"):
        _volume(tmp_path)


def test_too_large_series_is_refused_before_decoding(demo: Demo) -> None:
    header = copy.deepcopy(demo.template)
    header.Rows = header.Columns = 1024
    datasets = [header] * 200  # 210 million voxels of headers; no pixel data at all
    with pytest.raises(ValueError, match="too large"):
        read_series(datasets)


# --- series selection: the shipped rules, without the app ------------------------------------


def _selection(folder: Path) -> list[str]:
    """Descriptions of the series the app's loader and selector pick in ``folder``, best first, once each."""
    import json

    from monai.deploy.core import Fragment

    from operators import BrainSeriesSelectorOperator, RunStatus, StudyLoaderOperator

    fragment = Fragment()
    loader = StudyLoaderOperator(fragment, input_folder=folder, status=RunStatus(), name="loader")
    selector = BrainSeriesSelectorOperator(fragment, rules=RULES.read_text(), name="selector")
    (paths,) = scan_dicom_folder(folder).studies.values()
    study = loader.load_study(paths)
    chosen = selector.filter(json.loads(RULES.read_text()), [study], all_matched=True, sort_by_sop_instance_count=True)
    names = [str(header_view(item.series.get_sop_instances()[0].get_native_sop_instance()).SeriesDescription)
             for selection in chosen for item in selection.selected_series]
    return list(dict.fromkeys(names))


def test_selection_prefers_the_3d_series(demo: Demo, tmp_path: Path) -> None:
    study = hd.UID()
    _multi_series(demo, tmp_path / "study", study)
    assert _selection(tmp_path / "study")[0] == "t1_mprage_sag_p2_iso"


def test_selection_finds_an_enhanced_image(demo: Demo, tmp_path: Path) -> None:
    paths = write_series(demo.small[30:40], tmp_path / "single", demo.template, description="FLAIR tra",
                         acquisition="2D", unsigned=True)
    enhanced(paths, tmp_path / "study" / "enhanced.dcm")  # 2D: only the rule on the orientation matches it
    assert _selection(tmp_path / "study") == ["FLAIR tra (enhanced conversion)"]


def test_selection_survives_malformed_attributes(demo: Demo, tmp_path: Path) -> None:
    """A series the SDK's matching cannot handle matches nothing; the study's good series is chosen."""
    study = hd.UID()
    write_series(demo.small[30:36], tmp_path / "a", demo.template, study=study, description="T1 tra", acquisition="2D",
                 edits={"PatientPosition": "SITTING"})
    write_series(demo.small[30:36], tmp_path / "b", demo.template, study=study, acquisition="2D",
                 edits={"SeriesDescription": ["T2", "TSE"], "ImageOrientationPatient": ["1", "0", "0", "0"]})
    write_series(demo.small[30:34], tmp_path / "c", demo.template, study=study, description="T2 tra", acquisition="2D")
    assert _selection(tmp_path) == ["T2 tra"]
    # the SDK's own matching gives up on the whole study
    import json

    from monai.deploy.core import Fragment
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

    from operators import RunStatus, StudyLoaderOperator

    fragment = Fragment()
    (paths,) = scan_dicom_folder(tmp_path).studies.values()
    study_list = [StudyLoaderOperator(fragment, input_folder=tmp_path, status=RunStatus(), name="l").load_study(paths)]
    with pytest.raises(NotImplementedError):
        DICOMSeriesSelectorOperator(fragment, name="s").filter(json.loads(RULES.read_text()), study_list, True, True)


@pytest.mark.parametrize("case", [c for c in NOT_ASSESSED_CASES if c.code == "no-suitable-series"], ids=lambda c: c.name)
def test_non_brain_studies_select_nothing(case: Case, demo: Demo, tmp_path: Path) -> None:
    case.build(demo, tmp_path / "study", hd.UID())
    assert _selection(tmp_path / "study") == []


# --- the exit status of a run over several studies -------------------------------------------


def test_run_status_over_several_studies() -> None:
    from operators import ExitCode, RunStatus

    status = RunStatus()
    assert status.exit_code == ExitCode.ERROR  # nothing recorded: the run failed
    status.expected = 2
    status.record("1.2.3", ExitCode.ASSESSED, [])
    assert status.exit_code == ExitCode.ERROR  # a study the loader emitted never reached the writer
    status.record("1.2.4", ExitCode.ASSESSED, [])
    assert status.exit_code == ExitCode.ASSESSED
    status.expected = 3
    status.record("1.2.5", ExitCode.NOT_ASSESSED, [])
    assert status.exit_code == ExitCode.NOT_ASSESSED
    empty = RunStatus(expected=1)
    empty.record(None, ExitCode.USAGE, [])
    assert empty.exit_code == ExitCode.USAGE


def test_failed_write_leaves_no_file(demo: Demo, tmp_path: Path) -> None:
    """All of a study's objects are written, or none (brainmirror.dicom's atomic writer)."""
    from brainmirror.dicom import _write_atomically

    good = pydicom.dcmread(write_series(demo.small[40:41], tmp_path / "in", demo.template)[0])
    bad = copy.deepcopy(good)
    bad.SOPInstanceUID = hd.UID()
    bad.add_new(0x00280010, "US", "not a number")  # Rows: cannot be encoded
    with pytest.raises(Exception):
        _write_atomically([("SR", good), ("KEY", bad)], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_watchdog_kills_a_run_whose_interpreter_is_blocked(tmp_path: Path) -> None:
    """The SIGALRM fallback: native code holding the interpreter cannot stop the timeout."""
    script = (
        "import re, sys; sys.path.insert(0, sys.argv[1]); import app; from operators import RunStatus\n"
        "app.Watchdog(RunStatus(), timeout=1, grace=2).start()\n"
        "re.match(r'(a|aa)+b', 'a' * 60)  # holds the GIL for far longer than 3 s\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, timeout=120,
                          preexec_fn=_stack_limit)
    assert proc.returncode == -14, proc.stderr[-2000:]  # SIGALRM
    assert time.monotonic() - start < 60


# --- one run over every study case, junk files beside them -----------------------------------


@dataclass
class Batch:
    run: MeasuredRun
    studies: dict[str, str]  # case name -> StudyInstanceUID
    inputs: Path

    def outputs(self, case: str) -> dict[str, list[Path]]:
        """The case's output files by prefix (SR, SEG, KEY)."""
        found: dict[str, list[Path]] = {}
        for path in sorted(self.run.output.glob("*.dcm")):
            if study_of(path) == self.studies[case]:
                found.setdefault(path.name.split("_")[0], []).append(path)
        return found


@pytest.fixture(scope="module")
def batch(demo: Demo, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Batch:
    root = tmp_path_factory.mktemp("batch")
    studies = {}
    for case in CASES:
        studies[case.name] = hd.UID()
        case.build(demo, root / "in" / case.name, studies[case.name])
    write_junk(root / "in", demo)
    return Batch(run_measured(root / "in", root / "out", models_dir), studies, root / "in")


@pytest.mark.slow
def test_batch_run_exit_code_and_log(batch: Batch) -> None:
    run = batch.run
    assert run.returncode == 3, run.log[-3000:]  # at least one study not assessed
    assert_no_traceback(run)
    assert "Input: 742 DICOM file(s) in 16 study(ies); skipped 10 file(s): 1 DICOMDIR, 3 incomplete, " \
           "5 not DICOM, 1 truncated" in run.log
    for word in PATIENT_WORDS:  # neither from the headers nor from the folder named after the patient
        assert word not in run.log.lower()
    print(f"\nbatch run: {len(CASES)} studies, peak RSS {run.peak_rss_mb:.0f} MB")


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: c.name,
)
def test_batch_study_outcome(case: Case, batch: Batch) -> None:
    """Each study its own outputs, in its own study, and one log line with its outcome."""
    uid, log, outputs = batch.studies[case.name], batch.run.log, batch.outputs(case.name)
    if case.code is None:
        assert len(re.findall(rf"Study {re.escape(uid)} assessed: ", log)) == 1, log[-3000:]
        verdict, n_findings = re.search(rf"Study {re.escape(uid)} assessed: (\w+), .*?, (\d+) finding", log).groups()
        assert len(outputs["SR"]) == 1 and 1 <= len(outputs["KEY"]) <= 3
        assert len(outputs.get("SEG", [])) == (1 if int(n_findings) else 0)
        sr = pydicom.dcmread(outputs["SR"][0])  # the study's verdict; findings are coded as lesions
        assert {"abnormal": ("263654008", "SCT"), "normal": ("17621005", "SCT")}[verdict] in sr_codes(sr, FINDING)
    else:
        assert len(re.findall(rf"Study {re.escape(uid)} NOT ASSESSED \({re.escape(case.code)}\): .*{case.reason}",
                              log)) == 1, log[-3000:]
        assert list(outputs) == ["SR"] and len(outputs["SR"]) == 1
        sr = pydicom.dcmread(outputs["SR"][0])
        assert sr_finding(sr) == NOT_ASSESSED
        assert sr_texts(sr)["Reason code"] == case.code and re.search(case.reason, sr_texts(sr)["Reason not assessed"])


@pytest.mark.slow
def test_batch_multi_series_study_is_assessed_on_its_3d_t1(batch: Batch) -> None:
    sources = [pydicom.dcmread(p, stop_before_pixels=True)
               for p in (batch.inputs / "multi-series-dicomdir").rglob("IM*")]
    by_description = {str(ds.SeriesDescription): str(ds.SeriesInstanceUID) for ds in sources}
    outputs = batch.outputs("multi-series-dicomdir")
    sr = pydicom.dcmread(outputs["SR"][0])
    evidence = {str(series.SeriesInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence}
    results = {study_series for path in outputs.get("KEY", []) + outputs.get("SEG", [])
               for study_series in [str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)]}
    assert evidence - results == {by_description["t1_mprage_sag_p2_iso"]}


@pytest.mark.slow
def test_batch_outputs_are_complete_and_nothing_else(batch: Batch) -> None:
    output = batch.run.output
    files = sorted(output.iterdir())
    assert files == sorted(output.glob("*_*.dcm"))  # no temporary or hidden files
    assert {study_of(p) for p in files} == set(batch.studies.values())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
def test_batch_outputs_are_valid_dicom(batch: Batch) -> None:
    errors = {path.name: validate(path) for path in sorted(batch.run.output.glob("*.dcm"))}
    assert errors and not any(errors.values()), {k: v for k, v in errors.items() if v}


@pytest.mark.slow
def test_batch_input_is_not_modified(batch: Batch) -> None:
    assert hashes_equal(batch.run)


# --- a very large series: bounded memory -----------------------------------------------------

PEAK_RSS_LIMIT_MB = 4000  # measured about 2.8 GB for 0.5 mm isotropic (57 million voxels)


@pytest.fixture(scope="module")
def large_run(demo: Demo, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> MeasuredRun:
    """The demo at 0.5 mm isotropic: 362 slices of 434 x 362, 57 million voxels, 111 MB of DICOM."""
    root = tmp_path_factory.mktemp("large")
    write_series(upsampled(demo.volume, 2), root / "in", demo.template, description="T1 3D 0.5mm iso")
    return run_measured(root / "in", root / "out", models_dir)


@pytest.mark.slow
def test_large_series_is_assessed_in_bounded_memory(large_run: MeasuredRun) -> None:
    assert large_run.returncode == 0, large_run.log[-3000:]
    assert_no_traceback(large_run)
    assert len(list(large_run.output.glob("SR_*.dcm"))) == 1
    assert hashes_equal(large_run)
    if shutil.which("dciodvfy"):
        assert not any(validate(path) for path in large_run.output.glob("*.dcm"))
    print(f"\nlarge series (0.5 mm, 57 Mvoxel): peak RSS {large_run.peak_rss_mb:.0f} MB")
    assert large_run.peak_rss_mb < PEAK_RSS_LIMIT_MB


# --- a stuck run ends at its timeout -----------------------------------------------------------


@pytest.mark.slow
def test_stuck_run_ends_at_the_timeout(demo: Demo, models_dir: Path, tmp_path: Path) -> None:
    """A study that takes longer than BRAINMIRROR_TIMEOUT_S: exit 4, one log line, no partial output.

    3 s is far below what one brain study needs on any CPU (brain extraction alone takes about 2 s
    on 2 cores), so the outcome does not depend on how fast or loaded the machine is.
    """
    write_series(demo.volume, tmp_path / "in" / "brain", demo.template, study=hd.UID())
    run = run_measured(tmp_path / "in", tmp_path / "out", models_dir, env={"BRAINMIRROR_TIMEOUT_S": "3"})
    assert run.returncode == 4, run.log[-3000:]
    assert_no_traceback(run)
    assert len(re.findall(r"timed out: no study finished within 3 s", run.log)) == 1
    assert not run.output.exists() or not any(run.output.iterdir())  # nothing partial left behind
    assert hashes_equal(run)


# --- the series real scanners write: jittered positions, gaps, partial coverage, contrast -----

JITTERS_MM = (0.1, 0.3, 0.5)
SCORE_TOLERANCE = 0.05  # |jittered score - clean score| <= this x the study threshold (measured: at most 0.032)


def thick_slices(volume: hd.Volume, first: int, count: int, thickness: int = 5, gap: int = 1) -> hd.Volume:
    """A 2D acquisition from a 1 mm volume: ``count`` slabs of ``thickness`` slices (their mean), ``gap`` apart."""
    step = thickness + gap
    array = np.stack([np.asarray(volume.array[first + i * step:first + i * step + thickness]).mean(axis=0)
                      for i in range(count)])
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ np.array([first + (thickness - 1) / 2, 0.0, 0.0]) + volume.affine[:3, 3]
    affine[:3, 0] *= step
    return hd.Volume(array, affine, coordinate_system="PATIENT", frame_of_reference_uid=volume.frame_of_reference_uid)


def jitter_positions(paths: list[Path], jitter_mm: float, seed: int = 0) -> list[float]:
    """Move each slice along its normal by a random amount, the largest exactly ``jitter_mm``; pixels unchanged."""
    offsets = np.random.default_rng(seed).uniform(-1.0, 1.0, len(paths))
    offsets *= jitter_mm / np.abs(offsets).max()
    for path, offset in zip(paths, offsets):
        ds = pydicom.dcmread(path)
        normal = hd.spatial.get_normal_vector([float(v) for v in ds.ImageOrientationPatient])
        ds.ImagePositionPatient = [_ds(v) for v in np.array([float(v) for v in ds.ImagePositionPatient])
                                   + offset * normal]
        ds.save_as(path, enforce_file_format=True)
    return offsets.tolist()


def _clinical_2d(demo: Demo, folder: Path, study: str | None = None) -> list[Path]:
    """20 axial slices of 5 mm every 6 mm (1 mm gaps), post-contrast T1, as a 1.5 T scanner writes them."""
    return write_series(thick_slices(demo.volume, 29, 20), folder, demo.template, study=study,
                        description="T1 POST GAD", acquisition="2D",
                        edits={"SliceThickness": "5", "SpacingBetweenSlices": "6", "SeriesNumber": "5",
                               "ContrastBolusAgent": "Gadobutrol", "MagneticFieldStrength": "1.5"})


@pytest.mark.parametrize("jitter", JITTERS_MM)
@pytest.mark.parametrize("geometry", ["1mm-3d", "5mm-2d-gaps"])
def test_jittered_positions_are_resampled_onto_a_regular_grid(geometry: str, jitter: float, demo: Demo,
                                                              tmp_path: Path) -> None:
    from brainmirror.dicom import load_series

    if geometry == "1mm-3d":
        paths = write_series(demo.volume[60:100], tmp_path, demo.template)
    else:
        paths = _clinical_2d(demo, tmp_path)
    clean = _volume(tmp_path)
    jitter_positions(paths, jitter)
    (datasets,) = read_dicom_series(tmp_path).values()
    with pytest.raises(ValueError, match="regularly-spaced"):  # highdicom's own tolerance refuses it
        hd.get_volume_from_series(datasets)
    volume, resampling = load_series(datasets)
    assert resampling is not None and 0.9 * jitter <= resampling.max_deviation_mm <= jitter + 1e-3
    thickness = 1.0 if geometry == "1mm-3d" else 5.0
    assert resampling.tolerance_mm == pytest.approx(thickness / 2, abs=0.01)
    assert volume.spatial_shape == clean.spatial_shape
    np.testing.assert_allclose(volume.affine, clean.affine, atol=jitter + 1e-3)
    # one grid slice per source slice, in order along the normal
    positions = {str(ds.SOPInstanceUID): float(np.asarray(ds.ImagePositionPatient, float) @ volume.affine[:3, 0])
                 for ds in datasets}
    assert np.all(np.diff([positions[uid] for uid in resampling.slice_instances]) > 0)
    # the content moves by at most the interpolation between neighbours, weighted by the jitter
    step = np.abs(np.diff(clean.array, axis=0)).mean()
    assert np.abs(volume.array - clean.array).mean() <= (jitter / volume.spacing_between_slices + 0.01) * step


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("gap", "slice(s) missing"),
        ("gap-jittered", "slice(s) missing"),
        ("near-duplicate", "duplicates with different content"),
        ("near-duplicate-3d", "duplicates with different content"),  # within half a slice of a straight fit
        ("too-far", "more than half the slice thickness"),
        ("mixed-orientation", "same orientation"),
    ],
)
def test_positions_beyond_the_tolerance_are_refused(damage: str, message: str, demo: Demo, tmp_path: Path) -> None:
    from brainmirror.dicom import load_series

    paths = write_series(demo.volume[60:100], tmp_path, demo.template) if damage.endswith("3d") else \
        _clinical_2d(demo, tmp_path)
    if damage.startswith("gap"):
        paths.pop(9).unlink()
        if damage == "gap-jittered":
            jitter_positions(paths, 0.3)
    elif damage.startswith("near-duplicate"):  # another image a fifth of a slice from slice 10
        ds = pydicom.dcmread(paths[10])
        step = abs(float(pydicom.dcmread(paths[11]).ImagePositionPatient[2]) - float(ds.ImagePositionPatient[2]))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = hd.UID()
        ds.ImagePositionPatient = [_ds(float(v)) for v in ds.ImagePositionPatient[:2]] + \
            [_ds(float(ds.ImagePositionPatient[2]) + 0.2 * step)]
        ds.PixelData = pydicom.dcmread(paths[11]).PixelData
        ds.save_as(tmp_path / "extra.dcm", enforce_file_format=True)
    elif damage == "too-far":  # positions drift 4.5 mm back and forth; 5 mm slices: 2.5 mm allowed
        for k, path in enumerate(paths):
            ds = pydicom.dcmread(path)
            ds.ImagePositionPatient[2] = _ds(float(ds.ImagePositionPatient[2]) + 4.5 * np.sin(2 * np.pi * k / 19))
            ds.save_as(path, enforce_file_format=True)
    else:
        jitter_positions(paths, 0.1)
        ds = pydicom.dcmread(paths[10])
        ds.ImageOrientationPatient = [_ds(v) for v in (1, 0, 0, 0, 0.9998, -0.02)]
        ds.save_as(paths[10], enforce_file_format=True)
    (datasets,) = read_dicom_series(tmp_path).values()
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        load_series(datasets)
    assert str(info.value).startswith("cannot form a volume") and "\n" not in str(info.value)


@needs_dciodvfy_here
def test_resampled_series_results_map_onto_the_source_instances(demo: Demo, tmp_path: Path) -> None:
    """SEG frames sit on the source images (slice i of the grid on the instance it came from); valid DICOM."""
    from brainmirror.dicom import load_series, write_assessment
    from brainmirror.result import Assessment, Finding
    from brainmirror.series import describe_series

    paths = _clinical_2d(demo, tmp_path / "in", study=hd.UID())
    jitter_positions(paths, 0.5)
    (datasets,) = read_dicom_series(tmp_path / "in").values()
    volume, resampling = load_series(datasets)
    labels = np.zeros(volume.spatial_shape, np.uint8)
    labels[8:11, 90:110, 80:100] = 1
    scores = np.where(labels > 0, 5.0, 0.0).astype(np.float32)
    assessment = Assessment(
        verdict="abnormal", study_score=2.0, threshold=1.0, false_positive_rate=0.05, voxel_threshold=3.0,
        voxel_false_positive_rate=0.001, configuration="combined", slice_scores=scores.max(axis=(1, 2)),
        anomaly_map=scores, segmentation=labels,
        findings=[Finding(1, 7.2, "left", (8, 10), 5.0, (9.0, 100.0, 90.0))])
    with pytest.raises(ValueError, match="do not lie on the source images"):  # without its Resampling
        write_assessment(datasets, volume, assessment, tmp_path / "unmapped", algorithm_version="test")
    assert not (tmp_path / "unmapped").exists() or not any((tmp_path / "unmapped").iterdir())
    series = replace(describe_series(datasets), resampling=resampling, coverage=0.8)
    written = write_assessment(datasets, volume, assessment, tmp_path / "out", algorithm_version="test",
                               series=series)
    assert not any(validate(path) for path in written)
    sources = {str(ds.SOPInstanceUID): ds for ds in datasets}
    (seg_path,) = [p for p in written if p.name.startswith("SEG")]
    seg = pydicom.dcmread(seg_path)
    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) == 3
    for frame in frames:
        source = sources[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert np.allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in source.ImagePositionPatient], atol=1e-3)
        assert resampling.slice_instances.index(str(source.SOPInstanceUID)) in (8, 9, 10)
    for key in [p for p in written if p.name.startswith("KEY")]:
        assert referenced_uids(pydicom.dcmread(key, stop_before_pixels=True)) <= set(sources)
    sr = pydicom.dcmread(next(p for p in written if p.name.startswith("SR")))
    texts, numbers = sr_texts(sr), sr_numbers(sr)
    assert texts["Assessed series"] == "series 5: T1 POST GAD" and texts["Contrast family"] == "T1 post-contrast"
    assert numbers["Maximum slice position deviation"] == pytest.approx(resampling.max_deviation_mm, abs=1e-6)
    assert texts["Slice positions resampled"].startswith("yes: ")
    assert numbers["Brain coverage"] == pytest.approx(0.8) and "NOT assessed" in texts["Assessed region"]


@pytest.mark.parametrize(
    ("description", "agent", "family"),
    [
        ("T1 POST GAD", None, "T1 post-contrast"),
        ("T1+C", None, "T1 post-contrast"),
        ("MPRAGE post contrast", None, "T1 post-contrast"),
        ("AX POST GAD", None, "T1 post-contrast"),
        ("t1_se_tra", "Gadobutrol", "T1 post-contrast"),
        ("T1 PRE GAD", None, "T1"),
        ("T1 3D post-op", None, "T1"),
        ("t1_mprage_sag_p2_iso", None, "T1"),
        ("T1 FLAIR tra", None, "T1"),
        ("t2_tse_tra", None, "T2"),
        ("T2 FLAIR +C", "Gadobutrol", "FLAIR"),
        ("PD FS cor", None, "PD"),
        ("sequence 7", None, "unknown"),
    ],
)
def test_contrast_family(description: str, agent: str | None, family: str, demo: Demo) -> None:
    from brainmirror.series import contrast_family

    ds = copy.deepcopy(demo.template)
    ds.SeriesDescription, ds.SequenceName = description, "*se2d1"  # the demo's "*tfl3d1" says T1
    if agent:
        ds.ContrastBolusAgent = agent
    assert contrast_family(ds) == family


@pytest.mark.parametrize(
    ("description", "protocol", "family"),
    [
        ("AX T1 POST GAD", "MRI BRAIN W/WO CONTRAST", "T1 post-contrast"),  # the exam's name does not decide
        ("AX T2", "BRAIN T1 FLAIR ROUTINE", "T2"),
        ("T1 NON-CONTRAST", "BRAIN", "T1"),
        ("T1 ohne KM", "Schaedel", "T1"),
        ("sequence 7", "t2_tse_tra", "T2"),  # the protocol only when the description names no family
    ],
)
def test_contrast_family_reads_the_series_description_first(description: str, protocol: str, family: str,
                                                            demo: Demo) -> None:
    from brainmirror.series import contrast_family

    ds = copy.deepcopy(demo.template)
    ds.SeriesDescription, ds.ProtocolName, ds.SequenceName = description, protocol, "*se2d1"
    assert contrast_family(ds) == family


@pytest.mark.parametrize(
    ("series", "chosen"),
    [
        ((("T1 POST GAD", "2D", "FPL"), ("ep2d_diff_tra", "2D", "FPL")), "T1 POST GAD"),
        ((("MPRAGE post contrast", "3D", "LFP"), ("AX T2 FLAIR", "2D", "FPL")), "MPRAGE post contrast"),
        ((("SAG T1+C", "2D", "LFP"), ("COR PD FS", "2D", "PFL")), "SAG T1+C"),
        ((("Ax Gd", "2D", "FPL"),), "Ax Gd"),
    ],
    ids=["axial-post-gad", "3d-post-contrast", "sagittal-and-coronal-2d-only", "post-gd-only"],
)
def test_selection_picks_a_brain_series_in_contrast_studies(series: tuple, chosen: str, demo: Demo,
                                                            tmp_path: Path) -> None:
    study = hd.UID()
    for number, (description, acquisition, orientation) in enumerate(series, start=1):
        volume = demo.small.to_patient_orientation(orientation)
        middle = volume.spatial_shape[0] // 2
        write_series(volume[middle - 6:middle + 6:3], tmp_path / str(number), demo.template, study=study,
                     description=description, acquisition=acquisition,
                     edits={"ContrastBolusAgent": "Gadoterate"})
    assert _selection(tmp_path)[0] == chosen


# one whole-app run over the scanner cases (studies assessed one by one, the model loaded once)


@dataclass(frozen=True)
class ScannerCase:
    name: str
    build: Callable[[Demo, Path, str], None]
    code: str | None = None  # None: assessed


def _3d(jitter: float) -> Callable[[Demo, Path, str], None]:
    def build(demo: Demo, folder: Path, study: str) -> None:
        paths = write_series(demo.volume, folder, demo.template, study=study, description="t1_mprage_sag")
        if jitter:
            jitter_positions(paths, jitter)
    return build


def _2d(jitter: float) -> Callable[[Demo, Path, str], None]:
    def build(demo: Demo, folder: Path, study: str) -> None:
        paths = _clinical_2d(demo, folder, study)
        if jitter:
            jitter_positions(paths, jitter)
    return build


def _partial(first: int, stop: int) -> Callable[[Demo, Path, str], None]:
    def build(demo: Demo, folder: Path, study: str) -> None:
        write_series(demo.small[first:stop], folder, demo.template, study=study, description="T1 3D slab")
    return build


SCANNER_CASES = [
    ScannerCase("1mm-3d", _3d(0.0)),
    *[ScannerCase(f"1mm-3d-jitter-{j}", _3d(j)) for j in JITTERS_MM],
    ScannerCase("5mm-2d-gaps", _2d(0.0)),
    *[ScannerCase(f"5mm-2d-gaps-jitter-{j}", _2d(j)) for j in JITTERS_MM],
    ScannerCase("partial-60", _partial(32, 62)),  # 30 slices of 2 mm through the middle of the brain
    ScannerCase("partial-20", _partial(46, 56), "partial-coverage"),  # 10 slices of 2 mm
]


@pytest.fixture(scope="module")
def scanner_batch(demo: Demo, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Batch:
    root = tmp_path_factory.mktemp("scanner")
    studies = {}
    for case in SCANNER_CASES:
        studies[case.name] = hd.UID()
        case.build(demo, root / "in" / case.name, studies[case.name])
    return Batch(run_measured(root / "in", root / "out", models_dir), studies, root / "in")


def _scanner_sr(batch: Batch, case: str) -> pydicom.Dataset:
    (path,) = batch.outputs(case)["SR"]
    return pydicom.dcmread(path)


@pytest.mark.slow
def test_scanner_batch_outcomes(scanner_batch: Batch) -> None:
    run = scanner_batch.run
    assert run.returncode == 3, run.log[-3000:]  # partial-20 is not assessed
    assert_no_traceback(run)
    assert hashes_equal(run)
    for case in SCANNER_CASES:
        uid = scanner_batch.studies[case.name]
        if case.code is None:
            assert len(re.findall(rf"Study {re.escape(uid)} assessed: ", run.log)) == 1, case.name
        else:
            assert len(re.findall(rf"Study {re.escape(uid)} NOT ASSESSED \({case.code}\)", run.log)) == 1, case.name
    if shutil.which("dciodvfy"):
        errors = {path.name: validate(path) for path in sorted(run.output.glob("*.dcm"))}
        assert errors and not any(errors.values()), {k: v for k, v in errors.items() if v}


@pytest.mark.slow
@pytest.mark.parametrize("jitter", JITTERS_MM)
@pytest.mark.parametrize("geometry", ["1mm-3d", "5mm-2d-gaps"])
def test_jittered_study_matches_the_clean_one(geometry: str, jitter: float, scanner_batch: Batch) -> None:
    clean, jittered = _scanner_sr(scanner_batch, geometry), _scanner_sr(scanner_batch, f"{geometry}-jitter-{jitter}")
    assert sr_finding(jittered) == sr_finding(clean)
    clean_numbers, numbers = sr_numbers(clean), sr_numbers(jittered)
    difference = abs(numbers["Anomaly score"] - clean_numbers["Anomaly score"])
    print(f"\n{geometry} jitter {jitter} mm: score {numbers['Anomaly score']:.4g} "
          f"(clean {clean_numbers['Anomaly score']:.4g}, threshold {clean_numbers['Anomaly score threshold']:.4g})")
    assert difference <= SCORE_TOLERANCE * abs(clean_numbers["Anomaly score threshold"])
    assert 0.9 * jitter <= numbers["Maximum slice position deviation"] <= jitter + 1e-3
    assert "Maximum slice position deviation" not in clean_numbers
    assert sr_texts(jittered)["Slice positions resampled"].startswith("yes: ")


@pytest.mark.slow
def test_clinical_2d_series_with_gaps_is_assessed_with_its_contrast_and_coverage(scanner_batch: Batch) -> None:
    sr = _scanner_sr(scanner_batch, "5mm-2d-gaps")
    texts, numbers = sr_texts(sr), sr_numbers(sr)
    assert texts["Assessed series"] == "series 5: T1 POST GAD" and texts["Contrast family"] == "T1 post-contrast"
    assert 0.5 <= numbers["Brain coverage"] <= 1.0
    assert _scanner_sr(scanner_batch, "1mm-3d").ContentSequence and \
        sr_numbers(_scanner_sr(scanner_batch, "1mm-3d"))["Brain coverage"] >= 0.95


@pytest.mark.slow
def test_partial_coverage_is_assessed_above_the_fraction_and_refused_below(scanner_batch: Batch) -> None:
    partial = _scanner_sr(scanner_batch, "partial-60")
    assert sr_finding(partial) != NOT_ASSESSED
    coverage = sr_numbers(partial)["Brain coverage"]
    assert 0.5 <= coverage <= 0.7
    assert f"the {100 * coverage:.0f} % of a typical brain inside the field of view only" in sr_texts(partial)["Assessed region"]
    assert "NOT assessed" in sr_texts(partial)["Assessed region"]
    refused = _scanner_sr(scanner_batch, "partial-20")
    assert sr_finding(refused) == NOT_ASSESSED
    assert sr_texts(refused)["Reason code"] == "partial-coverage"
    assert "less than the 50 % needed" in sr_texts(refused)["Reason not assessed"]
    assert sr_numbers(refused)["Brain coverage"] < 0.3
