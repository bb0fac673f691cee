"""Evaluation harness (Frotscher et al. 2025 protocol) on the synthetic lesion suite or real cohorts.

Thresholds come from held-out *healthy* validation studies at stated false-positive rates
(study level and voxel level); lesions are only ever used to measure. Every configuration and
baseline is scored on the same studies in the same run:

- ``combined``, ``vae``, ``mse``, ``symmetry``: the model's scoring configurations,
- ``baseline-context``: the same U-Net with the mirror channel withheld (plain masked
  reconstruction residual, an ablation, not a separately trained network),
- ``baseline-flip``: raw left-right flip difference, no learning, no healthy statistics,
- ``baseline-vae-raw``: the Beta-VAE trained on raw slices, without the reconstruction stage
  (``brainmirror.baselines``; scored when its bundle exists).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score
from tqdm import tqdm

from .anatomies import ANATOMIES, TRAINING_ANATOMIES
from .baselines import RawVAEBaseline
from .detector import Detector
from .difference_maps import DifferenceMaps
from .lesions import SUBTLE_CONTRAST_RATIO
from .parallel import in_workers
from .preprocess import PreprocessingError, canonicalise
from .slicing import Slices, slice_volume
from .study_statistic import CONFIGURATIONS, study_score
from .training import cache_folder, threshold_at_fpr

log = logging.getLogger(__name__)
SIZE_BINS_MM = (0, 10, 20, 40, 1000)
LESION_SLICE_VOXELS = 5  # canonical slices with at least this many lesion voxels count as lesion slices
VOXEL_SAMPLE = 200_000  # healthy voxels kept per study for thresholds / AUPRC (seeded subsample)
STRATUM_NOTE = (f"\n*subtle*: the lesion's mean absolute change inside its mask is below {SUBTLE_CONTRAST_RATIO:g} x "
                "the image's GM/WM contrast (on FLAIR, a white-matter lesion less than about 18 % brighter than the "
                "tissue it replaces, where published hyperacute infarcts lie); *typical*: at or above "
                "(`brainmirror/lesions.py` states the assumptions).\n")
CASE_CACHE_VERSION = 2  # bump when what a cached case holds changes (2: lesion contrast ratio and stratum)


@dataclass
class Case:
    """One test study: its scores per method and its voxel-level figures."""

    name: str
    label: int  # 1 lesion, 0 healthy
    kind: str  # lesion kind or "healthy"
    meta: dict
    study: dict[str, float]
    slice_scores: dict[str, np.ndarray]
    slice_labels: np.ndarray
    voxel_scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    voxel_truth: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, bool))
    example: dict | None = field(repr=False, default=None)


# -- sources -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticCase:
    """Loader of one virtual-cohort case (SYNTHETIC), seeded by stream and index: (image, lesion
    mask or None, meta)."""

    stream: str
    index: int
    anatomy: str
    contrast: str
    kind: str | None  # lesion kind, None for a healthy study

    def __call__(self) -> tuple[nib.Nifti1Image, np.ndarray | None, dict]:
        from .cohort import make_subject, subject_rng

        subject = make_subject(self.anatomy, subject_rng(self.stream, self.index), contrast=self.contrast,
                               lesion_kind=self.kind)
        return subject.image, subject.lesion_mask, subject.meta


def synthetic_cases(stream: str, healthy: int, per_kind: int, kinds: tuple[str, ...],
                    anatomies: tuple[str, ...] = ANATOMIES) -> Iterator[tuple[str, callable]]:
    """(name, loader) pairs; loader returns (image, native truth mask or None, meta). SYNTHETIC.

    Thresholds come from the training anatomies only (``anatomies=TRAINING_ANATOMIES``); test
    sets use every anatomy, the held-out ones included, and are reported by anatomy.
    """
    from .cohort import CONTRASTS

    # every anatomy with every contrast, cycled over the healthy studies and, from the start
    # again, over the lesion studies (anatomy fastest, so that a short plan still has every
    # anatomy): if anatomy and contrast cycled separately, some anatomies would only ever be
    # paired with some contrasts; if the lesion studies went on where the healthy ones stopped,
    # a combination could have more lesion than healthy studies, and a lesion would be compared
    # with healthy studies of another mix
    combinations = [(anatomy, contrast) for contrast in CONTRASTS for anatomy in anatomies]
    plan = [None] * healthy + [k for k in kinds for _ in range(per_kind)]
    for index, kind in enumerate(plan):
        anatomy, contrast = combinations[(index if kind is None else index - healthy) % len(combinations)]
        yield (f"{kind or 'healthy'}-{stream}-{index:03d}-{anatomy}-{contrast}",
               SyntheticCase(stream, index, anatomy, contrast, kind))


def folder_cases(root: Path, healthy_root: Path | None) -> Iterator[tuple[str, callable]]:
    """Real cohorts: images with masks (BraTS-like ``*_seg``) under root; healthy studies under healthy_root."""
    from .data import find_mask, is_mask_name, is_nifti, iter_studies

    for path in sorted(p for p in root.rglob("*") if is_nifti(p) and not is_mask_name(p)):
        mask_path = find_mask(path)

        def load(path=path, mask_path=mask_path):
            mask = nib.load(str(mask_path)).get_fdata() > 0 if mask_path else None
            return nib.load(str(path)), mask, {"source": str(path), "contrast": "unknown"}

        yield f"lesion-{path.stem}" if mask_path else f"healthy-{path.stem}", load
    if healthy_root is not None:
        for name, image in iter_studies(healthy_root):
            yield f"healthy-{name}", (lambda image=image: (image, None, {"contrast": "unknown"}))


# -- scoring -------------------------------------------------------------------------------
def method_slice_scores(detector: Detector, slices: Slices, maps: DifferenceMaps,
                        raw_vae: RawVAEBaseline | None = None) -> dict[str, np.ndarray]:
    """Slice scores of every configuration and baseline, keyed by method name."""
    scores = detector.slice_scores(slices, maps, detector.embed(maps))
    count = np.maximum(slices.mask.sum(axis=(1, 2)), 1)
    scores["baseline-context"] = (maps.context_residual**2).sum(axis=(1, 2)) / count
    scores["baseline-flip"] = (maps.symmetry**2).sum(axis=(1, 2)) / count
    if raw_vae is not None:
        scores[raw_vae.name] = raw_vae.slice_scores(slices)
    return scores


def methods_of(cases: list[Case]) -> list[str]:
    return list(cases[0].study) if cases else list(CONFIGURATIONS)


def is_baseline(method: str) -> bool:
    return method not in CONFIGURATIONS


PreparedCase = tuple[Slices, np.ndarray, dict]  # canonical slices, lesion truth per slice, metadata


def prepared_cases(sources, cache: Path | None, workers: int | None = None) -> Iterator[tuple[str, PreparedCase | None]]:
    """(name, prepared case, or None where it cannot be assessed) for each source, in order.

    Cached per preprocessing, anatomy and case version (``cache`` None: not cached). Uncached
    cases are prepared in worker processes where their loaders allow it (``parallel.in_workers``),
    while the caller goes on with those already prepared.
    """
    sources = list(sources)
    folder = cache_folder(cache) / f"cases-v{CASE_CACHE_VERSION}" if cache else None
    paths = [folder / f"{name}.npz" if folder else None for name, _ in sources]
    missing = [path is None or not path.exists() for path in paths]
    made = in_workers(_prepare_case, [load for (_, load), m in zip(sources, missing) if m], workers)
    for (name, _), path, is_missing in zip(sources, paths, missing):
        if not is_missing:
            with np.load(path) as data:
                yield name, (Slices(data["image"], data["mask"], data["z"]), data["truth"], json.loads(str(data["meta"])))
            continue
        prepared = next(made)
        if isinstance(prepared, str):
            log.warning("%s not assessed: %s", name, prepared)
            yield name, None
            continue
        if path is not None:
            slices, truth, meta = prepared
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, image=slices.image, mask=slices.mask, z=slices.z, truth=truth,
                                meta=json.dumps(meta, default=float))
            tmp.replace(path)
        yield name, prepared


def _prepare_case(load) -> PreparedCase | str:
    """One case in canonical slices with its lesion truth per slice, or why it cannot be assessed."""
    image, truth, meta = load()
    try:
        canonical = canonicalise(image)
    except PreprocessingError as error:
        return str(error)
    slices = slice_volume(canonical)
    truth_canonical = np.zeros(canonical.image.shape, bool)
    if truth is not None:
        truth_canonical = canonical.to_canonical(truth.astype(np.float32)) > 0.5
    truth_slices = truth_canonical[:, :, slices.z].transpose(2, 0, 1) & slices.mask
    return slices, truth_slices, dict(meta, lesion=truth is not None and bool(np.any(truth)))


def score_slices(detector: Detector, name: str, slices: Slices, truth_slices: np.ndarray, meta: dict,
                 rng: np.random.Generator, keep_example: bool, raw_vae: RawVAEBaseline | None = None) -> Case:
    maps = detector.reconstruct(slices)
    scores = method_slice_scores(detector, slices, maps, raw_vae)
    voxel = maps.anomaly[slices.mask]
    voxel_truth = truth_slices[slices.mask]
    label = int(meta.get("lesion", False))
    if not label and len(voxel) > VOXEL_SAMPLE:  # healthy voxels: a seeded subsample suffices
        keep = rng.choice(len(voxel), VOXEL_SAMPLE, replace=False)
        voxel, voxel_truth = voxel[keep], voxel_truth[keep]
    example = None
    if keep_example and truth_slices.any():
        k = int(np.argmax(truth_slices.sum(axis=(1, 2))))
        example = {"image": slices.image[k], "reconstruction": maps.reconstruction[k], "difference": maps.residual[k],
                   "anomaly": maps.anomaly[k], "truth": truth_slices[k]}
    return Case(
        name=name, label=label, kind=name.split("-")[0], meta=meta,
        study={m: study_score(s) for m, s in scores.items()},
        slice_scores=scores, slice_labels=(truth_slices.sum(axis=(1, 2)) >= LESION_SLICE_VOXELS).astype(int),
        voxel_scores=voxel.astype(np.float32), voxel_truth=voxel_truth, example=example,
    )


def score_cases(detector: Detector, sources, desc: str, progress: bool, cache: Path | None = None,
                examples: int = 0, raw_vae: RawVAEBaseline | None = None, workers: int | None = None) -> list[Case]:
    cases, rng = [], np.random.default_rng(0)
    seen_kinds: set[str] = set()
    sources = list(sources)
    for name, prepared in tqdm(prepared_cases(sources, cache, workers), total=len(sources), desc=desc,
                               disable=not progress, unit="study"):
        if prepared is None:
            continue
        kind = name.split("-")[0]
        keep = kind not in seen_kinds and len(seen_kinds) < examples
        case = score_slices(detector, name, *prepared, rng, keep_example=keep, raw_vae=raw_vae)
        cases.append(case)
        if case.example is not None:
            seen_kinds.add(kind)
    return cases


# -- metrics -------------------------------------------------------------------------------
def thresholds_from_healthy(cases: list[Case], study_fpr: float, voxel_fpr: float) -> dict:
    """Per-method study thresholds and the voxel threshold at the stated healthy FPRs."""
    study = {m: threshold_at_fpr([c.study[m] for c in cases], study_fpr) for m in methods_of(cases)}
    voxel = threshold_at_fpr(np.concatenate([c.voxel_scores for c in cases]), voxel_fpr)
    return {"study": study, "voxel": voxel, "study_fpr": study_fpr, "voxel_fpr": voxel_fpr, "n_healthy": len(cases)}


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    labels, scores = np.asarray(labels), np.asarray(scores)
    predicted = scores > threshold
    positives, negatives = labels == 1, labels == 0
    out = {
        "n": int(len(labels)), "n_positive": int(positives.sum()),
        "accuracy": float((predicted == positives).mean()) if len(labels) else float("nan"),
        "sensitivity": float(predicted[positives].mean()) if positives.any() else float("nan"),
        "specificity": float((~predicted[negatives]).mean()) if negatives.any() else float("nan"),
        "fpr": float(predicted[negatives].mean()) if negatives.any() else float("nan"),
    }
    both = positives.any() and negatives.any()
    out["auroc"] = float(roc_auc_score(labels, scores)) if both else float("nan")
    out["auprc"] = float(average_precision_score(labels, scores)) if both else float("nan")
    return out


def bootstrap_ci(labels: np.ndarray, scores: np.ndarray, threshold: float, n: int = 1000, seed: int = 0) -> dict:
    """95 % percentile bootstrap intervals of AUROC and sensitivity (resampling studies)."""
    rng = np.random.default_rng(seed)
    labels, scores = np.asarray(labels), np.asarray(scores)
    auroc, sens = [], []
    for _ in range(n):
        i = rng.integers(len(labels), size=len(labels))
        if 0 < labels[i].sum() < len(i):
            auroc.append(roc_auc_score(labels[i], scores[i]))
            sens.append((scores[i][labels[i] == 1] > threshold).mean())
    interval = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else [float("nan")] * 2  # noqa: E731
    return {"auroc": interval(auroc), "sensitivity": interval(sens)}


def paired_auroc_difference(labels: np.ndarray, first: np.ndarray, second: np.ndarray, n: int = 1000, seed: int = 0) -> dict:
    """AUROC of ``second`` minus that of ``first`` (two scores of the same studies), with its 95 %
    percentile interval from the same bootstrap resamples of studies for both (a paired bootstrap);
    nan without both classes."""
    rng = np.random.default_rng(seed)
    labels, first, second = np.asarray(labels), np.asarray(first), np.asarray(second)
    if not 0 < labels.sum() < len(labels):
        return {"difference": float("nan"), "interval": [float("nan")] * 2}
    differences = []
    for _ in range(n):
        i = rng.integers(len(labels), size=len(labels))
        if 0 < labels[i].sum() < len(i):
            differences.append(roc_auc_score(labels[i], second[i]) - roc_auc_score(labels[i], first[i]))
    return {"difference": float(roc_auc_score(labels, second) - roc_auc_score(labels, first)),
            "interval": [float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5))] if differences
            else [float("nan")] * 2}


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return float(2 * (prediction & truth).sum() / total) if total else 1.0


def size_bin(diameter: float | None) -> str:
    if diameter is None:
        return "n/a"
    for low, high in zip(SIZE_BINS_MM[:-1], SIZE_BINS_MM[1:]):
        if low <= diameter < high:
            return f"{low}-{high} mm" if high < 1000 else f">={low} mm"
    return "n/a"


def within_study_slice_auroc(lesions: list[Case], method: str) -> dict:
    """Lesion slices against the other slices of the same study, AUROC averaged over lesion studies.

    Unlike the pooled slice AUROC, every study is compared only with itself, so it measures
    whether a map points at the right slices whatever the study's overall score level (which
    the study-level figures depend on). Studies without both kinds of slices are left out.
    """
    values = []
    for c in lesions:
        labels, scores = c.slice_labels, c.slice_scores[method]
        ok = np.isfinite(scores)
        if 0 < labels[ok].sum() < ok.sum():
            values.append(roc_auc_score(labels[ok], scores[ok]))
    return {"auroc_within_study": float(np.mean(values)) if values else float("nan"), "n_within_study": len(values)}


def is_focal(case: Case, min_mm: float = 10.0) -> bool:
    """A focal lesion of at least ``min_mm`` (every kind but diffuse atrophy)."""
    return case.kind != "atrophy" and (case.meta.get("lesion_diameter_mm") or 0) >= min_mm


def proportion_ci(count: int, n: int) -> list[float]:
    """Exact (Clopper-Pearson) 95 % interval of the proportion ``count / n``."""
    from scipy.stats import binomtest

    if n == 0:
        return [float("nan")] * 2
    interval = binomtest(count, n).proportion_ci(0.95, method="exact")
    return [float(interval.low), float(interval.high)]


def group_figures(healthy: list[Case], lesions: list[Case], thresholds: dict, methods: list[str]) -> dict:
    """Per method: healthy score median and 95th percentile, FPR at the calibrated threshold with its
    exact interval, and study-level AUROC (all lesions and focal >= 10 mm) against these healthy studies."""
    out = {}
    for m in methods:
        threshold = thresholds["study"][m]
        h = np.array([c.study[m] for c in healthy], float)
        scores = np.r_[h, [c.study[m] for c in lesions]]
        labels = np.r_[np.zeros(len(healthy)), np.ones(len(lesions))].astype(int)
        focal = [c for c in lesions if is_focal(c)]
        false_positives = int((h > threshold).sum())
        out[m] = {
            "n_healthy": len(healthy), "n_lesion": len(lesions), "n_focal_10mm": len(focal),
            "healthy_score_median": float(np.median(h)) if len(h) else float("nan"),
            "healthy_score_p95": float(np.percentile(h, 95)) if len(h) else float("nan"),
            "fpr": false_positives / len(h) if len(h) else float("nan"),
            "fpr_ci95": proportion_ci(false_positives, len(h)),
            **{k: v for k, v in binary_metrics(labels, scores, threshold).items() if k in ("auroc", "sensitivity")},
            "auroc_ci95": bootstrap_ci(labels, scores, threshold)["auroc"] if healthy and lesions else [float("nan")] * 2,
            "focal_10mm_auroc": binary_metrics(np.r_[np.zeros(len(healthy)), np.ones(len(focal))].astype(int),
                                               np.r_[h, [c.study[m] for c in focal]], threshold)["auroc"],
        }
    return out


def anatomy_metrics(healthy: list[Case], lesions: list[Case], thresholds: dict, methods: list[str],
                    seen: tuple[str, ...] = TRAINING_ANATOMIES) -> dict:
    """Study-level figures on the anatomies the model has ``seen`` and on the others apart, and per anatomy."""
    def split(anatomy: str | None) -> str:
        return "seen" if anatomy in seen else "unseen"

    def of(cases: list[Case], keep) -> list[Case]:
        return [c for c in cases if keep(c.meta.get("anatomy"))]

    return {
        "seen_anatomies": list(seen), "unseen_anatomies": [a for a in ANATOMIES if a not in seen],
        "split": {name: group_figures(of(healthy, lambda a: split(a) == name), of(lesions, lambda a: split(a) == name),
                                      thresholds, methods)
                  for name in ("seen", "unseen")},
        "per_anatomy": {name: group_figures(of(healthy, lambda a: a == name), of(lesions, lambda a: a == name),
                                            thresholds, methods)
                        for name in ANATOMIES if any(c.meta.get("anatomy") == name for c in healthy + lesions)},
    }


def contrast_metrics(healthy: list[Case], lesions: list[Case], thresholds: dict, methods: list[str]) -> dict:
    """Per contrast family: its healthy studies' score levels and FPR at the one calibrated threshold,
    and its lesions against its own healthy studies (one threshold serves every family only where
    their healthy studies score alike)."""
    names = sorted({c.meta.get("contrast") for c in healthy + lesions} - {None, "unknown"})
    return {name: group_figures([c for c in healthy if c.meta.get("contrast") == name],
                                [c for c in lesions if c.meta.get("contrast") == name], thresholds, methods)
            for name in names}


def compute_metrics(healthy: list[Case], lesions: list[Case], thresholds: dict,
                    seen_anatomies: tuple[str, ...] = TRAINING_ANATOMIES) -> dict:
    cases = healthy + lesions
    labels = np.array([c.label for c in cases])
    metrics: dict = {"study": {}, "slice": {}, "voxel": {}, "breakdown": {}, "thresholds": thresholds}
    focal = [c for c in lesions if is_focal(c)]
    methods = methods_of(cases)
    for m in methods:
        scores = np.array([c.study[m] for c in cases])
        metrics["study"][m] = binary_metrics(labels, scores, thresholds["study"][m])
        metrics["study"][m]["ci95"] = bootstrap_ci(labels, scores, thresholds["study"][m])
        f_labels = np.array([0] * len(healthy) + [1] * len(focal))
        f_scores = np.array([c.study[m] for c in healthy + focal])
        metrics["study"][m]["focal_10mm"] = binary_metrics(f_labels, f_scores, thresholds["study"][m]) | {
            "ci95": bootstrap_ci(f_labels, f_scores, thresholds["study"][m])}
        s_labels = np.concatenate([c.slice_labels for c in cases])
        s_scores = np.concatenate([c.slice_scores[m] for c in cases])
        ok = np.isfinite(s_scores)
        metrics["slice"][m] = {"auroc": float(roc_auc_score(s_labels[ok], s_scores[ok])) if 0 < s_labels.sum() < len(s_labels) else float("nan"),
                               "auprc": float(average_precision_score(s_labels[ok], s_scores[ok])) if s_labels.any() else float("nan")}
        metrics["slice"][m] |= within_study_slice_auroc(lesions, m)
    # voxel level: AUPRC over the whole set, Dice per lesion subject at the healthy-FPR threshold
    if lesions:
        v_scores = np.concatenate([c.voxel_scores for c in cases])
        v_truth = np.concatenate([c.voxel_truth for c in cases])
        per_subject = [dice(c.voxel_scores > thresholds["voxel"], c.voxel_truth) for c in lesions]
        candidates = np.quantile(v_scores, np.linspace(0.9, 0.9995, 60))
        oracle = max(candidates, key=lambda t: np.mean([dice(c.voxel_scores > t, c.voxel_truth) for c in lesions]))
        metrics["voxel"] = {
            "auprc": float(average_precision_score(v_truth, v_scores)) if v_truth.any() else float("nan"),
            "dice_mean": float(np.mean(per_subject)), "dice_std": float(np.std(per_subject)),
            "oracle_threshold": float(oracle),
            "oracle_dice_mean": float(np.mean([dice(c.voxel_scores > oracle, c.voxel_truth) for c in lesions])),
            "healthy_voxel_fpr_observed": float(np.mean(np.concatenate([c.voxel_scores for c in healthy]) > thresholds["voxel"])) if healthy else float("nan"),
        }
        for c, d in zip(lesions, per_subject):
            c.meta["dice"] = d
    # breakdowns (study-level sensitivity at the calibrated threshold, voxel Dice)
    groups: dict[str, dict[str, list[Case]]] = {"kind": {}, "size": {}, "contrast": {}, "stratum": {}, "voxel_size": {},
                                                "noise": {}}
    for c in lesions:
        if "lesion_stratum" in c.meta:  # synthetic lesions: subtle or typical (``lesions.stratum_of``)
            groups["stratum"].setdefault(c.meta["lesion_stratum"], []).append(c)
        groups["kind"].setdefault(c.kind, []).append(c)
        groups["size"].setdefault(size_bin(c.meta.get("lesion_diameter_mm")), []).append(c)
        groups["contrast"].setdefault(c.meta.get("contrast", "unknown"), []).append(c)
        groups["voxel_size"].setdefault("x".join(f"{v:g}" for v in c.meta.get("voxel_mm", [])) or "unknown", []).append(c)
        groups["noise"].setdefault("high noise" if c.meta.get("noise", 0) > 0.02 else "low noise", []).append(c)
    if any(c.meta.get("anatomy") in ANATOMIES for c in cases):
        metrics["anatomy"] = anatomy_metrics(healthy, lesions, thresholds, methods, seen_anatomies)
    if contrasts := contrast_metrics(healthy, lesions, thresholds, methods):
        metrics["contrast"] = contrasts
    for axis, members in groups.items():
        metrics["breakdown"][axis] = {
            key: {"n": len(group),
                  "sensitivity": {m: float(np.mean([c.study[m] > thresholds["study"][m] for c in group])) for m in methods},
                  "dice_mean": float(np.mean([c.meta.get("dice", np.nan) for c in group])),
                  "auroc_vs_healthy": {m: float(roc_auc_score([0] * len(healthy) + [1] * len(group),
                                                               [h.study[m] for h in healthy] + [c.study[m] for c in group]))
                                       if healthy else float("nan") for m in methods}}
            for key, group in sorted(members.items())
        }
    if not metrics["breakdown"]["stratum"]:  # lesions without a recorded stratum (site data)
        del metrics["breakdown"]["stratum"]
    return metrics


# -- report --------------------------------------------------------------------------------
def write_report(out: Path, metrics: dict, healthy: list[Case], lesions: list[Case], description: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    out.mkdir(parents=True, exist_ok=True)
    cases = healthy + lesions
    labels = np.array([c.label for c in cases])
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for m in methods_of(cases):
        scores = np.array([c.study[m] for c in cases])
        fpr, tpr, _ = roc_curve(labels, scores)
        precision, recall, _ = precision_recall_curve(labels, scores)
        style = "-" if m in CONFIGURATIONS else "--"
        axes[0].plot(fpr, tpr, style, label=f"{m} (AUROC {metrics['study'][m]['auroc']:.3f})")
        axes[1].plot(recall, precision, style, label=f"{m} (AUPRC {metrics['study'][m]['auprc']:.3f})")
    axes[0].axvline(metrics["thresholds"]["study_fpr"], color="grey", lw=0.8, ls=":")
    axes[0].set(xlabel="false-positive rate", ylabel="sensitivity", title="Study level ROC")
    axes[1].set(xlabel="recall", ylabel="precision", title="Study level PR")
    for ax in axes:
        ax.legend(fontsize=8, loc="lower right" if ax is axes[0] else "lower left")
        ax.grid(alpha=0.3)
    fig.suptitle(description, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "roc_pr.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in sorted({c.kind for c in lesions}):
        members = [c for c in lesions if c.kind == kind]
        ax.scatter([c.meta.get("lesion_diameter_mm", np.nan) for c in members], [c.meta.get("dice", np.nan) for c in members], label=kind, s=25)
    ax.axhline(0.645, color="grey", ls=":", lw=1, label="DISYRE BraTS T2 (0.645, real data)")
    ax.set(xlabel="largest lesion diameter (mm)", ylabel="voxel Dice at 1% healthy voxel FPR", title="Dice by lesion size", ylim=(0, 1))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "dice_by_size.png", dpi=110)
    plt.close(fig)

    threshold = metrics["thresholds"]["study"]["combined"]
    if "anatomy" in metrics:
        seen = metrics["anatomy"]["seen_anatomies"]
        names = [a for a in ANATOMIES if any(c.meta.get("anatomy") == a for c in cases)]
        scores_plot(out / "anatomy_scores.png", healthy, lesions, threshold, "anatomy",
                    {n: f"{n}\n{'seen' if n in seen else 'UNSEEN'}" for n in names}, "Study scores by anatomy")
    if "contrast" in metrics:
        scores_plot(out / "contrast_scores.png", healthy, lesions, threshold, "contrast",
                    {n: n.upper() for n in metrics["contrast"]}, "Study scores by contrast family")

    examples = [c for c in lesions if c.example is not None]
    if examples:
        columns = ("image", "reconstruction", "difference", "anomaly", "truth")
        fig, axes = plt.subplots(len(examples), len(columns), figsize=(2.2 * len(columns), 2.4 * len(examples)), squeeze=False)
        for row, case in zip(axes, examples):
            for ax, key in zip(row, columns):
                image = case.example[key]
                ax.imshow(image.T, origin="lower", cmap="magma" if key == "anomaly" else "gray",
                          vmin=0, vmax=None if key != "anomaly" else max(5.0, metrics["thresholds"]["voxel"] * 2))
                ax.set_xticks([])
                ax.set_yticks([])
                if row is axes[0]:
                    ax.set_title(key, fontsize=9)
            row[0].set_ylabel(f"{case.kind}\n{case.meta.get('contrast', '')}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "gallery.png", dpi=90)
        plt.close(fig)

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    (out / "cases.json").write_text(json.dumps([{"name": c.name, "label": c.label, "kind": c.kind, "study": c.study,
                                                  "meta": c.meta} for c in cases], indent=2, default=float) + "\n")
    (out / "summary.md").write_text(summary_markdown(metrics, description))


def scores_plot(path: Path, healthy: list[Case], lesions: list[Case], threshold: float, key: str,
                names: dict[str, str], title: str) -> None:
    """`combined` study scores per group (``names``: the values of ``meta[key]`` and their tick labels),
    healthy and lesion studies side by side, with the threshold."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4.5))
    rng = np.random.default_rng(0)
    for x, name in enumerate(names):
        for offset, cases, colour, label in ((-0.17, healthy, "tab:blue", "healthy"), (0.17, lesions, "tab:red", "lesion")):
            y = [c.study["combined"] for c in cases if c.meta.get(key) == name]
            ax.scatter(x + offset + rng.uniform(-0.08, 0.08, len(y)), y, s=14, color=colour, alpha=0.75,
                       label=label if x == 0 else None)
    ax.axhline(threshold, color="grey", ls="--", lw=1, label="calibrated 5 % FPR threshold")
    ax.set_xticks(range(len(names)), list(names.values()))
    ax.set(ylabel="study score (combined)", title=f"{title} (SYNTHETIC studies)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_markdown(metrics: dict, description: str) -> str:
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"  # noqa: E731
    lines = [f"# brainmirror evaluation\n\n{description}\n",
             f"Thresholds from {metrics['thresholds']['n_healthy']} held-out healthy studies at "
             f"{metrics['thresholds']['study_fpr']:.0%} study FPR and {metrics['thresholds']['voxel_fpr']:.0%} voxel FPR; "
             "nothing tuned on lesions.\n",
             "## Study level (all lesion kinds vs healthy)\n",
             "| method | AUROC [95% CI] | AUPRC | accuracy | sensitivity [95% CI] | specificity | FPR | focal >=10 mm AUROC | focal >=10 mm sensitivity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in metrics["study"].items():
        f = r["focal_10mm"]
        lines.append(f"| {m} | {fmt(r['auroc'])} [{fmt(r['ci95']['auroc'][0])}, {fmt(r['ci95']['auroc'][1])}] | {fmt(r['auprc'])} | "
                     f"{fmt(r['accuracy'])} | {fmt(r['sensitivity'])} [{fmt(r['ci95']['sensitivity'][0])}, {fmt(r['ci95']['sensitivity'][1])}] | "
                     f"{fmt(r['specificity'])} | {fmt(r['fpr'])} | {fmt(f['auroc'])} | {fmt(f['sensitivity'])} |")
    if "anatomy" in metrics:
        lines += anatomy_markdown(metrics["anatomy"], fmt)
    if "contrast" in metrics:
        lines += contrast_markdown(metrics["contrast"], fmt)
    lines += ["\n## Slice level\n",
              ("Pooled over all test slices; *within study*: lesion slices against the other slices of the same "
               "lesion study, averaged over studies (does the map point at the right slices, whatever the study's score level).\n"),
              "| method | AUROC | AUPRC | AUROC within study |", "|---|---|---|---|"]
    lines += [f"| {m} | {fmt(r['auroc'])} | {fmt(r['auprc'])} | {fmt(r.get('auroc_within_study'))} |" for m, r in metrics["slice"].items()]
    if metrics["voxel"]:
        v = metrics["voxel"]
        lines += ["\n## Voxel level (combined anomaly map)\n",
                  f"AUPRC {fmt(v['auprc'])}; Dice at the healthy 1% voxel-FPR threshold {fmt(v['dice_mean'])} "
                  f"(sd {fmt(v['dice_std'])}); oracle-threshold Dice (secondary, optimistic) {fmt(v['oracle_dice_mean'])}; "
                  f"observed healthy voxel FPR {fmt(v['healthy_voxel_fpr_observed'])}.\n"]
    for axis, groups in metrics["breakdown"].items():
        note = STRATUM_NOTE if axis == "stratum" else ""
        lines += [f"\n## By {axis.replace('_', ' ')}\n{note}", "| group | n | sensitivity (combined) | AUROC vs healthy (combined) | best baseline AUROC | Dice |", "|---|---|---|---|---|---|"]
        for key, g in groups.items():
            best = max(v for m, v in g["auroc_vs_healthy"].items() if is_baseline(m))
            lines.append(f"| {key} | {g['n']} | {fmt(g['sensitivity']['combined'])} | {fmt(g['auroc_vs_healthy']['combined'])} | {fmt(best)} | {fmt(g['dice_mean'])} |")
    lines.append("\nPlots: `roc_pr.png`, `dice_by_size.png`, `gallery.png`" + (", `anatomy_scores.png`" if "anatomy" in metrics else "")
                 + (", `contrast_scores.png`" if "contrast" in metrics else "")
                 + ". Raw figures: `metrics.json`, `cases.json`.\n")
    return "\n".join(lines)


def anatomy_markdown(figures: dict, fmt) -> list[str]:
    """The by-anatomy section of the summary: `combined` and the best baseline, seen / unseen / each anatomy."""
    recorded = "" if figures.get("recorded_by_the_bundle", True) else (
        " (The bundle does not record its anatomies: the configured training anatomies are taken as seen.)")
    lines = ["\n## By anatomy: seen (training) and unseen (held out)\n",
             f"Seen: the anatomies the model bundle records as trained or calibrated on "
             f"({', '.join(figures['seen_anatomies'])}). Unseen: never used for its training, healthy statistics "
             f"or calibration ({', '.join(figures['unseen_anatomies']) or 'none'}).{recorded} FPR: healthy studies "
             "above the calibrated study threshold, with its exact 95 % interval.\n",
             *group_table("anatomies")]
    rows = [(f"**{split}**", g) for split, g in figures["split"].items()]
    rows += [(f"{name} ({'seen' if name in figures['seen_anatomies'] else 'unseen'})", g)
             for name, g in figures["per_anatomy"].items()]
    return lines + [group_row(label, group, fmt) for label, group in rows]


def contrast_markdown(figures: dict, fmt) -> list[str]:
    """The by-contrast-family section of the summary: healthy levels and FPR, lesions against their own family."""
    return ["\n## By contrast family: healthy levels at the one threshold\n",
            "Each family's healthy studies against the one calibrated study threshold (FPR with its exact 95 % "
            "interval), and its lesion studies against its own healthy studies only (the breakdown by contrast "
            "below compares them with every healthy study).\n",
            *group_table("contrast"), *(group_row(name.upper(), group, fmt) for name, group in figures.items())]


def group_table(label: str) -> list[str]:
    """The header of a table of ``group_row`` rows."""
    return [f"| {label} | healthy | lesion | healthy score median / p95 | FPR [95% CI] | AUROC [95% CI] | focal >=10 mm AUROC | best baseline AUROC |",
            "|---|---|---|---|---|---|---|---|"]


def group_row(label: str, group: dict, fmt) -> str:
    """A summary row of ``group_figures``: `combined`, and the best baseline's AUROC."""
    c = group["combined"]
    baselines = [v["auroc"] for m, v in group.items() if is_baseline(m) and np.isfinite(v["auroc"])]
    return (f"| {label} | {c['n_healthy']} | {c['n_lesion']} | {fmt(c['healthy_score_median'])} / {fmt(c['healthy_score_p95'])} | "
            f"{fmt(c['fpr'])} [{fmt(c['fpr_ci95'][0])}, {fmt(c['fpr_ci95'][1])}] | "
            f"{fmt(c['auroc'])} [{fmt(c['auroc_ci95'][0])}, {fmt(c['auroc_ci95'][1])}] | {fmt(c['focal_10mm_auroc'])} | "
            f"{fmt(max(baselines)) if baselines else 'n/a'} |")


def evaluate(detector: Detector, calibration_sources, test_sources, out: Path, description: str,
             study_fpr: float = 0.05, voxel_fpr: float = 0.01, progress: bool = True, cache: Path | None = None,
             raw_vae: RawVAEBaseline | None = None) -> dict:
    """Calibrate on healthy validation studies, score the test studies, write the report.

    ``cache``: folder for preprocessed cases, so a rerun (e.g. of another model) skips preprocessing.
    ``raw_vae``: the raw-slice VAE baseline, scored beside the model when given.
    Anatomies count as seen when the bundle records them as trained or calibrated on; a bundle
    that records none is taken to have seen the configured ``TRAINING_ANATOMIES`` (and the
    report says so).
    """
    validation = score_cases(detector, calibration_sources, "validation (healthy)", progress, cache, raw_vae=raw_vae)
    if len(validation) < 2:
        raise ValueError("need at least 2 healthy validation studies for thresholds")
    thresholds = thresholds_from_healthy(validation, study_fpr, voxel_fpr)
    tested = score_cases(detector, test_sources, "test", progress, cache, examples=8, raw_vae=raw_vae)
    healthy = [c for c in tested if c.label == 0]
    lesions = [c for c in tested if c.label == 1]
    metrics = compute_metrics(healthy, lesions, thresholds, detector.anatomies() or TRAINING_ANATOMIES)
    if "anatomy" in metrics:
        metrics["anatomy"]["recorded_by_the_bundle"] = bool(detector.anatomies())
    metrics["description"] = description
    write_report(out, metrics, healthy, lesions, description)
    return metrics
