"""Series selection: the SDK's DICOMSeriesSelectorOperator plus rule-file exclusions."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from monai.deploy.core.domain.dicom_series_selection import StudySelectedSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

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
