"""The detector: slicer, reconstruction, difference maps, embedding and scoring stages.

Scoring (every configuration is a per-slice statistic, standardised per canonical slice
position against healthy statistics, then aggregated to the study):

- ``mse``: mean squared residual of the mirror-informed reconstruction inside the brain,
- ``symmetry``: mean squared left-right difference ``|x - mirror(x)|`` inside the brain,
- ``vae``: Mahalanobis distance of the Beta-VAE embedding of the difference maps to the
  healthy embeddings (Ledoit-Wolf shrinkage covariance),
- ``combined``: the mean of the standardised ``vae`` score and of the top-2 % mean of the
  voxel anomaly map.

Study score: the mean of the three highest slice scores (robust to one noisy slice, still
sensitive to a lesion a few slices thick). Voxel anomaly map: the geometric mean of three
residuals (the mirror-informed reconstruction's, the context-only reconstruction's and the
restorer's), smoothed, divided by its median in the study's brain, then standardised voxel by
voxel against healthy subjects in canonical space. A lesion is far from all three healthy
references; a healthy voxel is rarely far from all three: the restorer keeps healthy tissue that
the hemisphere reconstructions cannot predict (the two hemispheres' own folding), and the
context-only reconstruction does not copy a lesion's mirror ghost, which the mirror-informed
one of the healthy side does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from . import __version__
from .networks import INFERENCE, BetaVAE, Reconstructor, Restorer, rebuild_hemispheres
from .preprocess import SHAPE, Canonical
from .result import Assessment, Finding

CONFIGURATIONS = ("mse", "symmetry", "vae", "combined")
TOP_SLICES = 3
TOP_VOXEL_FRACTION = 0.02
MIN_BRAIN_FRACTION = 0.03  # slices with less brain than this are not scored
MIN_FINDING_ML = 0.3
VOXEL_STD_FLOOR = 0.25  # in units of the study's median raw map
RAW_LEVEL_FLOOR = 1e-3


@dataclass
class Slices:
    """Canonical axial slices that contain brain."""

    image: np.ndarray  # (n, 96, 112) float32
    mask: np.ndarray  # (n, 96, 112) bool
    z: np.ndarray  # (n,) canonical slice index


@dataclass
class DifferenceMaps:
    """Per-slice reconstructions and difference maps."""

    reconstruction: np.ndarray  # mirror-informed reconstruction, (n, 96, 112)
    residual: np.ndarray  # |x - reconstruction|
    context_residual: np.ndarray  # |x - context-only reconstruction|
    restoration_residual: np.ndarray  # |x - restored slice|
    symmetry: np.ndarray  # |x - mirror(x)|
    voxel_score: np.ndarray  # standardised voxel anomaly score (0 outside the brain)


def slice_volume(canonical: Canonical) -> Slices:
    """Axial slices of the canonical volume with at least MIN_BRAIN_FRACTION brain."""
    fraction = canonical.mask.mean(axis=(0, 1))
    z = np.flatnonzero(fraction >= MIN_BRAIN_FRACTION)
    return Slices(
        image=np.ascontiguousarray(canonical.image[:, :, z].transpose(2, 0, 1)),
        mask=np.ascontiguousarray(canonical.mask[:, :, z].transpose(2, 0, 1)),
        z=z,
    )


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


def half_precision_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A network's weights as a bundle stores them: floating-point tensors in half precision.

    Training rounds its networks to these weights before it fits healthy statistics with them
    (``training.round_to_stored``), so a loaded bundle scores exactly as the one that was fitted.
    """
    return {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}


def mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Row-wise Mahalanobis distance of ``x`` (n, d) to a distribution given by mean and precision."""
    delta = x - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", delta, precision, delta), 0))


def _describe(inference: dict[str, str]) -> str:
    return f"{inference['masks']} masks with the {inference['mirror']} mirror, {inference['reference']} reference"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Detector:
    """A trained model bundle: networks, healthy (normative) statistics and calibration."""

    def __init__(self, reconstructor: Reconstructor, restorer: Restorer, vae: BetaVAE,
                 normative: dict[str, np.ndarray], metadata: dict, device: torch.device | None = None):
        self.device = device or default_device()
        self.reconstructor = reconstructor.to(self.device).eval()
        self.restorer = restorer.to(self.device).eval()
        self.vae = vae.to(self.device).eval()
        self.normative = normative
        self.metadata = metadata

    # -- bundle I/O ------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle: Path | str, device: torch.device | None = None) -> "Detector":
        bundle = Path(bundle)
        if (bundle / "brainmirror").is_dir():  # accept the models/ folder of an app too
            bundle = bundle / "brainmirror"
        metadata_path = bundle / "configs" / "metadata.json"
        if not metadata_path.exists():
            raise FileNotFoundError(f"no brainmirror model bundle at {bundle} (missing configs/metadata.json)")
        metadata = json.loads(metadata_path.read_text())
        inference = {"masks": "checkerboard", "mirror": "unmasked", "reference": "reconstructed",
                     **metadata.get("inference", {})}
        if inference != INFERENCE:
            raise ValueError(f"model bundle at {bundle} was fitted for {_describe(inference)}, but this brainmirror "
                             f"rebuilds {_describe(INFERENCE)}: retrain it (README, 'Reproducing the shipped weights')")
        network = metadata["network"]
        networks = {"reconstruction": Reconstructor(tuple(network["unet_features"])),
                    "restoration": Restorer(tuple(network["restorer_features"])),
                    "embedding": BetaVAE(latent=network["latent"], channels=tuple(network["vae_channels"]))}
        for name, model in networks.items():  # stored in half precision (see ``save``)
            weights = torch.load(bundle / "models" / f"{name}.pt", map_location="cpu")
            try:
                model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
            except RuntimeError as error:
                detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
                raise ValueError(f"model bundle at {bundle}: its {name} network is not the one this brainmirror "
                                 f"runs ({detail}): retrain it (README, 'Reproducing the shipped weights')") from None
        with np.load(bundle / "models" / "normative.npz") as data:
            normative = {k: data[k].astype(np.float32) for k in data.files}
        return cls(networks["reconstruction"], networks["restoration"], networks["embedding"], normative, metadata, device)

    def save(self, bundle: Path | str) -> None:
        bundle = Path(bundle)
        (bundle / "configs").mkdir(parents=True, exist_ok=True)
        (bundle / "models").mkdir(parents=True, exist_ok=True)
        for name, model in self.networks().items():
            torch.save(half_precision_weights(model), bundle / "models" / f"{name}.pt")
        np.savez_compressed(bundle / "models" / "normative.npz",
                            **{k: v.astype(np.float16 if v.ndim == 3 else np.float32) for k, v in self.normative.items()})
        (bundle / "configs" / "metadata.json").write_text(json.dumps(self.metadata, indent=2) + "\n")

    def networks(self) -> dict[str, torch.nn.Module]:
        """The bundle's networks by the file name they are stored under."""
        return {"reconstruction": self.reconstructor, "restoration": self.restorer, "embedding": self.vae}

    def anatomies(self) -> tuple[str, ...]:
        """The virtual-cohort anatomies this bundle was trained or calibrated on (as recorded)."""
        return tuple(sorted({*self.metadata.get("training", {}).get("anatomies", []),
                             *self.metadata.get("calibration", {}).get("anatomies", [])}))

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", __version__))

    # -- stages ----------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, slices: Slices, batch_size: int = 32) -> DifferenceMaps:
        """Each hemisphere rebuilt while masked, with and without the mirror (of the other one), and
        the slice restored from itself and its mirror-informed reconstruction."""
        n = len(slices.image)
        mirrored, context, restored = (np.zeros_like(slices.image) for _ in range(3))
        for start in range(0, n, batch_size):
            x = torch.from_numpy(slices.image[start:start + batch_size, None]).to(self.device)
            brain = torch.from_numpy(slices.mask[start:start + batch_size, None]).to(x)
            keep = torch.tensor([1.0] * len(x) + [0.0] * len(x), device=self.device)
            both = rebuild_hemispheres(self.reconstructor, torch.cat([x, x]), keep) * torch.cat([brain, brain])
            mirrored[start:start + len(x)] = both[: len(x), 0].cpu().numpy()
            context[start:start + len(x)] = both[len(x):, 0].cpu().numpy()
            restored[start:start + len(x)] = (self.restorer(x, both[: len(x)]) * brain)[:, 0].cpu().numpy()
        x_np, brain = slices.image, slices.mask
        residual, context_residual, restoration_residual = (np.abs(x_np - r) * brain for r in (mirrored, context, restored))
        symmetry = np.abs(x_np - x_np[:, ::-1]) * brain
        return DifferenceMaps(mirrored, residual, context_residual, restoration_residual, symmetry,
                              self._voxel_score(residual, context_residual, restoration_residual, brain, slices.z))

    def _voxel_score(self, residual: np.ndarray, context_residual: np.ndarray, restoration_residual: np.ndarray,
                     brain: np.ndarray, z: np.ndarray) -> np.ndarray:
        raw = raw_voxel_map(residual, context_residual, restoration_residual, brain)
        if "voxel_mean" not in self.normative:  # while training, before healthy statistics exist
            return raw
        mean = self.normative["voxel_mean"][:, :, z].transpose(2, 0, 1)
        std = np.maximum(self.normative["voxel_std"][:, :, z].transpose(2, 0, 1), VOXEL_STD_FLOOR)
        return (np.clip((raw - mean) / std, -5, 50) * brain).astype(np.float32)

    @staticmethod
    def vae_input(maps: DifferenceMaps) -> np.ndarray:
        return np.stack([np.clip(maps.voxel_score, -5, 50) / 10.0, maps.symmetry], axis=1).astype(np.float32)

    @torch.no_grad()
    def embed(self, maps: DifferenceMaps, batch_size: int = 64) -> np.ndarray:
        """Posterior means of the Beta-VAE for each slice's difference maps, (n, latent)."""
        x = torch.from_numpy(self.vae_input(maps))
        out = [self.vae.encode(x[i:i + batch_size].to(self.device))[0].cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.vae.mu.out_features), np.float32)

    def slice_features(self, slices: Slices, maps: DifferenceMaps, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Raw (unstandardised) per-slice statistics."""
        brain = slices.mask
        count = np.maximum(brain.sum(axis=(1, 2)), 1)
        flat = np.where(brain, maps.voxel_score, -np.inf).reshape(len(brain), -1)
        k = np.maximum((count * TOP_VOXEL_FRACTION).astype(int), 10)
        top = np.array([np.sort(row)[-kk:].mean() for row, kk in zip(flat, k)]) if len(flat) else np.zeros(0)
        return {
            "mse": (maps.residual**2).sum(axis=(1, 2)) / count,
            "symmetry": (maps.symmetry**2).sum(axis=(1, 2)) / count,
            "vae": mahalanobis(embeddings, self.normative["embedding_mean"], self.normative["embedding_precision"]),
            "top": top,
        }

    def slice_scores(self, slices: Slices, maps: DifferenceMaps, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Slice scores of every configuration, standardised per canonical slice position."""
        features = self.slice_features(slices, maps, embeddings)
        z = slices.z
        standard = {name: (value - self.normative[f"{name}_mean"][z]) / self.normative[f"{name}_std"][z]
                    for name, value in features.items()}
        standard["combined"] = 0.5 * (standard["vae"] + standard["top"])
        return {name: standard[name].astype(np.float32) for name in CONFIGURATIONS}

    @staticmethod
    def study_score(slice_scores: np.ndarray) -> float:
        if len(slice_scores) == 0:
            return float("nan")
        return float(np.sort(slice_scores)[-TOP_SLICES:].mean())

    def calibration(self, configuration: str) -> dict:
        try:
            return self.metadata["calibration"]["study"][configuration] | {"voxel": self.metadata["calibration"]["voxel"]}
        except KeyError as error:
            raise RuntimeError(f"model bundle is not calibrated for {configuration!r}: run `brainmirror calibrate`") from error

    def score(self, canonical: Canonical, slices: Slices, maps: DifferenceMaps, embeddings: np.ndarray,
              configuration: str = "combined") -> Assessment:
        """Verdict, slice scores and voxel maps on the input's native grid."""
        if configuration not in CONFIGURATIONS:
            raise ValueError(f"unknown configuration {configuration!r}; choose from {CONFIGURATIONS}")
        calibration = self.calibration(configuration)
        scores = self.slice_scores(slices, maps, embeddings)[configuration]
        study = self.study_score(scores)
        verdict = "abnormal" if study > calibration["threshold"] else "normal"

        voxel_canonical = np.zeros(SHAPE, np.float32)
        voxel_canonical[:, :, slices.z] = maps.voxel_score.transpose(1, 2, 0)
        anomaly_map = canonical.to_native(voxel_canonical, order=1) * canonical.native_mask
        score_volume = np.full(SHAPE, -1e6, np.float32)
        score_volume[:, :, slices.z] = scores[None, None, :]
        native_scores = canonical.to_native(score_volume, order=0)
        native_scores = np.where(canonical.native_mask & (native_scores > -1e5), native_scores, np.nan)
        with np.errstate(all="ignore"):
            slice_scores = np.array([np.nanmax(s) if np.isfinite(s).any() else np.nan for s in native_scores])

        voxel_threshold = calibration["voxel"]["threshold"]
        segmentation = np.zeros(canonical.native_shape, np.uint8)
        findings: list[Finding] = []
        if verdict == "abnormal":
            segmentation, findings = self.findings(canonical, anomaly_map, voxel_threshold)
        return Assessment(
            verdict=verdict, study_score=study, threshold=float(calibration["threshold"]),
            false_positive_rate=float(calibration["fpr"]), voxel_threshold=float(voxel_threshold),
            voxel_false_positive_rate=float(calibration["voxel"]["fpr"]), configuration=configuration,
            slice_scores=slice_scores.astype(np.float32), anomaly_map=anomaly_map.astype(np.float32),
            segmentation=segmentation, findings=findings, brain_extraction=canonical.brain_extraction,
            model_version=self.version,
        )

    @staticmethod
    def findings(canonical: Canonical, anomaly_map: np.ndarray, threshold: float) -> tuple[np.ndarray, list[Finding]]:
        """Connected regions above the voxel threshold, largest first, as labels and findings."""
        voxel_ml = abs(np.linalg.det(canonical.native_affine[:3, :3])) / 1000.0
        components, n = ndimage.label(anomaly_map > threshold)
        if n == 0:
            return np.zeros(canonical.native_shape, np.uint8), []
        sizes = ndimage.sum_labels(np.ones_like(anomaly_map), components, index=np.arange(1, n + 1))
        keep = [i + 1 for i in np.argsort(-sizes) if sizes[i] * voxel_ml >= MIN_FINDING_ML][:20]
        segmentation = np.zeros(canonical.native_shape, np.uint8)
        to_canonical_mm = np.linalg.inv(canonical.canonical_to_native_mm) @ canonical.native_affine
        findings = []
        for label, component in enumerate(keep, start=1):
            region = components == component
            segmentation[region] = label
            ijk = np.argwhere(region)
            x_mm = (to_canonical_mm[:3, :3] @ ijk.T + to_canonical_mm[:3, 3:4])[0]
            right = float((x_mm > 0).mean())  # RAS: x > 0 is the patient's right
            hemisphere = "right" if right > 0.8 else "left" if right < 0.2 else "bilateral"
            findings.append(Finding(
                label=label, volume_ml=float(region.sum() * voxel_ml), hemisphere=hemisphere,
                slice_range=(int(ijk[:, 0].min()), int(ijk[:, 0].max())),
                peak_score=float(anomaly_map[region].max()),
                centroid_ijk=tuple(float(c) for c in ijk.mean(axis=0)),
            ))
        return segmentation, findings

    def assess(self, canonical: Canonical, configuration: str = "combined") -> Assessment:
        """All stages after preprocessing, for one study."""
        slices = slice_volume(canonical)
        maps = self.reconstruct(slices)
        return self.score(canonical, slices, maps, self.embed(maps), configuration)

