"""Fuzzing the DICOM loading path with mutated files (hypothesis), for a bounded time.

The loading path is what the app does with the files of its input before any model runs:
``brainmirror.data`` (scan, read, deduplicate), the app's study loader, the series selector
with the shipped rules (with ``header_view``), and ``brainmirror.dicom.read_series``. Its
contract: the folder readers, the loader and the selector never raise, whatever the bytes of
a file; ``read_series`` raises nothing but ``ValueError`` (a one-line reason). Everything else
is a crash the app would turn into a traceback and exit code 1.

Seeds: small MR slices in several encodings (explicit and implicit VR, RLE, JPEG-LS, JPEG 2000),
an enhanced multi-frame image and a DICOMDIR. Each example mutates one seed (bytes written,
inserted, deleted, truncated, or element headers - lengths, VRs, delimiters - overwritten) and
puts it alone or among the other slices of its series. Hypothesis drives the choices from a
seeded random byte stream (``fuzz_one_input``), for BRAINMIRROR_FUZZ_SECONDS (default 60);
the number of examples run is printed (``pytest -s``). A failure names the seed, the iteration
and the buffer; BRAINMIRROR_FUZZ_SEED=<seed> replays the same stream. Marked ``slow`` (CI runs it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.fileset import FileSet
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from brainmirror.data import header_view, read_dicom_series, scan_dicom_folder
from brainmirror.dicom import read_series, write_mr_series

FUZZ_SECONDS = float(os.environ.get("BRAINMIRROR_FUZZ_SECONDS", "60"))
FUZZ_SEED = int(os.environ.get("BRAINMIRROR_FUZZ_SEED", "20261122"))
RULES = json.loads((REPO / "operators" / "series_selection.json").read_text())
INTERESTING = [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xff", b"\x00\x00", b"\x01\x00", b"\x00\x80",
               b"SQ", b"UN", b"OB", b"OW", b"UI", b"DS", b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0", b"\xfe\xff\x0d\xe0",
               b"\\", b"\x00", b"-1", b"1e308", b"nan", b"\xe0\x7f\x10\x00"]


@dataclass
class Seed:
    name: str
    data: bytes
    headers: list[int]  # offsets of element tags in ``data``
    companions: Path | None  # the other files of its series


def _tag_offsets(data: bytes, ds: pydicom.Dataset) -> list[int]:
    tags = {elem.tag for elem in ds.iterall()} | {elem.tag for elem in ds.file_meta}
    offsets = set()
    for tag in tags:
        needle = int(tag.group).to_bytes(2, "little") + int(tag.element).to_bytes(2, "little")
        start = data.find(needle)
        while start != -1:
            offsets.add(start)
            start = data.find(needle, start + 1)
    return sorted(offsets)


def make_seeds(folder: Path) -> list[Seed]:
    """Small seed files in several encodings, with their series' other slices as companions."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 900, (36, 40, 6)).astype(np.float32)  # JPEG 2000 wants at least 32 x 32
    array[8:28, 10:30, 1:5] += 1500.0
    paths = write_mr_series(nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0])), folder / "native",
                            patient_id="FUZZ", patient_name="Fuzz^Seed")
    seeds = []

    def add(name: str, path: Path, companions: Path | None) -> None:
        data = path.read_bytes()
        seeds.append(Seed(name, data, _tag_offsets(data, pydicom.dcmread(path, force=True)), companions))

    def variant(name: str, change) -> None:
        target = folder / name
        target.mkdir()
        for path in paths[1:]:
            ds = pydicom.dcmread(path)
            change(ds)
            ds.save_as(target / path.name, enforce_file_format=True)
        ds = pydicom.dcmread(paths[0])
        change(ds)
        ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
        add(name, folder / f"{name}.dcm", target)

    companions = folder / "native-companions"
    companions.mkdir()
    for path in paths[1:]:
        shutil.copy(path, companions)
    add("explicit", paths[0], companions)

    def implicit(ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    def unsigned(syntax: str):
        def change(ds: pydicom.Dataset) -> None:
            ds.set_pixel_data(np.clip(ds.pixel_array, 0, None).astype(np.uint16), "MONOCHROME2", 16)
            ds.compress(syntax)
        return change

    variant("implicit", implicit)
    variant("rle", lambda ds: ds.compress(RLELossless))
    variant("jpeg-ls", unsigned(JPEGLSLossless))
    variant("jpeg-2000", unsigned(JPEG2000Lossless))
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        [pydicom.dcmread(p) for p in paths], series_instance_uid=hd.UID(), series_number=2,
        sop_instance_uid=hd.UID(), instance_number=1)
    image.save_as(folder / "enhanced.dcm", enforce_file_format=True)
    add("enhanced", folder / "enhanced.dcm", None)
    fileset = FileSet()
    for path in paths:
        fileset.add(path)
    fileset.write(folder / "cd")
    add("dicomdir", folder / "cd" / "DICOMDIR", None)
    return seeds


class LoadingPath:
    """What the app does with a folder before any model runs; raises only what the contract allows."""

    def __init__(self) -> None:
        from monai.deploy.core import Fragment

        from operators import BrainSeriesSelectorOperator, RunStatus, StudyLoaderOperator

        fragment = Fragment()
        self.loader = StudyLoaderOperator(fragment, input_folder=Path("."), status=RunStatus(), name="loader")
        self.selector = BrainSeriesSelectorOperator(fragment, rules=json.dumps(RULES), name="selector")

    def __call__(self, folder: Path) -> None:
        volumes = [datasets for datasets in read_dicom_series(folder).values()]  # the library's reader
        for paths in scan_dicom_folder(folder).studies.values():  # the app's loader and selector
            study = self.loader.load_study(paths)
            if study is None:
                continue
            self.selector.filter(RULES, [study], all_matched=True, sort_by_sop_instance_count=True)
            for series in study.get_all_series():
                volumes.append([sop.get_native_sop_instance() for sop in series.get_sop_instances()])
        for datasets in volumes:
            for ds in datasets:
                header_view(ds)
            try:
                read_series(datasets)
            except ValueError as error:
                assert "\n" not in str(error)


def _mutate(data: bytes, seed: Seed, mutations: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, where, payload in mutations:
        if not out:
            break
        if kind == "header" and seed.headers:
            position = seed.headers[where % len(seed.headers)] + payload[0] % 12
            blob = payload[1]
        else:
            position, blob = where % len(out), payload[1]
        if kind in ("write", "header"):
            out[position:position + len(blob)] = blob
        elif kind == "insert":
            out[position:position] = blob
        elif kind == "delete":
            del out[position:position + 1 + payload[0] % 64]
        elif kind == "truncate":
            del out[position:]
    return bytes(out)


_payload = st.tuples(st.integers(0, 255), st.one_of(st.sampled_from(INTERESTING), st.binary(min_size=1, max_size=8)))
_mutation = st.tuples(st.sampled_from(["write", "header", "header", "insert", "delete", "truncate"]),
                      st.integers(0, 2**24), _payload)


@dataclass
class Fuzz:
    seeds: list[Seed]
    work: Path
    loading_path: LoadingPath
    runs: int = 0


FUZZ: Fuzz | None = None  # set by the test; hypothesis' target below reads it


@settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(index=st.integers(0, 63), mutations=st.lists(_mutation, min_size=1, max_size=6), among_series=st.booleans())
def fuzz_target(index: int, mutations: list[tuple], among_series: bool) -> None:
    assert FUZZ is not None
    seed = FUZZ.seeds[index % len(FUZZ.seeds)]
    folder = FUZZ.work / ("series" if among_series and seed.companions else "alone")
    shutil.rmtree(folder, ignore_errors=True)
    if among_series and seed.companions:
        shutil.copytree(seed.companions, folder)
    folder.mkdir(exist_ok=True)
    (folder / "mutated.dcm").write_bytes(_mutate(seed.data, seed, mutations))
    FUZZ.runs += 1
    FUZZ.loading_path(folder)


def test_seeds_pass_the_loading_path(tmp_path: Path) -> None:
    """Unmutated, every seed loads; its series (when it has one) forms a volume."""
    loading_path = LoadingPath()
    for seed in make_seeds(tmp_path / "seeds"):
        folder = tmp_path / seed.name
        shutil.copytree(seed.companions, folder) if seed.companions else folder.mkdir()
        (folder / "seed.dcm").write_bytes(seed.data)
        loading_path(folder)
        series = read_dicom_series(folder)
        if seed.name != "dicomdir":
            (datasets,) = series.values()
            assert read_series(datasets).spatial_shape[0] == 6


@pytest.mark.slow
def test_loading_path_survives_mutated_files(tmp_path: Path) -> None:
    global FUZZ
    FUZZ = Fuzz(make_seeds(tmp_path / "seeds"), tmp_path / "work", LoadingPath())
    FUZZ.work.mkdir()
    stream = random.Random(FUZZ_SEED)
    deadline = time.monotonic() + FUZZ_SECONDS
    iteration = 0
    try:
        while time.monotonic() < deadline:
            iteration += 1
            buffer = stream.randbytes(512)
            try:
                fuzz_target.hypothesis.fuzz_one_input(buffer)
            except Exception as error:
                raise AssertionError(f"the loading path crashed at iteration {iteration} of the stream of seed "
                                     f"{FUZZ_SEED} (buffer {buffer.hex()}): {type(error).__name__}: {error}") from error
    finally:
        runs, FUZZ = FUZZ.runs, None
    print(f"\nfuzz: {runs} mutated inputs in {FUZZ_SECONDS:.0f} s through the loading path without a crash "
          f"(seed {FUZZ_SEED})")
    assert runs > 0
