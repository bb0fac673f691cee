"""brainmirror routing inside Orthanc (Orthanc Python plugin; research use only, NOT FOR CLINICAL USE).

When a brain MR study becomes stable in Orthanc, this script runs brainmirror on it - the MAP
container (``"Runner": "docker"``) or the application in a Python virtual environment
(``"Runner": "venv"``) - stores the DICOM SR, SEG and key images it writes back into the same
study, reads the verdict from the SR and routes the study:

    abnormal      -> label brainmirror-abnormal, forward the study to PriorityModality
    normal        -> label brainmirror-normal (forwarded to NormalModality only when one is set)
    not assessed  -> label brainmirror-not-assessed, forward the study to ReviewModality
    error         -> label brainmirror-error, forward the study to ReviewModality

Labels need Orthanc 1.12 or later; the verdict is always kept as the study metadata
``BrainMirrorVerdict`` (declared in ``UserMetadata``), which Orthanc 1.10 (Debian 12) supports.

The script only uses the standard library of the Python that Orthanc's plugin links against
(python3.11 for Debian 12's orthanc-python); torch and the application run in a child process.
Settings: the ``"BrainMirror"`` section of the Orthanc configuration (see DEFAULTS below and
deploy/orthanc/orthanc.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

try:  # inside Orthanc
    import orthanc
except ImportError:  # imported by the unit tests
    orthanc = None

# --- settings ------------------------------------------------------------------------------------

DEFAULTS = {
    "Enabled": True,
    # "venv": <Python> <App> -i IN -o OUT -m <Models>; "docker": docker run <DockerImage> (the MAP)
    "Runner": "venv",
    "Python": "/opt/brainmirror/.venv/bin/python",
    "App": "/opt/brainmirror/app.py",
    "Models": "/opt/brainmirror/models",
    "SeriesRules": "",  # optional series selection rules JSON (venv runner: --series-rules)
    "Docker": "docker",
    "DockerImage": "brainmirror-map:latest",
    "DockerArguments": [],  # e.g. ["--gpus", "all"] with a CUDA image and the NVIDIA container toolkit
    "DockerUser": "auto",  # "auto": Orthanc's uid:gid (the image's own user when Orthanc runs as root); "": the image's
    "Environment": {},  # extra environment variables for the application (e.g. OMP_NUM_THREADS)
    "TimeoutSeconds": 1800,
    "WorkDirectory": "",  # "": a folder "brainmirror" next to Orthanc's storage; the study's files live here while it runs
    "LogDirectory": "",  # "": WorkDirectory/logs; the application's log of the last run of each study
    "KeepWorkFiles": False,
    # which stable studies are brain MR studies
    "Modalities": ["MR"],
    "BodyParts": ["BRAIN", "HEAD", "HEADNECK", "SKULL"],
    "DescriptionPattern": r"(?i)brain|head|neuro|cerebr|cranial|kopf|sch(a|ae|\u00e4)del|cerveau|cr(a|\u00e2)ne|hirn",
    # routing: names of entries of "DicomModalities"; "" means do not forward
    "PriorityModality": "PRIORITY",
    "ReviewModality": "REVIEW",
    "NormalModality": "",
    "ForwardRetries": 3,
    "ForwardRetryDelaySeconds": 30,
    "Labels": {
        "abnormal": "brainmirror-abnormal",
        "normal": "brainmirror-normal",
        "not-assessed": "brainmirror-not-assessed",
        "error": "brainmirror-error",
    },
}

# user-defined metadata this script writes on the study (declare them in "UserMetadata")
METADATA_VERDICT = "BrainMirrorVerdict"  # abnormal | normal | not-assessed | error
METADATA_STATUS = "BrainMirrorStatus"  # queued | running | done | forward-failed
METADATA_SOURCES = "BrainMirrorSources"  # fingerprint of the instances assessed (no rerun on the same set)
METADATA_DETAIL = "BrainMirrorDetail"  # JSON: exit code, outputs, destination, timings

# the codes brainmirror writes into the SR (brainmirror/dicom.py)
FINDING = ("121071", "DCM")
VERDICTS = {
    ("263654008", "SCT"): "abnormal",
    ("17621005", "SCT"): "normal",
    ("NOTASSESSED", "99BRAINMIRROR"): "not-assessed",
}
EXIT_ASSESSED, EXIT_NOT_ASSESSED = 0, 3  # app.py's exit codes
ALGORITHM = "brainmirror"  # Manufacturer and series description prefix of what brainmirror writes
MAP_INPUT, MAP_OUTPUT = "/var/holoscan/input", "/var/holoscan/output"


def load_settings(configuration: dict) -> dict:
    """The "BrainMirror" section of the Orthanc configuration over DEFAULTS."""
    settings = json.loads(json.dumps(DEFAULTS))
    section = configuration.get("BrainMirror", {}) or {}
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown BrainMirror settings: {', '.join(unknown)}")
    for key, value in section.items():
        if key == "Labels":
            settings["Labels"].update(value)
        else:
            settings[key] = value
    if settings["Runner"] not in ("venv", "docker"):
        raise ValueError(f"BrainMirror.Runner must be 'venv' or 'docker', not {settings['Runner']!r}")
    if not settings["WorkDirectory"]:
        storage = configuration.get("StorageDirectory", "OrthancStorage")
        settings["WorkDirectory"] = str(Path(storage).resolve().parent / "brainmirror")
    if not settings["LogDirectory"]:
        settings["LogDirectory"] = str(Path(settings["WorkDirectory"]) / "logs")
    return settings


# --- pure logic (unit-tested without Orthanc) ----------------------------------------------------


def is_brain_mr(study_tags: dict, series: list[dict], settings: dict) -> bool:
    """Whether a study is a brain MR study: an MR series whose body part or description says brain/head.

    ``series``: Orthanc series resources (``MainDicomTags``); ``study_tags``: the study's MainDicomTags.
    """
    pattern = re.compile(settings["DescriptionPattern"]) if settings["DescriptionPattern"] else None
    body_parts = {b.upper() for b in settings["BodyParts"]}
    for s in input_series(series, settings):
        tags = s.get("MainDicomTags", {})
        if tags.get("BodyPartExamined", "").strip().upper() in body_parts:
            return True
        texts = (tags.get("SeriesDescription", ""), tags.get("ProtocolName", ""), study_tags.get("StudyDescription", ""))
        if pattern is not None and any(pattern.search(t or "") for t in texts):
            return True
    return False


def input_series(series: list[dict], settings: dict) -> list[dict]:
    """The series brainmirror reads: modality in Modalities, and not one of its own results."""
    modalities = {m.upper() for m in settings["Modalities"]}
    chosen = []
    for s in series:
        tags = s.get("MainDicomTags", {})
        if tags.get("Modality", "").upper() not in modalities:
            continue
        if is_result(tags):
            continue
        chosen.append(s)
    return chosen


def is_result(series_tags: dict) -> bool:
    """Whether a series is one brainmirror wrote (SR, SEG, key images: "brainmirror <what> - NOT FOR CLINICAL USE")."""
    return series_tags.get("SeriesDescription", "").startswith(ALGORITHM + " ")


def fingerprint(instance_ids: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(instance_ids)).encode()).hexdigest()


def find_verdict(tags: dict) -> str | None:
    """The study-level Finding (DCM 121071) of a brainmirror SR, from Orthanc's simplified tags."""

    def code(item: dict, keyword: str) -> tuple[str, str] | None:
        seq = item.get(keyword) or []
        if not seq:
            return None
        return (str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", "")))

    def walk(items: list) -> str | None:
        for item in items or []:
            if not isinstance(item, dict):
                continue
            if item.get("ValueType") == "CODE" and code(item, "ConceptNameCodeSequence") == FINDING:
                found = VERDICTS.get(code(item, "ConceptCodeSequence"))
                if found:
                    return found
            found = walk(item.get("ContentSequence"))
            if found:
                return found
        return None

    return walk(tags.get("ContentSequence"))


def outcome(exit_code: int | None, sr_verdict: str | None) -> str:
    """abnormal | normal | not-assessed | error, from the app's exit code and the verdict in its SR."""
    if exit_code == EXIT_ASSESSED and sr_verdict in ("abnormal", "normal"):
        return sr_verdict
    if exit_code == EXIT_NOT_ASSESSED and sr_verdict == "not-assessed":
        return "not-assessed"
    return "error"  # crashed, timed out, or an SR that does not match the exit code


def destination(result: str, settings: dict) -> str:
    """The DicomModalities entry the study goes to ("" = nowhere)."""
    return {
        "abnormal": settings["PriorityModality"],
        "normal": settings["NormalModality"],
        "not-assessed": settings["ReviewModality"],
        "error": settings["ReviewModality"],
    }[result]


def command(settings: dict, input_dir: Path, output_dir: Path, name: str) -> list[str]:
    """The command that runs brainmirror on input_dir, writing into output_dir."""
    if settings["Runner"] == "docker":
        cmd = [settings["Docker"], "run", "--rm", "--name", name, "--network", "none",
               "--ulimit", "stack=33554432", "--security-opt", "no-new-privileges"]
        user = settings["DockerUser"]
        if user == "auto":  # Orthanc's own uid:gid, but never root: then the image's non-root user
            user = f"{os.getuid()}:{os.getgid()}" if os.getuid() != 0 else ""
        if user:
            cmd += ["--user", user]
        for key, value in settings["Environment"].items():
            cmd += ["--env", f"{key}={value}"]
        cmd += ["-v", f"{input_dir}:{MAP_INPUT}:ro", "-v", f"{output_dir}:{MAP_OUTPUT}"]
        return cmd + list(settings["DockerArguments"]) + [settings["DockerImage"]]
    cmd = ["/bin/sh", "-c", 'ulimit -s 32768 2>/dev/null; exec "$@"', "sh",  # holoscan wants a 32 MB stack
           settings["Python"], settings["App"], "-i", str(input_dir), "-o", str(output_dir), "-m", settings["Models"]]
    if settings["SeriesRules"]:
        cmd += ["--series-rules", settings["SeriesRules"]]
    return cmd


# --- Orthanc side --------------------------------------------------------------------------------


def _get(uri: str):
    return json.loads(orthanc.RestApiGet(uri))


def _log(level: str, message: str) -> None:
    getattr(orthanc, {"info": "LogInfo", "warning": "LogWarning", "error": "LogError"}[level])("brainmirror: " + message)


class Router:
    """A queue of stable studies and one worker thread that assesses and routes them one at a time."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.pending: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.process: subprocess.Popen | None = None
        self.container: str | None = None
        self.labels_supported: bool | None = None
        self.thread = threading.Thread(target=self._work, name="brainmirror-router", daemon=True)

    # lifecycle
    def start(self) -> None:
        Path(self.settings["WorkDirectory"]).mkdir(parents=True, exist_ok=True, mode=0o700)
        Path(self.settings["LogDirectory"]).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.thread.start()
        _log("warning", f"routing stable brain MR studies (runner {self.settings['Runner']}; priority "
                        f"{self.settings['PriorityModality'] or '-'}, review {self.settings['ReviewModality'] or '-'})")

    def stop(self) -> None:
        self.stopping.set()
        self._kill_child()
        self.queue.put(None)
        self.thread.join(timeout=30)

    def submit(self, study_id: str) -> None:
        with self.lock:
            if study_id in self.pending:
                return
            self.pending.add(study_id)
        self.queue.put(study_id)

    def _work(self) -> None:
        while not self.stopping.is_set():
            study_id = self.queue.get()
            if study_id is None:
                break
            with self.lock:
                self.pending.discard(study_id)
            try:
                self.process_study(study_id)
            except Exception as error:  # keep the worker alive whatever happens to one study
                if not self.stopping.is_set():
                    _log("error", f"study {study_id}: {type(error).__name__}: {error}")

    # one study
    def process_study(self, study_id: str) -> None:
        try:
            study = _get(f"/studies/{study_id}")
        except Exception:
            return  # deleted meanwhile
        series = [_get(f"/series/{s}") for s in study["Series"]]
        if not is_brain_mr(study.get("MainDicomTags", {}), series, self.settings):
            _log("info", f"study {study_id}: not a brain MR study, left alone")
            return
        sources = [i for s in input_series(series, self.settings) for i in s["Instances"]]
        print_ = fingerprint(sources)
        if self._metadata(study_id, METADATA_SOURCES) == print_:
            return  # these instances were assessed already (this event came from storing the results)
        self._set_metadata(study_id, METADATA_SOURCES, print_)
        self._set_metadata(study_id, METADATA_STATUS, "running")
        started = time.time()
        work = Path(tempfile.mkdtemp(prefix=f"{study_id[:8]}-", dir=self.settings["WorkDirectory"]))
        try:
            result, detail = self._assess(study_id, sources, work)
        finally:
            if not self.settings["KeepWorkFiles"]:
                shutil.rmtree(work, ignore_errors=True)
        detail["seconds_assess"] = round(time.time() - started, 1)
        self._set_label(study_id, result)
        self._set_metadata(study_id, METADATA_VERDICT, result)
        target = destination(result, self.settings)
        status = "done"
        if target:
            detail["forwarded_to"] = target
            if not self._forward(study_id, target):
                status = "forward-failed"
        detail["seconds_total"] = round(time.time() - started, 1)
        self._set_metadata(study_id, METADATA_DETAIL, json.dumps(detail, sort_keys=True))
        self._set_metadata(study_id, METADATA_STATUS, status)
        _log("warning", f"study {study_id}: {result}" + (f", forwarded to {target}" if target else "")
             + f" ({detail['seconds_total']} s){'' if status == 'done' else ' - FORWARDING FAILED'}")

    def _assess(self, study_id: str, sources: list[str], work: Path) -> tuple[str, dict]:
        input_dir, output_dir = work / "input", work / "output"
        input_dir.mkdir()
        output_dir.mkdir()
        for instance in sources:
            (input_dir / f"{instance}.dcm").write_bytes(orthanc.RestApiGet(f"/instances/{instance}/file"))
        if self.settings["Runner"] == "docker":  # the container user must be able to read and write these
            for path in (work, input_dir, output_dir):
                path.chmod(0o755 if path != output_dir else 0o777)
        name = f"brainmirror-{study_id[:12]}-{os.getpid()}"
        cmd = command(self.settings, input_dir, output_dir, name)
        env = dict(os.environ, PYTHONUNBUFFERED="1", MPLCONFIGDIR=str(work / "mpl"),
                   **{k: str(v) for k, v in self.settings["Environment"].items()})
        log_path = Path(self.settings["LogDirectory"]) / f"{study_id}.log"
        exit_code: int | None = None
        with open(log_path, "wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, cwd=str(Path(self.settings["App"]).parent)
                                            if self.settings["Runner"] == "venv" else str(work),
                                            start_new_session=True)
            self.container = name if self.settings["Runner"] == "docker" else None
            try:
                exit_code = self.process.wait(timeout=self.settings["TimeoutSeconds"])
            except subprocess.TimeoutExpired:
                _log("error", f"study {study_id}: brainmirror took over {self.settings['TimeoutSeconds']} s; stopped")
                self._kill_child()
                self.process.wait()
            finally:
                self.process, self.container = None, None
        uploaded, verdict = [], None
        for path in sorted(output_dir.glob("*.dcm")):
            answer = json.loads(orthanc.RestApiPost("/instances", path.read_bytes()))
            uploaded.append(answer["ID"])
            if answer.get("ParentStudy") != study_id:
                _log("warning", f"study {study_id}: result {path.name} went to another study {answer.get('ParentStudy')}")
                continue
            tags = _get(f"/instances/{answer['ID']}/simplified-tags")
            if tags.get("Modality") == "SR" and tags.get("Manufacturer") == ALGORITHM:
                verdict = find_verdict(tags) or verdict
        result = outcome(exit_code, verdict)
        if result == "error":
            _log("error", f"study {study_id}: brainmirror exit code {exit_code}, SR verdict {verdict}; see {log_path}")
        return result, {"exit_code": exit_code, "sr_verdict": verdict, "results": uploaded,
                        "instances_assessed": len(sources)}

    def _kill_child(self) -> None:
        process, container = self.process, self.container
        if container:
            subprocess.run([self.settings["Docker"], "rm", "-f", container], capture_output=True, timeout=60)
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _forward(self, study_id: str, modality: str) -> bool:
        body = json.dumps({"Resources": [study_id], "Synchronous": True})
        for attempt in range(1, int(self.settings["ForwardRetries"]) + 2):
            try:
                orthanc.RestApiPost(f"/modalities/{modality}/store", body)
                return True
            except Exception as error:
                _log("warning", f"study {study_id}: C-STORE to {modality} failed (attempt {attempt}): {error}")
                if self.stopping.wait(float(self.settings["ForwardRetryDelaySeconds"])):
                    return False
        return False

    def _metadata(self, study_id: str, name: str) -> str | None:
        try:
            value = orthanc.RestApiGet(f"/studies/{study_id}/metadata/{name}")
        except Exception:
            return None
        return value.decode() if isinstance(value, bytes) else value

    def _set_metadata(self, study_id: str, name: str, value: str) -> None:
        orthanc.RestApiPut(f"/studies/{study_id}/metadata/{name}", value)

    def _set_label(self, study_id: str, result: str) -> None:
        """Labels (Orthanc >= 1.12): exactly one brainmirror label on the study."""
        if self.labels_supported is False:
            return
        labels = self.settings["Labels"]
        try:
            for other in labels.values():
                if other != labels[result]:
                    orthanc.RestApiDelete(f"/studies/{study_id}/labels/{other}")
            orthanc.RestApiPut(f"/studies/{study_id}/labels/{labels[result]}", "")
            self.labels_supported = True
        except Exception:
            if self.labels_supported is None:
                _log("warning", "this Orthanc has no labels (1.12+); the verdict is in the study metadata "
                                f"{METADATA_VERDICT} only")
            self.labels_supported = False


ROUTER: Router | None = None


def on_change(change_type, level, resource_id) -> None:
    global ROUTER
    if change_type == orthanc.ChangeType.ORTHANC_STARTED:
        configuration = json.loads(orthanc.GetConfiguration())
        settings = load_settings(configuration)
        missing = [m for m in (METADATA_VERDICT, METADATA_STATUS, METADATA_SOURCES, METADATA_DETAIL)
                   if m not in configuration.get("UserMetadata", {})]
        if missing:
            _log("error", f"declare {', '.join(missing)} in UserMetadata; routing is off")
            return
        if not settings["Enabled"]:
            _log("warning", "BrainMirror.Enabled is false; routing is off")
            return
        ROUTER = Router(settings)
        ROUTER.start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        if ROUTER is not None:
            ROUTER.stop()
    elif change_type == orthanc.ChangeType.STABLE_STUDY and ROUTER is not None:
        ROUTER.submit(resource_id)


if orthanc is not None:
    orthanc.RegisterOnChangeCallback(on_change)
