"""Active-learning strategy ``nearest_threshold``: the next study to review is the unreviewed one
whose score lies nearest the active study threshold."""

from __future__ import annotations

import logging

from fastapi import HTTPException

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy

from lib.core import INFO_KEY, Brainmirror, BundleError

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "Unreviewed studies (no final label), nearest the study threshold first: |score - threshold| "
    "ascending. The threshold is a high quantile of the scores of studies confirmed normal, so a "
    "confirmation near it is the one that changes the recalibrated threshold; studies far below are "
    "confidently normal and those far above confidently abnormal. Unscored studies are assessed first."
)


def score_unreviewed(core: Brainmirror, datastore: Datastore) -> tuple[dict[str, float], dict[str, str]]:
    """Scores of the studies without a final label (assessing those not yet scored), and the
    studies that cannot be assessed with why."""
    scores: dict[str, float] = {}
    errors: dict[str, str] = {}
    for image_id in sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL)):
        cached = datastore.get_image_info(image_id).get(INFO_KEY)
        summary = core.score(datastore.get_image_uri(image_id), cached)
        if summary is not cached:
            datastore.update_image_info(image_id, {INFO_KEY: summary})
        if "error" in summary:
            errors[image_id] = summary["error"]
        else:
            scores[image_id] = summary["score"]
    return scores, errors


class NearestThreshold(Strategy):
    def __init__(self, core: Brainmirror):
        super().__init__(DESCRIPTION)
        self.core = core

    def __call__(self, request, datastore: Datastore):
        from lib.core import review_order

        try:
            scores, errors = score_unreviewed(self.core, datastore)
            threshold = self.core.thresholds()["study_threshold"]
        except BundleError as error:
            raise HTTPException(status_code=503, detail=str(error)) from error
        queue = review_order(scores, threshold)
        if not queue:
            logger.info("nearest_threshold: nothing left to review (%d not assessable)", len(errors))
            return None
        first = queue[0]
        logger.info("nearest_threshold: next %s (score %.3f, threshold %.3f)", first["id"], first["score"], threshold)
        return {"id": first["id"], "score": first["score"], "threshold": threshold, "distance": first["distance"],
                "queue": queue, "not_assessed": errors}
