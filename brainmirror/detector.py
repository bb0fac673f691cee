"""The detector: a trained model bundle and its stages, in the order a study meets them.

slicing -> healthy_reference -> difference_maps -> embedding -> study_statistic, then the verdict
and findings on the input's native grid (``score``). Each stage lives in the module named for it;
this module binds them to a bundle's networks and healthy statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from . import __version__
from . import embedding, study_statistic
from .difference_maps import ANOMALY_MAP_VERSION, DifferenceMaps, difference_maps
from .healthy_reference import rebuild
from .networks import INFERENCE, BetaVAE, Reconstructor, Restorer, default_device
from .preprocess import PREPROCESSING_VERSION, SHAPE, Canonical
from .result import Assessment, Finding
from .slicing import Slices, slice_volume
from .study_statistic import CONFIGURATIONS

MIN_FINDING_ML = 0.3


def half_precision_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A network's weights as a bundle stores them: floating-point tensors in half precision.

    Training rounds its networks to these weights before it fits healthy statistics with them
    (``training.round_to_stored``), so a loaded bundle scores exactly as the one that was fitted.
    """
    return {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}


def _describe(inference: dict[str, str]) -> str:
    return f"{inference['masks']} masks with the {inference['mirror']} mirror, {inference['reference']} reference"


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
    def load(cls, bundle: Path | str, device: torch.device | None = None, refit: bool = False) -> "Detector":
        """A bundle from disk; refused (ValueError, with what to do) where this brainmirror would score
        it wrongly. ``refit``: accept healthy statistics of another preprocessing (they are refitted)."""
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
        preprocessing = metadata.get("preprocessing")
        if preprocessing != PREPROCESSING_VERSION and not refit:
            raise ValueError(f"model bundle at {bundle}: its healthy statistics were fitted on preprocessing version "
                             f"{preprocessing or '3 or earlier'}, but this brainmirror preprocesses with version "
                             f"{PREPROCESSING_VERSION}: refit them on its training studies with `brainmirror finetune --model {bundle} "
                             f"--output {bundle} --unet-steps 0 --restorer-steps 0 --vae-steps 0` and calibrate, or retrain it "
                             "(README, 'Reproducing the shipped weights')")
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
        missing = [f for f in study_statistic.FEATURES if f"{f}_mean" not in normative]
        if missing:
            raise ValueError(f"model bundle at {bundle} has no healthy statistics of the slice statistic "
                             f"{', '.join(missing)} (made by an earlier brainmirror): retrain it "
                             "(README, 'Reproducing the shipped weights')")
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

    def normative_keys(self) -> tuple[str, ...]:
        """The studies (``training.study_key``) its healthy statistics were fitted on, as recorded."""
        return tuple(self.metadata.get("training", {}).get("normative_keys", []))

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", __version__))

    # -- stages ----------------------------------------------------------------------------
    def reconstruct(self, slices: Slices) -> DifferenceMaps:
        """Two stages in one: the healthy references of every slice (``healthy_reference``) and the
        difference maps to them (``difference_maps``)."""
        return difference_maps(slices, rebuild(self.reconstructor, self.restorer, slices), self.normative)

    def embed(self, maps: DifferenceMaps) -> np.ndarray:
        """Posterior means of the Beta-VAE for each slice's difference maps, (n, latent)."""
        return embedding.embed(self.vae, embedding.vae_input(maps))

    def slice_scores(self, slices: Slices, maps: DifferenceMaps, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Slice scores of every configuration, standardised per canonical slice position."""
        features = study_statistic.slice_features(slices, maps, embeddings, self.normative)
        return study_statistic.slice_scores(features, slices.z, self.normative)

    def calibration(self, configuration: str) -> dict:
        try:
            calibration = self.metadata["calibration"]["study"][configuration] | {"voxel": self.metadata["calibration"]["voxel"]}
        except KeyError as error:
            raise RuntimeError(f"model bundle is not calibrated for {configuration!r}: run `brainmirror calibrate`") from error
        if self.metadata["calibration"].get("preprocessing") != self.metadata.get("preprocessing"):
            raise RuntimeError("model bundle was calibrated on another preprocessing than its healthy statistics: "
                               "run `brainmirror calibrate` again")
        if calibration["voxel"].get("anomaly_map", 1) != ANOMALY_MAP_VERSION:
            raise RuntimeError("model bundle's voxel threshold was calibrated on an earlier voxel anomaly map: "
                               "run `brainmirror calibrate` again")
        return calibration

    def score(self, canonical: Canonical, slices: Slices, maps: DifferenceMaps, embeddings: np.ndarray,
              configuration: str = "combined") -> Assessment:
        """Verdict, slice scores and voxel maps on the input's native grid."""
        if configuration not in CONFIGURATIONS:
            raise ValueError(f"unknown configuration {configuration!r}; choose from {CONFIGURATIONS}")
        calibration = self.calibration(configuration)
        scores = self.slice_scores(slices, maps, embeddings)[configuration]
        study = study_statistic.study_score(scores)
        verdict = "abnormal" if study > calibration["threshold"] else "normal"

        voxel_canonical = np.zeros(SHAPE, np.float32)
        voxel_canonical[:, :, slices.z] = maps.anomaly.transpose(1, 2, 0)
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

