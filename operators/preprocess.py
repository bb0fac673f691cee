"""Preprocess: the selected series -> highdicom volume -> canonical space."""

from __future__ import annotations

import logging

from monai.deploy.core import ExecutionContext, InputContext, Operator, OperatorSpec, OutputContext
from monai.deploy.core.domain.dicom_series_selection import StudySelectedSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy

from brainmirror.dicom import read_series, volume_to_nifti
from brainmirror.preprocess import Canonical, canonicalise
from brainmirror.result import NotAssessed

from .common import SourceStudy, timed

log = logging.getLogger(__name__)


class PreprocessOperator(Operator):
    """Builds the volume of the selected series and brings it into canonical space.

    The SDK's DICOMSeriesToVolumeOperator is not used: the SEG written at the end must map
    voxel-exactly onto the source instances, which the highdicom Volume built from those very
    instances (``brainmirror.dicom.read_series``) guarantees.

    Runs once per study: the loader emits the input's studies one at a time. Of the series the
    selector chose, the first (best rule, then most frames) is used.

    Named inputs:
        dicom_study_list: list[DICOMStudy], from the DICOM loader.
        study_selected_series_list: list[StudySelectedSeries], from the series selector.
    Named outputs:
        study: SourceStudy, for the writer (datasets to reference, and the volume once read).
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
        log.info("Selected series %s (%s, %d instances)",
                 series.SeriesInstanceUID, chosen.selection_name, len(datasets))
        try:
            with timed(log, "Preprocess: volume"):
                volume = read_series(datasets)
        except ValueError as error:
            return SourceStudy(uid, datasets), NotAssessed(
                f"The selected series is not usable: {_sentence(error)}.", "invalid-series")
        try:
            with timed(log, "Preprocess: canonical space"):
                canonical = canonicalise(volume_to_nifti(volume))
        except ValueError as error:  # PreprocessingError included
            return SourceStudy(uid, datasets), NotAssessed(
                f"The selected series could not be preprocessed: {_sentence(error)}.", "preprocessing-failed")
        return SourceStudy(uid, datasets, volume), canonical


def _sentence(error: Exception) -> str:
    return " ".join(str(error).split()).rstrip(".") or type(error).__name__
