"""Difference maps: how far each voxel is from its healthy references, and the voxel anomaly map.

The standardised difference (``voxel_score``) is the geometric mean of the three residuals
(mirror-informed reconstruction, context-only reconstruction, restored slice), smoothed, divided
by its median in the study's brain, then standardised voxel by voxel against healthy subjects in
canonical space. A lesion is far from all three healthy references; a healthy voxel is rarely far
from all three: the restorer keeps healthy tissue that the hemisphere reconstructions cannot
predict (the two hemispheres' own folding), and the context-only reconstruction does not copy a
lesion's mirror ghost, which the mirror-informed one of the healthy side does.

The voxel anomaly map (``anomaly``), which findings, segmentations and the voxel threshold use,
is the positive part of the standardised difference where the restorer also says it removed a
disorder (times its probability), smoothed in 3D: a voxel must be far from the healthy references
*and* look like a disorder to the restorer, which healthy hot spots (sulci, ventricle walls, an
anatomy the statistics have not seen) rarely do both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .healthy_reference import HealthyReference
from .preprocess import SHAPE
from .slicing import Slices

VOXEL_STD_FLOOR = 0.25  # in units of the study's median raw map
RAW_LEVEL_FLOOR = 1e-3
ANOMALY_SIGMA = (1.0, 1.5, 1.5)  # Gaussian sigma of the anomaly map (slices, rows, columns): 2, 3, 3 mm
ANOMALY_MAP_VERSION = 2  # recorded with a voxel threshold: 1 was the standardised difference itself


@dataclass
class DifferenceMaps:
    """The mirror-informed reconstruction and the difference maps of a study's slices."""

    reconstruction: np.ndarray  # mirror-informed reconstruction, (n, 96, 112)
    residual: np.ndarray  # |x - reconstruction|
    context_residual: np.ndarray  # |x - context-only reconstruction|
    restoration_residual: np.ndarray  # |x - restored slice|
    symmetry: np.ndarray  # |x - mirror(x)|
    voxel_score: np.ndarray  # standardised difference (0 outside the brain)
    disorder: np.ndarray  # the restorer's probability that a voxel held a disorder
    anomaly: np.ndarray  # voxel anomaly map (0 outside the brain)


def raw_voxel_map(residual: np.ndarray, context_residual: np.ndarray, restoration_residual: np.ndarray,
                  brain: np.ndarray) -> np.ndarray:
    """Geometric mean of the three residuals, smoothed in-plane, relative to the study's own median.

    Dividing by the median inside the brain makes the map a ratio to the study's typical
    reconstruction error, so contrast, noise level and scanner (which set that level for every
    voxel alike) cancel, and only local excess remains for the healthy statistics to judge.
    """
    raw = ndimage.gaussian_filter(np.cbrt(residual * context_residual * restoration_residual), sigma=(0, 1, 1)) * brain
    level = float(np.median(raw[brain])) if brain.any() else 0.0
    return (raw / max(level, RAW_LEVEL_FLOOR)).astype(np.float32)


def difference_maps(slices: Slices, reference: HealthyReference, normative: dict[str, np.ndarray]) -> DifferenceMaps:
    """The residuals to each healthy reference, the flip difference and the voxel anomaly map.

    Without healthy voxel statistics in ``normative`` (while training) the standardised
    difference is left raw.
    """
    x, brain = slices.image, slices.mask
    residual, context_residual, restoration_residual = (
        np.abs(x - r) * brain for r in (reference.mirrored, reference.context, reference.restored))
    raw = raw_voxel_map(residual, context_residual, restoration_residual, brain)
    if "voxel_mean" in normative:
        mean = normative["voxel_mean"][:, :, slices.z].transpose(2, 0, 1)
        std = np.maximum(normative["voxel_std"][:, :, slices.z].transpose(2, 0, 1), VOXEL_STD_FLOOR)
        voxel_score = (np.clip((raw - mean) / std, -5, 50) * brain).astype(np.float32)
    else:
        voxel_score = raw
    return DifferenceMaps(reference.mirrored, residual, context_residual, restoration_residual,
                          np.abs(x - x[:, ::-1]) * brain, voxel_score, reference.disorder,
                          anomaly_map(voxel_score, reference.disorder, slices))


def anomaly_map(voxel_score: np.ndarray, disorder: np.ndarray, slices: Slices) -> np.ndarray:
    """The positive standardised difference times the disorder probability, smoothed in canonical
    space (neighbouring slices by their canonical position, so a gap between slices is not bridged)."""
    volume = np.zeros((SHAPE[2],) + voxel_score.shape[1:], np.float32)
    volume[slices.z] = np.clip(voxel_score, 0, None) * disorder
    smooth = ndimage.gaussian_filter(volume, ANOMALY_SIGMA)[slices.z]
    return (smooth * slices.mask).astype(np.float32)


def voxel_statistics(studies: list[Slices], maps: list[DifferenceMaps]) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel mean and std of the raw anomaly map over healthy studies, spatially smoothed."""
    total, total_sq, count = (np.zeros(SHAPE, np.float64) for _ in range(3))
    for s, m in zip(studies, maps):
        raw = raw_voxel_map(m.residual, m.context_residual, m.restoration_residual, s.mask).transpose(1, 2, 0)
        brain = s.mask.transpose(1, 2, 0)
        total[:, :, s.z] += raw * brain
        total_sq[:, :, s.z] += raw**2 * brain
        count[:, :, s.z] += brain
    smooth = lambda v: ndimage.gaussian_filter(v, 2.0)  # noqa: E731
    n = np.maximum(smooth(count), 1e-3)
    mean = smooth(total) / n
    std = np.sqrt(np.maximum(smooth(total_sq) / n - mean**2, 0))
    return mean.astype(np.float32), std.astype(np.float32)
