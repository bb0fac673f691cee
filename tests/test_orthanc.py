"""PACS routing with Orthanc (deploy/orthanc): unit tests of the routing script, and an integration
test with real Orthanc processes on loopback.

The integration test starts three Orthancs - BRAINMIRROR (the shipped deploy/orthanc/orthanc.json with
the brainmirror_orthanc.py plugin, venv runner) and two plain ones standing for the priority reading node
and the human-review node - C-STOREs three demo studies with dcmtk's storescu (tumour, normal, and a
4-slice copy of the normal one that cannot be assessed), waits until the plugin has routed them, and
checks results, routing and verdict metadata against the SR read back from Orthanc. Every process it
starts is stopped by PID.

The verdicts of the tumour/normal demo studies are only asserted with the shipped model (or with
BRAINMIRROR_ASSERT_VERDICTS=1); a small test bundle gives meaningless verdicts, so then the test only
asserts that the routing matches whatever verdict the SR states.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import REPO, shipped_weights, terminate

ORTHANC_DIR = REPO / "deploy" / "orthanc"
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
ORTHANC = shutil.which("Orthanc")
ROUTING_TIMEOUT = 420  # seconds for all three studies to be routed (about 2 minutes on 2 busy cores)


def load_plugin():
    spec = importlib.util.spec_from_file_location("brainmirror_orthanc", ORTHANC_DIR / "brainmirror_orthanc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plugin = load_plugin()


# --- unit tests of the routing script (no Orthanc needed) ------------------------------------------


def _series(modality, body_part="", description="", manufacturer=""):
    return {"MainDicomTags": {"Modality": modality, "BodyPartExamined": body_part,
                              "SeriesDescription": description, "Manufacturer": manufacturer},
            "Instances": [f"{modality}-{description}"]}


def test_the_plugin_knows_the_codes_brainmirror_writes():
    from brainmirror.dicom import CODE_ABNORMAL, CODE_FINDING, CODE_NORMAL, CODE_NOT_ASSESSED

    assert plugin.FINDING == (CODE_FINDING.value, CODE_FINDING.scheme_designator)
    assert plugin.VERDICTS == {
        (CODE_ABNORMAL.value, CODE_ABNORMAL.scheme_designator): "abnormal",
        (CODE_NORMAL.value, CODE_NORMAL.scheme_designator): "normal",
        (CODE_NOT_ASSESSED.value, CODE_NOT_ASSESSED.scheme_designator): "not-assessed",
    }


def test_shipped_orthanc_configuration_is_valid_and_closed_by_default():
    configuration = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
    settings = plugin.load_settings(  # raises on unknown BrainMirror keys; Orthanc expands ${...} from the environment
        json.loads((ORTHANC_DIR / "orthanc.json").read_text().replace("${BRAINMIRROR_RUNNER}", "venv")))
    assert settings["PriorityModality"] in configuration["DicomModalities"]
    assert settings["ReviewModality"] in configuration["DicomModalities"]
    assert configuration["RemoteAccessAllowed"] is False and configuration["AuthenticationEnabled"] is True
    assert all(k.startswith("${") and v.startswith("${") for k, v in configuration["RegisteredUsers"].items())
    for key in ("Store", "Find", "FindWorklist", "Get", "Move", "Echo"):
        assert configuration[f"DicomAlwaysAllow{key}"] is False
    assert configuration["DicomCheckCalledAet"] and configuration["DicomCheckModalityHost"]
    senders = [name for name, m in configuration["DicomModalities"].items() if m["AllowStore"]]
    assert senders == ["SCANNER"]
    for name in ("BrainMirrorVerdict", "BrainMirrorStatus", "BrainMirrorSources", "BrainMirrorDetail"):
        assert name in configuration["UserMetadata"]


def test_brain_mr_selection():
    settings = plugin.load_settings({})
    assert plugin.is_brain_mr({}, [_series("MR", "BRAIN")], settings)
    assert plugin.is_brain_mr({"StudyDescription": "MRT Schädel nativ"}, [_series("MR")], settings)
    assert plugin.is_brain_mr({}, [_series("MR", description="AX FLAIR NEURO")], settings)
    assert not plugin.is_brain_mr({}, [_series("MR", "KNEE")], settings)
    assert not plugin.is_brain_mr({"StudyDescription": "CT HEAD"}, [_series("CT", "HEAD")], settings)
    # brainmirror's own results never count as input
    ours = _series("OT", "BRAIN", "brainmirror key images - NOT FOR CLINICAL USE", "brainmirror")
    assert not plugin.is_brain_mr({}, [ours], plugin.load_settings({"BrainMirror": {"Modalities": ["MR", "OT"]}}))
    assert plugin.is_brain_mr({}, [_series("MR", "BRAIN", "T1 3D (synthetic demo)", "brainmirror")], settings)
    assert not plugin.is_brain_mr({}, [ours, _series("SR"), _series("SEG")], settings)
    assert [s["Instances"] for s in plugin.input_series([ours, _series("MR", "BRAIN", "T1")], settings)] == [["MR-T1"]]


def test_routing_table():
    settings = plugin.load_settings({"BrainMirror": {"PriorityModality": "P", "ReviewModality": "R"}})
    assert plugin.outcome(0, "abnormal") == "abnormal" and plugin.destination("abnormal", settings) == "P"
    assert plugin.outcome(0, "normal") == "normal" and plugin.destination("normal", settings) == ""
    assert plugin.outcome(3, "not-assessed") == "not-assessed" and plugin.destination("not-assessed", settings) == "R"
    for code, verdict in ((1, None), (None, None), (0, None), (0, "not-assessed"), (3, "abnormal"), (-9, "normal")):
        assert plugin.outcome(code, verdict) == "error"
    assert plugin.destination("error", settings) == "R"
    with pytest.raises(ValueError):
        plugin.load_settings({"BrainMirror": {"PriorityModalty": "P"}})


def test_find_verdict_in_simplified_tags():
    def item(value_type, name, concept=None, children=None):
        entry = {"ValueType": value_type, "ConceptNameCodeSequence": [{"CodeValue": name[0], "CodingSchemeDesignator": name[1]}]}
        if concept:
            entry["ConceptCodeSequence"] = [{"CodeValue": concept[0], "CodingSchemeDesignator": concept[1]}]
        if children:
            entry["ContentSequence"] = children
        return entry

    finding = item("CODE", ("121071", "DCM"), ("263654008", "SCT"))
    other = item("CODE", ("111001", "DCM"), ("17621005", "SCT"))
    tags = {"ContentSequence": [item("CONTAINER", ("126010", "DCM"), children=[
        item("CONTAINER", ("125007", "DCM"), children=[other, finding])])]}
    assert plugin.find_verdict(tags) == "abnormal"
    assert plugin.find_verdict({"ContentSequence": [other]}) is None


def test_commands(tmp_path):
    venv = plugin.load_settings({"BrainMirror": {"Python": "/v/python", "App": "/a/app.py", "Models": "/m"}})
    cmd = plugin.command(venv, tmp_path / "in", tmp_path / "out", "n")
    assert cmd[:3] == ["/bin/sh", "-c", 'ulimit -s 32768 2>/dev/null; exec "$@"']
    assert cmd[4:] == ["/v/python", "/a/app.py", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", "/m"]
    docker = plugin.load_settings({"BrainMirror": {"Runner": "docker", "DockerImage": "img:1", "DockerUser": "5:6"}})
    cmd = plugin.command(docker, tmp_path / "in", tmp_path / "out", "n")
    assert cmd[:2] == ["docker", "run"] and cmd[-1] == "img:1"
    joined = " ".join(cmd)
    for part in ("--network none", "--ulimit stack=33554432", "--user 5:6",
                 f"{tmp_path / 'in'}:/var/holoscan/input:ro", f"{tmp_path / 'out'}:/var/holoscan/output"):
        assert part in joined


def test_workflow_manager_definition_matches_the_orthanc_routing():
    """deploy/workflow-manager: the MONAI Deploy Workflow Manager variant of the same routing."""
    workflow = json.loads((REPO / "deploy" / "workflow-manager" / "brainmirror-workflow.json").read_text())
    tasks = {task["id"]: task for task in workflow["tasks"]}
    assert len(tasks) == len(workflow["tasks"]) and len(workflow["name"]) <= 15
    router = workflow["tasks"][0]  # the first task runs first
    assert router["type"] == "router"
    condition = " ".join(router["task_destinations"][0]["conditions"])
    assert "('0008','0060') }} == 'MR'" in condition and "('0018','0015') }} == 'BRAIN'" in condition
    gateway = set(workflow["informatics_gateway"]["export_destinations"])
    for task in workflow["tasks"]:
        for destination in task.get("task_destinations", []):
            assert destination["name"] in tasks
        for destination in task.get("export_destinations", []):
            assert destination["name"] in gateway
    routes = {d["name"]: " ".join(d["conditions"]) for d in tasks["brainmirror"]["task_destinations"]}
    verdicts = {"abnormal": "export-priority", "normal": "export-results", "not-assessed": "export-review",
                "error": "export-review"}
    for verdict, task_id in verdicts.items():
        assert "result.verdict }} == '" + verdict + "'" in routes[task_id]
    assert tasks["export-priority"]["export_destinations"] == [{"name": "PRIORITY"}]
    assert tasks["export-review"]["export_destinations"] == [{"name": "REVIEW"}]
    template = (REPO / "deploy" / "workflow-manager" / "argo-workflow-template.yaml").read_text()
    assert f"name: {tasks['brainmirror']['args']['workflow_template_name']}\n" in template
    for artifact in ("input-dicom", "brainmirror-output"):
        assert f"- name: {artifact}\n" in template


# --- integration test with real Orthanc processes ---------------------------------------------------

needs_orthanc = pytest.mark.skipif(
    ORTHANC is None or not PYTHON_PLUGIN.exists(),
    reason="Orthanc is not installed (Debian: apt-get install orthanc orthanc-python orthanc-dicomweb; "
           "scripts/setup.sh installs them)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancProcess:
    """One Orthanc on loopback with its own storage and configuration, stopped by PID."""

    def __init__(self, root: Path, name: str, configuration: dict, env: dict[str, str] | None = None,
                 credentials: tuple[str, str] | None = None):
        self.name, self.root = name, root / name
        self.root.mkdir(parents=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        configuration = {**configuration, "Name": name, "HttpPort": self.http_port, "DicomPort": self.dicom_port,
                         "StorageDirectory": str(self.root / "db"), "IndexDirectory": str(self.root / "db")}
        self.config = self.root / "orthanc.json"
        self.config.write_text(json.dumps(configuration, indent=2))
        self.log = self.root / "orthanc.log"
        self.auth = ("Basic " + b64encode(":".join(credentials).encode()).decode()) if credentials else None
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, cwd=self.root)
        deadline = time.time() + 30
        while time.time() < deadline:
            assert self.process.poll() is None, f"{self.name} exited:\n{self.log_tail()}"
            with contextlib.suppress(OSError):
                self.get("/system")
                return
            time.sleep(0.3)
        raise AssertionError(f"{self.name} did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, timeout=40)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def request(self, method: str, uri: str, body: bytes | None = None, auth: bool = True) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{uri}", data=body, method=method)
        if self.auth and auth:
            request.add_header("Authorization", self.auth)
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read()

    def get(self, uri: str):
        return json.loads(self.request("GET", uri))

    def study_id(self, study_uid: str) -> str | None:
        found = json.loads(self.request("POST", "/tools/lookup", study_uid.encode()))
        return next((f["ID"] for f in found if f["Type"] == "Study"), None)

    def metadata(self, study_id: str, name: str) -> str | None:
        try:
            return self.request("GET", f"/studies/{study_id}/metadata/{name}").decode()
        except urllib.error.HTTPError:
            return None


def storescu(port: int, folder: Path, calling: str = "SCANNER", called: str = "BRAINMIRROR") -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", calling, "-aec", called, "+sd", "+r", "127.0.0.1", str(port), str(folder)],
                          capture_output=True, text=True, timeout=120)


def sr_verdict(dataset: pydicom.Dataset) -> str | None:
    """The study-level Finding of a brainmirror SR (read here with pydicom, independently of the plugin)."""
    from brainmirror.dicom import CODE_ABNORMAL, CODE_FINDING, CODE_NORMAL, CODE_NOT_ASSESSED

    names = {(c.value, c.scheme_designator): v for c, v in
             ((CODE_ABNORMAL, "abnormal"), (CODE_NORMAL, "normal"), (CODE_NOT_ASSESSED, "not-assessed"))}

    def walk(items):
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if item.get("ValueType") == "CODE" and name and (name[0].CodeValue, name[0].CodingSchemeDesignator) == (
                    CODE_FINDING.value, CODE_FINDING.scheme_designator):
                concept = item.ConceptCodeSequence[0]
                return names.get((concept.CodeValue, concept.CodingSchemeDesignator))
            found = walk(item.get("ContentSequence", []))
            if found:
                return found
        return None

    return walk(dataset.get("ContentSequence", []))


def _stop_strays(marker: str) -> None:
    """Stop, by PID, any application process still running on this test's files (normally none)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def demo_studies(tmp_path_factory) -> dict[str, Path]:
    """tumour and normal demo studies (SYNTHETIC), and a 4-slice copy of normal as a study of its own."""
    root = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-m", "brainmirror", "demo-data", str(root), "--study", "all"],
                   check=True, cwd=REPO, capture_output=True, timeout=300)
    few = root / "few"
    few.mkdir()
    study_uid, series_uid = generate_uid(), generate_uid()
    for path in sorted((root / "normal").glob("*.dcm"))[80:84]:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName, ds.AccessionNumber = "BM-DEMO-FEW", "Demo^Few", "FEW1"
        ds.save_as(few / path.name)
    return {"tumour": root / "tumour", "normal": root / "normal", "few": few}


@needs_orthanc
@pytest.mark.orthanc
@pytest.mark.slow
def test_orthanc_routes_brain_mr_studies_on_the_sr_verdict(tmp_path, demo_studies, models_dir):
    assert shutil.which("storescu"), "storescu (dcmtk) is needed: scripts/setup.sh installs it"
    strict = os.environ.get("BRAINMIRROR_ASSERT_VERDICTS", "1" if shipped_weights() else "0") == "1"
    root = tmp_path / "orthanc"
    destination = {"Plugins": [], "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                   "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True, "StableAge": 1}
    priority = OrthancProcess(root, "PRIORITY", {**destination, "DicomAet": "PRIORITY"})
    review = OrthancProcess(root, "REVIEW", {**destination, "DicomAet": "REVIEW"})

    shipped = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
    shipped["PythonScript"] = str(ORTHANC_DIR / "brainmirror_orthanc.py")
    shipped["Plugins"] = [str(PYTHON_PLUGIN)]  # DICOMweb is not needed here
    shipped["StableAge"] = 2
    shipped["BrainMirror"].update({
        "Python": sys.executable, "App": str(REPO / "app.py"), "Models": str(models_dir),
        "WorkDirectory": str(root / "work"), "ForwardRetries": 1, "ForwardRetryDelaySeconds": 2,
        "TimeoutSeconds": 300,
    })
    credentials = ("tester", os.urandom(12).hex())
    env = {"BRAINMIRROR_ORTHANC_USER": credentials[0], "BRAINMIRROR_ORTHANC_PASSWORD": credentials[1],
           "BRAINMIRROR_AET": "BRAINMIRROR", "BRAINMIRROR_RUNNER": "venv", "BRAINMIRROR_IMAGE": "unused",
           "BRAINMIRROR_SCANNER_AET": "SCANNER", "BRAINMIRROR_SCANNER_HOST": "127.0.0.1", "BRAINMIRROR_SCANNER_PORT": "104",
           "BRAINMIRROR_PRIORITY_AET": "PRIORITY", "BRAINMIRROR_PRIORITY_HOST": "127.0.0.1",
           "BRAINMIRROR_PRIORITY_PORT": str(priority.dicom_port),
           "BRAINMIRROR_REVIEW_AET": "REVIEW", "BRAINMIRROR_REVIEW_HOST": "127.0.0.1",
           "BRAINMIRROR_REVIEW_PORT": str(review.dicom_port)}
    brainmirror = OrthancProcess(root, "BRAINMIRROR", shipped, env=env, credentials=credentials)

    nodes = (priority, review, brainmirror)
    try:
        for node in nodes:
            node.start()
        # closed by default: no REST without credentials, no C-STORE from an unknown AE title
        with pytest.raises(urllib.error.HTTPError) as refused:
            brainmirror.request("GET", "/system", auth=False)
        assert refused.value.code == 401
        intruder = storescu(brainmirror.dicom_port, demo_studies["few"], calling="INTRUDER")
        assert intruder.returncode != 0
        assert brainmirror.get("/studies") == []

        stored: dict[str, float] = {}
        uids: dict[str, str] = {}
        for name in ("tumour", "normal", "few"):
            sent = storescu(brainmirror.dicom_port, demo_studies[name])
            assert sent.returncode == 0, sent.stdout + sent.stderr
            stored[name] = time.time()
            uids[name] = pydicom.dcmread(next(demo_studies[name].glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID

        ids: dict[str, str] = {}
        routed: dict[str, float] = {}
        deadline = time.time() + ROUTING_TIMEOUT
        while len(routed) < len(uids) and time.time() < deadline:
            for name, uid in uids.items():
                if name in routed:
                    continue
                ids[name] = ids.get(name) or brainmirror.study_id(uid)
                if ids[name] and brainmirror.metadata(ids[name], "BrainMirrorStatus") in ("done", "forward-failed"):
                    routed[name] = time.time()
            assert brainmirror.process.poll() is None, brainmirror.log_tail()
            time.sleep(1)
        assert len(routed) == len(uids), f"not routed in time: {set(uids) - set(routed)}\n{brainmirror.log_tail()}"

        for name, uid in uids.items():
            study = ids[name]
            detail = json.loads(brainmirror.metadata(study, "BrainMirrorDetail"))
            assert brainmirror.metadata(study, "BrainMirrorStatus") == "done", (name, detail, brainmirror.log_tail())
            # the results are in the source study: an SR by brainmirror, plus what it references
            ours = {}
            for series_id in brainmirror.get(f"/studies/{study}")["Series"]:
                series = brainmirror.get(f"/series/{series_id}")
                if plugin.is_result(series["MainDicomTags"]):
                    ours.setdefault(series["MainDicomTags"]["Modality"], []).extend(series["Instances"])
            assert len(ours.get("SR", [])) == 1, (name, ours, detail)
            assert sorted(i for v in ours.values() for i in v) == sorted(detail["results"])
            sr = pydicom.dcmread(__import__("io").BytesIO(brainmirror.request("GET", f"/instances/{ours['SR'][0]}/file")))
            assert sr.StudyInstanceUID == uid
            verdict = sr_verdict(sr)
            assert verdict == detail["sr_verdict"], (name, verdict, detail)
            assert brainmirror.metadata(study, "BrainMirrorVerdict") == verdict
            has_findings = any(item.get("ReferencedSOPClassUID") == "1.2.840.10008.5.1.4.1.1.66.4"
                               for evidence in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
                               for series in evidence.ReferencedSeriesSequence
                               for item in series.ReferencedSOPSequence)
            assert bool(ours.get("SEG")) == has_findings, (name, ours)
            if verdict == "not-assessed":
                assert set(ours) == {"SR"}
            else:
                assert "OT" in ours  # key images

            # routing follows the verdict
            at_priority, at_review = priority.study_id(uid), review.study_id(uid)
            assert bool(at_priority) == (verdict == "abnormal"), (name, verdict)
            assert bool(at_review) == (verdict == "not-assessed"), (name, verdict)
            for node, found in ((priority, at_priority), (review, at_review)):
                if found:  # the whole study, results included
                    assert node.get(f"/studies/{found}/statistics")["CountInstances"] == \
                        brainmirror.get(f"/studies/{study}/statistics")["CountInstances"]
            with contextlib.suppress(urllib.error.HTTPError):  # labels: Orthanc 1.12 and later only
                labels = brainmirror.get(f"/studies/{study}/labels")
                assert labels == [f"brainmirror-{verdict}"]
            print(f"{name}: {verdict}, routed {routed[name] - stored[name]:.1f} s after its C-STORE "
                  f"(app + upload {detail['seconds_assess']} s, total {detail['seconds_total']} s)")

        assert json.loads(brainmirror.metadata(ids["few"], "BrainMirrorDetail"))["exit_code"] == 3
        if strict:
            assert brainmirror.metadata(ids["tumour"], "BrainMirrorVerdict") == "abnormal"
            assert brainmirror.metadata(ids["normal"], "BrainMirrorVerdict") == "normal"
            assert "SEG" in {brainmirror.get(f"/series/{s}")["MainDicomTags"]["Modality"]
                             for s in brainmirror.get(f"/studies/{ids['tumour']}")["Series"]}

        # storing the results made the studies stable again: they must not be assessed a second time
        time.sleep(shipped["StableAge"] + 3)
        for name in uids:
            modalities = [brainmirror.get(f"/series/{s}")["MainDicomTags"]["Modality"]
                          for s in brainmirror.get(f"/studies/{ids[name]}")["Series"]]
            assert modalities.count("SR") == 1, (name, modalities)
            assert brainmirror.metadata(ids[name], "BrainMirrorStatus") == "done"
    finally:
        for node in reversed(nodes):
            node.stop()
        _stop_strays(str(root))
