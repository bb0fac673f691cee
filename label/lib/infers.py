"""Infer task ``brainmirror``: the anomaly label map of a study, with verdict, score and threshold."""

from __future__ import annotations

import logging
import tempfile
from typing import Any, Dict, Tuple, Union

import nibabel as nib
from fastapi import HTTPException

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.core import Brainmirror, BundleError, NotAssessed

logger = logging.getLogger(__name__)


class BrainmirrorInfer(InferTask):
    """Runs the brainmirror core (``combined`` configuration) with the active bundle."""

    def __init__(self, core: Brainmirror):
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={"anomaly": 1},
            dimension=3,
            description="brainmirror: symmetry-informed anomaly detection in brain MRI (research software, "
            "NOT FOR CLINICAL USE). Label 1 = anomaly regions; the response gives verdict, score and threshold.",
        )
        self.core = core

    def info(self) -> Dict[str, Any]:
        return super().info() | {"bundle": str(self.core.active_bundle())}

    def is_valid(self) -> bool:
        return True

    def get_path(self, validate=True):
        return str(self.core.active_bundle() / "models" / "reconstruction.pt")

    def __call__(self, request) -> Tuple[Union[str, None], Dict]:
        image = request.get("image")
        if not isinstance(image, str):
            raise HTTPException(status_code=422, detail="brainmirror needs an image from the datastore or a file")
        try:
            result = self.core.assess(image)
        except NotAssessed as error:
            logger.warning("brainmirror: not assessed: %s", error)
            raise HTTPException(status_code=422, detail=f"not assessed: {error}") from error
        except BundleError as error:
            logger.error("brainmirror: %s", error)
            raise HTTPException(status_code=503, detail=str(error)) from error
        label = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        nib.save(result.label_image(), label)
        logger.info("brainmirror: %s %s (score %.3f, threshold %.3f)", image, result.summary["verdict"],
                    result.summary["score"], result.summary["threshold"])
        return label, result.summary | {"label_names": {"anomaly": 1}}
