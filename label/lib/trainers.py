"""Train task ``calibrate``: recompute the study and voxel thresholds from the studies a radiologist
confirmed normal (``brainmirror.training.calibrate``, healthy studies only) into a new bundle."""

from __future__ import annotations

import logging

import SimpleITK as sitk

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.core import ABNORMAL, Brainmirror, NotAssessed, review_outcome

logger = logging.getLogger(__name__)


def reviewed(datastore: Datastore) -> tuple[dict[str, str], list[str]]:
    """Studies with a final label: the confirmed normals (id -> image uri) and the confirmed abnormals."""
    normals: dict[str, str] = {}
    abnormal: list[str] = []
    for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL)):
        label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
        info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL)
        label = sitk.GetArrayFromImage(sitk.ReadImage(datastore.get_label_uri(label_id, DefaultLabelTag.FINAL)))
        if review_outcome(label, info) == ABNORMAL:
            abnormal.append(image_id)
        else:
            normals[image_id] = datastore.get_image_uri(image_id)
    return normals, abnormal


class Calibrate(TrainTask):
    def __init__(self, core: Brainmirror):
        super().__init__(
            "Recalibrate the study and voxel thresholds on the studies confirmed normal (an empty final label, "
            "or label info review=normal); confirmed abnormal studies are never used. Writes a new bundle "
            "brainmirror-site-<date> beside the shipped one, which is never changed."
        )
        self.core = core

    def config(self):
        return {"study_fpr": 0.0, "voxel_fpr": 0.0}  # 0: keep the shipped bundle's operating points

    def stats(self):
        return self.core.latest_report()

    def __call__(self, request, datastore: Datastore):
        normals, abnormal = reviewed(datastore)
        usable, not_assessed = {}, {}
        for image_id, uri in normals.items():
            try:
                self.core.slices(uri)
                usable[image_id] = uri
            except NotAssessed as error:
                not_assessed[image_id] = str(error)
        logger.info("calibrate: %d confirmed normal (%d usable), %d confirmed abnormal excluded",
                    len(normals), len(usable), len(abnormal))
        report = self.core.calibrate_site(usable, abnormal, not_assessed, datastore.name(),
                                          request.get("study_fpr") or None, request.get("voxel_fpr") or None)
        logger.info("calibrate: report %s", report)
        return report
