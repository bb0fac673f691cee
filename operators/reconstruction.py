"""Reconstruction: mirror-informed masked reconstruction and difference maps of each slice."""

from __future__ import annotations

import logging

from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext

from brainmirror.result import NotAssessed

from .common import DetectorProvider, timed

log = logging.getLogger(__name__)


class ReconstructionOperator(Operator):
    """Reconstructs the slices (GPU when present) and computes difference maps.

    The first operator that needs the model: the shared detector is loaded here, once per run.

    Named input: slices (Slices | NotAssessed). Named output: maps (DifferenceMaps | NotAssessed).
    """

    def __init__(self, fragment: Fragment, *args, detector: DetectorProvider, **kwargs) -> None:
        self._detector = detector
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("slices")
        spec.output("maps")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        slices = op_input.receive("slices")
        if isinstance(slices, NotAssessed):
            op_output.emit(slices, "maps")
            return
        detector = self._detector.detector
        with timed(log, "Reconstruction"):
            maps = detector.reconstruct(slices)
        op_output.emit(maps, "maps")
