"""Study loader: the SDK's DICOM loader, one study per tick, robust to files that are not usable DICOM."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.conditions import BooleanCondition
from monai.deploy.core import ExecutionContext, Fragment, InputContext, OutputContext
from monai.deploy.core.domain.dicom_series import DICOMSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator

from brainmirror.data import DicomFileError, deduplicate, read_dicom_file, scan_dicom_folder

from .common import RunStatus, timed

log = logging.getLogger(__name__)


class StudyLoaderOperator(DICOMDataLoaderOperator):
    """Emits the input's DICOM studies one at a time, each as a one-study ``dicom_study_list``.

    Why one study per tick: the SDK loader emits every study at once and the DAG runs once, so
    a folder with several studies got one assessment. Here the loader ticks once per study (a
    BooleanCondition it disables after the last), and every downstream operator runs once per
    study, unchanged: each study gets its own outputs and its own exit status, the model is
    loaded once per run, and memory is bounded by the largest study, not by the input: the first
    tick only scans the folder (``brainmirror.data.scan_dicom_folder``: headers, checked, let go),
    and each tick reads one study's headers, pixel data staying on disk until a volume is built.

    Files that are not usable DICOM (not DICOM, corrupt, truncated, DICOMDIR, without UIDs) are
    skipped and counted in one log line, never named (file names may carry patient names).
    Duplicated instances are dropped (``brainmirror.data.deduplicate``). An input without any
    study gives one tick and an empty list (nothing to assess).

    Named output: ``dicom_study_list`` (list[DICOMStudy], one study or none).
    """

    def __init__(self, fragment: Fragment, *args, input_folder: Path, status: RunStatus, **kwargs) -> None:
        self._more = BooleanCondition(fragment, enable_tick=True, name="more_studies")
        self._status = status
        self._pending: list[list[Path]] | None = None
        super().__init__(fragment, self._more, *args, input_folder=Path(input_folder), must_load=False, **kwargs)

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        if self._pending is None:
            with timed(log, "Input scan"):
                folder = scan_dicom_folder(self.input_path)
            (log.warning if folder.skipped else log.info)("Input: %s", folder.summary())
            self._pending = list(folder.studies.values())
        studies = []
        while self._pending and not studies:
            study = self.load_study(self._pending.pop(0))
            studies = [study] if study is not None else []
        if not self._pending:
            self._more.disable_tick()
        self._status.expected += 1  # every emission reaches the writer, which records an outcome
        op_output.emit(studies, self.output_name)

    def load_study(self, paths: list[Path]) -> DICOMStudy | None:
        """The study of ``paths`` (files of one study), its series deduplicated; None if no file is usable."""
        by_series: dict[str, list] = {}
        changed = 0
        for path in paths:
            try:
                ds = read_dicom_file(path)
            except DicomFileError:  # it passed the scan: changed since
                changed += 1
                continue
            by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
        if changed:
            log.warning("Skipped %d file(s) that changed since the input was scanned", changed)
        if not by_series:
            return None
        first = next(iter(by_series.values()))[0]
        study = DICOMStudy(str(first.StudyInstanceUID))
        self.populate_study_attributes(study, first)
        for uid, datasets in by_series.items():
            series = DICOMSeries(uid)
            try:
                self.populate_series_attributes(series, datasets[0])
            except (TypeError, ValueError, IndexError, AttributeError) as error:  # a malformed value
                log.info("Series %s: some header attributes are not usable (%s)", uid, type(error).__name__)
            for ds in deduplicate(datasets):
                series.add_sop_instance(ds)
            study.add_series(series)
        log.info("Study %s: %d series, %d instances", study.StudyInstanceUID, len(by_series),
                 sum(len(s.get_sop_instances()) for s in study.get_all_series()))
        return study
