"""Synthetic disorders that teach the restorer what to remove (training only).

A disorder is an intensity change inside a smooth random shape of 5-40 mm on a healthy canonical
slice: either a shift of either sign, or a patch of another slice blended in (foreign tissue), on
one side or on both at mirror positions. The restorer learns to return the clean slice, so it
learns to keep healthy tissue (and its left-right differences) and to remove what does not belong.

This generator is deliberately unlike the evaluation's lesion model (``lesions.py``): it shares no
code, no parameters and no tissue model with it, so that an evaluation stays a test of
generalisation rather than of recognising the training disorders.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PIXEL_MM = 2.0  # canonical slice spacing
DIAMETER_MM = (5.0, 40.0)
SHIFT = (0.08, 0.7)  # |intensity shift| in canonical units (healthy brain ~ 0-1)
CLEAN_FRACTION = 0.2  # training slices left without a disorder
BOTH_SIDES = 0.3  # probability that a disorder also appears at the mirror position
SHIFT_FRACTION = 0.6  # the rest are foreign patches


def shape(rng: np.random.Generator, brain: np.ndarray, diameter_mm: float | None = None) -> np.ndarray:
    """A smooth, irregular weight in [0, 1] centred on a random brain pixel (zero outside the brain),
    of a random diameter in ``DIAMETER_MM`` unless one is given."""
    ys, xs = np.nonzero(brain)
    if len(ys) == 0:
        return np.zeros(brain.shape, np.float32)
    i = rng.integers(len(ys))
    radius = (rng.uniform(*DIAMETER_MM) if diameter_mm is None else diameter_mm) / PIXEL_MM / 2
    elongation, angle = rng.uniform(0.6, 1.4), rng.uniform(0, np.pi)
    yy, xx = np.mgrid[: brain.shape[0], : brain.shape[1]].astype(np.float32)
    dy, dx = yy - ys[i], xx - xs[i]
    u = (dy * np.cos(angle) + dx * np.sin(angle)) / (radius * elongation)
    v = (-dy * np.sin(angle) + dx * np.cos(angle)) * elongation / radius
    roughness = ndimage.gaussian_filter(rng.normal(size=brain.shape), rng.uniform(1.5, 4.0))
    roughness /= roughness.std() + 1e-6
    inside = np.clip((1 - np.hypot(u, v) + 0.25 * roughness) / rng.uniform(0.15, 0.5), 0, 1)
    return (inside * inside * (3 - 2 * inside) * brain).astype(np.float32)


def corrupt(image: np.ndarray, brain: np.ndarray, donors: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (H, W) with 0-3 disorders, and their combined weight map; ``donors`` (k, H, W) are
    other healthy slices that foreign patches are taken from. Inputs are not modified."""
    corrupted, weight = image.astype(np.float32).copy(), np.zeros(image.shape, np.float32)
    if rng.random() < CLEAN_FRACTION:
        return corrupted, weight
    for _ in range(rng.integers(1, 4)):
        first = shape(rng, brain)
        for w in [first] + ([first[::-1] * rng.uniform(0.5, 1.0)] if rng.random() < BOTH_SIDES else []):
            if rng.random() < SHIFT_FRACTION:
                corrupted = corrupted + rng.choice([-1.0, 1.0]) * rng.uniform(*SHIFT) * w
            else:
                donor = np.roll(donors[rng.integers(len(donors))], tuple(rng.integers(-20, 21, size=2)), (0, 1))
                alpha = rng.uniform(0.4, 1.0) * w
                corrupted = (1 - alpha) * corrupted + alpha * donor
            weight = np.maximum(weight, w)
    return (np.clip(corrupted, 0, 2) * brain).astype(np.float32), weight
