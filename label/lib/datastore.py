"""Datastores: a local folder of NIfTI files and DICOM series, and a PACS (Orthanc) over DICOMweb."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import List, Optional

import nibabel as nib

from brainmirror.data import read_dicom_series
from brainmirror.dicom import read_series, volume_to_nifti
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.datastore.local import LocalDatastore

logger = logging.getLogger(__name__)

EXTENSIONS = ["*.nii.gz", "*.nii"]


def import_dicom_series(folder: Path) -> list[str]:
    """Convert every DICOM series under ``folder`` (once) into ``<folder>/<PatientID>-<uid>.nii.gz``
    on the series' own grid, so MONAI Label and the viewers see it as one image; return new files."""
    written = []
    for uid, datasets in read_dicom_series(folder).items():
        patient = re.sub(r"[^A-Za-z0-9._-]+", "_", str(datasets[0].get("PatientID", "")) or "study")
        target = folder / f"{patient}-{uid.replace('.', '')[-12:]}.nii.gz"
        if target.exists():
            continue
        try:
            image = volume_to_nifti(read_series(datasets))
        except ValueError as error:
            logger.warning("DICOM series %s not imported: %s", uid, error)
            continue
        nib.save(image, target)
        written.append(target.name)
    if written:
        logger.info("imported %d DICOM series as NIfTI: %s", len(written), ", ".join(written))
    return written


def local_datastore(studies: str, auto_reload: bool, read_only: bool) -> LocalDatastore:
    """A LocalDatastore of the NIfTI files in ``studies``, DICOM series under it imported first."""
    if not read_only:
        import_dicom_series(Path(studies))
    return LocalDatastore(studies, extensions=EXTENSIONS, auto_reload=auto_reload, read_only=read_only)


class ReviewedDICOMWebDatastore(DICOMWebDatastore):
    """Images from a PACS over DICOMweb; the radiologists' final labels (reviews) stay in this server's
    cache of the PACS (labels/final), whether empty (confirmed normal) or not.

    MONAI Label's DICOMweb datastore turns a final label into a DICOM SEG on the PACS with dcmqi (a
    binary it downloads) and counts only studies with a SEG there as labelled; an empty label (a
    confirmed normal) cannot be a SEG. brainmirror's own SEG/SR for the PACS are the MAP's job.
    """

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info, label_id: str = "") -> str:
        image_uri = self.get_image_uri(image_id)  # also puts the image in the cache index
        if label_filename.endswith(".bin"):  # OHIF sends the label as raw voxels of the image's grid
            converted = binary_to_image(image_uri, label_filename)
            try:
                return LocalDatastore.save_label(self, image_id, converted, label_tag, label_info)
            finally:
                os.unlink(converted)
        return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        return LocalDatastore.get_label_uri(self, label_id, label_tag)

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return [i for i in LocalDatastore.get_labeled_images(self, label_tag, labels) if i in self.list_images()]

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        labeled = set(LocalDatastore.get_labeled_images(self, label_tag, labels))
        return [i for i in self.list_images() if i not in labeled]

    def datalist(self, full_path=True):
        return LocalDatastore.datalist(self, full_path)
