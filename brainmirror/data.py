"""Finding studies on disk: NIfTI files and DICOM series, recursively (flat, BIDS-like, IXI)."""

from __future__ import annotations

import logging
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, MediaStorageDirectoryStorage

log = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MASK_WORDS = ("seg", "mask", "label", "lesion", "roi")  # files with these words are not images


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def is_mask_name(path: Path) -> bool:
    stem = path.name.lower().split(".")[0]
    return any(word in stem.replace("-", "_").split("_") for word in MASK_WORDS)


# --- DICOM input: one file, a series, a folder ---------------------------------------------
#
# Everything below reads untrusted files: a file that is not a usable DICOM instance raises
# DicomFileError (a ValueError) from read_dicom_file and is skipped, with a count per reason,
# by the folder readers. Nothing here writes to the input.

PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float, Double Float, Pixel Data
DEFER_SIZE = 16 * 1024  # bytes: larger values (pixel data) are read from the file when first used
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
FILE_PROBLEMS = ("not DICOM", "unreadable", "DICOMDIR", "incomplete", "truncated")


class DicomFileError(ValueError):
    """A file that is not a usable DICOM instance; ``kind`` (one of ``FILE_PROBLEMS``) says why."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_dicom_file(path: Path | str, *, defer_size: int | None = DEFER_SIZE) -> pydicom.Dataset:
    """Read and check one DICOM Part 10 file; raise ``DicomFileError`` if it is not usable.

    Rejected: files that are not DICOM Part 10 (no ``DICM`` preamble), that pydicom cannot
    parse or whose values it cannot convert (pydicom converts lazily; here every element but
    the pixel data is converted once, so a malformed value fails now and not in a later step),
    DICOMDIR index files (the instances they list are found as files), instances without the
    SOP Class/SOP Instance/Study/Series UIDs, and images whose native pixel data is shorter
    than their header says (a truncated copy). Values longer than ``defer_size`` bytes (the
    pixel data) are read from the file when first used, so a loaded study costs its headers.
    """
    path = Path(path)
    with warnings.catch_warnings():  # pydicom warns about odd values, quoting them: not in our logs
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=False, defer_size=defer_size)
        except InvalidDicomError as error:
            raise DicomFileError("not DICOM", f"not a DICOM file: {_line(error)}") from error
        except Exception as error:  # untrusted bytes: pydicom raises many kinds
            raise DicomFileError("unreadable", f"unreadable DICOM: {_line(error)}") from error
        try:
            _convert(ds.file_meta)
            _convert(ds)
        except Exception as error:
            raise DicomFileError("unreadable", f"unreadable DICOM value: {_line(error)}") from error
        sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
        if sop_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
            raise DicomFileError("DICOMDIR", "a DICOMDIR index file (the files it lists are read directly)")
        missing = [k for k in _REQUIRED_UIDS if not isinstance(ds.get(k), str) or not ds.get(k)]
        if missing:
            raise DicomFileError("incomplete", f"no {', '.join(missing)}")
        _check_pixel_length(ds, path)
    return ds


def _line(error: Exception) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def _convert(ds: pydicom.Dataset, depth: int = 0) -> None:
    """Convert every raw element but the pixel data (recursing into sequences; deferred values are read)."""
    if depth > 16:
        raise ValueError("sequences nested too deeply")
    for tag in list(ds.keys()):
        if tag in PIXEL_DATA_TAGS:
            continue
        element = ds[tag]
        if element.VR == "SQ":
            for item in element.value:
                _convert(item, depth + 1)


def _check_pixel_length(ds: pydicom.Dataset, path: Path) -> None:
    """Raise DicomFileError when native (uncompressed) pixel data is shorter than the header says."""
    if "PixelData" not in ds or ds.file_meta.get("TransferSyntaxUID") is None:
        return
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if not syntax.is_transfer_syntax or syntax.is_compressed:
        return  # encapsulated (or unknown): a truncated stream fails when decoded
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = int(ds.BitsAllocated) * int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError) as error:
        raise DicomFileError("incomplete", f"image without a usable pixel description: {_line(error)}") from error
    expected = (bits * frames + 7) // 8
    raw = ds.get_item("PixelData", keep_deferred=True)
    if raw.VR not in (None, "OB", "OW", "OB or OW", "UN"):
        raise DicomFileError("unreadable", f"pixel data with value representation {raw.VR!r}")
    if isinstance(raw, RawDataElement) and raw.value is None:  # deferred: the bytes left in the file
        available = min(raw.length, max(path.stat().st_size - (raw.value_tell or 0), 0))
    else:
        value = ds.PixelData
        available = len(value) if isinstance(value, bytes) else expected
    if available < expected:
        raise DicomFileError("truncated", f"pixel data truncated ({available} of {expected} bytes)")


@dataclass
class DicomFolder:
    """The usable DICOM instances of a folder: files by study, and how many files were skipped why."""

    studies: dict[str, list[Path]] = field(default_factory=dict)  # StudyInstanceUID -> files
    skipped: Counter = field(default_factory=Counter)  # reason -> number of files
    problems: dict[Path, str] = field(default_factory=dict)  # skipped file -> why (not logged: names)

    def summary(self) -> str:
        files = sum(len(paths) for paths in self.studies.values())
        text = f"{files} DICOM file(s) in {len(self.studies)} study(ies)"
        if self.skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
            text += f"; skipped {sum(self.skipped.values())} file(s): {reasons}"
        return text


def _files(root: Path, *, nifti: bool = False) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and (nifti or not is_nifti(p)))


def scan_dicom_folder(root: Path | str) -> DicomFolder:
    """Group the usable DICOM files under ``root`` (recursively) by study, in path order.

    Each file is read and checked as by ``read_dicom_file`` (pixel data not loaded), then let go:
    the memory this takes does not grow with the size of the input. Nothing is logged: file
    names may carry patient names; ``summary()`` says what was found and skipped.
    """
    folder = DicomFolder()
    for path in _files(root, nifti=True):
        try:
            ds = read_dicom_file(path)
        except DicomFileError as error:
            folder.skipped[error.kind] += 1
            folder.problems[path] = str(error)
            continue
        folder.studies.setdefault(str(ds.StudyInstanceUID), []).append(path)
    return folder


def deduplicate(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Drop duplicated instances of one series, keeping the order of the rest.

    The same SOP Instance UID twice (a file copied or sent twice): the first is kept. Several
    single-frame images at the same position and orientation (a re-sent or repeated slice,
    several echoes in one series): the one of the highest AcquisitionNumber (the repeat, as the
    MONAI Deploy loader does), then the lowest EchoNumbers, then the lowest InstanceNumber is
    kept, the same choice at every position, so that a volume never mixes echoes.
    """
    unique: dict[str, pydicom.Dataset] = {}
    for ds in datasets:
        unique.setdefault(str(ds.SOPInstanceUID), ds)
    at: dict[tuple, list[pydicom.Dataset]] = defaultdict(list)
    for ds in unique.values():
        at[_place(ds) or ("unique", str(ds.SOPInstanceUID))].append(ds)
    keep = {id(min(group, key=_preference)) for group in at.values()}
    kept = [ds for ds in unique.values() if id(ds) in keep]
    if len(kept) < len(datasets):
        log.info("Dropped %d duplicated instance(s) of series %s", len(datasets) - len(kept),
                 datasets[0].SeriesInstanceUID)
    return kept


def _place(ds: pydicom.Dataset) -> tuple | None:
    """(position, orientation) of a single-frame image, rounded; None when unknown."""
    try:
        if int(ds.get("NumberOfFrames") or 1) != 1:
            return None
        position = tuple(round(float(v), 2) for v in ds.ImagePositionPatient)
        orientation = tuple(round(float(v), 4) for v in ds.ImageOrientationPatient)
    except (AttributeError, TypeError, ValueError):
        return None
    return (position, orientation) if len(position) == 3 and len(orientation) == 6 else None


def _preference(ds: pydicom.Dataset) -> tuple[float, float, float]:
    def number(keyword: str, default: float) -> float:
        try:
            return float(ds.get(keyword, default))
        except (TypeError, ValueError):
            return default
    return (-number("AcquisitionNumber", -1), number("EchoNumbers", 0), number("InstanceNumber", 0))


def header_view(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The header of an image as rules written for single-frame images see it.

    A single-frame image is returned as is. For an enhanced multi-frame image, a new dataset
    (the pixel data left out, nothing read from the file) with the attributes of the shared and
    then the first frame's functional groups (ImageOrientationPatient, PixelSpacing, ...) added
    at top level where absent there. The image itself is not changed.
    """
    groups = [ds.get(k) for k in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")]
    if not any(groups):
        return ds
    view = pydicom.Dataset()
    for tag in ds.keys():
        if tag not in PIXEL_DATA_TAGS:
            view.add(ds.get_item(tag, keep_deferred=True))
    for sequence in groups:
        for macro in (sequence[0] if sequence else []):  # each functional group macro
            if macro.VR == "SQ" and macro.value:
                for element in macro.value[0]:
                    if element.tag not in view:
                        view.add(element)
    return view


def read_dicom_series(root: Path) -> dict[str, list[pydicom.Dataset]]:
    """Every usable DICOM image under ``root``, grouped by SeriesInstanceUID, duplicates dropped.

    Never raises for a bad file: unusable files are skipped and counted in one log line.
    """
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    skipped: Counter = Counter()
    for path in _files(root):
        try:
            ds = read_dicom_file(path, defer_size=None)
        except DicomFileError as error:
            skipped[error.kind] += 1
            continue
        if "PixelData" in ds:
            series[str(ds.SeriesInstanceUID)].append(ds)
    if skipped:
        log.info("Skipped %d file(s) under %s: %s", sum(skipped.values()), root,
                 ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items())))
    return {uid: deduplicate(datasets) for uid, datasets in series.items()}


def iter_studies(root: Path | str) -> Iterator[tuple[str, nib.Nifti1Image]]:
    """(name, volume) for every NIfTI image and every DICOM series under ``root``."""
    from .dicom import read_series, volume_to_nifti

    root = Path(root)
    if root.is_file() and is_nifti(root):
        yield root.name.split(".")[0], nib.load(str(root))
        return
    for path in sorted(p for p in root.rglob("*") if is_nifti(p) and not is_mask_name(p)):
        yield str(path.relative_to(root)).split(".")[0], nib.load(str(path))
    for uid, datasets in read_dicom_series(root).items():
        try:
            yield f"dicom-{uid}", volume_to_nifti(read_series(datasets))
        except ValueError as error:
            log.warning("skipped DICOM series %s: %s", uid, error)


def find_mask(image_path: Path) -> Path | None:
    """A ground-truth mask beside an image (BraTS ``*_seg``, ``*_mask``, ``*_label``), if any."""
    stem = image_path.name.split(".")[0]
    prefix = stem.rsplit("_", 1)[0] if "_" in stem else stem
    for candidate in sorted(image_path.parent.iterdir()):
        if candidate != image_path and is_nifti(candidate) and is_mask_name(candidate) and candidate.name.startswith(prefix):
            return candidate
    return None
