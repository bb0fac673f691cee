"""Study statistic: from difference maps and embeddings to slice scores and one study score.

Every configuration is a per-slice statistic, standardised per canonical slice position against
healthy statistics, then aggregated to the study:

- ``mse``: mean squared residual of the mirror-informed reconstruction inside the brain,
- ``symmetry``: mean squared left-right difference ``|x - mirror(x)|`` inside the brain,
- ``vae``: Mahalanobis distance of the Beta-VAE embedding of the difference maps to the
  healthy embeddings,
- ``combined``: the mean of the standardised ``vae`` score and of the top-2 % mean of the
  voxel anomaly map.

Study score: the mean of the three highest slice scores (robust to one noisy slice, still
sensitive to a lesion a few slices thick).
"""

from __future__ import annotations

import numpy as np

from .difference_maps import DifferenceMaps
from .embedding import embedding_distance
from .preprocess import SHAPE
from .slicing import Slices

CONFIGURATIONS = ("mse", "symmetry", "vae", "combined")
TOP_SLICES = 3
TOP_VOXEL_FRACTION = 0.02


def slice_features(slices: Slices, maps: DifferenceMaps, embeddings: np.ndarray,
                   normative: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw (unstandardised) per-slice statistics."""
    brain = slices.mask
    count = np.maximum(brain.sum(axis=(1, 2)), 1)
    flat = np.where(brain, maps.voxel_score, -np.inf).reshape(len(brain), -1)
    k = np.maximum((count * TOP_VOXEL_FRACTION).astype(int), 10)
    top = np.array([np.sort(row)[-kk:].mean() for row, kk in zip(flat, k)]) if len(flat) else np.zeros(0)
    return {
        "mse": (maps.residual**2).sum(axis=(1, 2)) / count,
        "symmetry": (maps.symmetry**2).sum(axis=(1, 2)) / count,
        "vae": embedding_distance(embeddings, normative),
        "top": top,
    }


def slice_scores(features: dict[str, np.ndarray], z: np.ndarray, normative: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Slice scores of every configuration, each feature standardised at its canonical slice position."""
    standard = {name: standardise(value, z, normative[f"{name}_mean"], normative[f"{name}_std"])
                for name, value in features.items()}
    standard["combined"] = 0.5 * (standard["vae"] + standard["top"])
    return {name: standard[name].astype(np.float32) for name in CONFIGURATIONS}


def standardise(values: np.ndarray, z: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Slice statistics as z-scores against their healthy mean and std at each slice's position z."""
    return (values - mean[z]) / std[z]


def study_score(slice_scores: np.ndarray) -> float:
    """The mean of the TOP_SLICES highest slice scores (nan without slices)."""
    if len(slice_scores) == 0:
        return float("nan")
    return float(np.sort(slice_scores)[-TOP_SLICES:].mean())


def position_statistics(values: list[np.ndarray], zs: list[np.ndarray], window: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Healthy mean and std of a slice statistic per canonical slice position, pooled over +-window."""
    mean, std = np.zeros(SHAPE[2], np.float32), np.ones(SHAPE[2], np.float32)
    v, z = np.concatenate(values), np.concatenate(zs)
    for position in range(SHAPE[2]):
        near = np.abs(z - position) <= window
        if near.sum() >= 5:
            mean[position] = v[near].mean()
            std[position] = max(v[near].std(), 1e-6)
    return mean, std
