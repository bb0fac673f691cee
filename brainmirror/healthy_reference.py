"""Healthy reference: each slice as it would look without a disorder, three ways.

- ``mirrored``: each hemisphere rebuilt by the U-Net while it is masked, from the mirror image of
  the other hemisphere (and no tissue of its own side, so a one-sided lesion cannot be copied);
- ``context``: the same without the mirror channel (a lesion's mirror ghost is not copied);
- ``restored``: the slice restored by the restorer from itself and ``mirrored`` (keeps the
  healthy folding of each hemisphere that neither reconstruction can predict);

and, from the same pass of the restorer, ``disorder``: its probability that a voxel held a
disorder it removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .networks import Reconstructor, Restorer, rebuild_hemispheres
from .slicing import Slices


@dataclass
class HealthyReference:
    """The three healthy references of a study's slices and the restorer's disorder probability,
    each (n, 96, 112), 0 outside the brain."""

    mirrored: np.ndarray
    context: np.ndarray
    restored: np.ndarray
    disorder: np.ndarray


@torch.no_grad()
def rebuild(reconstructor: Reconstructor, restorer: Restorer, slices: Slices, batch_size: int = 32) -> HealthyReference:
    """The healthy references of every slice, in batches on the device of the networks (both on one)."""
    device = next(reconstructor.parameters()).device
    mirrored, context, restored, disorder = (np.zeros_like(slices.image) for _ in range(4))
    for start in range(0, len(slices.image), batch_size):
        x = torch.from_numpy(slices.image[start:start + batch_size, None]).to(device)
        brain = torch.from_numpy(slices.mask[start:start + batch_size, None]).to(x)
        keep = torch.tensor([1.0] * len(x) + [0.0] * len(x), device=device)
        both = rebuild_hemispheres(reconstructor, torch.cat([x, x]), keep) * torch.cat([brain, brain])
        mirrored[start:start + len(x)] = both[: len(x), 0].cpu().numpy()
        context[start:start + len(x)] = both[len(x):, 0].cpu().numpy()
        clean, where = restorer.restore_and_locate(x, both[: len(x)])
        restored[start:start + len(x)] = (clean * brain)[:, 0].cpu().numpy()
        disorder[start:start + len(x)] = (torch.sigmoid(where) * brain)[:, 0].cpu().numpy()
    return HealthyReference(mirrored, context, restored, disorder)
