"""Preprocess: the selected series -> highdicom volume -> canonical space."""

from __future__ import annotations

import logging
from dataclasses import replace

from monai.deploy.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext
from monai.deploy.core.domain.dicom_series_selection import StudySelectedSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy

from brainmirror.dicom import load_series, volume_to_nifti
from brainmirror.preprocess import MIN_BRAIN_COVERAGE, Canonical, PartialCoverageError, canonicalise
from brainmirror.result import NotAssessed
from brainmirror.series import describe_series

from .common import SourceStudy, timed

log = logging.getLogger(__name__)


class PreprocessOperator(Operator):
    """Builds the volume of the selected series and brings it into canonical space.

    The SDK's DICOMSeriesToVolumeOperator is not used: the SEG written at the end must map
    voxel-exactly onto the source instances, which the highdicom Volume built from those very
    instances (``brainmirror.dicom.load_series``) guarantees; a series whose slice positions
    jitter is resampled onto a regular grid there, one grid slice per instance, and the SEG
    follows that correspondence. A series covering less than ``MIN_BRAIN_COVERAGE`` of a
    typical brain is not assessed (``partial-coverage``).

    Runs once per study: the loader emits the input's studies one at a time. Of the series the
    selector chose, the first (best rule, then most frames) is used.

    Named inputs:
        dicom_study_list: list[DICOMStudy], from the DICOM loader.
        study_selected_series_list: list[StudySelectedSeries], from the series selector.
    Named outputs:
        study: SourceStudy, for the writer (datasets to reference, the volume once read, the
            series report: description, contrast family, resampling, brain coverage).
        canonical: Canonical, or NotAssessed when there is no suitable series or it cannot be used.
    """

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("dicom_study_list")
        spec.input("study_selected_series_list")
        spec.output("study")
        spec.output("canonical")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        studies = op_input.receive("dicom_study_list") or []
        selections = op_input.receive("study_selected_series_list") or []
        with timed(log, "Preprocess"):
            study, canonical = self.prepare(studies, selections)
        op_output.emit(study, "study")
        op_output.emit(canonical, "canonical")

    @staticmethod
    def prepare(
        studies: list[DICOMStudy], selections: list[StudySelectedSeries]
    ) -> tuple[SourceStudy, Canonical | NotAssessed]:
        if not studies:
            return SourceStudy(None), NotAssessed("The input holds no DICOM study.", "no-dicom-input")
        selection = next((s for s in selections if s.selected_series), None)
        study = selection.study if selection is not None else studies[0]
        uid = str(study.StudyInstanceUID)
        if selection is None:
            datasets = [sop.get_native_sop_instance() for series in study.get_all_series()
                        for sop in series.get_sop_instances()]
            return SourceStudy(uid, datasets), NotAssessed(
                "No suitable brain MR series (3D or axial T1/T2/FLAIR) in the study.", "no-suitable-series")

        chosen = selection.selected_series[0]
        series = chosen.series
        datasets = [sop.get_native_sop_instance() for sop in series.get_sop_instances()]
        report = describe_series(datasets)
        log.info("Selected series %s (%s, %d instances, contrast %s)",
                 series.SeriesInstanceUID, chosen.selection_name, len(datasets), report.contrast)
        try:
            with timed(log, "Preprocess: volume"):
                volume, resampling = load_series(datasets)
        except ValueError as error:
            return SourceStudy(uid, datasets, series=report), NotAssessed(
                f"The selected series is not usable: {_sentence(error)}.", "invalid-series")
        if resampling is not None:
            log.info("Slice positions deviate from a regular %.4g mm grid by up to %.3g mm: resampled onto it",
                     resampling.spacing_mm, resampling.max_deviation_mm)
        report = replace(report, resampling=resampling)
        try:
            with timed(log, "Preprocess: canonical space"):
                canonical = canonicalise(volume_to_nifti(volume), min_coverage=MIN_BRAIN_COVERAGE)
        except PartialCoverageError as error:
            return SourceStudy(uid, datasets, series=replace(report, coverage=error.coverage)), NotAssessed(
                f"The selected series covers too little of the brain: {_sentence(error)}.", "partial-coverage")
        except ValueError as error:  # PreprocessingError included
            return SourceStudy(uid, datasets, series=report), NotAssessed(
                f"The selected series could not be preprocessed: {_sentence(error)}.", "preprocessing-failed")
        log.info("Brain coverage %.0f %%", 100 * canonical.coverage)
        return SourceStudy(uid, datasets, volume, replace(report, coverage=canonical.coverage)), canonical


def _sentence(error: Exception) -> str:
    return " ".join(str(error).split()).rstrip(".") or type(error).__name__
