"""What the brainmirror operators share: the study being assessed, the detector, exit codes, timing."""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
from pydicom import Dataset

from brainmirror.detector import Detector

__all__ = ["ExitCode", "RunStatus", "SourceStudy", "DetectorProvider", "bundle_exists", "timed"]


class ExitCode(enum.IntEnum):
    """Process exit codes of the application."""

    ASSESSED = 0  # SR (+ SEG when there are findings) + key images written
    ERROR = 1  # unexpected error (logged with a traceback)
    USAGE = 2  # nothing to assess: missing/empty input folder, no DICOM study, no model bundle, bad rules
    NOT_ASSESSED = 3  # the study could not be assessed; a "not assessed" SR was written


@dataclass
class RunStatus:
    """Outcome of one application run, set by the writer and read by ``app.py`` after ``run()``."""

    exit_code: ExitCode = ExitCode.ERROR
    outputs: list[Path] = field(default_factory=list)


@dataclass
class SourceStudy:
    """The study being assessed: the instances the results refer to and, once read, their volume."""

    study_instance_uid: str | None
    datasets: list[Dataset] = field(default_factory=list)
    volume: hd.Volume | None = None


def bundle_exists(models_dir: Path) -> bool:
    """Whether ``models_dir`` is (or holds, as ``brainmirror/``) a brainmirror model bundle."""
    return any((path / "configs" / "metadata.json").is_file() for path in (models_dir / "brainmirror", models_dir))


class DetectorProvider:
    """Loads the detector on first use and shares it between operators: once per application run."""

    def __init__(self, models_dir: Path, log: logging.Logger | None = None):
        self.models_dir = Path(models_dir)
        self._log = log or logging.getLogger(__name__)

    @functools.cached_property
    def detector(self) -> Detector:
        with timed(self._log, "Model loading"):
            detector = Detector.load(self.models_dir)
        self._log.info("Model %s loaded from %s on %s", detector.version, self.models_dir, detector.device)
        return detector


@contextmanager
def timed(log: logging.Logger, stage: str) -> Iterator[None]:
    """Log the wall time of the enclosed block at INFO level."""
    start = time.perf_counter()
    try:
        yield
    finally:
        log.info("%s took %.2f s", stage, time.perf_counter() - start)
