"""brainmirror MONAI Deploy application: a brain MR study in, DICOM SR + SEG + key images out.

Research only - NOT FOR CLINICAL USE.

    python app.py -i INPUT -o OUTPUT -m MODELS [--series-rules RULES.json] [-l DEBUG]

or with the environment variables HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH
(and BRAINMIRROR_SERIES_RULES); arguments win over environment variables. MODELS is the folder
holding ``brainmirror/`` (a MONAI bundle), or the bundle itself. Holoscan wants ``ulimit -s 32768``.

INPUT may hold several studies (any folder layout, DICOMDIR file-sets included; files that are
not usable DICOM are skipped and counted): each study is assessed on its own and gets its own
outputs, all in OUTPUT, each object in its source study (docs/bad-input.md lists what happens to
which input).

Exit codes: 0 assessed, every study (SR, SEG when there are findings, key images); 1 unexpected
error; 2 nothing to assess (missing or empty input, no DICOM study, no model bundle, bad rules
file); 3 at least one study was not assessed (a "not assessed" SR was written for it, saying why);
4 timed out: no study finished within BRAINMIRROR_TIMEOUT_S seconds (default 600; the studies
finished before are written, the rest get nothing, no partial file is left). Should the Python
interpreter itself be blocked, the process is killed by SIGALRM 60 s later (exit status 142).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from monai.deploy.core import Application, init_app_context

from brainmirror import __version__
from operators import (
    DEFAULT_RULES,
    AssessmentWriterOperator,
    BrainSeriesSelectorOperator,
    DetectorProvider,
    EmbeddingOperator,
    ExitCode,
    PreprocessOperator,
    ReconstructionOperator,
    RunStatus,
    ScoringOperator,
    SlicerOperator,
    StudyLoaderOperator,
    bundle_exists,
    load_rules,
)

RULES_ENV = "BRAINMIRROR_SERIES_RULES"
TIMEOUT_ENV = "BRAINMIRROR_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
HARD_TIMEOUT_GRACE_S = 60  # SIGALRM this long after the timeout, should the watchdog not get to run

log = logging.getLogger("brainmirror.app")


class UsageError(Exception):
    """The application cannot start: bad paths or rules (exit code 2)."""


@dataclass(frozen=True)
class Settings:
    input_path: Path
    output_path: Path
    model_path: Path
    rules: str  # selection rules, JSON text


def resolve_settings(argv: list[str]) -> Settings:
    """Paths from the SDK's arguments/environment, plus ``--series-rules`` or $BRAINMIRROR_SERIES_RULES."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--series-rules", type=Path)
    ours, rest = parser.parse_known_args(argv[1:])
    context = init_app_context([argv[0], *rest])  # the SDK's -i/-o/-m/-l and HOLOSCAN_* variables
    input_path, model_path = Path(context.input_path), Path(context.model_path)
    rules_path = Path(ours.series_rules or os.environ.get(RULES_ENV) or DEFAULT_RULES)
    if not input_path.is_dir():
        raise UsageError(f"input folder {input_path} does not exist")
    if not bundle_exists(model_path):
        raise UsageError(f"no brainmirror model bundle in {model_path} (expected brainmirror/configs/metadata.json)")
    try:
        rules = load_rules(rules_path)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot use the series selection rules: {error}") from error
    log.info("Input %s, output %s, models %s, selection rules %s",
             input_path, context.output_path, model_path, rules_path)
    return Settings(input_path, Path(context.output_path), model_path, rules)


class BrainMirrorApp(Application):
    """Unsupervised anomaly detection in a brain MR study (research only, NOT FOR CLINICAL USE).

    DICOM loader -> series selector -> preprocess -> slicer -> reconstruction -> embedding
    -> scoring -> writer. A study that cannot be assessed travels down the DAG as a NotAssessed
    outcome, which every operator forwards untouched, and the writer turns into a "not assessed" SR.
    ``status.exit_code`` holds the process exit code once ``run()`` returns.

    Several studies: the DAG is composed once and runs once per study, the loader emitting one
    study per tick (``StudyLoaderOperator``). The alternatives were worse: passing lists of
    studies through every operator holds every study's volumes at once and makes each operator
    loop; running the app once per study (splitting the input in ``main()``) restarts Holoscan
    and reloads the model per study. Per tick, the operators stay as they were, one study at a
    time, and memory is bounded by the largest study.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.status = RunStatus()

    def compose(self) -> None:
        settings = resolve_settings(self.argv)
        detector = DetectorProvider(settings.model_path)  # loaded once per run, here
        try:  # a bundle this brainmirror cannot use (fitted for other masks, uncalibrated) stops it now
            detector.detector.calibration("combined")
        except (OSError, ValueError, RuntimeError) as error:
            raise UsageError(f"cannot use the model bundle in {settings.model_path}: {error}") from error

        loader = StudyLoaderOperator(self, input_folder=settings.input_path, status=self.status,
                                     name="study_loader_op")
        selector = BrainSeriesSelectorOperator(self, rules=settings.rules, all_matched=True,
                                               sort_by_sop_instance_count=True, name="series_selector_op")
        # Not the SDK's DICOMSeriesToVolumeOperator: the SEG must map voxel-exactly onto the source
        # instances, which the highdicom Volume that PreprocessOperator builds from them guarantees.
        preprocess = PreprocessOperator(self, name="preprocess_op")
        slicer = SlicerOperator(self, name="slicer_op")
        reconstruction = ReconstructionOperator(self, detector=detector, name="reconstruction_op")
        embedding = EmbeddingOperator(self, detector=detector, name="embedding_op")
        scoring = ScoringOperator(self, detector=detector, name="scoring_op")
        writer = AssessmentWriterOperator(self, output_folder=settings.output_path, status=self.status,
                                          algorithm_version=__version__, name="writer_op")

        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(loader, preprocess, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, preprocess, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(preprocess, writer, {("study", "study")})
        self.add_flow(preprocess, slicer, {("canonical", "canonical")})
        self.add_flow(preprocess, scoring, {("canonical", "canonical")})
        self.add_flow(slicer, reconstruction, {("slices", "slices")})
        self.add_flow(slicer, scoring, {("slices", "slices")})
        self.add_flow(reconstruction, embedding, {("maps", "maps")})
        self.add_flow(reconstruction, scoring, {("maps", "maps")})
        self.add_flow(embedding, scoring, {("embeddings", "embeddings")})
        self.add_flow(scoring, writer, {("assessment", "assessment")})


def timeout_seconds() -> float:
    """$BRAINMIRROR_TIMEOUT_S, or the default (600 s); 0 or less turns the timeout off."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


class Watchdog(threading.Thread):
    """Ends a stuck run: exit code 4 when no study has finished for ``timeout`` seconds.

    The clock starts with the process and restarts whenever a study's outputs are written
    (``RunStatus.last_progress``), so the timeout bounds one study, whatever the number of
    studies. Before ending the process the watchdog takes ``RunStatus.lock``, which the writer
    holds while writing a study's files, so that no study is left half written; it logs one
    line and ends the process with ``os._exit`` (the DAG is not waited for). A thread only runs
    when the interpreter lets it, so ``SIGALRM`` (armed here, re-armed by each finished study,
    ``RunStatus.record``) kills the process ``grace`` seconds later in case native code holds
    the interpreter.
    """

    def __init__(self, status: RunStatus, timeout: float, grace: float = HARD_TIMEOUT_GRACE_S):
        super().__init__(name="brainmirror-watchdog", daemon=True)
        self.status, self.timeout, self.grace = status, timeout, grace

    def start(self) -> None:
        self.status.hard_timeout_s = self.timeout + self.grace
        signal.alarm(min(int(self.status.hard_timeout_s) + 1, 2**31 - 1))
        super().start()

    def run(self) -> None:
        while True:
            remaining = self.status.last_progress + self.timeout - time.monotonic()
            if remaining > 0:
                time.sleep(min(remaining, 5.0))
                continue
            got_lock = self.status.lock.acquire(timeout=self.grace / 2)
            finished = sum(code != ExitCode.USAGE for _, code in self.status.outcomes)
            log.error("brainmirror timed out: no study finished within %.0f s (%s); %d study(ies) were "
                      "written before, the rest have no output", self.timeout, TIMEOUT_ENV, finished)
            if not got_lock:
                log.error("a study was still being written after %.0f s; its files may be missing", self.grace / 2)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(ExitCode.TIMEOUT))


def keep_header_values_out_of_logs() -> None:
    """pydicom reports malformed header values by quoting them, and they may be patient data.

    Its warnings stay out of the run's log (errors only); brainmirror logs what it skipped and why
    in its own words, with UIDs and counts, never file names or header values.
    """
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def main() -> int:
    """Run the application once (every study of the input); return the process exit code."""
    keep_header_values_out_of_logs()
    try:
        timeout = timeout_seconds()
    except UsageError as error:
        logging.basicConfig()
        log.error("brainmirror cannot run: %s", error)
        return int(ExitCode.USAGE)
    app = BrainMirrorApp()
    if timeout > 0:
        Watchdog(app.status, timeout).start()
    try:
        app.run()
    except UsageError as error:
        log.error("brainmirror cannot run: %s", error)
        return int(ExitCode.USAGE)
    return int(app.status.exit_code)


if __name__ == "__main__":
    sys.exit(main())
