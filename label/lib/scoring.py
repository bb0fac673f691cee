"""Scoring method ``brainmirror``: assess every unreviewed study ahead of review (results are kept in
the image info under ``brainmirror``, which ``nearest_threshold`` orders by)."""

from __future__ import annotations

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.activelearning import score_unreviewed
from lib.core import Brainmirror


class BrainmirrorScoring(ScoringMethod):
    def __init__(self, core: Brainmirror):
        super().__init__("Assess unreviewed studies with brainmirror (score, verdict) for review ordering")
        self.core = core

    def __call__(self, request, datastore: Datastore):
        scores, errors = score_unreviewed(self.core, datastore)
        return {"scores": scores, "not_assessed": errors, "threshold": self.core.thresholds()["study_threshold"]}
