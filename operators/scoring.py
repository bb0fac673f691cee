"""Scoring: study verdict, slice scores, voxel anomaly map and findings on the native grid."""

from __future__ import annotations

import logging

from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext

from brainmirror.result import NotAssessed

from .common import DetectorProvider, timed

log = logging.getLogger(__name__)

INPUTS = ("canonical", "slices", "maps", "embeddings")


class ScoringOperator(Operator):
    """Scores the study with the calibrated ``configuration``; forwards NotAssessed untouched.

    Named inputs: canonical, slices, maps, embeddings (each may be NotAssessed).
    Named output: assessment (Assessment | NotAssessed).
    """

    def __init__(
        self, fragment: Fragment, *args, detector: DetectorProvider, configuration: str = "combined", **kwargs
    ) -> None:
        self._detector = detector
        self._configuration = configuration
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        for name in INPUTS:
            spec.input(name)
        spec.output("assessment")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        received = {name: op_input.receive(name) for name in INPUTS}
        outcome = next((v for v in received.values() if isinstance(v, NotAssessed)), None)
        if outcome is not None:
            op_output.emit(outcome, "assessment")
            return
        with timed(log, "Scoring"):
            assessment = self._detector.detector.score(*received.values(), configuration=self._configuration)
        op_output.emit(assessment, "assessment")
