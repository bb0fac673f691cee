"""Series selection: the SDK's DICOMSeriesSelectorOperator plus rule-file exclusions."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from monai.deploy.core.domain.dicom_series import DICOMSeries
from monai.deploy.core.domain.dicom_series_selection import StudySelectedSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

from brainmirror.data import header_view

DEFAULT_RULES = Path(__file__).with_name("series_selection.json")

log = logging.getLogger(__name__)


def load_rules(path: Path = DEFAULT_RULES) -> str:
    """Read a selection rules file; raises ``ValueError`` when it is not usable."""
    text = Path(path).read_text()
    try:
        rules = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"series selection rules {path} are not valid JSON: {error}") from error
    if not isinstance(rules, dict) or not rules.get("selections"):
        raise ValueError(f"series selection rules {path} have no 'selections'")
    return text


class BrainSeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """The SDK selector, plus an optional top-level ``exclusions`` list in the rules.

    An exclusion has the ``name``/``conditions`` syntax of a selection; a series that matches all the
    conditions of any exclusion is dropped from the selection. A condition on an attribute a series
    lacks never matches, so exclusions act on attributes only when present (e.g. "BodyPartExamined,
    when present, must be HEAD or BRAIN"), which selections alone cannot express. Use it with
    ``all_matched=True`` so that an excluded first match does not hide a later suitable series.

    Two robustness changes to the SDK's matching (``_select_series``), for headers as scanners
    send them: each series is matched on its own, so a series whose attributes the SDK cannot
    match (a multi-valued SeriesDescription, an unknown PatientPosition, a malformed
    ImageOrientationPatient) matches nothing instead of failing the whole study; and an
    enhanced multi-frame image is matched on ``brainmirror.data.header_view`` (its functional
    groups' ImageOrientationPatient etc. at top level). Several matches of one selection are
    sorted by frame count, not instance count: one enhanced image of 176 frames is a volume.

    Named input: ``dicom_study_list``. Named output: ``study_selected_series_list``.
    """

    def filter(
        self,
        selection_rules: dict[str, Any] | None,
        dicom_study_list: list[DICOMStudy],
        all_matched: bool = False,
        sort_by_sop_instance_count: bool = False,
    ) -> list[StudySelectedSeries]:
        selected = super().filter(selection_rules, dicom_study_list, all_matched, sort_by_sop_instance_count)
        exclusions = (selection_rules or {}).get("exclusions") or []
        result = []
        for study_selection in selected:
            excluded = self._excluded(exclusions, study_selection.study)
            kept = StudySelectedSeries(study_selection.study)
            for item in study_selection.selected_series:
                uid = str(item.series.SeriesInstanceUID)
                if uid in excluded:
                    log.info("Series %s (selection %r) excluded: %s", uid, item.selection_name, excluded[uid])
                else:
                    kept.add_selected_series(item)
            if kept.selected_series:
                result.append(kept)
        return result

    def _excluded(self, exclusions: list[dict[str, Any]], study: DICOMStudy) -> dict[str, str]:
        """Series instance UID -> name of the first exclusion it matches."""
        excluded: dict[str, str] = {}
        for exclusion in exclusions:
            conditions = exclusion.get("conditions")
            if not conditions:
                continue
            for series in self._select_series(conditions, study, all_matched=True):
                excluded.setdefault(str(series.SeriesInstanceUID), exclusion.get("name", "exclusion"))
        return excluded

    def _select_series(
        self, attributes: dict[str, Any], study: DICOMStudy, all_matched: bool = False,
        sort_by_sop_instance_count: bool = False,
    ) -> list[DICOMSeries]:
        found = []
        for series in study.get_all_series():
            try:
                matched = super()._select_series(attributes, _view(study, series), all_matched=True)
            except (NotImplementedError, ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
                log.info("Series %s cannot be matched against %s: %s", series.SeriesInstanceUID,
                         sorted(attributes), " ".join(str(error).split()) or type(error).__name__)
                matched = []
            if matched:
                found.append(series)
                if not all_matched:
                    break
        if sort_by_sop_instance_count:
            found.sort(key=_frames, reverse=True)
        return found


def _view(study: DICOMStudy, series: DICOMSeries) -> DICOMStudy:
    """A one-series copy of ``study`` whose first instance is seen through ``header_view``."""
    properties = DICOMSeriesSelectorOperator._get_instance_properties
    view_study = DICOMStudy(study.StudyInstanceUID)
    view_series = DICOMSeries(series.SeriesInstanceUID)
    for source, target in ((study, view_study), (series, view_series)):
        for name, value in properties(source).items():
            if value is not None and name not in ("StudyInstanceUID", "SeriesInstanceUID"):
                setattr(target, name, value)
    instances = series.get_sop_instances()
    if instances:
        view_series.add_sop_instance(header_view(instances[0].get_native_sop_instance()))
    view_study.add_series(view_series)
    return view_study


def _frames(series: DICOMSeries) -> int:
    total = 0
    for sop in series.get_sop_instances():
        try:
            total += max(int(sop.get_native_sop_instance().get("NumberOfFrames") or 1), 1)
        except (TypeError, ValueError):
            total += 1
    return total
