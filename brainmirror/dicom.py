"""DICOM input and output: read a series into a volume, write demo MR series and results.

Results are written as new series in the source study: a binary SEG of the findings, a
Comprehensive 3D SR (TID 1500) with the verdict, scores and per-finding measurements, and
RGB secondary-capture key images. Everything is built with highdicom; nothing here imports
Holoscan.
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from . import ALGORITHM_NAME, NOT_FOR_CLINICAL_USE
from .result import Assessment, Finding, NotAssessed, Resampling, SeriesReport

__all__ = [
    "read_series",
    "load_series",
    "volume_to_nifti",
    "write_mr_series",
    "write_assessment",
    "write_not_assessed",
    "validate",
]

# --- codes -------------------------------------------------------------------------------

PRIVATE_SCHEME = "99BRAINMIRROR"
CODE_FINDING = codes.DCM.Finding  # (121071, DCM, "Finding")
CODE_ABNORMAL = codes.SCT.Abnormal  # (263654008, SCT, "Abnormal")
CODE_NORMAL = codes.SCT.Normal  # (17621005, SCT, "Normal")
CODE_NOT_ASSESSED = Code("NOTASSESSED", PRIVATE_SCHEME, "Not assessed")
CODE_ANOMALY_SCORE = Code("ANOMSCORE", PRIVATE_SCHEME, "Anomaly score")
CODE_SCORE_THRESHOLD = Code("ANOMTHRESH", PRIVATE_SCHEME, "Anomaly score threshold")
CODE_STUDY_FPR = Code("STUDYFPR", PRIVATE_SCHEME, "Study-level false positive rate")
CODE_VOXEL_THRESHOLD = Code("VOXTHRESH", PRIVATE_SCHEME, "Voxel anomaly score threshold")
CODE_VOXEL_FPR = Code("VOXFPR", PRIVATE_SCHEME, "Voxel-level false positive rate")
CODE_PEAK_SCORE = Code("PEAKSCORE", PRIVATE_SCHEME, "Peak anomaly score")
CODE_CONFIGURATION = Code("SCORECONFIG", PRIVATE_SCHEME, "Scoring configuration")
CODE_BRAIN_EXTRACTION = Code("BRAINEXTRACT", PRIVATE_SCHEME, "Brain extraction method")
CODE_MODEL_VERSION = Code("MODELVERSION", PRIVATE_SCHEME, "Model version")
CODE_NOTE = Code("NOTE", PRIVATE_SCHEME, "Note")
CODE_DISCLAIMER = Code("DISCLAIMER", PRIVATE_SCHEME, "Disclaimer")
CODE_SLICE_RANGE = Code("SLICERANGE", PRIVATE_SCHEME, "Slice range")
CODE_REASON = Code("REASON", PRIVATE_SCHEME, "Reason not assessed")
CODE_REASON_CODE = Code("REASONCODE", PRIVATE_SCHEME, "Reason code")
CODE_SERIES = Code("SERIES", PRIVATE_SCHEME, "Assessed series")
CODE_CONTRAST = Code("CONTRAST", PRIVATE_SCHEME, "Contrast family")
CODE_RESAMPLED = Code("RESAMPLED", PRIVATE_SCHEME, "Slice positions resampled")
CODE_SLICE_DEVIATION = Code("SLICEDEV", PRIVATE_SCHEME, "Maximum slice position deviation")
CODE_COVERAGE = Code("COVERAGE", PRIVATE_SCHEME, "Brain coverage")
CODE_REGION = Code("REGION", PRIVATE_SCHEME, "Assessed region")
CODE_SEG_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # (49755003, SCT)
CODE_SEG_TYPE = codes.SCT.Lesion  # (52988006, SCT)
UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_MM = Code("mm", "UCUM", "millimeter")
UNIT_NONE = codes.UCUM.NoUnits  # ("1", UCUM, "no units")
UNIT_RATIO = codes.UCUM.Ratio  # ("{ratio}", UCUM, "ratio")
LATERALITY = {
    "left": codes.SCT.Left,
    "right": codes.SCT.Right,
    "bilateral": codes.SCT.Bilateral,
}

SERIES_NUMBER_SR = 9901
SERIES_NUMBER_SEG = 9902
SERIES_NUMBER_KEY = 9903
MAX_KEY_IMAGES = 3
WHOLE_BRAIN_COVERAGE = 0.95  # from this coverage on, the SR calls the assessed region the whole brain
KEY_IMAGE_SIZE = 512  # pixels along the longer physical side

_MANUFACTURER = ALGORITHM_NAME
_DISCLAIMER = f"{ALGORITHM_NAME} - {NOT_FOR_CLINICAL_USE}"


# --- reading -----------------------------------------------------------------------------


# Bounds the memory of a run: its peak is about 1.6 GB + 22 bytes per voxel of the series
# (docs/bad-input.md), so about 4.6 GB at this limit (134 million voxels, e.g. 512 x 512 x 512).
MAX_SERIES_VOXELS = 128 * 1024 * 1024
# A slice may sit this fraction of the slice thickness (or of the spacing, when smaller) off the
# regular grid and still be resampled onto it; farther, the series is refused.
SLICE_DEVIATION_TOLERANCE = 0.5
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def read_series(datasets: Sequence[Dataset], max_voxels: int = MAX_SERIES_VOXELS) -> hd.Volume:
    """The volume of ``load_series`` (resampled onto a regular grid when its slices jitter)."""
    return load_series(datasets, max_voxels)[0]


def load_series(
    datasets: Sequence[Dataset], max_voxels: int = MAX_SERIES_VOXELS
) -> tuple[hd.Volume, Resampling | None]:
    """Build the float32 volume (rescale applied) of one single-frame series.

    A single enhanced multi-frame dataset is accepted too. Slice positions that deviate from a
    regular grid along the slice normal by at most half the slice thickness
    (``SLICE_DEVIATION_TOLERANCE``) are resampled onto that grid, one grid slice per source
    slice, and the returned ``Resampling`` says so (None when the series was regular as
    highdicom's default tolerance sees it). Raises ``ValueError`` with a one-line message when
    the datasets do not form such a volume (missing slices, duplicates, mixed orientations, larger
    deviations), or hold more than ``max_voxels`` voxels (checked on the headers, before any
    pixel is decoded).
    """
    items = list(datasets)
    if not items:
        raise ValueError("cannot form a volume: no datasets given")
    try:
        voxels = sum(int(ds.Rows) * int(ds.Columns) * max(int(ds.get("NumberOfFrames") or 1), 1) for ds in items)
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"cannot form a volume: no usable image size ({' '.join(str(e).split())})") from e
    if voxels > max_voxels:
        raise ValueError(f"cannot form a volume: the series is too large ({voxels / 1e6:.0f} million voxels, "
                         f"at most {max_voxels / 1e6:.0f} million are read)")
    multiframe = len(items) == 1 and int(items[0].get("NumberOfFrames", 1) or 1) > 1
    missing = [] if multiframe else [k for k in _GEOMETRY if any(k not in ds for ds in items)]
    if missing:
        raise ValueError(f"cannot form a volume: the images do not say where they are ({', '.join(missing)} missing)")
    resampling = None
    try:
        if multiframe:
            volume = hd.Image.from_dataset(items[0], copy=False).get_volume(dtype=np.float32)
        else:
            try:
                volume = hd.get_volume_from_series(items, dtype=np.float32)
            except ValueError as e:
                if "not a regularly-spaced volume" not in str(e):
                    raise
                volume, resampling = _regularised(items)
    except _Irregular as e:
        raise ValueError(f"cannot form a volume: Series is not a regularly-spaced volume: {e}") from e
    except Exception as e:  # the headers and pixel data are untrusted input; decoders raise many kinds
        message = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"cannot form a volume: {message}") from e
    except BaseException as e:  # a Rust decoder's panic (pyo3 PanicException) is no Exception
        if type(e).__name__ != "PanicException":
            raise
        raise ValueError(f"cannot form a volume: the pixel data cannot be decoded ({type(e).__name__})") from e
    if volume.array.ndim != 3:
        raise ValueError("cannot form a volume: the series is not a grayscale image series")
    return volume, resampling


class _Irregular(Exception):
    """Slice positions too far from any regular grid (the message says how)."""


def _minimax_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(intercept, slope, max |residual|) of the line minimising the largest residual of y over x."""
    from scipy.optimize import linprog

    if len(x) < 3:
        slope = float((y[-1] - y[0]) / (x[-1] - x[0]))
        return float(y[0] - slope * x[0]), slope, 0.0
    ones = np.ones_like(x)  # variables (intercept, slope, t): minimise t with |y - a - b x| <= t
    a_ub = np.block([[-ones[:, None], -x[:, None], -ones[:, None]], [ones[:, None], x[:, None], -ones[:, None]]])
    b_ub = np.concatenate([-y, y])
    fit = linprog([0, 0, 1], A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * 3, method="highs")
    if not fit.success:  # cannot happen for finite input; fall back to least squares
        slope, intercept = np.polyfit(x, y, 1)
    else:
        intercept, slope = fit.x[:2]
    return float(intercept), float(slope), float(np.abs(y - intercept - slope * x).max())


def _regularised(items: list[Dataset]) -> tuple[hd.Volume, Resampling]:
    """A series whose slices sit near a regular grid, resampled onto it along the slice normal.

    One grid slice per source slice, in order along the normal; the grid is the one that
    minimises the largest distance of a slice from its grid position. Refused (``_Irregular``)
    when that distance exceeds ``SLICE_DEVIATION_TOLERANCE`` of the slice thickness, when the
    positions fit a regular grid with missing slices, or when two slices share a position.
    highdicom sorts and decodes the slices (its spacing tolerance set to accept these
    positions) and checks that they stack along the normal.
    """
    orientation = [float(v) for v in items[0].ImageOrientationPatient]
    # the slice direction highdicom stacks volumes along
    normal = hd.spatial.get_normal_vector(orientation, index_convention=hd.spatial.VOLUME_INDEX_CONVENTION)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in items])
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    d = distances[order]
    steps = np.diff(d)
    if len(d) < 2 or steps.min() <= 1e-3:
        raise _Irregular("two slices at the same position (duplicates with different content)")
    ranks = np.arange(len(d), dtype=np.float64)
    intercept, spacing, deviation = _minimax_line(ranks, d)
    typical = float(np.median(steps))
    increments = np.round(steps / typical)
    if (increments != 1).any():  # a grid with holes, or with two images in one slot, may fit better
        slots = np.concatenate([[0.0], np.cumsum(increments)])
        _, _, slot_deviation = _minimax_line(slots, d)
        if slot_deviation < deviation / 2:
            if (increments == 0).any():
                raise _Irregular(f"an extra image {steps.min():.3g} mm from its neighbour where slices are "
                                 f"{typical:.3g} mm apart (duplicates with different content)")
            raise _Irregular(f"{int(slots[-1]) + 1 - len(d)} slice(s) missing (a gap of {steps.max():.3g} mm "
                             f"where slices are {typical:.3g} mm apart)")
    try:
        thickness = float(items[0].get("SliceThickness") or 0.0)
    except (TypeError, ValueError):
        thickness = 0.0
    thickness = min(thickness, spacing) if thickness > 0 else spacing
    tolerance = SLICE_DEVIATION_TOLERANCE * thickness
    if deviation > tolerance + 1e-3:
        if steps.min() < 0.25 * typical:
            raise _Irregular(f"two slices {steps.min():.3g} mm apart where slices are {typical:.3g} mm apart "
                             "(duplicates with different content)")
        raise _Irregular(f"slice positions deviate from a regular {spacing:.3g} mm grid by up to {deviation:.3g} mm, "
                         f"more than half the slice thickness ({tolerance:.3g} mm)")
    spread = float(np.abs(steps - (d[-1] - d[0]) / (len(d) - 1)).max())
    volume = hd.get_volume_from_series(items, dtype=np.float32, atol=spread + 1e-3)
    grid = intercept + spacing * ranks
    below = np.clip(np.searchsorted(d, grid, side="right") - 1, 0, len(d) - 2)
    weight = np.clip((grid - d[below]) / (d[below + 1] - d[below]), 0.0, 1.0).astype(np.float32)
    source = volume.array
    array = np.empty_like(source)  # slice by slice: no full-volume temporaries
    for k, (b, w) in enumerate(zip(below, weight)):
        array[k] = source[b] + w * (source[b + 1] - source[b])
    first = positions[order[0]] + (grid[0] - d[0]) * normal
    regular = hd.Volume.from_attributes(
        array=array,
        image_position=first.tolist(),
        image_orientation=orientation,
        pixel_spacing=[float(v) for v in items[0].PixelSpacing],
        spacing_between_slices=spacing,
        coordinate_system="PATIENT",
        frame_of_reference_uid=volume.frame_of_reference_uid,
    )
    return regular, Resampling(
        max_deviation_mm=deviation,
        tolerance_mm=tolerance,
        spacing_mm=spacing,
        slice_instances=tuple(str(items[i].SOPInstanceUID) for i in order),
    )


def _on_source_planes(source_datasets: Sequence[Dataset], volume: hd.Volume, atol_mm: float = 0.01) -> bool:
    """Whether every slice of ``volume`` starts at the position of a single-frame source image
    (always true for a multi-frame source, which is never resampled)."""
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in source_datasets
                          if "ImagePositionPatient" in ds], dtype=np.float64)
    if len(positions) == 0:
        return True
    affine = volume.affine  # voxel (slice, row, column) -> patient mm
    starts = affine[:3, 3] + np.arange(volume.spatial_shape[0])[:, None] * affine[:3, 0]
    nearest = np.linalg.norm(starts[:, None, :] - positions[None, :, :], axis=2).min(axis=1)
    return bool(nearest.max() <= atol_mm)


def volume_to_nifti(volume: hd.Volume) -> nib.Nifti1Image:
    """Convert a volume to NIfTI: same array and axes, affine converted from LPS to RAS."""
    if volume.array.ndim != 3:
        raise ValueError("only volumes without channel dimensions can be converted to NIfTI")
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    affine = volume.get_affine("RAS")
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    return image


# --- writing a demo MR series ------------------------------------------------------------


def _ds(value: float) -> str:
    """A DS string (at most 16 characters) for a float."""
    return format_number_as_ds(float(value))


def _quantise(array: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
    """Map float values to int16 stored values; returns (stored, slope, intercept, rescaled)."""
    lo, hi = float(array.min()), float(array.max())
    integral = np.array_equal(array, np.round(array))
    if integral and lo >= -32768 and hi <= 32767:
        return np.round(array).astype(np.int16), 1.0, 0.0, False
    # The DS strings are what a reader sees, so quantise with their parsed values.
    intercept = float(_ds(lo))
    slope = float(_ds((hi - intercept) / 32767.0)) if hi > intercept else 1.0
    stored = np.clip(np.round((array - intercept) / slope), -32768, 32767)
    return stored.astype(np.int16), slope, intercept, True


def write_mr_series(
    image: nib.Nifti1Image,
    out_dir: Path,
    *,
    patient_id: str,
    patient_name: str,
    study_instance_uid: str | None = None,
    series_description: str = "T1 3D",
    series_number: int = 1,
    accession_number: str = "",
    study_description: str = "MR BRAIN",
) -> list[Path]:
    """Write a NIfTI volume as a single-frame MR Image Storage series of axial slices.

    The voxel grid is permuted/flipped (never resampled) to the closest standard axial
    layout (slices head to foot, rows anterior to posterior, columns right to left),
    which is also the order ``read_series`` gives back.
    Returns the written paths in slice order.
    """
    data = np.asarray(image.get_fdata(dtype=np.float64))
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {image.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError("image contains non-finite values")
    affine = np.asarray(image.affine, dtype=np.float64)
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-4):
        raise ValueError("the affine is not orthogonal (sheared); DICOM cannot represent it")

    frame_of_reference_uid = hd.UID()
    volume = hd.Volume(
        array=data,
        affine=affine,
        coordinate_system="PATIENT",
        frame_of_reference_uid=frame_of_reference_uid,
        from_reference_convention="RAS",
    )
    volume = volume.to_patient_orientation("FPL").ensure_handedness("RIGHT_HANDED", flip_axis=0)
    stored, slope, intercept, rescaled = _quantise(volume.array)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_instance_uid = study_instance_uid or hd.UID()
    series_instance_uid = hd.UID()
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    orientation = [_ds(v) for v in volume.direction_cosines]
    row_spacing, column_spacing = volume.pixel_spacing
    slice_spacing = volume.spacing_between_slices
    cosines = np.array(volume.direction_cosines)
    normal = np.cross(cosines[:3], cosines[3:])
    values = volume.array
    center = float(np.percentile(values, 50) + np.percentile(values, 99.5)) / 2.0
    width = max(float(np.percentile(values, 99.5) - np.percentile(values, 0.5)), 1.0)

    paths = []
    for index in range(stored.shape[0]):
        position = volume.affine[:3, :3] @ np.array([index, 0.0, 0.0]) + volume.affine[:3, 3]
        sop_instance_uid = hd.UID()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_instance_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_instance_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AccessionNumber = accession_number
        ds.Modality = "MR"
        ds.Manufacturer = _MANUFACTURER
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.ManufacturerModelName = f"{ALGORITHM_NAME} demo"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.BodyPartExamined = "BRAIN"
        ds.ScanningSequence = ["GR", "IR"]
        ds.SequenceVariant = ["SP", "MP"]
        ds.ScanOptions = ""  # type 2; no option from the defined terms applies
        ds.MRAcquisitionType = "3D"
        ds.SequenceName = "*tfl3d1"
        ds.AngioFlag = "N"
        ds.SliceThickness = _ds(slice_spacing)
        ds.RepetitionTime = "2300"
        ds.EchoTime = "2.98"
        ds.InversionTime = "900"
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = "123.2"
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.MagneticFieldStrength = "3"
        ds.SpacingBetweenSlices = _ds(slice_spacing)
        ds.EchoTrainLength = "1"
        ds.FlipAngle = "9"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_instance_uid
        ds.SeriesInstanceUID = series_instance_uid
        ds.StudyID = "1"
        ds.SeriesNumber = str(series_number)
        ds.AcquisitionNumber = "1"
        ds.InstanceNumber = str(index + 1)
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = orientation
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(position @ normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.PixelSpacing = [_ds(row_spacing), _ds(column_spacing)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = _ds(center)
        ds.WindowWidth = _ds(width)
        if rescaled:
            ds.RescaleIntercept = _ds(intercept)
            ds.RescaleSlope = _ds(slope)
            ds.RescaleType = "US"
        ds.PixelData = np.ascontiguousarray(stored[index]).astype("<i2").tobytes()
        path = out_dir / f"MR_{index + 1:04d}_{sop_instance_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- helpers for results -----------------------------------------------------------------


def _check_study(source_datasets: Sequence[Dataset]) -> None:
    if not source_datasets:
        raise ValueError("no source datasets given")
    study = {ds.StudyInstanceUID for ds in source_datasets}
    if len(study) != 1:
        raise ValueError("source datasets belong to more than one study")


def _coding_schemes() -> list[CodingSchemeIdentificationItem]:
    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name=f"{ALGORITHM_NAME} local codes",
            responsible_organization=ALGORITHM_NAME,
        )
    ]


def _observation_context(algorithm_version: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[ALGORITHM_NAME, algorithm_version]),
        name=ALGORITHM_NAME,
        manufacturer_name=_MANUFACTURER,
        model_name=ALGORITHM_NAME,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _num(name: Code, value: float, unit: Code) -> list[hd.sr.Measurement]:
    if value is None or not math.isfinite(float(value)):
        return []
    return [hd.sr.Measurement(name=name, value=float(value), unit=unit)]


def _sr(
    source_datasets: Sequence[Dataset],
    report: hd.sr.MeasurementReport,
    evidence: Sequence[Dataset],
    series_description: str,
    algorithm_version: str,
) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        evidence=[*source_datasets, *evidence],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER_SR,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=algorithm_version,
        coding_schemes=_coding_schemes(),
    )


def _write_atomically(objects: Sequence[tuple[str, Dataset]], out_dir: Path) -> list[Path]:
    """Save (prefix, dataset) pairs to ``out_dir`` via a temporary folder; all or nothing."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".brainmirror-", dir=out_dir))
    moved: list[Path] = []
    try:
        staged = []
        for prefix, ds in objects:
            name = f"{prefix}_{ds.SOPInstanceUID}.dcm"
            ds.save_as(tmp / name, enforce_file_format=True)
            staged.append(name)
        for name in staged:
            os.replace(tmp / name, out_dir / name)
            moved.append(out_dir / name)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return moved


# --- SEG ---------------------------------------------------------------------------------


def _segmentation(
    source_datasets: Sequence[Dataset],
    volume: hd.Volume,
    assessment: Assessment,
    findings: Sequence[Finding],
    tracking_uids: dict[int, str],
    algorithm_version: str,
    resampling: Resampling | None = None,
) -> hd.seg.Segmentation:
    """The findings as a binary SEG on the source instances.

    A regular series: highdicom maps the volume onto its instances. A resampled one: grid slice
    i is written as the frame of the source instance it was made from (at most
    ``Resampling.tolerance_mm`` away along the normal), so every frame sits on a source image.
    """
    labels = [f.label for f in findings]
    if labels != list(range(1, len(labels) + 1)):
        raise ValueError(f"finding labels must be 1..N without gaps, got {labels}")
    segmentation = np.asarray(assessment.segmentation)
    labelmap = np.where(np.isin(segmentation, labels), segmentation, 0).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.DCM.ArtificialIntelligence, version=algorithm_version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=f.label,
            segment_label=f"Anomaly {f.label}",
            segmented_property_category=CODE_SEG_CATEGORY,
            segmented_property_type=CODE_SEG_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uids[f.label],
            tracking_id=f"{ALGORITHM_NAME} finding {f.label}",
            anatomic_regions=[codes.SCT.Brain],
        )
        for f in findings
    ]
    if resampling is None:
        sources, pixels = list(source_datasets), volume.with_array(labelmap)
    else:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
        sources, pixels = [by_uid[uid] for uid in resampling.slice_instances], labelmap
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER_SEG,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=algorithm_version,
        device_serial_number="0",
        series_description=f"{ALGORITHM_NAME} anomalies - {NOT_FOR_CLINICAL_USE}",
        content_description=f"{ALGORITHM_NAME} anomaly regions - {NOT_FOR_CLINICAL_USE}",
        content_label="ANOMALIES",
    )


# --- key images --------------------------------------------------------------------------


def _orientation_letter(vector: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(vector)))
    return (("R", "L"), ("A", "P"), ("F", "H"))[axis][int(vector[axis] > 0)]


def _window(array: np.ndarray) -> tuple[float, float]:
    """Grey window from percentiles of the (roughly) brain/foreground voxels."""
    values = array[np.isfinite(array)]
    if values.size == 0:
        return 0.0, 1.0
    foreground = values[values > 0.1 * np.percentile(values, 99)]
    if foreground.size < 100:
        foreground = values
    lo, hi = np.percentile(foreground, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _render_slice(
    volume: hd.Volume, assessment: Assessment, index: int, window: tuple[float, float]
) -> np.ndarray:
    """RGB uint8 key image of one native slice: grey image, anomaly overlay, contours, text."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    image = volume.array[index]
    scores = np.asarray(assessment.anomaly_map[index], dtype=np.float32)
    labels = np.asarray(assessment.segmentation[index])
    row_spacing, column_spacing = volume.pixel_spacing
    height_mm, width_mm = image.shape[0] * row_spacing, image.shape[1] * column_spacing
    scale = KEY_IMAGE_SIZE / max(height_mm, width_mm)
    width_px = max(int(round(width_mm * scale)), 64)
    height_px = max(int(round(height_mm * scale)), 64)

    dpi = 100
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor="black")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    axes.imshow(
        np.nan_to_num(image), cmap="gray", vmin=window[0], vmax=window[1],
        aspect="auto", interpolation="bilinear",
    )
    overlay = np.isfinite(scores) & (scores > assessment.voxel_threshold)
    if overlay.any():
        finite = np.asarray(assessment.anomaly_map)[np.isfinite(assessment.anomaly_map)]
        top = float(finite.max()) if finite.size else assessment.voxel_threshold
        low = assessment.voxel_threshold
        norm = Normalize(vmin=low, vmax=max(top, low + 1e-6))
        axes.imshow(
            np.ma.masked_where(~overlay, scores), cmap="autumn", norm=norm, alpha=0.6,
            aspect="auto", interpolation="nearest",
        )
    if (labels > 0).any() and min(labels.shape) > 1:
        axes.contour(labels > 0, levels=[0.5], colors="cyan", linewidths=1.0)
    axes.set_xlim(-0.5, image.shape[1] - 0.5)
    axes.set_ylim(image.shape[0] - 0.5, -0.5)
    text = (
        f"{ALGORITHM_NAME} \u2013 {NOT_FOR_CLINICAL_USE}, score {assessment.study_score:.3g} "
        f"(threshold {assessment.threshold:.3g})\n"
        f"{assessment.verdict}, slice {index + 1}/{volume.spatial_shape[0]}"
    )
    axes.text(
        0.01, 0.99, text, transform=axes.transAxes, va="top", ha="left", fontsize=7,
        color="yellow", bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "edgecolor": "none"},
    )
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def _slice_datasets(
    source_datasets: Sequence[Dataset], volume: hd.Volume, resampling: Resampling | None = None
) -> dict[int, tuple[Dataset, int | None]]:
    """Map native slice index to (source dataset, frame number or None for single-frame)."""
    if resampling is not None:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
        return {i: (by_uid[uid], None) for i, uid in enumerate(resampling.slice_instances)}

    def index_of(position: Sequence[float]) -> int:
        point = np.array([[float(v) for v in position]])
        return int(volume.map_reference_to_indices(point, round_output=True)[0][0])

    mapping: dict[int, tuple[Dataset, int | None]] = {}
    for ds in source_datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
            for number, frame in enumerate(ds.get("PerFrameFunctionalGroupsSequence", []), start=1):
                plane = frame.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
                if plane:
                    mapping.setdefault(index_of(plane[0].ImagePositionPatient), (ds, number))
        elif "ImagePositionPatient" in ds:
            mapping[index_of(ds.ImagePositionPatient)] = (ds, None)
    return {i: v for i, v in mapping.items() if 0 <= i < volume.spatial_shape[0]}


def _key_slices(assessment: Assessment, n_slices: int) -> list[int]:
    scores = np.asarray(assessment.slice_scores, dtype=np.float64)
    count = MAX_KEY_IMAGES if assessment.is_abnormal else 1
    finite = np.flatnonzero(np.isfinite(scores))
    if finite.size == 0:
        return [n_slices // 2]
    order = finite[np.argsort(-scores[finite], kind="stable")]
    return [int(i) for i in order[:count]]


def _key_images(
    source_datasets: Sequence[Dataset],
    volume: hd.Volume,
    assessment: Assessment,
    algorithm_version: str,
    resampling: Resampling | None = None,
) -> list[Dataset]:
    window = _window(volume.array)
    by_slice = _slice_datasets(source_datasets, volume, resampling)
    series_instance_uid = hd.UID()
    row_direction, column_direction = volume.affine[:3, 2], volume.affine[:3, 1]
    orientation = (_orientation_letter(row_direction), _orientation_letter(column_direction))
    images = []
    for number, index in enumerate(_key_slices(assessment, volume.spatial_shape[0]), start=1):
        reference, frame_number = by_slice.get(index, (source_datasets[0], None))
        pixels = _render_slice(volume, assessment, index, window)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=reference,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=SERIES_NUMBER_KEY,
            sop_instance_uid=hd.UID(),
            instance_number=number,
            manufacturer=_MANUFACTURER,
            patient_orientation=orientation,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=f"{ALGORITHM_NAME} key images - {NOT_FOR_CLINICAL_USE}",
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=algorithm_version,
        )
        sc.BurnedInAnnotation = "YES"
        # An unpaired body part makes (type 2C) Laterality not required.
        sc.BodyPartExamined = reference.get("BodyPartExamined") or "BRAIN"
        resampled = "" if resampling is None else " (resampled onto a regular grid)"
        sc.DerivationDescription = (
            f"{ALGORITHM_NAME} anomaly overlay on native slice {index}{resampled} - {NOT_FOR_CLINICAL_USE}"
        )
        if index in by_slice:
            item = Dataset()
            item.ReferencedSOPClassUID = reference.SOPClassUID
            item.ReferencedSOPInstanceUID = reference.SOPInstanceUID
            if frame_number is not None:
                item.ReferencedFrameNumber = frame_number
            sc.SourceImageSequence = [item]
        images.append(sc)
    return images


# --- SR ----------------------------------------------------------------------------------


def _series_items(
    series: SeriesReport | None, assessed: bool = True
) -> tuple[list[hd.sr.Measurement], list[hd.sr.TextContentItem]]:
    """SR items on the series: which one, its contrast family, resampling, brain coverage (and,
    when ``assessed``, the region the verdict covers)."""
    if series is None:
        return [], []
    number = f"series {series.number}" if series.number else "series without a number"
    texts = [
        _text(CODE_SERIES, f"{number}: {series.description or '(no description)'}"),
        _text(CODE_CONTRAST, series.contrast),
    ]
    measurements = []
    if series.resampling is not None:
        r = series.resampling
        measurements += _num(CODE_SLICE_DEVIATION, r.max_deviation_mm, UNIT_MM)
        texts.append(_text(CODE_RESAMPLED, (
            f"yes: slice positions deviated from a regular {r.spacing_mm:.4g} mm grid by up to "
            f"{r.max_deviation_mm:.3g} mm (at most {r.tolerance_mm:.3g} mm, half the smaller of slice thickness "
            "and spacing, is accepted) and were resampled onto it along the slice normal")))
    if series.coverage is not None:
        measurements += _num(CODE_COVERAGE, series.coverage, UNIT_RATIO)
        percent = 100.0 * series.coverage
        if assessed and series.coverage >= WHOLE_BRAIN_COVERAGE:
            region = (f"the whole brain ({percent:.0f} % of a typical brain in the field of view; gaps between "
                      "slices count as covered)")
            texts.append(_text(CODE_REGION, region))
        elif assessed:
            region = (f"partial coverage: the {percent:.0f} % of a typical brain inside the field of view only "
                      f"(gaps between slices count as covered); the other {100.0 - percent:.0f} % is outside it and "
                      "NOT assessed (neither normal nor abnormal); the study FPR was calibrated on whole brains")
            texts.append(_text(CODE_REGION, region))
    return measurements, texts


def _study_group(
    assessment: Assessment, algorithm: hd.sr.AlgorithmIdentification, series: SeriesReport | None = None
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    series_measurements, series_texts = _series_items(series)
    measurements = [
        *_num(CODE_ANOMALY_SCORE, assessment.study_score, UNIT_NONE),
        *_num(CODE_SCORE_THRESHOLD, assessment.threshold, UNIT_NONE),
        *_num(CODE_STUDY_FPR, assessment.false_positive_rate, UNIT_RATIO),
        *_num(CODE_VOXEL_THRESHOLD, assessment.voxel_threshold, UNIT_NONE),
        *_num(CODE_VOXEL_FPR, assessment.voxel_false_positive_rate, UNIT_RATIO),
        *series_measurements,
    ]
    verdict = CODE_ABNORMAL if assessment.is_abnormal else CODE_NORMAL
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"{ALGORITHM_NAME} study assessment"
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(CODE_FINDING, verdict)],
    )
    content = group[0].ContentSequence
    content.extend(series_texts)
    content.append(_text(CODE_CONFIGURATION, assessment.configuration))
    if assessment.brain_extraction:
        content.append(_text(CODE_BRAIN_EXTRACTION, assessment.brain_extraction))
    if assessment.model_version:
        content.append(_text(CODE_MODEL_VERSION, assessment.model_version))
    for note in assessment.notes:
        content.append(_text(CODE_NOTE, note))
    content.append(_text(CODE_DISCLAIMER, _DISCLAIMER))
    return group


def _finding_group(
    finding: Finding,
    seg: hd.seg.Segmentation,
    tracking_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    laterality = LATERALITY.get(finding.hemisphere.lower())
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"{ALGORITHM_NAME} finding {finding.label}"
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=finding.label,
            source_series=hd.sr.SourceSeriesForSegmentation(
                seg.ReferencedSeriesSequence[0].SeriesInstanceUID
            ),
        ),
        finding_category=CODE_SEG_CATEGORY,
        finding_type=CODE_SEG_TYPE,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Brain, laterality=laterality)],
        measurements=[
            *_num(codes.SCT.Volume, finding.volume_ml, UNIT_ML),
            *_num(CODE_PEAK_SCORE, finding.peak_score, UNIT_NONE),
        ],
    )
    first, last = finding.slice_range
    group[0].ContentSequence.append(
        _text(
            CODE_SLICE_RANGE,
            f"native slices {first}-{last} (0-based, inclusive); hemisphere {finding.hemisphere}",
        )
    )
    return group


def write_assessment(
    source_datasets: Sequence[Dataset],
    volume: hd.Volume,
    assessment: Assessment,
    out_dir: Path,
    *,
    algorithm_version: str,
    series: SeriesReport | None = None,
) -> list[Path]:
    """Write SEG (when there are findings), key images and a TID 1500 SR into the source study.

    ``volume`` is the one ``load_series`` built from ``source_datasets``; the native maps of
    ``assessment`` are on its grid. ``series`` adds the series, its contrast family, the
    resampling (which the SEG and key images then follow) and the brain coverage to the SR.
    All files appear in ``out_dir`` or none do.
    """
    resampling = series.resampling if series is not None else None
    if resampling is not None and len(resampling.slice_instances) != volume.spatial_shape[0]:
        raise ValueError("the resampling does not describe this volume (slice counts differ)")
    if resampling is None and not _on_source_planes(source_datasets, volume):
        raise ValueError("the volume's slices do not lie on the source images: a resampled series needs "
                         "its Resampling (from load_series) in `series`")
    _check_study(source_datasets)
    if assessment.verdict not in ("abnormal", "normal"):
        raise ValueError(f"unknown verdict {assessment.verdict!r}")
    shape = volume.spatial_shape
    for name in ("anomaly_map", "segmentation"):
        if np.shape(getattr(assessment, name)) != shape:
            got = np.shape(getattr(assessment, name))
            raise ValueError(f"assessment.{name} has shape {got}, the volume {shape}")
    if len(assessment.slice_scores) != shape[0]:
        got = len(assessment.slice_scores)
        raise ValueError(f"assessment.slice_scores has {got} values, the volume {shape[0]} slices")
    if not math.isfinite(assessment.study_score):
        raise ValueError("assessment.study_score is not finite")

    findings = sorted(assessment.findings, key=lambda f: f.label)
    tracking_uids = {f.label: hd.UID() for f in findings}
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=algorithm_version, family=codes.DCM.ArtificialIntelligence
    )
    seg = None
    if findings:
        seg = _segmentation(
            source_datasets, volume, assessment, findings, tracking_uids, algorithm_version, resampling
        )
    key_images = _key_images(source_datasets, volume, assessment, algorithm_version, resampling)

    groups: list = [_study_group(assessment, algorithm, series)]
    if seg is not None:
        groups += [_finding_group(f, seg, tracking_uids[f.label], algorithm) for f in findings]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm_version),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    sr = _sr(
        source_datasets,
        report,
        [*([seg] if seg is not None else []), *key_images],
        f"{ALGORITHM_NAME} report - {NOT_FOR_CLINICAL_USE}",
        algorithm_version,
    )
    objects: list[tuple[str, Dataset]] = [("SR", sr)]
    if seg is not None:
        objects.append(("SEG", seg))
    objects += [("KEY", image) for image in key_images]
    return _write_atomically(objects, out_dir)


def write_not_assessed(
    source_datasets: Sequence[Dataset],
    outcome: NotAssessed,
    out_dir: Path,
    *,
    algorithm_version: str,
    series: SeriesReport | None = None,
) -> list[Path]:
    """Write one TID 1500 SR stating the study was not assessed, and why (atomically).

    ``series``, when a series was chosen, adds what is known of it (``_series_items``).
    """
    _check_study(source_datasets)
    series_measurements, series_texts = _series_items(series, assessed=False)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"{ALGORITHM_NAME} study assessment"
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=ALGORITHM_NAME, version=algorithm_version, family=codes.DCM.ArtificialIntelligence
        ),
        measurements=series_measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(CODE_FINDING, CODE_NOT_ASSESSED)],
    )
    content = group[0].ContentSequence
    content.extend(series_texts)
    content.append(_text(CODE_REASON, outcome.reason))
    content.append(_text(CODE_REASON_CODE, outcome.code))
    content.append(_text(CODE_DISCLAIMER, _DISCLAIMER))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm_version),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[group],
    )
    sr = _sr(
        source_datasets,
        report,
        [],
        f"{ALGORITHM_NAME} NOT ASSESSED - {NOT_FOR_CLINICAL_USE}",
        algorithm_version,
    )
    return _write_atomically([("SR", sr)], out_dir)


# --- validation --------------------------------------------------------------------------


def validate(path: Path) -> list[str]:
    """Run ``dciodvfy`` on one file and return its error lines."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        raise RuntimeError("dciodvfy (dicom3tools) is not installed; apt-get install dicom3tools")
    result = subprocess.run(
        [executable, str(path)], capture_output=True, text=True, errors="replace", check=False
    )
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if "Error" in line]
