"""Slicer: the canonical volume as the axial slices that the networks see."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .preprocess import Canonical

MIN_BRAIN_FRACTION = 0.03  # slices with less brain than this are not scored


@dataclass
class Slices:
    """Canonical axial slices that contain brain."""

    image: np.ndarray  # (n, 96, 112) float32
    mask: np.ndarray  # (n, 96, 112) bool
    z: np.ndarray  # (n,) canonical slice index


def slice_volume(canonical: Canonical) -> Slices:
    """Axial slices of the canonical volume with at least MIN_BRAIN_FRACTION brain."""
    fraction = canonical.mask.mean(axis=(0, 1))
    z = np.flatnonzero(fraction >= MIN_BRAIN_FRACTION)
    return Slices(
        image=np.ascontiguousarray(canonical.image[:, :, z].transpose(2, 0, 1)),
        mask=np.ascontiguousarray(canonical.mask[:, :, z].transpose(2, 0, 1)),
        z=z,
    )
