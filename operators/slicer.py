"""Slicer: canonical volume -> the axial slices that contain brain."""

from __future__ import annotations

import logging

from monai.deploy.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext

from brainmirror.slicing import slice_volume
from brainmirror.result import NotAssessed

from .common import timed

log = logging.getLogger(__name__)


class SlicerOperator(Operator):
    """Cuts the canonical volume into axial slices with brain; forwards NotAssessed untouched.

    Named input: canonical (Canonical | NotAssessed). Named output: slices (Slices | NotAssessed).
    """

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("canonical")
        spec.output("slices")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        canonical = op_input.receive("canonical")
        if isinstance(canonical, NotAssessed):
            op_output.emit(canonical, "slices")
            return
        with timed(log, "Slicer"):
            slices = slice_volume(canonical)
        if len(slices.z) == 0:
            op_output.emit(NotAssessed("No slice of the series contains enough brain.", "no-brain-slices"), "slices")
            return
        log.info("%d canonical slices with brain", len(slices.z))
        op_output.emit(slices, "slices")
