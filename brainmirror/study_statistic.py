"""Study statistic: from difference maps and embeddings to slice scores and one study score.

Every configuration is a per-slice statistic, standardised per canonical slice position against
healthy statistics, then aggregated to the study:

- ``mse``: mean squared residual of the mirror-informed reconstruction inside the brain,
- ``symmetry``: mean squared left-right difference ``|x - mirror(x)|`` inside the brain,
- ``vae``: Mahalanobis distance of the Beta-VAE embedding of the difference maps to the
  healthy embeddings,
- ``combined``: the mean of the standardised ``vae`` score and of the standardised peak of the
  voxel anomaly map in the slice (a voxel far from the healthy references *and* taken for a
  disorder by the restorer; healthy hot spots of the standardised difference alone rarely are).

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
FEATURES = ("mse", "symmetry", "vae", "peak")  # slice statistics with healthy position statistics
TOP_SLICES = 3


def slice_features(slices: Slices, maps: DifferenceMaps, embeddings: np.ndarray,
                   normative: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw (unstandardised) per-slice statistics."""
    brain = slices.mask
    count = np.maximum(brain.sum(axis=(1, 2)), 1)
    return {
        "mse": (maps.residual**2).sum(axis=(1, 2)) / count,
        "symmetry": (maps.symmetry**2).sum(axis=(1, 2)) / count,
        "vae": embedding_distance(embeddings, normative),
        "peak": np.where(brain, maps.anomaly, 0).max(axis=(1, 2), initial=0),
    }


def slice_scores(features: dict[str, np.ndarray], z: np.ndarray, normative: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Slice scores of every configuration, each feature standardised at its canonical slice position."""
    standard = {name: standardise(value, z, normative[f"{name}_mean"], normative[f"{name}_std"])
                for name, value in features.items()}
    standard["combined"] = 0.5 * (standard["vae"] + standard["peak"])
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
