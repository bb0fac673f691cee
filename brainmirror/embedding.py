"""Embedding: the Beta-VAE's view of a slice's difference maps, and its distance to healthy ones.

The Beta-VAE is a learned model of what healthy difference maps look like (a residual along a
sulcus is normal, a residual blob in white matter is not); a slice is scored by the Mahalanobis
distance of its posterior mean to the healthy embeddings (Ledoit-Wolf shrinkage covariance).
"""

from __future__ import annotations

import numpy as np
import torch

from .difference_maps import DifferenceMaps
from .networks import BetaVAE


def vae_input(maps: DifferenceMaps) -> np.ndarray:
    """The VAE's two input channels: the voxel anomaly map (clipped, scaled) and the flip difference."""
    return np.stack([np.clip(maps.voxel_score, -5, 50) / 10.0, maps.symmetry], axis=1).astype(np.float32)


@torch.no_grad()
def embed(vae: BetaVAE, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Posterior means of the Beta-VAE for each input slice (n, channels, 96, 112): (n, latent)."""
    device = next(vae.parameters()).device
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = [vae.encode(t[i:i + batch_size].to(device))[0].cpu() for i in range(0, len(t), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, vae.mu.out_features), np.float32)


def mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Row-wise Mahalanobis distance of ``x`` (n, d) to a distribution given by mean and precision."""
    delta = x - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", delta, precision, delta), 0))


def embedding_distance(embeddings: np.ndarray, normative: dict[str, np.ndarray]) -> np.ndarray:
    """Mahalanobis distance of each embedding to the healthy ones (``embedding_statistics``)."""
    return mahalanobis(embeddings, normative["embedding_mean"], normative["embedding_precision"])


def embedding_statistics(embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and Ledoit-Wolf precision of healthy embeddings (n, latent)."""
    from sklearn.covariance import LedoitWolf  # training only

    lw = LedoitWolf().fit(embeddings)
    return {"embedding_mean": lw.location_.astype(np.float32), "embedding_precision": lw.precision_.astype(np.float32)}
