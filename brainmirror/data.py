"""Finding studies on disk: NIfTI files and DICOM series, recursively (flat, BIDS-like, IXI)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import pydicom

log = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MASK_WORDS = ("seg", "mask", "label", "lesion", "roi")  # files with these words are not images


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def is_mask_name(path: Path) -> bool:
    stem = path.name.lower().split(".")[0]
    return any(word in stem.replace("-", "_").split("_") for word in MASK_WORDS)


def read_dicom_series(root: Path) -> dict[str, list[pydicom.Dataset]]:
    """Every readable DICOM image under ``root``, grouped by SeriesInstanceUID."""
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not is_nifti(p)):
        try:
            ds = pydicom.dcmread(path, force=False)
        except Exception:  # not DICOM, truncated, unreadable: skipped
            continue
        if "PixelData" in ds and "SeriesInstanceUID" in ds:
            series[str(ds.SeriesInstanceUID)].append(ds)
    return dict(series)


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
