"""Evaluation baselines that are not configurations of the model.

``RawVAEBaseline`` is the "VAE without the reconstruction stage" of the Frotscher protocol: the
same Beta-VAE architecture, trained on raw healthy slices instead of difference maps, scored by
the Mahalanobis distance of its embedding to healthy embeddings, standardised per canonical slice
position. It is trained on the same studies (same stream, same fit/normative split) as the model,
so the two differ only by the reconstruction stage. It lives in its own bundle, outside the
deployed application (``models/baselines/raw-vae``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from .embedding import embed, embedding_distance, embedding_statistics
from .networks import BetaVAE, default_device
from .slicing import Slices
from .study_statistic import position_statistics, standardise

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "models" / "baselines" / "raw-vae"


class RawVAEBaseline:
    """Beta-VAE on raw slices; slice score = standardised Mahalanobis distance of the embedding."""

    name = "baseline-vae-raw"

    def __init__(self, vae: BetaVAE, normative: dict[str, np.ndarray], metadata: dict, device: torch.device | None = None):
        self.device = device or default_device()
        self.vae = vae.to(self.device).eval()
        self.normative = normative
        self.metadata = metadata

    def embed(self, slices: Slices) -> np.ndarray:
        return embed(self.vae, slices.image[:, None])

    def distances(self, slices: Slices) -> np.ndarray:
        return embedding_distance(self.embed(slices), self.normative)

    def slice_scores(self, slices: Slices) -> np.ndarray:
        return standardise(self.distances(slices), slices.z, self.normative["score_mean"],
                           self.normative["score_std"]).astype(np.float32)

    def fit_statistics(self, normative: list[Slices]) -> None:
        """Embedding mean, Ledoit-Wolf precision and per-position score statistics on healthy studies."""
        embeddings = [self.embed(s) for s in normative]
        self.normative = embedding_statistics(np.concatenate(embeddings))
        distances = [embedding_distance(e, self.normative) for e in embeddings]
        self.normative["score_mean"], self.normative["score_std"] = position_statistics(distances, [s.z for s in normative])

    def save(self, path: Path | str) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu().half() if v.is_floating_point() else v.cpu() for k, v in self.vae.state_dict().items()},
                   path / "embedding.pt")
        np.savez_compressed(path / "normative.npz", **self.normative)
        (path / "metadata.json").write_text(json.dumps(self.metadata, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path | str = DEFAULT_PATH, device: torch.device | None = None) -> RawVAEBaseline:
        path = Path(path)
        if not (path / "metadata.json").exists():
            raise FileNotFoundError(f"no raw-slice VAE baseline at {path}: train it with `brainmirror train-baseline`")
        metadata = json.loads((path / "metadata.json").read_text())
        vae = BetaVAE(in_channels=1, latent=metadata["latent"], channels=tuple(metadata["vae_channels"]))
        state = torch.load(path / "embedding.pt", map_location="cpu")
        vae.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        with np.load(path / "normative.npz") as data:
            normative = {k: data[k] for k in data.files}
        return cls(vae, normative, metadata, device)
