"""The MONAI Label app (label/) against a real server: `monailabel start_server` from the label venv
on loopback, a small datastore (demo DICOM series and synthetic healthy NIfTI studies), infer,
label upload, review order, calibration on confirmed normals; and Orthanc over DICOMweb.

The review rules themselves (label/lib/core.py) are also tested directly, without a server.
SYNTHETIC data only.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import REPO, terminate

LABEL = REPO / "label"
LABEL_PYTHON = LABEL / ".venv" / "bin" / "python"
SHIPPED = REPO / "models" / "brainmirror"
SERVER_START_S = 180
needs_label_venv = pytest.mark.skipif(
    not LABEL_PYTHON.exists(), reason="the MONAI Label server's venv label/.venv is missing: run scripts/setup.sh")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


core = _load("brainmirror_label_core", LABEL / "lib" / "core.py")
overlay = _load("brainmirror_label_overlay", LABEL / "overlay.py")


# --- the review rules, without a server ------------------------------------------------------
def test_an_empty_final_label_confirms_normal_and_any_region_abnormal():
    empty = np.zeros((4, 4, 4), np.uint8)
    region = empty.copy()
    region[1, 2, 3] = 1
    assert core.review_outcome(empty) == "normal"
    assert core.review_outcome(region) == "abnormal"
    assert core.review_outcome(region.astype(np.float32) * 0.5) == "abnormal"


def test_explicit_review_in_label_info_wins():
    empty = np.zeros((4, 4, 4), np.uint8)
    region = np.ones((4, 4, 4), np.uint8)
    assert core.review_outcome(empty, {"review": "abnormal"}) == "abnormal"
    assert core.review_outcome(region, {"review": "Normal"}) == "normal"
    assert core.review_outcome(region, {"review": "unsure"}) == "abnormal"


def test_review_order_rule_puts_the_nearest_to_the_threshold_first():
    scores = {"far-above": 20.0, "just-below": 5.5, "far-below": -3.0, "just-above": 6.2, "nan": float("nan")}
    order = core.review_order(scores, threshold=6.0)
    assert [r["id"] for r in order] == ["just-above", "just-below", "far-below", "far-above"]
    assert [r["distance"] for r in order] == pytest.approx([0.2, 0.5, 9.0, 14.0])
    # neither highest-score-first nor alphabetical
    assert [r["id"] for r in order] != sorted(scores, key=lambda k: -scores[k])[:4]


# --- helpers -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelServer:
    """One `monailabel start_server` of the app in label/, on loopback, stopped by PID."""

    def __init__(self, root: Path, studies: str, conf: dict[str, str], env: dict[str, str] | None = None):
        self.root, self.studies, self.port = root, studies, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        args = [str(LABEL_PYTHON), "-m", "monailabel.main", "start_server", "--app", str(LABEL), "--studies", studies,
                "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in conf.items():
            args += ["--conf", key, value]
        self.args = args
        # no scoring in the background (the tests ask for it), sessions in the test folder, no hub
        self.env = {**os.environ, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "false",
                    "MONAI_LABEL_DATASTORE_CACHE_PATH": str(root / "dicomweb-cache"), "HF_HUB_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen | None = None
        self.start_seconds = 0.0

    def start(self) -> None:
        clock = time.perf_counter()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        deadline = time.time() + SERVER_START_S
        while time.time() < deadline:
            assert self.process.poll() is None, f"the label server exited:\n{self.log_tail()}"
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/info/", timeout=5).ok:
                    self.start_seconds = time.perf_counter() - clock
                    return
            time.sleep(0.5)
        raise AssertionError(f"the label server did not start in {SERVER_START_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, timeout=30)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def get(self, path: str, **kwargs):
        answer = requests.get(f"{self.url}{path}", timeout=60, **kwargs)
        assert answer.ok, f"GET {path}: {answer.status_code} {answer.text[:500]}\n{self.log_tail()}"
        return answer.json()

    def post(self, path: str, expect_ok: bool = True, timeout: float = 600, **kwargs) -> requests.Response:
        answer = requests.post(f"{self.url}{path}", timeout=timeout, **kwargs)
        if expect_ok:
            assert answer.ok, f"POST {path}: {answer.status_code} {answer.text[:500]}\n{self.log_tail()}"
        return answer

    def save_label(self, image_id: str, label: nib.Nifti1Image, folder: Path, info: dict | None = None) -> dict:
        path = folder / f"label-{image_id}.nii.gz"
        nib.save(label, path)
        with open(path, "rb") as f:
            answer = requests.put(f"{self.url}/datastore/label", params={"image": image_id, "tag": "final"},
                                  files={"label": (path.name, f)}, data={"params": json.dumps(info or {})}, timeout=60)
        assert answer.ok, f"PUT label {image_id}: {answer.status_code} {answer.text[:500]}"
        return answer.json()

    def infer(self, image_id: str) -> tuple[dict, nib.Nifti1Image]:
        answer = self.post("/infer/brainmirror", params={"image": image_id})
        params, label = overlay.parse_infer_answer(answer.headers["content-type"], answer.content)
        return params, overlay.load_nifti(label)


@contextlib.contextmanager
def running(server: LabelServer):
    try:
        server.start()
        yield server
    finally:
        server.stop()


def sha256_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_studies(root: Path) -> dict[str, Path]:
    """Demo DICOM series (normal, tumour), two synthetic healthy NIfTI studies and a blank volume."""
    from brainmirror.cohort import make_subject, subject_rng
    from brainmirror.demo import make_demo_study

    root.mkdir(parents=True)
    make_demo_study(root / "dicom" / "normal", "normal")
    make_demo_study(root / "dicom" / "tumour", "tumour")
    for i in range(2):
        subject = make_subject("colin", subject_rng("demo", 10 + i), contrast="t1", acquisition="clean")
        nib.save(subject.image, root / f"healthy-{i}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), np.eye(4)), root / "blank.nii.gz")
    return {"root": root}


# --- a local datastore ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def local(tmp_path_factory):
    if not LABEL_PYTHON.exists():
        pytest.skip("the MONAI Label server's venv label/.venv is missing: run scripts/setup.sh")
    root = tmp_path_factory.mktemp("label")
    make_studies(root / "studies")
    shipped_before = sha256_tree(SHIPPED)
    server = LabelServer(root, str(root / "studies"),
                         {"site_dir": str(root / "site"), "cache_dir": str(root / "cache")})
    with running(server):
        datastore = server.get("/datastore/", params={"output": "all"})
        ids = sorted(datastore["objects"])
        by_patient = {i.split("-")[2]: i for i in ids if i.startswith("BM-DEMO-")}
        state = {"server": server, "root": root, "shipped_before": shipped_before, "ids": ids,
                 "tumour": by_patient["001"], "normal": by_patient["002"]}
        yield state
    assert sha256_tree(SHIPPED) == shipped_before, "the shipped bundle models/brainmirror was changed"


@needs_label_venv
def test_info_lists_the_brainmirror_tasks(local):
    info = local["server"].get("/info/")
    assert "brainmirror" in info["models"]
    assert info["models"]["brainmirror"]["labels"] == {"anomaly": 1}
    assert Path(info["models"]["brainmirror"]["bundle"]) == SHIPPED.resolve()
    assert "nearest_threshold" in info["strategies"]
    assert "|score - threshold|" in info["strategies"]["nearest_threshold"]["description"]
    assert "calibrate" in info["trainers"] and "brainmirror" in info["scoring"]
    # the two DICOM series were imported beside the three NIfTI files
    assert info["datastore"]["total"] == 5
    assert {"healthy-0", "healthy-1", "blank", local["tumour"], local["normal"]} == set(local["ids"])
    assert local["server"].start_seconds < SERVER_START_S


@needs_label_venv
def test_infer_returns_the_anomaly_label_on_the_image_grid(local):
    server = local["server"]
    clock = time.perf_counter()
    params, label = server.infer(local["tumour"])
    local["infer_seconds"] = time.perf_counter() - clock
    image = nib.load(local["root"] / "studies" / f"{local['tumour']}.nii.gz")
    shipped = json.loads((SHIPPED / "configs" / "metadata.json").read_text())["calibration"]
    assert params["threshold"] == pytest.approx(shipped["study"]["combined"]["threshold"])
    assert params["voxel_threshold"] == pytest.approx(shipped["voxel"]["threshold"])
    # the verdict is the score against the threshold (whether the shipped weights flag this
    # synthetic tumour is the evaluation's business, not the label server's)
    assert params["verdict"] == ("abnormal" if params["score"] > params["threshold"] else "normal")
    assert Path(params["bundle"]) == SHIPPED.resolve()
    data = np.asarray(label.dataobj)
    assert data.shape == image.shape
    assert np.allclose(label.affine, image.affine, atol=1e-3)
    assert set(np.unique(data)) <= {0, 1}
    assert bool(params["findings"]) == bool(data.any()) and (params["verdict"] == "abnormal" or not data.any())
    assert data.sum() * abs(np.linalg.det(image.affine[:3, :3])) / 1000 == pytest.approx(
        sum(f["volume_ml"] for f in params["findings"]), rel=0.01, abs=1e-6)
    # the answer is recorded for the review order
    info = server.get("/datastore/image/info", params={"image": local["tumour"]})
    assert info["brainmirror"]["score"] == pytest.approx(params["score"])
    # the README's picture is drawn from this answer (docs/label-overlay.png is made the same way)
    out = overlay.render(image, label, params, local["root"] / "overlay.png", title=local["tumour"])
    assert out.stat().st_size > 10_000


@needs_label_venv
def test_a_study_that_cannot_be_assessed_gets_a_clear_message(local):
    answer = local["server"].post("/infer/brainmirror", expect_ok=False, params={"image": "blank"})
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert detail.startswith("not assessed: ") and "constant" in detail
    assert "Traceback" not in answer.text


@needs_label_venv
def test_review_order_is_nearest_the_threshold_first(local):
    server = local["server"]
    first = server.post("/activelearning/nearest_threshold", json={}).json()
    datastore = server.get("/datastore/", params={"output": "all"})["objects"]
    infos = {k: v["image"].get("info", {}).get("brainmirror", {}) for k, v in datastore.items()}
    scores = {k: info["score"] for k, info in infos.items() if "score" in info}
    assert set(scores) == {"healthy-0", "healthy-1", local["tumour"], local["normal"]}
    assert "blank" in first["not_assessed"] and "constant" in first["not_assessed"]["blank"]
    threshold = first["threshold"]
    expected = sorted(scores, key=lambda k: abs(scores[k] - threshold))
    assert [q["id"] for q in first["queue"]] == expected
    assert first["id"] == expected[0]
    distances = [q["distance"] for q in first["queue"]]
    assert distances == sorted(distances) and distances[0] == pytest.approx(abs(scores[expected[0]] - threshold))
    local["scores"] = scores

    # review the first one: it leaves the queue and the next nearest comes up
    image = nib.load(local["root"] / "studies" / f"{first['id']}.nii.gz")
    server.save_label(first["id"], nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), local["root"],
                      {"review": "abnormal"} if first["id"] == local["tumour"] else None)
    second = server.post("/activelearning/nearest_threshold", json={}).json()
    assert second["id"] == expected[1]
    assert [q["id"] for q in second["queue"]] == expected[1:]


@needs_label_venv
def test_calibrate_uses_confirmed_normals_only(local):
    from brainmirror.training import threshold_at_fpr

    server, root, scores = local["server"], local["root"], local["scores"]
    # the highest-scoring study is confirmed abnormal (its final label keeps a region), so that using
    # it would change the healthy-only threshold; the three others are confirmed normal (empty label)
    abnormal = max(scores, key=scores.get)
    normals = sorted(k for k in scores if k != abnormal)
    for image_id in scores:
        image = nib.load(root / "studies" / f"{image_id}.nii.gz")
        label = np.zeros(image.shape, np.uint8)
        if image_id == abnormal:
            label[tuple(slice(s // 2 - 2, s // 2 + 2) for s in image.shape)] = 1
        server.save_label(image_id, nib.Nifti1Image(label, image.affine), root)

    # as Slicer's "Train" button does: an asynchronous train task, polled
    task = server.post("/train/calibrate", json={}).json()
    deadline = time.time() + 600
    while True:
        status = server.get("/train/")
        if status["id"] == task["id"] and status["status"] not in ("SUBMITTED", "RUNNING"):
            break
        assert time.time() < deadline, f"calibrate did not finish: {status}"
        time.sleep(2)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))

    report = server.get("/info/")["train_stats"]["calibrate"]
    scores = local["scores"]
    assert report["confirmed_normal"] == sorted(normals)
    assert report["excluded_confirmed_abnormal"] == [abnormal]
    shipped = json.loads((SHIPPED / "configs" / "metadata.json").read_text())["calibration"]
    assert report["old"]["study_threshold"] == pytest.approx(shipped["study"]["combined"]["threshold"])
    # the healthy-only rule: the (1 - FPR) quantile of the confirmed normals' scores, no other study
    fpr = shipped["study"]["combined"]["fpr"]
    expected = threshold_at_fpr(np.array([scores[i] for i in normals]), fpr)
    assert report["new"]["study_threshold"] == pytest.approx(expected, rel=1e-5)
    assert report["new"]["n_studies"] == 3
    # three normals cannot promise 5 %: the report says how far the true FPR may be off
    assert report["new"]["study_fpr_upper_95"] == pytest.approx(1 - 0.05 ** (1 / 3), rel=1e-6)
    with_abnormal = threshold_at_fpr(np.array([scores[i] for i in [*normals, abnormal]]), fpr)
    assert report["new"]["study_threshold"] != pytest.approx(with_abnormal)  # it was left out
    # direction: with fewer than 1/FPR normals the quantile is their highest score, so the threshold
    # moves from the shipped one towards it (down here: every confirmed normal scored below it)
    old = report["old"]["study_threshold"]
    assert np.sign(report["new"]["study_threshold"] - old) == np.sign(max(scores[i] for i in normals) - old) != 0
    assert report["new"]["voxel_threshold"] != pytest.approx(report["old"]["voxel_threshold"])

    # a new bundle beside the shipped one, now the active one; the shipped bundle untouched
    bundle = Path(report["bundle"])
    assert bundle.parent == root / "site" and bundle.name.startswith("brainmirror-site-")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["calibration"]["study"]["combined"]["threshold"] == pytest.approx(expected, rel=1e-5)
    assert sha256_tree(SHIPPED) == local["shipped_before"]
    assert Path(server.get("/info/")["models"]["brainmirror"]["bundle"]) == bundle

    # nothing assessable is left to review (the blank volume cannot be assessed)
    assert server.post("/activelearning/nearest_threshold", json={}).json() == {}


@needs_label_venv
def test_calibrate_refuses_fewer_than_two_confirmed_normals(tmp_path):
    """Run in the app's own process (as the train subprocess does), no server: a clear error."""
    studies = tmp_path / "studies"
    studies.mkdir()
    code = (
        "import sys; sys.path.insert(0, %r); from main import BrainmirrorApp\n"
        "app = BrainmirrorApp(%r, %r, {'site_dir': %r, 'cache_dir': %r})\n"
        "try:\n    app.train({'model': 'calibrate'})\n"
        "except ValueError as e:\n    print('REFUSED', e)\n"
    ) % (str(LABEL), str(LABEL), str(studies), str(tmp_path / "site"), str(tmp_path / "cache"))
    result = subprocess.run([str(LABEL_PYTHON), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    assert "REFUSED calibration needs at least 2 studies confirmed normal, found 0" in result.stdout, result.stderr[-2000:]
    assert not (tmp_path / "site").exists() or not any((tmp_path / "site").iterdir())


# --- Orthanc over DICOMweb ----------------------------------------------------------------------
ORTHANC = Path(shutil.which("Orthanc") or "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@needs_label_venv
@pytest.mark.skipif(not ORTHANC.exists() or not DICOMWEB_PLUGIN.exists(),
                    reason="Orthanc with DICOMweb is not installed (scripts/setup.sh installs orthanc, orthanc-dicomweb)")
def test_orthanc_datastore_over_dicomweb(tmp_path):
    from test_orthanc import OrthancProcess
    from brainmirror.demo import make_demo_study

    orthanc = OrthancProcess(tmp_path, "PACS", {
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomAet": "PACS"})
    try:
        orthanc.start()
        files, _ = make_demo_study(tmp_path / "normal", "normal")
        for path in files:
            orthanc.request("POST", "/instances", Path(path).read_bytes())
        series_uid = orthanc.get(f"/series/{orthanc.get('/series')[0]}")["MainDicomTags"]["SeriesInstanceUID"]
        server = LabelServer(tmp_path, f"http://127.0.0.1:{orthanc.http_port}/dicom-web",
                             {"site_dir": str(tmp_path / "site"), "cache_dir": str(tmp_path / "cache")})
        with running(server):
            assert server.post("/activelearning/random", json={}).json()["id"] == series_uid
            params, label = server.infer(series_uid)
            assert params["verdict"] == "normal" and params["score"] < params["threshold"]
            assert np.asarray(label.dataobj).shape[0] > 1 and not np.asarray(label.dataobj).any()
            # the radiologist confirms it normal: an empty final label, kept by the label server
            server.save_label(series_uid, label, tmp_path)
            labelled = server.get("/datastore/", params={"output": "all"})["objects"][series_uid]["labels"]
            assert "final" in labelled
            assert server.post("/activelearning/nearest_threshold", json={}).json() == {}
            assert not (tmp_path / "site").exists()
    finally:
        orthanc.stop()
