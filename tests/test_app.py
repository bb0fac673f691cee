"""Tests for the MONAI Deploy application (app.py, operators/): whole-DAG runs as subprocesses.

Until the shipped weights exist the app runs with a small test bundle whose verdicts are
meaningless: only the tests decorated ``@trained`` (skipped until then) check verdicts.
Tests marked ``slow`` share three full assessments of a demo study (about 40 s each on 2 CPU
cores); the others run the app on studies it rejects early (about 7 s each) or no app at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import REPO, shipped_weights, stack_limit

from brainmirror.demo import make_demo_study
from brainmirror.dicom import validate

APP = REPO / "app.py"
RULES = REPO / "operators" / "series_selection.json"
STAGES = ("Preprocess", "Slicer", "Reconstruction", "Embedding", "Scoring", "Writer")
FINDING = ("121071", "DCM")
LESION = ("52988006", "SCT")  # the Finding value of each anomaly region
VERDICTS = {("263654008", "SCT"): "abnormal", ("17621005", "SCT"): "normal"}
NOT_ASSESSED = ("NOTASSESSED", "99BRAINMIRROR")
SUMMARY = re.compile(r"assessed: (abnormal|normal), anomaly score (\S+) \(threshold \S+, \w+\), (\d+) finding")
PATIENT_NAME_PREFIX = "Demo^"  # make_demo_study names patients Demo^Tumour, Demo^Normal

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
trained = pytest.mark.skipif(not shipped_weights(), reason="verdicts need the shipped weights in models/")


# --- helpers -----------------------------------------------------------------------------


@dataclass
class AppRun:
    returncode: int
    log: str  # stdout + stderr
    output: Path
    input_hashes: tuple[dict[str, str], dict[str, str]] = ({}, {})  # before, after

    def files(self, prefix: str) -> list[Path]:
        return sorted(self.output.glob(f"{prefix}_*.dcm"))

    def summary(self) -> tuple[str, float, int]:
        """(verdict, anomaly score, number of findings) from the writer's log line."""
        match = SUMMARY.search(self.log)
        assert match, "no assessment summary in the log"
        return match[1], float(match[2]), int(match[3])


_stack_limit = stack_limit(32)  # Holoscan wants a 32 MiB stack (``ulimit -s 32768``)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_app(input_dir: Path, output_dir: Path, models: Path, *args: str, via_env: bool = False,
            env: dict[str, str] | None = None) -> AppRun:
    """Run ``python app.py`` once, in a clean working directory; input hashes taken around it."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("HOLOSCAN_") and k != "BRAINMIRROR_SERIES_RULES"}
    environment.update(env or {})
    if via_env:
        environment.update(HOLOSCAN_INPUT_PATH=str(input_dir), HOLOSCAN_OUTPUT_PATH=str(output_dir),
                           HOLOSCAN_MODEL_PATH=str(models))
    else:
        args = ("-i", str(input_dir), "-o", str(output_dir), "-m", str(models), *args)
    before = _hashes(input_dir)
    proc = subprocess.run([sys.executable, str(APP), *args], cwd=output_dir.parent, env=environment,
                          capture_output=True, text=True, timeout=1200, preexec_fn=_stack_limit, check=False)
    return AppRun(proc.returncode, proc.stdout + proc.stderr, output_dir, (before, _hashes(input_dir)))


def _sr_items(ds: pydicom.Dataset):
    stack = list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        yield item
        stack.extend(item.get("ContentSequence", []))


def _code(item: pydicom.Dataset, sequence: str) -> tuple[str, str]:
    code = item[sequence][0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def sr_finding(ds: pydicom.Dataset) -> tuple[str, str]:
    """The study-level Finding: Normal, Abnormal or Not assessed (each finding adds a "Lesion" Finding)."""
    (value,) = [code for code in (_code(i, "ConceptCodeSequence") for i in _sr_items(ds)
                                  if i.ValueType == "CODE" and _code(i, "ConceptNameCodeSequence") == FINDING)
                if code != LESION]
    return value


def sr_numbers(ds: pydicom.Dataset) -> dict[str, float]:
    return {i.ConceptNameCodeSequence[0].CodeMeaning: float(i.MeasuredValueSequence[0].NumericValue)
            for i in _sr_items(ds) if i.ValueType == "NUM"}


def sr_texts(ds: pydicom.Dataset) -> dict[str, str]:
    return {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in _sr_items(ds) if i.ValueType == "TEXT"}


def referenced_uids(ds: pydicom.Dataset) -> set[str]:
    return {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}


def headers(folder: Path) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in
            (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm")))}


def derived_series(source: Path, target: Path, edits: dict, count: int | None = None) -> Path:
    """Copy (the middle ``count`` slices of) a demo series as a new series with ``edits`` applied."""
    paths = sorted(source.glob("*.dcm"))
    if count is not None:
        start = (len(paths) - count) // 2
        paths = paths[start:start + count]
    target.mkdir(parents=True)
    series_uid = hd.UID()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = hd.UID()
        for keyword, value in edits.items():
            setattr(ds, keyword, value)
        ds.save_as(target / path.name, enforce_file_format=True)
    return target


def assert_no_traceback(run: AppRun) -> None:
    assert "Traceback" not in run.log and "Exception occurred" not in run.log, run.log[-3000:]


def assert_valid(paths: list[Path]) -> None:
    for path in paths:
        assert validate(path) == [], path.name


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_tumour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "tumour"
    make_demo_study(folder, "tumour")
    return folder


@pytest.fixture(scope="module")
def demo_normal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "normal"
    make_demo_study(folder, "normal")
    return folder


@pytest.fixture(scope="module")
def tumour_run(demo_tumour: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AppRun:
    """The app on the tumour demo study, with command line arguments."""
    return run_app(demo_tumour, tmp_path_factory.mktemp("run") / "out", models_dir)


@pytest.fixture(scope="module")
def normal_run(demo_normal: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AppRun:
    """The app on the normal demo study, with HOLOSCAN_* environment variables only."""
    return run_app(demo_normal, tmp_path_factory.mktemp("run") / "out", models_dir, via_env=True)


@pytest.fixture(scope="module")
def abnormal_run(demo_tumour: Path, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AppRun:
    """The tumour study with the bundle re-calibrated so that every study is abnormal with findings.

    Exercises the SEG path whatever the weights: study threshold far below any score, voxel
    threshold at most 3 on the voxel anomaly map.
    """
    bundle = models_dir / "brainmirror" if (models_dir / "brainmirror").is_dir() else models_dir
    models = tmp_path_factory.mktemp("abnormal_models")
    shutil.copytree(bundle, models / "brainmirror")
    metadata_path = models / "brainmirror" / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["calibration"]["study"]["combined"]["threshold"] = -1e9
    voxel = metadata["calibration"]["voxel"]
    voxel["threshold"] = min(voxel["threshold"], 3.0)
    metadata_path.write_text(json.dumps(metadata))
    return run_app(demo_tumour, tmp_path_factory.mktemp("run") / "out", models)


# --- an assessed study -------------------------------------------------------------------


@pytest.mark.slow
def test_assessed_study_writes_sr_key_images_and_seg_for_findings(tumour_run: AppRun) -> None:
    assert tumour_run.returncode == 0, tumour_run.log[-3000:]
    assert_no_traceback(tumour_run)
    _, _, n_findings = tumour_run.summary()
    assert len(tumour_run.files("SR")) == 1
    assert 1 <= len(tumour_run.files("KEY")) <= 3
    assert len(tumour_run.files("SEG")) == (1 if n_findings else 0)
    # nothing else: no partial or temporary outputs
    assert sorted(tumour_run.output.iterdir()) == sorted(tumour_run.output.glob("*_*.dcm"))


@needs_dciodvfy
@pytest.mark.slow
def test_assessed_outputs_are_valid_dicom(tumour_run: AppRun) -> None:
    assert_valid(sorted(tumour_run.output.glob("*.dcm")))


@pytest.mark.slow
def test_outputs_belong_to_the_source_study(tumour_run: AppRun, demo_tumour: Path) -> None:
    sources = headers(demo_tumour)
    (study_uid,) = {ds.StudyInstanceUID for ds in sources.values()}
    outputs = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(tumour_run.output.glob("*.dcm"))]
    assert outputs and {ds.StudyInstanceUID for ds in outputs} == {study_uid}
    for key_image in tumour_run.files("KEY"):
        assert referenced_uids(pydicom.dcmread(key_image, stop_before_pixels=True)) <= set(sources)


@pytest.mark.slow
def test_sr_verdict_and_score_match_the_log(tumour_run: AppRun) -> None:
    verdict, score, _ = tumour_run.summary()
    sr = pydicom.dcmread(tumour_run.files("SR")[0])
    assert VERDICTS[sr_finding(sr)] == verdict
    assert math.isclose(sr_numbers(sr)["Anomaly score"], score, rel_tol=1e-5, abs_tol=1e-9)


@pytest.mark.slow
def test_log_has_stage_timings_and_no_patient_name(tumour_run: AppRun) -> None:
    for stage in STAGES:
        assert re.search(rf"{stage} took \d+\.\d+ s", tumour_run.log), stage
    assert tumour_run.log.count("Model loading took") == 1
    assert PATIENT_NAME_PREFIX.lower() not in tumour_run.log.lower()


@pytest.mark.slow
def test_input_files_are_not_modified(tumour_run: AppRun) -> None:
    before, after = tumour_run.input_hashes
    assert before and before == after


@pytest.mark.slow
def test_seg_maps_onto_the_source_instances(abnormal_run: AppRun, demo_tumour: Path) -> None:
    assert abnormal_run.returncode == 0, abnormal_run.log[-3000:]
    verdict, _, n_findings = abnormal_run.summary()
    assert verdict == "abnormal" and n_findings >= 1
    (seg_path,) = abnormal_run.files("SEG")
    seg = pydicom.dcmread(seg_path)
    sources = headers(demo_tumour)
    first = next(iter(sources.values()))
    assert (seg.Rows, seg.Columns) == (first.Rows, first.Columns)
    assert len(seg.SegmentSequence) == n_findings
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        orientation = (frame.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence)[0]
        spacing = (frame.get("PixelMeasuresSequence") or shared.PixelMeasuresSequence)[0]
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = sources[source_uid]
        assert np.allclose([float(v) for v in orientation.ImageOrientationPatient],
                           [float(v) for v in source.ImageOrientationPatient], atol=1e-4)
        assert np.allclose([float(v) for v in spacing.PixelSpacing], [float(v) for v in source.PixelSpacing])
        assert np.allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in source.ImagePositionPatient], atol=1e-3)
    sr = pydicom.dcmread(abnormal_run.files("SR")[0])
    assert seg.SOPInstanceUID in referenced_uids(sr)
    assert {str(ds.StudyInstanceUID) for ds in (seg, sr)} == {str(first.StudyInstanceUID)}


@needs_dciodvfy
@pytest.mark.slow
def test_seg_output_is_valid_dicom(abnormal_run: AppRun) -> None:
    assert_valid(sorted(abnormal_run.output.glob("*.dcm")))


@pytest.mark.slow
def test_environment_variable_invocation(normal_run: AppRun) -> None:
    assert normal_run.returncode == 0, normal_run.log[-3000:]
    sr = pydicom.dcmread(normal_run.files("SR")[0])
    assert VERDICTS[sr_finding(sr)] == normal_run.summary()[0]
    assert normal_run.input_hashes[0] == normal_run.input_hashes[1]


@trained
@pytest.mark.slow
def test_tumour_study_is_abnormal(tumour_run: AppRun) -> None:
    verdict, _, n_findings = tumour_run.summary()
    assert verdict == "abnormal" and n_findings >= 1


@trained
@pytest.mark.slow
def test_normal_study_is_normal(normal_run: AppRun) -> None:
    assert normal_run.summary()[0] == "normal"


# --- studies that are not assessed, and runs with nothing to assess ----------------------


def _assert_not_assessed(run: AppRun, code: str) -> None:
    assert run.returncode == 3, run.log[-3000:]
    assert_no_traceback(run)
    assert [p.name[:3] for p in run.output.iterdir()] == ["SR_"]
    sr = pydicom.dcmread(run.files("SR")[0])
    assert sr_finding(sr) == NOT_ASSESSED
    assert sr_texts(sr)["Reason code"] == code
    assert len(re.findall(r"NOT ASSESSED \(" + re.escape(code), run.log)) == 1
    if shutil.which("dciodvfy"):
        assert_valid(run.files("SR"))


@pytest.mark.parametrize(
    ("edits", "count"),
    [
        ({"BodyPartExamined": "KNEE", "SeriesDescription": "KNEE T1 3D"}, None),
        ({"BodyPartExamined": "KNEE"}, 40),
        ({"SeriesDescription": "T1 sag spine"}, 40),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "SeriesDescription": "Localizer",
          "MRAcquisitionType": "2D"}, 3),
        ({"ImageType": ["DERIVED", "SECONDARY", "MPR"]}, 40),
        ({"Modality": "CT"}, 40),
    ],
    ids=["knee", "knee-body-part", "spine-description", "localizer", "derived", "not-mr"],
)
def test_unsuitable_series_is_not_assessed(edits: dict, count: int | None, demo_tumour: Path, models_dir: Path,
                                           tmp_path: Path) -> None:
    source = derived_series(demo_tumour, tmp_path / "in", edits, count)
    run = run_app(source, tmp_path / "out", models_dir)
    _assert_not_assessed(run, "no-suitable-series")
    assert run.input_hashes[0] == run.input_hashes[1]


def test_unusable_series_is_not_assessed(demo_tumour: Path, models_dir: Path, tmp_path: Path) -> None:
    source = derived_series(demo_tumour, tmp_path / "in", {}, count=4)  # too few slices to preprocess
    _assert_not_assessed(run_app(source, tmp_path / "out", models_dir), "preprocessing-failed")


def test_irregular_series_is_not_assessed(demo_tumour: Path, models_dir: Path, tmp_path: Path) -> None:
    source = derived_series(demo_tumour, tmp_path / "in", {}, count=20)
    sorted(source.glob("*.dcm"))[10].unlink()  # a gap: not a regularly spaced volume
    _assert_not_assessed(run_app(source, tmp_path / "out", models_dir), "invalid-series")


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_series_rules_can_be_overridden(how: str, demo_tumour: Path, models_dir: Path, tmp_path: Path) -> None:
    rules = tmp_path / "ct_only.json"
    rules.write_text(json.dumps({"selections": [{"name": "CT", "conditions": {"Modality": "(?i)^CT$"}}]}))
    out = tmp_path / "out"
    if how == "argument":
        run = run_app(demo_tumour, out, models_dir, "--series-rules", str(rules))
    else:
        run = run_app(demo_tumour, out, models_dir, env={"BRAINMIRROR_SERIES_RULES": str(rules)})
    _assert_not_assessed(run, "no-suitable-series")


def test_empty_input_folder(models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    run = run_app(tmp_path / "in", tmp_path / "out", models_dir)
    assert run.returncode == 2
    assert_no_traceback(run)
    assert "Nothing to assess" in run.log
    assert not any((tmp_path / "out").iterdir())


def test_input_without_dicom(models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    run = run_app(tmp_path / "in", tmp_path / "out", models_dir)
    assert run.returncode == 2
    assert_no_traceback(run)


def test_missing_model_bundle(demo_tumour: Path, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    run = run_app(demo_tumour, tmp_path / "out", tmp_path / "models")
    assert run.returncode == 2
    assert_no_traceback(run)
    assert "no brainmirror model bundle" in run.log


def test_model_bundle_of_another_brainmirror_is_refused(demo_tumour: Path, models_dir: Path, tmp_path: Path) -> None:
    """A bundle fitted for other inference masks stops the app at start with what to do, not mid-run."""
    bundle = models_dir / "brainmirror" if (models_dir / "brainmirror").is_dir() else models_dir
    shutil.copytree(bundle, tmp_path / "models" / "brainmirror")
    path = tmp_path / "models" / "brainmirror" / "configs" / "metadata.json"
    metadata = json.loads(path.read_text())
    del metadata["inference"]  # as bundles of the checkerboard-inference releases are
    path.write_text(json.dumps(metadata))
    run = run_app(demo_tumour, tmp_path / "out", tmp_path / "models")
    assert run.returncode == 2
    assert_no_traceback(run)
    assert "cannot use the model bundle" in run.log and "retrain it" in run.log
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_input_folder_from_environment(models_dir: Path, tmp_path: Path) -> None:
    run = run_app(tmp_path / "absent", tmp_path / "out", models_dir, via_env=True)
    assert run.returncode == 2
    assert_no_traceback(run)
    assert "does not exist" in run.log


# --- series selection rules, without running the application -----------------------------


def _selected(folder: Path) -> list[str]:
    """Selection names the shipped rules give the series in ``folder``, best first."""
    from monai.deploy.core import Fragment
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator

    from operators import BrainSeriesSelectorOperator

    fragment = Fragment()
    studies = DICOMDataLoaderOperator(fragment, name="loader").load_data_to_studies(folder)
    selector = BrainSeriesSelectorOperator(fragment, rules=RULES.read_text(), name="selector")
    chosen = selector.filter(json.loads(RULES.read_text()), studies, all_matched=True, sort_by_sop_instance_count=True)
    return [item.selection_name for study in chosen for item in study.selected_series]


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        ({}, "3D T1/T2/FLAIR"),
        ({"BodyPartExamined": "HEAD"}, "3D T1/T2/FLAIR"),
        ({"BodyPartExamined": None}, "3D T1/T2/FLAIR"),  # absent: allowed
        ({"MRAcquisitionType": "2D", "SeriesDescription": "t2_tse_tra"}, "Axial T1/T2/FLAIR"),
        ({"SeriesDescription": "sequence 7"}, "3D MR"),
        ({"MRAcquisitionType": "2D", "SeriesDescription": "sequence 7"}, "Axial MR"),
        ({"MRAcquisitionType": "2D", "SeriesDescription": "t2_tse_tra", "PatientPosition": None}, None),
        ({"BodyPartExamined": "CSPINE"}, None),
        ({"SeriesDescription": "AAHead_Scout"}, None),
        ({"SeriesDescription": "ep2d_diff_tra"}, None),
        ({"ImageType": ["DERIVED", "PRIMARY", "MPR"]}, None),
    ],
)
def test_selection_rules(edits: dict, expected: str | None, demo_tumour: Path, tmp_path: Path) -> None:
    source = sorted(demo_tumour.glob("*.dcm"))[60:70]
    for path in source:  # header-only copies: selection reads no pixels
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword, value in edits.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(tmp_path / path.name)
    selected = _selected(tmp_path)
    assert (selected[0] if selected else None) == expected


def test_manifest_matches_the_package_version() -> None:
    from brainmirror import __version__

    manifest = (REPO / "app.yaml").read_text()
    assert re.search(rf'^  version: "{re.escape(__version__)}"', manifest, re.MULTILINE)
    for key in ("title", "input-formats", "output-formats"):  # the packager's spelling
        assert re.search(rf"^  {key}: \S", manifest, re.MULTILINE), key
    assert re.search(r"^resources:$", manifest, re.MULTILINE)


def test_shipped_rules_follow_the_sdk_syntax() -> None:
    rules = json.loads(RULES.read_text())
    for entry in rules["selections"] + rules["exclusions"]:
        assert set(entry) == {"name", "conditions"} and entry["name"] and entry["conditions"]
    names = [s["name"] for s in rules["selections"]]
    assert len(set(names)) == len(names)  # the SDK groups selected series by selection name
