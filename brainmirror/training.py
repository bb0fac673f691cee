"""Training and calibration on healthy studies only.

Training splits the healthy studies into a *fit* part (trains the U-Net and the Beta-VAE) and a
*normative* part (healthy statistics: per-voxel residual mean/std, per-slice-position score
statistics, embedding mean and shrinkage covariance), so that the statistics are not biased by
studies the networks have memorised. Calibration then sets thresholds on *other* healthy
studies. Nothing here ever sees a lesion.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import __version__
from .baselines import RawVAEBaseline
from .cohort import COHORT_VERSION
from .detector import Detector, half_precision_weights
from .difference_maps import ANOMALY_MAP_VERSION, voxel_statistics
from .embedding import embedding_statistics, vae_input
from .networks import (
    INFERENCE,
    BetaVAE,
    Reconstructor,
    Restorer,
    beta_vae_loss,
    default_device,
    rebuild_hemispheres,
    training_mask,
)
from .parallel import in_workers
from .slicing import Slices, slice_volume
from .study_statistic import CONFIGURATIONS, position_statistics, slice_features, study_score
from . import anatomies, disorders, preprocess
from .preprocess import canonicalise

log = logging.getLogger(__name__)

LOCATE_WEIGHT = 0.5  # restorer loss: weight of saying where the disorders are, next to restoring them
RESTORER_CROP = 64  # side of the restorer's square training crops, pixels

StudySource = Iterable[tuple[str, Callable[[], nib.Nifti1Image]]]


@dataclass
class TrainingConfig:
    unet_features: tuple[int, ...] = (16, 16, 32, 64, 128, 16)
    vae_channels: tuple[int, ...] = (16, 32, 64, 16)
    latent: int = 1024
    beta: float = 4.0
    unet_steps: int = 3000
    restorer_features: tuple[int, ...] = (16, 16, 32, 64, 128, 16)
    restorer_steps: int = 13000
    restorer_pool: int = 16000  # disordered slices the restorer trains on (made once, cropped at every step)
    vae_steps: int = 1500
    batch_size: int = 16
    learning_rate: float = 2e-3
    mirror_dropout: float = 0.3  # fraction of training samples that get no mirror channel
    normative_fraction: float = 0.25
    seed: int = 0


# -- data ----------------------------------------------------------------------------------
def cache_folder(cache: Path) -> Path:
    """The part of a preprocessing cache that holds for the current preprocessing, anatomy and cohort versions."""
    return cache / (f"preprocessing-v{preprocess.PREPROCESSING_VERSION}-anatomies-{anatomies.version_tag()}"
                    f"-cohort-v{COHORT_VERSION}")


def study_key(name: str) -> str:
    """A study's key: a hash of its source name (its cache file; what a bundle records, not a path)."""
    return hashlib.sha1(name.encode()).hexdigest()[:16]


def prepare(sources: StudySource, cache: Path, progress: bool = True, workers: int | None = None) -> dict[str, Slices]:
    """Preprocess every study once (cached per study and version, ``cache_folder``; a rerun
    resumes); the usable ones by ``study_key``, in source order.

    Uncached studies are prepared in ``workers`` processes (default: one per CPU core and 3 GB
    of memory, at most 8; each on one thread) when their loaders can be sent to another process
    (the virtual cohort's can, a folder's studies are prepared here).
    """
    cache = cache_folder(cache)
    cache.mkdir(parents=True, exist_ok=True)
    sources = list(sources)
    path_of = {name: cache / f"{study_key(name)}.npz" for name, _ in sources}
    missing = [(name, load) for name, load in sources if not path_of[name].exists()]
    with tqdm(total=len(missing), desc="preprocess", disable=not progress or not missing, unit="study") as bar:
        for (name, _), slices in zip(missing, in_workers(_prepare_one, [load for _, load in missing], workers)):
            bar.update()
            if isinstance(slices, str):
                log.warning("skipped %s: %s", name, slices)
                continue
            tmp = path_of[name].with_suffix(".tmp.npz")
            np.savez_compressed(tmp, image=slices.image, mask=slices.mask, z=slices.z)
            tmp.replace(path_of[name])
    prepared = {}
    for name, path in path_of.items():
        if path.exists():
            with np.load(path) as data:
                prepared[study_key(name)] = Slices(data["image"], data["mask"], data["z"])
    return prepared


def _prepare_one(load: Callable[[], nib.Nifti1Image]) -> Slices | str:
    """One study's canonical slices, or why it cannot be used."""
    try:
        return slice_volume(canonicalise(load()))
    except ValueError as error:
        return str(error)


@dataclass(frozen=True)
class SyntheticStudy:
    """Loader of one healthy virtual-cohort study (SYNTHETIC), seeded by stream and index."""

    anatomy: str
    stream: str
    index: int

    def __call__(self) -> nib.Nifti1Image:
        from .cohort import make_subject, subject_rng

        return make_subject(self.anatomy, subject_rng(self.stream, self.index)).image


def synthetic_sources(stream: str, count: int, names: tuple[str, ...] = anatomies.TRAINING_ANATOMIES) -> StudySource:
    """Healthy virtual-cohort studies (SYNTHETIC), seeded by stream and index, anatomies in turn."""
    for i in range(count):
        anatomy = names[i % len(names)]
        yield f"synthetic-{stream}-{anatomy}-{i}", SyntheticStudy(anatomy, stream, i)


def folder_sources(root: Path) -> StudySource:
    """Every NIfTI file and DICOM series under ``root`` (loaded lazily where possible)."""
    from .data import iter_studies

    for name, image in iter_studies(root):
        yield f"{root}:{name}", (lambda image=image: image)


def split(studies: dict[str, Slices], config: TrainingConfig, normative_keys: Collection[str] = (),
          refit_only: bool = False) -> tuple[list[Slices], list[Slices], list[str]]:
    """The studies that fit networks, those that give healthy statistics, and the latter's keys.

    ``normative_keys``: a base bundle's normative studies; those among ``studies`` stay normative
    and every other study fits networks, so that adding studies never moves one the networks have
    seen into the statistics. Without two of them (a site's own studies): a seeded split
    (``normative_fraction``), or, with ``refit_only`` (no network is trained, so none of these
    studies is ever seen by one), every study gives healthy statistics.
    """
    keys = list(studies)
    normative = [k for k in dict.fromkeys(normative_keys) if k in studies]  # in the base's order
    fit = [k for k in keys if k not in normative_keys]
    if len(normative) < 2 and refit_only:
        fit, normative = [], keys
    elif len(normative) < 2:  # a site's own studies: none (or one) of the base's
        order = [keys[i] for i in np.random.default_rng(config.seed).permutation(len(keys))]
        n_normative = max(2, int(round(config.normative_fraction * len(keys))))
        fit, normative = order[n_normative:], order[:n_normative]
    log.info("%d studies: %d fit, %d normative", len(keys), len(fit), len(normative))
    return [studies[k] for k in fit], [studies[k] for k in normative], normative


# -- networks ------------------------------------------------------------------------------
def _fingerprint(*parts) -> str:
    """What a run depends on (tensors, arrays, settings), so that a checkpoint resumes only its own run."""
    digest = hashlib.sha1()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().numpy()
        digest.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return digest.hexdigest()


def _settings(config: TrainingConfig, *names: str) -> tuple:
    """The named settings of ``config``: a stage's checkpoint depends on its own settings only, so
    changing a later stage's recipe reuses the earlier stages' finished checkpoints."""
    return tuple((name, getattr(config, name)) for name in names)


def _checkpointed_loop(name: str, model: torch.nn.Module, steps: int, step_fn, checkpoint_dir: Path,
                       learning_rate: float, progress: bool, key: str) -> None:
    """Adam over ``steps`` with a resumable checkpoint every 100 steps.

    ``key`` fingerprints the data, settings and starting weights: a checkpoint of another run
    (other studies, recipe or network input) in the same folder is ignored, never resumed.
    No steps: the weights are kept (a refit of the healthy statistics only).
    """
    if steps == 0:
        return
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    path = checkpoint_dir / f"{name}.ckpt"
    start = 0
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("key") == key and state["steps"] == steps:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = state["step"]
            log.info("resuming %s at step %d", name, start)
        else:
            log.info("not resuming %s from %s: it was made for other data or settings", name, path)
    model.train()
    bar = tqdm(range(start, steps), desc=f"train {name}", disable=not progress, initial=start, total=steps)
    for step in bar:
        loss = step_fn(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 100 == 0 or step + 1 == steps:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step + 1, "steps": steps,
                        "key": key}, path)
    model.eval()


class _Steps(torch.utils.data.Dataset):
    """Batches ``make_batch(step)`` for the steps ``start`` to ``stop``, in order."""

    def __init__(self, make_batch: Callable[[int], tuple], start: int, stop: int):
        self.make_batch, self.start, self.stop = make_batch, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, k: int) -> tuple:
        return self.make_batch(self.start + k)


def data_workers(device: torch.device) -> int:
    """Processes that make training batches: none on a CPU (its cores run the networks), else all
    the cores this process may use but one, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores - 1) if device.type == "cuda" else 0


def _prefetched(make_batch: Callable[[int], tuple], steps: int, workers: int) -> Callable[[int], tuple]:
    """``make_batch`` as a function of the step, computed ahead by ``workers`` processes where there
    are any (the same seeded batches as in the main process: only where they are computed differs)."""
    state: dict = {"next": None}

    def batch(i: int) -> tuple:
        if state["next"] != i:  # first step, or a resumed run
            state["batches"] = iter(torch.utils.data.DataLoader(
                _Steps(make_batch, i, steps), batch_size=None, num_workers=workers,
                prefetch_factor=4 if workers else None))
        state["next"] = i + 1
        return next(state["batches"])

    return batch


def train_reconstructor(fit: list[Slices], config: TrainingConfig, checkpoint_dir: Path,
                        device: torch.device, model: Reconstructor | None = None, progress: bool = True) -> Reconstructor:
    images = torch.from_numpy(np.concatenate([s.image for s in fit]))[:, None]
    brains = torch.from_numpy(np.concatenate([s.mask for s in fit]))[:, None].float()
    model = (model or Reconstructor(config.unet_features)).to(device)

    def step(i: int) -> torch.Tensor:
        rng = np.random.default_rng([config.seed, 1, i])
        index = torch.from_numpy(rng.integers(len(images), size=config.batch_size))
        gain = torch.from_numpy(rng.uniform(0.85, 1.15, size=(config.batch_size, 1, 1, 1)).astype(np.float32))
        x = (images[index] * gain).to(device)
        brain = brains[index].to(device)
        mask = torch.from_numpy(np.stack([training_mask(rng) for _ in index]))[:, None].to(device)
        keep = torch.from_numpy((rng.random(config.batch_size) >= config.mirror_dropout).astype(np.float32)).to(device)
        error = (model(x, mask, keep) - x).abs() * brain
        hidden = (error * mask).sum() / (mask * brain).sum().clamp(min=1)
        visible = (error * (1 - mask)).sum() / ((1 - mask) * brain).sum().clamp(min=1)
        return hidden + 0.1 * visible

    key = _fingerprint(images, brains, _settings(config, "unet_features", "unet_steps", "batch_size", "learning_rate",
                                                 "mirror_dropout", "seed"), INFERENCE, *model.state_dict().values())
    _checkpointed_loop("reconstruction", model, config.unet_steps, step, checkpoint_dir, config.learning_rate, progress, key)
    return model


def train_restorer(fit: list[Slices], config: TrainingConfig, checkpoint_dir: Path, device: torch.device,
                   reconstructor: Reconstructor, model: Restorer | None = None, progress: bool = True) -> Restorer:
    """Healthy slices with synthetic disorders (``disorders.py``) -> the clean slice and where the
    disorders are, given the frozen reconstructor's hemisphere reconstruction of the disordered
    slice. Loss inside the brain: L1 to the clean slice (weighted five-fold inside the disorders)
    plus ``LOCATE_WEIGHT`` x binary cross-entropy to the disorders' weight map.

    The disordered slices and their reconstructions are made once: a pool of ``config.restorer_pool``
    slices, fewer if the run sees fewer (``restorer_pool.npz`` in ``checkpoint_dir``, kept for a
    resumed run). Each step trains on ``RESTORER_CROP``-pixel square crops of it, half of them
    centred near a disorder: on 2 CPU cores 0.25 s a batch of 16, against 0.5-0.9 s on whole slices
    reconstructed at every step."""
    images = np.concatenate([s.image for s in fit])
    brains = np.concatenate([s.mask for s in fit])
    model = (model or Restorer(config.restorer_features)).to(device)
    reconstructor = reconstructor.to(device).eval()

    def make_batch(i: int) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng([config.seed, 3, i])
        index = rng.integers(len(images), size=config.batch_size)
        clean, corrupted, weights = [], [], []
        for j in index:
            gain = rng.uniform(0.85, 1.15)
            donors = images[rng.integers(len(images), size=4)] * gain
            image, weight = disorders.corrupt(images[j] * gain, brains[j], donors, rng)
            clean.append(images[j] * gain)
            corrupted.append(image)
            weights.append(weight)
        as_tensor = lambda a: torch.from_numpy(np.stack(a)[:, None].astype(np.float32))  # noqa: E731
        return as_tensor(corrupted), as_tensor(clean), as_tensor(weights), as_tensor(brains[index])

    pool_batches = max(1, min(config.restorer_pool, config.restorer_steps * config.batch_size) // config.batch_size)
    pool_key = _fingerprint(images, brains, _settings(config, "batch_size", "seed"), pool_batches,
                            *reconstructor.state_dict().values())
    pool = _restorer_pool(make_batch, pool_batches, reconstructor, device, checkpoint_dir / "restorer_pool.npz",
                          pool_key, progress) if config.restorer_steps else {}
    crop = min(RESTORER_CROP, *images.shape[-2:])

    def step(i: int) -> torch.Tensor:
        x, reconstruction, target, weight, brain = (t.to(device) for t in _crops(pool, crop, config.batch_size,
                                                                                 np.random.default_rng([config.seed, 5, i])))
        restored, where = model.restore_and_locate(x, reconstruction)
        error = (restored - target).abs() * (1 + 4 * weight) + LOCATE_WEIGHT * F.binary_cross_entropy_with_logits(
            where, weight, reduction="none")
        return (error * brain).sum() / brain.sum().clamp(min=1)

    key = _fingerprint(images, brains, _settings(config, "restorer_features", "restorer_steps", "batch_size",
                                                 "learning_rate", "seed"), LOCATE_WEIGHT, INFERENCE, pool_batches, crop,
                       *reconstructor.state_dict().values(), *model.state_dict().values())
    _checkpointed_loop("restoration", model, config.restorer_steps, step, checkpoint_dir, config.learning_rate, progress, key)
    return model


def _restorer_pool(make_batch: Callable[[int], tuple], batches: int, reconstructor: Reconstructor,
                   device: torch.device, path: Path, key: str, progress: bool) -> dict[str, np.ndarray]:
    """``batches`` disordered batches (``make_batch``: disordered, clean, disorder weight, brain) with
    the reconstructor's hemisphere reconstruction of the disordered slice, as half-precision arrays
    ``x``, ``r``, ``t``, ``w`` and the brain ``b``; kept in ``path`` under ``key`` and reused."""
    if path.exists():
        with np.load(path) as stored:
            if str(stored["key"]) == key:
                return {k: stored[k] for k in "xrtwb"}
        log.info("remaking the restorer's pool: %s was made for other data or settings", path)
    parts: dict[str, list] = {k: [] for k in "xrtwb"}
    made = _prefetched(make_batch, batches, data_workers(device))
    for i in tqdm(range(batches), desc="restorer pool", unit="batch", disable=not progress):
        x, target, weight, brain = made(i)
        with torch.no_grad():
            reconstruction = rebuild_hemispheres(reconstructor, x.to(device), torch.ones(len(x), device=device)) * brain.to(device)
        for k, a in zip("xrtw", (x, reconstruction.cpu(), target, weight)):
            parts[k].append(a.numpy().astype(np.float16))
        parts["b"].append(brain.numpy().astype(bool))
    pool = {k: np.concatenate(v) for k, v in parts.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, key=key, **pool)
    partial.replace(path)
    return pool


def _crops(pool: dict[str, np.ndarray], crop: int, batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """A batch of ``crop``-pixel square crops of pool slices: half centred near a disordered pixel,
    half near any brain pixel (within a quarter crop); each of the pool's arrays as a float tensor."""
    height, width = pool["x"].shape[-2:]
    parts = []
    for j in rng.integers(len(pool["x"]), size=batch_size):
        ys, xs = np.nonzero(pool["w"][j, 0] > 0.5) if rng.random() < 0.5 else np.nonzero(pool["b"][j, 0])
        if len(ys):
            k = rng.integers(len(ys))
            y0 = int(np.clip(ys[k] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, height - crop))
            x0 = int(np.clip(xs[k] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, width - crop))
        else:
            y0, x0 = int(rng.integers(height - crop + 1)), int(rng.integers(width - crop + 1))
        parts.append([pool[k][j, :, y0:y0 + crop, x0:x0 + crop] for k in "xrtwb"])
    return tuple(torch.from_numpy(np.stack([part[m] for part in parts]).astype(np.float32)) for m in range(5))


def round_to_stored(model: torch.nn.Module) -> torch.nn.Module:
    """The network with the (half-precision) weights a bundle stores, so that what is fitted with it
    is what ships."""
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in half_precision_weights(model).items()})
    return model


def train_vae(maps: np.ndarray, config: TrainingConfig, checkpoint_dir: Path, device: torch.device,
              model: BetaVAE | None = None, progress: bool = True) -> BetaVAE:
    data = torch.from_numpy(maps)
    model = (model or BetaVAE(latent=config.latent, channels=config.vae_channels)).to(device)

    def step(i: int) -> torch.Tensor:
        rng = np.random.default_rng([config.seed, 2, i])
        x = data[torch.from_numpy(rng.integers(len(data), size=config.batch_size * 2))].to(device)
        recon, mu, logvar = model(x)
        return beta_vae_loss(recon, x, mu, logvar, config.beta) / x[0].numel()

    key = _fingerprint(data, _settings(config, "latent", "vae_channels", "beta", "vae_steps", "batch_size", "learning_rate",
                                       "seed"), *model.state_dict().values())
    _checkpointed_loop("embedding", model, config.vae_steps, step, checkpoint_dir, config.learning_rate / 2, progress, key)
    return model


# -- normative statistics ------------------------------------------------------------------
def fit_voxel_statistics(detector: Detector, normative: list[Slices], progress: bool = True) -> None:
    """Per-voxel healthy mean and std of the raw anomaly map (needed before the VAE trains)."""
    maps = [detector.reconstruct(s) for s in tqdm(normative, desc="voxel statistics", disable=not progress)]
    detector.normative["voxel_mean"], detector.normative["voxel_std"] = voxel_statistics(normative, maps)


def fit_embedding_statistics(detector: Detector, normative: list[Slices], progress: bool = True) -> None:
    """Embedding mean and Ledoit-Wolf precision, and per-position slice statistics."""
    maps = [detector.reconstruct(s) for s in tqdm(normative, desc="normative statistics", disable=not progress)]
    embeddings = [detector.embed(m) for m in maps]
    detector.normative.update(embedding_statistics(np.concatenate(embeddings)))
    features = [slice_features(s, m, e, detector.normative) for s, m, e in zip(normative, maps, embeddings)]
    for name in features[0]:
        mean, std = position_statistics([f[name] for f in features], [s.z for s in normative])
        detector.normative[f"{name}_mean"], detector.normative[f"{name}_std"] = mean, std


def train(fit_sources: StudySource, output: Path, work: Path, config: TrainingConfig,
          data_description: str, base: Detector | None = None, progress: bool = True,
          anatomies: tuple[str, ...] = (), new_restorer: bool = False) -> Detector:
    """Train (or, with ``base``, fine-tune) a model bundle on healthy studies and save it.

    ``new_restorer``: with ``base``, train a restorer of ``config.restorer_features`` from scratch
    rather than fine-tune the base's.

    ``anatomies``: the virtual-cohort anatomies of the sources, recorded in the bundle (with those
    of its base) so that an evaluation knows which anatomies the model has seen.
    """
    torch.manual_seed(config.seed)
    device = default_device()
    studies = prepare(fit_sources, work / "cache", progress)
    if len(studies) < 4:
        raise ValueError(f"need at least 4 usable healthy studies, found {len(studies)}")
    if new_restorer and not config.restorer_steps:
        raise ValueError("a new restorer needs training steps")
    refit_only = base is not None and not (config.unet_steps or config.restorer_steps or config.vae_steps)
    fit, normative, normative_keys = split(studies, config, base.normative_keys() if base else (), refit_only)

    if refit_only:  # the base's networks as they are: only the healthy statistics are fitted
        reconstructor, restorer = base.reconstructor.to(device), base.restorer.to(device)
    else:
        reconstructor = round_to_stored(train_reconstructor(fit, config, work / "checkpoints", device,
                                                            base.reconstructor if base else None, progress))
        restorer = round_to_stored(train_restorer(fit, config, work / "checkpoints", device, reconstructor,
                                                  base.restorer if base and not new_restorer else None, progress))
    vae = base.vae if base else BetaVAE(latent=config.latent, channels=config.vae_channels)
    detector = Detector(reconstructor, restorer, vae, dict(base.normative) if base else {}, {}, device)
    fit_voxel_statistics(detector, normative, progress)
    if config.vae_steps:
        fit_maps = np.concatenate([vae_input(detector.reconstruct(s))
                                   for s in tqdm(fit, desc="difference maps", disable=not progress)])
        detector.vae = round_to_stored(train_vae(fit_maps, config, work / "checkpoints", device, detector.vae,
                                                 progress)).eval()
    fit_embedding_statistics(detector, normative, progress)
    detector.metadata = {
        "name": "brainmirror",
        "version": __version__,
        "task": "Unsupervised anomaly detection in brain MRI (symmetry-informed inverse learning)",
        "description": "2D U-Net rebuilding each masked hemisphere from its mirror image, a second one "
                       "restoring the slice from itself and that reconstruction, Beta-VAE embedding of "
                       "difference maps, Mahalanobis scoring.",
        "authors": "brainmirror",
        "copyright": "brainmirror",
        "intended_use": "Research only. NOT FOR CLINICAL USE.",
        "data_source": data_description,
        "preprocessing": preprocess.PREPROCESSING_VERSION,  # of the healthy statistics
        "training": {"studies": len(fit), "normative_studies": len(normative), "normative_keys": normative_keys,
                     "slices": int(sum(len(s.z) for s in fit)), "date": date.today().isoformat(),
                     "fine_tuned_from": base.version if base else None,
                     "base_training": base.metadata.get("training") if base else None,
                     "anatomies": sorted(set(anatomies) | set(base.anatomies() if base else ())),
                     "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()}},
        "network": {"unet_features": list(config.unet_features), "restorer_features": list(config.restorer_features),
                    "vae_channels": list(config.vae_channels),
                    "latent": config.latent},
        "inference": dict(INFERENCE),
        "network_data_format": {"inputs": {"image": {"type": "image", "modality": "MR", "num_channels": 1,
                                                     "spatial_shape": [96, 112], "format": "canonical axial slice"}},
                                "outputs": {"score": {"type": "probabilities", "format": "anomaly score"}}},
    }
    detector.save(output)
    return detector


def train_raw_vae_baseline(fit_sources: StudySource, output: Path, work: Path, config: TrainingConfig,
                           data_description: str, progress: bool = True) -> RawVAEBaseline:
    """The evaluation baseline "VAE without reconstruction": the model's Beta-VAE trained on raw slices.

    Uses the same studies, preprocessing cache and fit/normative split as ``train`` with the same
    seed, so that it differs from the model only by the missing reconstruction stage.
    """
    torch.manual_seed(config.seed)
    studies = prepare(fit_sources, work / "cache", progress)
    if len(studies) < 4:
        raise ValueError(f"need at least 4 usable healthy studies, found {len(studies)}")
    fit, normative, _ = split(studies, config)
    raw = np.concatenate([s.image[:, None] for s in fit]).astype(np.float32)
    vae = BetaVAE(in_channels=1, latent=config.latent, channels=config.vae_channels)
    vae = train_vae(raw, config, work / "baseline-checkpoints", default_device(), vae, progress)
    baseline = RawVAEBaseline(vae, {}, {
        "name": "brainmirror baseline: Beta-VAE on raw slices (no reconstruction stage)",
        "version": __version__, "latent": config.latent, "vae_channels": list(config.vae_channels),
        "beta": config.beta, "vae_steps": config.vae_steps, "seed": config.seed, "data_source": data_description,
        "training": {"studies": len(fit), "normative_studies": len(normative), "date": date.today().isoformat()},
    })
    baseline.fit_statistics(normative)
    baseline.save(output)
    return baseline


# -- calibration ---------------------------------------------------------------------------
def threshold_at_fpr(healthy_values: np.ndarray, fpr: float) -> float:
    """The lowest healthy value that at most a fraction ``fpr`` of healthy values exceed.

    Scores above the threshold are abnormal; on the healthy values themselves the observed
    false-positive rate is the largest achievable one that does not exceed ``fpr``.
    """
    return float(np.quantile(np.asarray(healthy_values, dtype=float), 1 - fpr, method="higher"))


def fpr_upper_bound(n_healthy: int, n_above: int, confidence: float = 0.95) -> float:
    """Upper confidence bound of the true false-positive rate at a threshold that ``n_above`` of
    ``n_healthy`` independent healthy scores exceed (distribution-free: the threshold is their
    ``n_healthy - n_above``-th order statistic, and the healthy probability mass above it follows
    Beta(n_above + 1, n_healthy - n_above))."""
    from scipy.stats import beta

    if not 0 <= n_above < n_healthy:
        raise ValueError(f"need 0 <= n_above < n_healthy, got {n_above} of {n_healthy}")
    return float(beta.ppf(confidence, n_above + 1, n_healthy - n_above))


def healthy_scores(detector: Detector, studies: list[Slices], progress: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Study scores per configuration and all brain voxel scores, for healthy studies."""
    scores: dict[str, list[float]] = {c: [] for c in CONFIGURATIONS}
    voxels = []
    for s in tqdm(studies, desc="score healthy", disable=not progress, unit="study"):
        maps = detector.reconstruct(s)
        per_slice = detector.slice_scores(s, maps, detector.embed(maps))
        for c in CONFIGURATIONS:
            scores[c].append(study_score(per_slice[c]))
        voxels.append(maps.anomaly[s.mask])
    return {c: np.array(v) for c, v in scores.items()}, np.concatenate(voxels)


def calibrate(detector: Detector, studies: list[Slices], study_fpr: float = 0.05, voxel_fpr: float = 0.01,
              description: str = "", progress: bool = True, anatomies: tuple[str, ...] = ()) -> dict:
    """Thresholds at the stated false-positive rates on held-out healthy studies (``anatomies``:
    their virtual-cohort anatomies, recorded in the bundle)."""
    if not 0 < study_fpr < 1 or not 0 < voxel_fpr < 1:
        raise ValueError("false-positive rates must lie strictly between 0 and 1")
    if len(studies) < 2:
        raise ValueError("calibration needs at least 2 healthy studies (60 or more recommended; the shipped bundle used 240)")
    scores, voxels = healthy_scores(detector, studies, progress)
    study = {}
    for c, values in scores.items():
        threshold = threshold_at_fpr(values, study_fpr)
        above = int((values > threshold).sum())
        study[c] = {"threshold": threshold, "fpr": study_fpr, "observed_fpr": above / len(values),
                    "n_studies": len(values), "fpr_upper_95": fpr_upper_bound(len(values), above)}
    voxel_threshold = threshold_at_fpr(voxels, voxel_fpr)
    calibration = {
        "study": study,
        "voxel": {"threshold": voxel_threshold, "fpr": voxel_fpr, "anomaly_map": ANOMALY_MAP_VERSION,
                  "observed_fpr": float((voxels > voxel_threshold).mean()), "n_voxels": int(len(voxels))},
        "data_source": description,
        "preprocessing": preprocess.PREPROCESSING_VERSION,
        "anatomies": list(anatomies),
        "date": date.today().isoformat(),
    }
    detector.metadata["calibration"] = calibration
    return calibration
