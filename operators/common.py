"""What the brainmirror operators share: the study being assessed, the detector, exit codes, timing."""

from __future__ import annotations

import enum
import functools
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
from pydicom import Dataset

from brainmirror.detector import Detector
from brainmirror.result import SeriesReport

__all__ = ["ExitCode", "RunStatus", "SourceStudy", "DetectorProvider", "bundle_exists", "timed"]


class ExitCode(enum.IntEnum):
    """Process exit codes of the application (for a run over several studies, see RunStatus)."""

    ASSESSED = 0  # SR (+ SEG when there are findings) + key images written
    ERROR = 1  # unexpected error (logged with a traceback)
    USAGE = 2  # nothing to assess: missing/empty input folder, no DICOM study, no model bundle, bad rules
    NOT_ASSESSED = 3  # the study could not be assessed; a "not assessed" SR was written
    TIMEOUT = 4  # no study finished within $BRAINMIRROR_TIMEOUT_S; the studies finished before are written


@dataclass
class RunStatus:
    """Outcome of one application run: one exit code per study, recorded by the writer.

    ``exit_code`` (read by ``app.py`` after ``run()``): 0 when every study was assessed, 3 when
    at least one was not, 2 when the input held no study, 1 when a study the loader emitted
    never reached the writer (an unexpected error). ``lock`` is held while a study's outputs
    are written and by the timeout watchdog before it ends the process, so that a study's
    files are all written or none are; ``last_progress`` is when the last study finished, and
    each finished study re-arms SIGALRM for ``hard_timeout_s`` when app.py set one (its
    watchdog's last resort).
    """

    outcomes: list[tuple[str | None, ExitCode]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    expected: int = 0  # studies (or empty study lists) the loader emitted
    lock: threading.RLock = field(default_factory=threading.RLock)
    last_progress: float = field(default_factory=time.monotonic)
    hard_timeout_s: float = 0.0

    def record(self, study_instance_uid: str | None, code: ExitCode, paths: list[Path]) -> None:
        with self.lock:
            self.outcomes.append((study_instance_uid, code))
            self.outputs.extend(paths)
            self.last_progress = time.monotonic()
            if self.hard_timeout_s > 0:
                signal.alarm(min(int(self.hard_timeout_s) + 1, 2**31 - 1))

    @property
    def exit_code(self) -> ExitCode:
        codes = [code for _, code in self.outcomes]
        if not codes or len(codes) < self.expected:
            return ExitCode.ERROR
        studies = [code for code in codes if code != ExitCode.USAGE]
        if not studies:
            return ExitCode.USAGE
        return ExitCode.NOT_ASSESSED if ExitCode.NOT_ASSESSED in studies else ExitCode.ASSESSED


@dataclass
class SourceStudy:
    """The study being assessed: the instances the results refer to, once read their volume, and
    what the SR says about the chosen series (its contrast, resampling, brain coverage)."""

    study_instance_uid: str | None
    datasets: list[Dataset] = field(default_factory=list)
    volume: hd.Volume | None = None
    series: SeriesReport | None = None


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
