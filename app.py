"""brainmirror MONAI Deploy application: a brain MR study in, DICOM SR + SEG + key images out.

Research only - NOT FOR CLINICAL USE.

    python app.py -i INPUT -o OUTPUT -m MODELS [--series-rules RULES.json] [-l DEBUG]

or with the environment variables HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH
(and BRAINMIRROR_SERIES_RULES); arguments win over environment variables. MODELS is the folder
holding ``brainmirror/`` (a MONAI bundle), or the bundle itself. Holoscan wants ``ulimit -s 32768``.

Exit codes: 0 assessed (SR, SEG when there are findings, key images); 1 unexpected error;
2 nothing to assess (missing or empty input, no DICOM study, no model bundle, bad rules file);
3 the study was not assessed (a "not assessed" SR was written, when the input had DICOM to refer to).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, init_app_context
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator

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
    bundle_exists,
    load_rules,
)

RULES_ENV = "BRAINMIRROR_SERIES_RULES"

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
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.status = RunStatus()

    def compose(self) -> None:
        settings = resolve_settings(self.argv)
        detector = DetectorProvider(settings.model_path)  # loaded by its first user, once per run

        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=settings.input_path,
                                         must_load=False, name="study_loader_op")
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


def main() -> int:
    """Run the application once; return the process exit code."""
    app = BrainMirrorApp()
    try:
        app.run()
    except UsageError as error:
        log.error("brainmirror cannot run: %s", error)
        return int(ExitCode.USAGE)
    return int(app.status.exit_code)


if __name__ == "__main__":
    sys.exit(main())
