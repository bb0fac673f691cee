"""Embedding: Beta-VAE embedding of each slice's difference maps."""

from __future__ import annotations

import logging

from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext

from brainmirror.result import NotAssessed

from .common import DetectorProvider, timed

log = logging.getLogger(__name__)


class EmbeddingOperator(Operator):
    """Embeds the difference maps of each slice; forwards NotAssessed untouched.

    Named input: maps (DifferenceMaps | NotAssessed). Named output: embeddings (np.ndarray | NotAssessed).
    """

    def __init__(self, fragment: Fragment, *args, detector: DetectorProvider, **kwargs) -> None:
        self._detector = detector
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("maps")
        spec.output("embeddings")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        maps = op_input.receive("maps")
        if isinstance(maps, NotAssessed):
            op_output.emit(maps, "embeddings")
            return
        with timed(log, "Embedding"):
            embeddings = self._detector.detector.embed(maps)
        op_output.emit(embeddings, "embeddings")
