"""The MAP container (deploy/Dockerfile), built and run for real.

Starts its own Docker daemon (Debian's docker.io: ``dockerd --iptables=false --bridge=none`` with a data
root in a temporary folder), makes a local base image with ``debootstrap --variant=minbase bookworm`` +
``docker import`` (no registry is needed), builds the image with ``--network host`` and passes the host
CA bundle as a BuildKit secret, runs it with ``--network none`` on a demo study, checks the SR/SEG it
writes, and, where Orthanc is installed, lets the Orthanc routing plugin run the image once. The daemon
(and what it started) is stopped by PID and its data root removed.

Needs root, dockerd, a BuildKit-capable docker CLI (docker.io's, or one with buildx) and debootstrap;
about 5 minutes cold on 2 cores. Settings (environment):

  BRAINMIRROR_DOCKER_HOST      use this running daemon (e.g. unix:///var/run/docker.sock) instead of starting one
  BRAINMIRROR_BASE_IMAGE       a base image already in that daemon (skips debootstrap)
  BRAINMIRROR_DEBIAN_MIRROR    debootstrap mirror (default http://deb.debian.org/debian)
  BRAINMIRROR_WHEELS           a folder of local wheels for the build (default: pip's find-links, /opt/wheels)
  BRAINMIRROR_BUILD_CA         CA bundle passed as the "ca" secret (default: PIP_CERT, SSL_CERT_FILE, the system bundle)
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import REPO, terminate

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE = "brainmirror-map:test"
SUITE = "bookworm"  # Python 3.11, the version of the local CPU torch wheel (trixie's 3.13 has none)
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_timings():
    """Prints what the tests of this module measured, after they ran (``pytest -s`` shows it)."""
    yield
    if TIMINGS:
        print("\nMAP container figures:", json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


def _docker_cli() -> str | None:
    """A docker CLI that builds with BuildKit: docker.io's (20.10 has it built in) or one with buildx."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            version = subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout
            if " 20.10." in version or subprocess.run([candidate, "buildx", "version"], capture_output=True).returncode == 0:
                return candidate
    return None


DOCKER = _docker_cli()
EXTERNAL_DAEMON = os.environ.get("BRAINMIRROR_DOCKER_HOST")
BASE_IMAGE = os.environ.get("BRAINMIRROR_BASE_IMAGE")


def _missing() -> str | None:
    if DOCKER is None:
        return "no docker CLI with BuildKit (Debian: apt-get install docker.io)"
    if EXTERNAL_DAEMON is None:
        if shutil.which("dockerd") is None:
            return "dockerd is not installed (Debian: apt-get install docker.io)"
        if os.geteuid() != 0:
            return "starting a Docker daemon needs root (or set BRAINMIRROR_DOCKER_HOST)"
    if BASE_IMAGE is None and shutil.which("debootstrap") is None:
        return "debootstrap is not installed (Debian: apt-get install debootstrap), and no BRAINMIRROR_BASE_IMAGE"
    return None


pytestmark.append(pytest.mark.skipif(_missing() is not None, reason=str(_missing())))


def _children(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                child = int(stat.split("/")[2])
                found += [child, *_children(child)]
    return found


class Daemon:
    """A Docker daemon of our own, in a short temporary folder (the socket path must stay under 108 bytes)."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="bmdk-", dir="/tmp"))
        self.host = f"unix://{self.root}/docker.sock"
        self.log = self.root / "dockerd.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
                 "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                 "--pidfile", str(self.root / "dockerd.pid"), "-H", self.host],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            if docker(self.host, "info", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError("dockerd did not come up:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            children = _children(self.process.pid)  # containerd and its shims
            terminate(self.process, timeout=60)
            time.sleep(1)
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        subprocess.run(["sh", "-c", f"grep -o ' {self.root}/[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l"],
                       capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def docker(host: str, *args: str, check: bool = True, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "DOCKER_HOST": host, "DOCKER_BUILDKIT": "1"}
    result = subprocess.run([DOCKER, *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} failed ({result.returncode}):\n"
                             f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


def _base_image(host: str, work: Path) -> str:
    if BASE_IMAGE:
        return BASE_IMAGE
    rootfs = work / "rootfs"
    mirror = os.environ.get("BRAINMIRROR_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    started = time.time()
    result = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / cache).glob("*"):
            if path.is_file():
                path.unlink()
    name = f"brainmirror-base:{SUITE}"
    env = {**os.environ, "DOCKER_HOST": host}
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run([DOCKER, "import", "-", name], stdin=tar.stdout, env=env, check=True, capture_output=True, timeout=600)
    assert tar.wait() == 0
    shutil.rmtree(rootfs, ignore_errors=True)
    TIMINGS["base_image_s"] = time.time() - started
    return name


def _wheels() -> list[Path]:
    """Local torch wheels for the base's Python 3.11 (a CPU build keeps the image small)."""
    folders = [os.environ.get("BRAINMIRROR_WHEELS", ""), *os.environ.get("PIP_FIND_LINKS", "").split(), "/opt/wheels"]
    found = []
    for folder in filter(None, folders):
        found += [Path(p) for p in glob.glob(os.path.join(folder.removeprefix("file://"), "torch-2.13.0*-cp311-*.whl"))]
    return found[:1]


def _stage_context(context: Path, models_dir: Path) -> None:
    """The build context the repository would be, with the test's model bundle and local wheels."""
    for name in ("app.py", "app.yaml", "requirements.txt", ".dockerignore"):
        shutil.copy2(REPO / name, context / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.whl")
    for name in ("operators", "brainmirror"):
        shutil.copytree(REPO / name, context / name, ignore=ignore)
    shutil.copytree(REPO / "deploy", context / "deploy", ignore=ignore)
    bundle = models_dir / "brainmirror" if (models_dir / "brainmirror").is_dir() else models_dir
    shutil.copytree(bundle, context / "models" / "brainmirror", ignore=ignore)
    for wheel in _wheels():
        target = context / "deploy" / "wheels" / wheel.name
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copy2(wheel, target)


def _ca_bundle() -> str | None:
    for candidate in (os.environ.get("BRAINMIRROR_BUILD_CA"), os.environ.get("PIP_CERT"),
                      os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def daemon():
    if EXTERNAL_DAEMON:
        yield EXTERNAL_DAEMON
        return
    own = Daemon()
    try:
        own.start()
        yield own.host
    finally:
        own.stop()


@pytest.fixture(scope="module")
def image(daemon, models_dir, tmp_path_factory) -> str:
    work = Path(tempfile.mkdtemp(prefix="bmctx-", dir="/tmp"))
    try:
        base = _base_image(daemon, work)
        context = work / "context"
        context.mkdir()
        _stage_context(context, models_dir)
        args = ["build", "--network", "host", "-f", "deploy/Dockerfile", "--build-arg", f"BASE_IMAGE={base}",
                "--build-arg", "MAP_GPU=0", "-t", IMAGE, "--progress", "plain"]
        ca = _ca_bundle()
        if ca:
            args += ["--secret", f"id=ca,src={ca}"]
        started = time.time()
        result = docker(daemon, *args, ".", cwd=context, timeout=1500)
        TIMINGS["build_s"] = time.time() - started
        (tmp_path_factory.getbasetemp() / "docker-build.log").write_text(result.stdout + result.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = int(docker(daemon, "image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip())
    TIMINGS["image_size_mb"] = size / 1e6
    return IMAGE


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-m", "brainmirror", "demo-data", str(root / "tumour"), "--study", "tumour"],
                   check=True, cwd=REPO, capture_output=True, timeout=300)
    return root / "tumour"


@pytest.fixture(scope="module")
def few_study(demo_study, tmp_path_factory) -> tuple[Path, str]:
    """4 slices of the demo study as a study of their own: brainmirror cannot assess it."""
    few = tmp_path_factory.mktemp("few")
    few.chmod(0o755)  # mktemp makes it 0700; the image's user must read the bind mount
    uid, series_uid = generate_uid(), generate_uid()
    for path in sorted(demo_study.glob("*.dcm"))[80:84]:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = "BM-DEMO-MAP"
        ds.save_as(few / path.name)
    return few, uid


def test_image_is_a_map_with_a_non_root_user(daemon, image):
    config = json.loads(docker(daemon, "image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] and config["User"].split(":")[0] not in ("", "0", "root")
    assert config["Entrypoint"] == ["/opt/holoscan/bin/brainmirror-map"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOLOSCAN_INPUT_PATH"] == "/var/holoscan/input" and env["HOLOSCAN_OUTPUT_PATH"] == "/var/holoscan/output"
    assert env["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models"
    script = ("cat /etc/holoscan/app.json; echo '@@'; cat /etc/holoscan/pkg.json; echo '@@'; "
              "test -f /opt/holoscan/app/app.py && test -f /opt/holoscan/models/brainmirror/configs/metadata.json "
              "&& test -d /var/holoscan/input && test -w /var/holoscan/output && echo layout-ok; "
              "ls /run/secrets 2>/dev/null | wc -l")
    out = docker(daemon, "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", script).stdout
    app_json, pkg_json, rest = out.split("@@")
    app, pkg = json.loads(app_json), json.loads(pkg_json)
    from brainmirror import __version__

    assert app["version"] == pkg["version"] == __version__
    assert app["sdk"] == "monai-deploy" and app["sdkVersion"] == "4.0.0"
    assert pkg["applicationRoot"] == "/opt/holoscan/app" and pkg["models"] == {"brainmirror": "/opt/holoscan/models/brainmirror"}
    assert pkg["resources"]["gpu"] == 0
    assert "layout-ok" in rest and rest.split()[-1] == "0"  # the CA secret is not in the image
    history = docker(daemon, "history", "--no-trunc", image).stdout
    assert "BEGIN CERTIFICATE" not in history


def test_container_assesses_a_study_without_network(daemon, image, demo_study, tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    output.chmod(0o777)
    started = time.time()
    result = docker(daemon, "run", "--rm", "--network", "none", "--ulimit", "stack=33554432",
                    "-v", f"{demo_study}:/var/holoscan/input:ro", "-v", f"{output}:/var/holoscan/output",
                    image, check=False, timeout=900)
    TIMINGS["run_s"] = time.time() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    files = {p.name.split("_")[0]: p for p in output.glob("*.dcm")}
    source = pydicom.dcmread(next(demo_study.glob("*.dcm")), stop_before_pixels=True)
    sr = pydicom.dcmread(files["SR"])
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.Manufacturer == "brainmirror"
    sys.path.insert(0, str(REPO / "deploy" / "map"))
    from sr_verdict import verdict

    assert verdict(sr) in ("abnormal", "normal")
    referenced = {item.ReferencedSOPClassUID for evidence in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
                  for series in evidence.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert ("SEG" in files) == (SEG_SOP_CLASS in referenced)
    if "SEG" in files:
        seg = pydicom.dcmread(files["SEG"], stop_before_pixels=True)
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert "KEY" in files
    assert all(p.stat().st_uid != 0 for p in output.iterdir())  # written by the image's non-root user


def test_workflow_mode_any_uid_read_only(daemon, image, few_study, tmp_path):
    """As the Argo template runs it: arbitrary uid, read-only root, verdict in metadata.json, exit 0."""
    few, uid = few_study
    output = tmp_path / "output"
    output.mkdir()
    output.chmod(0o777)
    result = docker(daemon, "run", "--rm", "--network", "none", "--user", "4242:4242", "--read-only",
                    "--tmpfs", "/tmp", "-e", "HOLOSCAN_OUTPUT_PATH=/var/holoscan/output/dicom",
                    "-e", "BRAINMIRROR_METADATA_JSON=/var/holoscan/output/metadata.json",
                    "-v", f"{few}:/var/holoscan/input:ro", "-v", f"{output}:/var/holoscan/output", image,
                    check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["verdict"] == "not-assessed" and metadata["exit_code"] == 3, metadata
    assert (output / "dicom" / metadata["sr"]).is_file()
    assert pydicom.dcmread(output / "dicom" / metadata["sr"]).StudyInstanceUID == uid


@pytest.mark.skipif(shutil.which("Orthanc") is None, reason="Orthanc is not installed")
def test_orthanc_plugin_runs_the_map(daemon, image, few_study, tmp_path):
    """The routing plugin's docker runner: a study that cannot be assessed goes to the review node."""
    from test_orthanc import ORTHANC_DIR, PYTHON_PLUGIN, OrthancProcess, storescu

    few, uid = few_study
    review = OrthancProcess(tmp_path, "REVIEW", {"Plugins": [], "RemoteAccessAllowed": False,
                                                 "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True})
    shipped = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
    shipped.update(PythonScript=str(ORTHANC_DIR / "brainmirror_orthanc.py"), Plugins=[str(PYTHON_PLUGIN)], StableAge=2)
    shipped["BrainMirror"].update(Docker=DOCKER, WorkDirectory=str(tmp_path / "work"), TimeoutSeconds=300,
                                  ForwardRetries=0)
    env = {"DOCKER_HOST": daemon, "BRAINMIRROR_ORTHANC_USER": "tester", "BRAINMIRROR_ORTHANC_PASSWORD": os.urandom(8).hex(),
           "BRAINMIRROR_AET": "BRAINMIRROR", "BRAINMIRROR_RUNNER": "docker", "BRAINMIRROR_IMAGE": image,
           "BRAINMIRROR_SCANNER_AET": "SCANNER", "BRAINMIRROR_SCANNER_HOST": "127.0.0.1", "BRAINMIRROR_SCANNER_PORT": "104",
           "BRAINMIRROR_PRIORITY_AET": "PRIORITY", "BRAINMIRROR_PRIORITY_HOST": "127.0.0.1", "BRAINMIRROR_PRIORITY_PORT": "9",
           "BRAINMIRROR_REVIEW_AET": "REVIEW", "BRAINMIRROR_REVIEW_HOST": "127.0.0.1",
           "BRAINMIRROR_REVIEW_PORT": str(review.dicom_port)}
    node = OrthancProcess(tmp_path, "BRAINMIRROR", shipped, env=env,
                          credentials=(env["BRAINMIRROR_ORTHANC_USER"], env["BRAINMIRROR_ORTHANC_PASSWORD"]))
    try:
        review.start()
        node.start()
        assert storescu(node.dicom_port, few).returncode == 0
        deadline = time.time() + 300
        study = None
        while time.time() < deadline:
            study = study or node.study_id(uid)
            if study and node.metadata(study, "BrainMirrorStatus") in ("done", "forward-failed"):
                break
            time.sleep(1)
        assert study and node.metadata(study, "BrainMirrorStatus") == "done", node.log_tail()
        detail = json.loads(node.metadata(study, "BrainMirrorDetail"))
        assert detail["exit_code"] == 3 and node.metadata(study, "BrainMirrorVerdict") == "not-assessed", detail
        assert review.study_id(uid) is not None
        TIMINGS["orthanc_docker_routed_s"] = detail["seconds_total"]
    finally:
        node.stop()
        review.stop()
