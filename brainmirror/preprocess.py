"""Preprocessing: any head MR volume -> the canonical symmetric space, and maps back.

Canonical space: the symmetric MNI152 2009a template (shipped in nilearn), 2 mm isotropic,
96 x 112 x 80 voxels (RAS). The mid-sagittal plane of the template (x = 0 mm) falls exactly
between columns 47 and 48, so ``volume[::-1]`` is the left-right mirror of the brain.

2 mm rather than 1 mm: a quarter of the pixels per slice, which is what lets the networks
train and run on two CPU cores; anomaly maps are resampled back to the input's native grid.

Intensities: N4 bias-field correction fitted inside the brain, then robust scaling. A coil's
smooth intensity gradient differs between the hemispheres, so left uncorrected it is a
left-right difference of lesion size that no mirror predicts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from importlib import resources

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

log = logging.getLogger(__name__)

PREPROCESSING_VERSION = 5  # 3: single-threaded registration (bit-identical poses); 4: N4 bias-field correction;
# 5: a skull-stripped input's zero background is kept out of the brain mask
"""Bump whenever ``canonicalise`` changes its output: preprocessing caches are kept per version."""
SPACING_MM = 2.0
SHAPE = (96, 112, 80)
ORIGIN_RAS = (-95.0, -129.0, -65.0)  # centre of voxel (0, 0, 0)
CANONICAL_AFFINE = np.array(
    [
        [SPACING_MM, 0, 0, ORIGIN_RAS[0]],
        [0, SPACING_MM, 0, ORIGIN_RAS[1]],
        [0, 0, SPACING_MM, ORIGIN_RAS[2]],
        [0, 0, 0, 1],
    ]
)
PLAUSIBLE_BRAIN_ML = (700.0, 2300.0)  # brain masks outside this range are not trusted
BIAS_SHRINK = 2  # N4 is fitted on a 4 mm copy of the canonical volume (1-6 s, README 'Speed and memory')
MIN_BRAIN_COVERAGE = 0.5  # the application assesses a series covering at least this fraction of a typical brain
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class PreprocessingError(ValueError):
    """The volume cannot be brought into the canonical space (not a usable head MR)."""


class PartialCoverageError(PreprocessingError):
    """The field of view holds less than the required fraction of a typical brain."""

    def __init__(self, coverage: float, minimum: float):
        super().__init__(f"the series covers {100 * coverage:.0f} % of a typical brain, "
                         f"less than the {100 * minimum:.0f} % needed")
        self.coverage = coverage


@dataclass
class Canonical:
    """A volume in canonical space, plus what is needed to map results back to native space."""

    image: np.ndarray  # float32, SHAPE, normalised intensities (brain ~[0, 1], 0 outside)
    mask: np.ndarray  # bool, SHAPE, brain mask
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray  # voxel -> RAS mm of the input volume
    canonical_to_native_mm: np.ndarray  # 4x4 rigid: canonical RAS mm -> native RAS mm
    native_mask: np.ndarray  # bool, native grid, brain mask
    brain_extraction: str  # "deepbet" or "template"
    timings: dict[str, float] = field(default_factory=dict)  # seconds per preprocessing step
    coverage: float = 1.0  # fraction of the template brain inside the input's field of view

    @property
    def canonical_to_native_vox(self) -> np.ndarray:
        return np.linalg.inv(self.native_affine) @ self.canonical_to_native_mm @ CANONICAL_AFFINE

    def to_native(self, volume: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample a canonical-space volume onto the native grid of the input."""
        return resample(volume, np.linalg.inv(self.canonical_to_native_vox), self.native_shape, order=order)

    def to_canonical(self, volume: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample a native-grid volume (e.g. a ground-truth mask) into canonical space."""
        return resample(volume, self.canonical_to_native_vox, SHAPE, order=order)


def resample(
    volume: np.ndarray, out_to_in_vox: np.ndarray, out_shape: tuple[int, ...], order: int = 1
) -> np.ndarray:
    """Resample ``volume`` on a grid whose voxel coordinates map to ``volume``'s by a 4x4."""
    out = ndimage.affine_transform(
        np.asarray(volume, dtype=np.float32),
        out_to_in_vox[:3, :3],
        offset=out_to_in_vox[:3, 3],
        output_shape=tuple(out_shape),
        order=order,
        mode="constant",
        cval=0.0,
    )
    return out


@functools.lru_cache(maxsize=1)
def template() -> tuple[np.ndarray, np.ndarray]:
    """The symmetric MNI152 2009a T1 template and its brain mask on the canonical grid."""
    data = resources.files("nilearn.datasets") / "data"
    t1 = nib.load(str(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    to_template_vox = np.linalg.inv(t1.affine) @ CANONICAL_AFFINE
    image = resample(t1.get_fdata(dtype=np.float32), to_template_vox, SHAPE, order=1)
    image = 0.5 * (image + image[::-1])  # exactly symmetric
    mask = image > 0.1 * image.max()
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=2))
    return (image / np.percentile(image[mask], 99)).astype(np.float32), mask


def to_sitk(array: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """A SimpleITK image of ``array`` (voxel axes i, j, k) with the geometry of a RAS affine."""
    lps = _LPS @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    return image


@contextlib.contextmanager
def _single_threaded_itk():
    """ITK's default thread count set to one for the block, then restored (the registration's
    metric follows the process default, not a per-object setting)."""
    default = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default)


def register_rigid(moving: np.ndarray, moving_affine: np.ndarray) -> np.ndarray:
    """Rigidly register a (brain-masked) volume to the symmetric template.

    Returns the 4x4 transform from canonical RAS mm to the moving volume's RAS mm.
    Mutual information, so any MR contrast registers to the T1 template. Every template brain
    voxel is sampled (no random subset), and the metric runs on one thread (ITK's threaded sums
    change order from run to run), so the pose is bit-identical on every run, whatever the core
    count or load: a study and its copy with a lesion land on the same grid, and scores do not
    move with a seed or with the machine's load.
    """
    fixed_image, fixed_mask = template()
    fixed = to_sitk(fixed_image, CANONICAL_AFFINE)
    moving_sitk = to_sitk(moving, moving_affine)
    factors = [max(1, int(SPACING_MM // s)) for s in moving_sitk.GetSpacing()]
    if max(factors) > 1:  # register at about the template's 2 mm: several times faster, as accurate
        moving_sitk = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving_sitk, SPACING_MM / 2), factors)
    initial = sitk.CenteredTransformInitializer(
        fixed, moving_sitk, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetMetricFixedMask(to_sitk(fixed_mask.astype(np.float32), CANONICAL_AFFINE) > 0.5)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-4, numberOfIterations=200, relaxationFactor=0.6
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([4.0, 2.0, 1.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    with _single_threaded_itk():
        transform = reg.Execute(fixed, moving_sitk)
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(transform).GetNthTransform(0))
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(euler.GetMatrix()).reshape(3, 3)
    center = np.array(euler.GetCenter())
    matrix[:3, 3] = np.array(euler.GetTranslation()) + center - matrix[:3, :3] @ center
    return _LPS @ matrix @ _LPS  # LPS -> RAS on both sides


@functools.lru_cache(maxsize=1)
def _deepbet():
    from deepbet.bet import BrainExtraction  # weights ship inside the deepbet wheel

    return BrainExtraction(no_gpu=not _cuda_available())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def extract_brain(image: nib.Nifti1Image) -> np.ndarray | None:
    """Brain mask on the native grid from deepbet, or None if its mask is implausible."""
    data = np.nan_to_num(image.get_fdata(dtype=np.float32))
    ras = nib.as_closest_canonical(nib.Nifti1Image(data, image.affine))
    try:
        mask = _deepbet().run_model(ras.get_fdata(dtype=np.float32).copy()) > 0.5
        mask = _deepbet().postprocess(mask)
    except (AssertionError, ValueError, RuntimeError) as error:  # deepbet asserts on empty input
        log.info("deepbet found no brain (%s)", error)
        return None
    # back from the RAS-reoriented grid to the input's voxel axes
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(ras.affine), nib.orientations.io_orientation(image.affine)
    )
    mask = nib.orientations.apply_orientation(mask, ornt).astype(bool)
    volume_ml = mask.sum() * abs(np.linalg.det(image.affine[:3, :3])) / 1000.0
    if not PLAUSIBLE_BRAIN_ML[0] <= volume_ml <= PLAUSIBLE_BRAIN_ML[1]:
        log.info("deepbet mask of %.0f ml is implausible; using the template mask", volume_ml)
        return None
    return mask


def without_stripped_background(mask: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``mask`` less the background of a skull-stripped input that it took in.

    A skull-stripped study is exactly at its minimum outside the brain it kept; a brain extractor
    run on it may take in some of that background (at the skull base, between the frontal lobes),
    voxels of no tissue that no healthy reference predicts. Minimum-valued voxels connected to
    minimum-valued voxels outside ``mask`` are removed from it; an input with a head around its
    brain, or noise in its background, is left as it is. ``data``: the input less its minimum.
    """
    background = data <= 0
    if not (background & ~mask).any():
        return mask
    labels, _ = ndimage.label(background)
    outside = np.unique(labels[background & ~mask])
    return mask & ~np.isin(labels, outside[outside > 0])


def canonicalise(image: nib.Nifti1Image, min_coverage: float = 0.0) -> Canonical:
    """Bring a head MR volume into canonical space (brain extraction, registration, scaling).

    ``coverage`` of the result: the fraction of the template brain inside the input's field of
    view once registered; below ``min_coverage``, ``PartialCoverageError``.
    """
    if image.ndim != 3 or min(image.shape) < 8:
        raise PreprocessingError(f"needs a 3D volume with at least 8 slices, got shape {image.shape}")
    data = np.nan_to_num(np.asarray(image.get_fdata(dtype=np.float32)))
    if not np.isfinite(data).all() or np.ptp(data) <= 0:
        raise PreprocessingError("the volume is constant (no image content)")
    data = data - data.min()
    affine = image.affine
    clock = time.perf_counter()
    native_mask = extract_brain(image)
    if native_mask is not None:
        native_mask = without_stripped_background(native_mask, data)
    timings = {"brain_extraction": time.perf_counter() - clock}
    method = "deepbet"
    clock = time.perf_counter()
    if native_mask is None:
        method = "template"
        head = data > np.percentile(data, 60) * 0.2
        to_canonical = register_rigid(data * head, affine)
    else:
        to_canonical = register_rigid(data * native_mask, affine)
    timings["registration"] = time.perf_counter() - clock
    clock = time.perf_counter()
    canonical_to_native_vox = np.linalg.inv(affine) @ to_canonical @ CANONICAL_AFFINE
    canonical = resample(data, canonical_to_native_vox, SHAPE, order=1)
    field_of_view = resample(np.ones(image.shape, np.float32), canonical_to_native_vox, SHAPE, order=0) > 0.5
    coverage = float((template()[1] & field_of_view).sum() / template()[1].sum())
    if coverage < min_coverage:
        raise PartialCoverageError(coverage, min_coverage)
    if native_mask is None:  # the template's brain, where the input's field of view covers it
        mask = template()[1] & field_of_view
        native_to_canonical_vox = np.linalg.inv(canonical_to_native_vox)
        native_mask = resample(mask, native_to_canonical_vox, image.shape, order=0) > 0.5
    else:
        mask = resample(native_mask, canonical_to_native_vox, SHAPE, order=1) > 0.5
    if mask.sum() * SPACING_MM**3 / 1000.0 < PLAUSIBLE_BRAIN_ML[0] / 2:
        raise PreprocessingError("too little brain in the field of view")
    timings["resampling"] = time.perf_counter() - clock
    clock = time.perf_counter()
    normalised = intensities(canonical, mask)
    timings["bias_correction"] = time.perf_counter() - clock
    return Canonical(
        image=normalised,
        mask=mask,
        native_shape=tuple(image.shape),
        native_affine=np.asarray(affine, dtype=float),
        canonical_to_native_mm=to_canonical,
        native_mask=native_mask,
        brain_extraction=method,
        timings=timings,
        coverage=coverage,
    )


def intensities(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The canonical image's intensities: bias-field corrected inside ``mask``, then scaled (``normalise``)."""
    return normalise(bias_corrected(volume, mask, CANONICAL_AFFINE, BIAS_SHRINK), mask)


def bias_corrected(volume: np.ndarray, mask: np.ndarray, affine: np.ndarray, shrink: int) -> np.ndarray:
    """``volume`` divided by its N4 bias field (SimpleITK), fitted inside ``mask`` on a copy
    shrunk ``shrink``-fold, on one thread (the fit's threaded sums depend on the thread count)."""
    image = to_sitk(volume + 1e-3, affine)
    brain = sitk.Cast(to_sitk(mask.astype(np.float32), affine) > 0.5, sitk.sitkUInt8)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([50, 40, 30])
    try:
        with _single_threaded_itk():
            n4.Execute(sitk.Shrink(image, [shrink] * 3), sitk.Shrink(brain, [shrink] * 3))
            log_bias = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).transpose(2, 1, 0)
    except RuntimeError as error:
        reason = (str(error).strip().splitlines() or ["ITK error"])[-1]
        raise PreprocessingError(f"bias-field correction failed ({reason})") from None
    if not np.isfinite(log_bias).all():
        raise PreprocessingError("bias-field correction failed (the fitted field is not finite)")
    return (volume / np.exp(log_bias)).astype(np.float32)


def normalise(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Robust scaling inside the brain: 1st percentile -> 0, 99th -> 1, clipped to [0, 2].

    The percentiles are taken over the voxel-wise minimum (99th) and maximum (1st) of the
    volume and its mirror, so a one-sided bright or dark lesion does not set the scale and
    compress the healthy brain (a 50 ml bright lesion would otherwise hold the 99th percentile).
    """
    mirrored = volume[::-1]
    both = mask & mask[::-1]
    if not both.any():
        raise PreprocessingError("no brain on both sides of the midline")
    low = np.percentile(np.maximum(volume, mirrored)[both], 1)
    high = np.percentile(np.minimum(volume, mirrored)[both], 99)
    if high - low <= 1e-6:
        raise PreprocessingError("no intensity contrast inside the brain")
    scaled = np.clip((volume - low) / (high - low), 0.0, 2.0)
    return np.where(mask, scaled, 0.0).astype(np.float32)
