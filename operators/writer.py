"""Writer: the DICOM results of the study (SR, SEG, key images), or a "not assessed" SR."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext

from brainmirror.dicom import write_assessment, write_not_assessed
from brainmirror.result import Assessment, NotAssessed

from .common import ExitCode, RunStatus, SourceStudy, timed

log = logging.getLogger(__name__)


class AssessmentWriterOperator(Operator):
    """Writes the results into the source study and records the study's exit code in ``status``.

    Runs once per study. Every study's objects go into the output folder, each object in its
    own study (its StudyInstanceUID), so that a PACS files them where they belong. SR, SEG and
    key images are written together, by one call, because the SR references the SEG's and key
    images' UIDs, and a failed run must leave no partial output: all files of a study appear in
    the output folder or none do (under ``status.lock``, which the timeout watchdog takes too).
    A NotAssessed outcome gets a "not assessed" SR (when the input held DICOM instances to
    reference) and exit code 3; no DICOM input gets exit code 2.

    Named inputs: study (SourceStudy), assessment (Assessment | NotAssessed).
    """

    def __init__(
        self, fragment: Fragment, *args, output_folder: Path, status: RunStatus, algorithm_version: str, **kwargs
    ) -> None:
        self._output_folder = Path(output_folder)
        self._status = status
        self._algorithm_version = algorithm_version
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.input("assessment")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        study: SourceStudy = op_input.receive("study")
        outcome: Assessment | NotAssessed = op_input.receive("assessment")
        with timed(log, "Writer"):
            if isinstance(outcome, NotAssessed):
                self._not_assessed(study, outcome)
            else:
                self._assessed(study, outcome)

    def _assessed(self, study: SourceStudy, assessment: Assessment) -> None:
        with self._status.lock:
            paths = write_assessment(study.datasets, study.volume, assessment, self._output_folder,
                                     algorithm_version=self._algorithm_version, series=study.series)
            self._status.record(study.study_instance_uid, ExitCode.ASSESSED, paths)
        log.info(
            "Study %s assessed: %s, anomaly score %.6g (threshold %.6g, %s), %d finding(s); wrote %d files to %s",
            study.study_instance_uid, assessment.verdict, assessment.study_score, assessment.threshold,
            assessment.configuration, len(assessment.findings), len(paths), self._output_folder,
        )

    def _not_assessed(self, study: SourceStudy, outcome: NotAssessed) -> None:
        if not study.datasets:
            self._status.record(None, ExitCode.USAGE, [])
            log.error("Nothing to assess: %s (%s)", outcome.reason, outcome.code)
            return
        with self._status.lock:
            paths = write_not_assessed(study.datasets, outcome, self._output_folder,
                                       algorithm_version=self._algorithm_version, series=study.series)
            self._status.record(study.study_instance_uid, ExitCode.NOT_ASSESSED, paths)
        log.warning("Study %s NOT ASSESSED (%s): %s Wrote a not-assessed SR to %s",
                    study.study_instance_uid, outcome.code, outcome.reason, self._output_folder)
