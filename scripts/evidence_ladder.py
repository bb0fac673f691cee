"""Evidence ladder: how far does a lesion move each map and study statistic, against healthy spread?

SYNTHETIC, ``development`` stream only (never the reported evaluation lesions). Each focal
lesion study is paired with its healthy twin (same anatomy, warp, contrast, bias, pose, grid and
noise, without the lesion; ``make_subject(..., twin=True)``), the twin taken onto the lesion
study's canonical grid, and every map computed on both:

- ``flip``: ``|x - mirror(x)|``, no learning;
- ``residual``: ``|x - reconstruction|`` of the model's mirror-informed reconstruction;
- ``context``: the same without the mirror channel;
- ``restored``: ``|x - restored slice|`` of the model's restorer (slice and reconstruction in);
- ``voxel``: the model's standardised difference (the geometric mean of the three residuals,
  standardised voxel by voxel);
- ``disorder``: the restorer's probability that a voxel held a disorder it removed;
- ``anomaly``: the model's voxel anomaly map (``voxel`` where ``disorder`` agrees, smoothed);
- ``tissue``: the residual as a robust z against the same study's residuals of the same tissue
  class, the class (3, a tied Gaussian mixture) read from the reconstruction, which rebuilds a
  lesion as healthy tissue; no population statistics (a candidate, not in the model).

The oracle (the twin as a perfect healthy reconstruction) is the ceiling: the lesion contrast
``|x - twin|`` inside the lesion. Printed per (map, statistic), over focal lesions >= 10 mm:

- ``paired``: share of pairs whose lesion study exceeds its twin (ties, where the lesion does not
  move the statistic at all, count as no response; 1.0: every lesion raises it);
- ``effect``: median paired difference / sd of the statistic across the healthy twins;
- ``cell AUROC``: lesion studies against the healthy twins of the same anatomy and contrast,
  averaged over cells with at least two pairs (their number in brackets: few cells, weak figure;
  restrict ``--anatomies`` for more pairs per cell);
- ``pooled``: AUROC of the focal lesion studies against every healthy twin, all anatomies and
  contrasts together (what a study-level verdict faces), with its bootstrap 95 % interval (studies
  resampled, as ``brainmirror evaluate`` does): at 28 pairs (22 focal) it is about +-0.15 wide, at
  70 (59 focal) +-0.10, and three sets of pairs gave the same model 0.61, 0.72 and 0.60;
- ``recovered`` (maps in intensity units): median share of the lesion contrast that the map
  gains inside the lesion over the twin (the oracle recovers 1.0);
- ``offset``: how much the anatomy decides a healthy study's value: the spread of the per-anatomy
  medians of the healthy twins over their pooled within-anatomy sd (0: none; about 1: an anatomy
  shifts a healthy study as much as healthy variation does);
- ``visible`` (per map, by lesion volume): share of focal pairs whose lesion reaches above its
  twin's hot spots, the map's maximum inside the lesion above the twin's 99.9th brain percentile
  (the top 0.1 %, about 200 voxels); a lesion no map shows cannot move any top-k statistic, so this
  is the ceiling of the study statistics that a map allows;
- ``ceiling at 5 % FPR`` (per map, by lesion volume): share of focal pairs whose peak inside the
  lesion exceeds the 95th percentile of the healthy twins' brain maxima, every anatomy and
  contrast together: the sensitivity at a 5 % study FPR of a verdict on the map's maximum even if
  it knew where the lesion was. ``visible`` compares a lesion with its own twin; this compares it
  with every healthy study a threshold has to pass, so a map whose healthy maxima vary from study
  to study caps every study statistic here, whichever is chosen;
- ``where the twins' hot spots lie`` (per map): the shares of the twins' top 0.1 % brain voxels at
  the intensity floor (as dark as the brain's darkest 1 %), above its 99th percentile, and within
  6 mm of the brain mask's edge, over every twin and over the fifth with the highest maxima (those
  that set a study threshold, and so the ceiling above);
- ``own disorders`` (per model): the restorer's own kind of disorder (``disorders.shape`` of 8, 16
  and 32 mm, intensity shift +-0.3) added to four slices of every healthy twin: the median share
  of it that the restored and the mirror-informed residual recover inside it (1: removed, 0:
  kept), and how often the disorder probability's peak inside it rises above the twin's 99.9th
  brain percentile, for the anatomies the model has seen and the others apart. A restorer that
  keeps these has not learned what it was trained for, whatever the lesions do;
- ``unseen FPR``: share of the twins of anatomies the model has not seen (not in the bundle's
  record) above the 95th percentile of the twins of seen anatomies (about 0.05 when an unseen
  anatomy scores like a seen one). A rough figure: a few seen twins set that threshold, and it
  moves with them (the shipped `combined`: 5.2, 9.4 and 7.6 on three sets of pairs);
- ``at the calibrated threshold`` (per configuration the bundle is calibrated for): the healthy
  twins of seen and of unseen anatomies above the bundle's own study threshold (set on its
  calibration studies), each with its exact 95 % interval, and the share of focal lesion
  studies above it: what a site would see, and the figure to judge a threshold's transfer to
  new people by.

Statistics: ``top50``/``top500`` (mean of the highest brain voxels), ``mass`` (largest 3D
connected region above the map's healthy 99th percentile, ml), and the model's own study scores
(``study:<configuration>``: top-3 slice mean). Per lesion kind and contrast: the paired response.

Voxel level, per map, over the focal lesion studies: ``AUPRC`` (all their brain voxels pooled) and
``Dice`` (mean per study) at the map's healthy 99th percentile over every twin's brain (a 1 %
voxel false-positive rate on healthy twins, as the evaluation protocol sets its voxel threshold).

Several ``--model`` bundles are laddered on the same pairs, one after the other (the pairs are
made once), and each later one's pooled AUROC is compared with the first's, statistic by
statistic, with a paired bootstrap 95 % interval of the difference; and per map its mean
per-study voxel AUPRC and Dice (each model at its own healthy 99th percentile), with the same kind
of interval over the focal lesion studies:

    .venv/bin/python scripts/evidence_ladder.py --pairs 3 --output work/ladder.json
    .venv/bin/python scripts/evidence_ladder.py --model models/brainmirror work/candidate

``--pairs-cache`` keeps the pairs for a later run (a candidate trained after the first ladder):

    .venv/bin/python scripts/evidence_ladder.py --pairs 6 --pairs-cache work/pairs.pkl
    .venv/bin/python scripts/evidence_ladder.py --pairs 6 --pairs-cache work/pairs.pkl --model models/brainmirror work/candidate

``--first-index`` makes an independent set of pairs (other development-stream subjects), on which
to confirm what one set suggested before the evaluation suite is run:

    .venv/bin/python scripts/evidence_ladder.py --pairs 4 --first-index 2500 --pairs-cache work/pairs2500.pkl
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.mixture import GaussianMixture
from tqdm import tqdm

from brainmirror import cohort, disorders, lesions, preprocess, slicing
from brainmirror.anatomies import ANATOMIES, TRAINING_ANATOMIES, version_tag
from brainmirror.cohort import CONTRASTS, make_subject, subject_rng
from brainmirror.detector import Detector
from brainmirror.evaluate import bootstrap_ci, dice, paired_auroc_difference, proportion_ci
from brainmirror.healthy_reference import rebuild
from brainmirror.slicing import Slices, slice_volume
from brainmirror.study_statistic import CONFIGURATIONS, study_score
from brainmirror.lesions import FOCAL_KINDS
from brainmirror.parallel import in_workers
from brainmirror.preprocess import SHAPE, SPACING_MM, canonicalise, intensities, resample

FIRST_INDEX = 2000  # development-stream indices of this script (other diagnostics use others)
MAPS = ("flip", "residual", "context", "restored", "voxel", "disorder", "anomaly", "tissue")
INTENSITY_MAPS = ("flip", "residual", "context", "restored")
FOCAL_MIN_MM = 10.0
SMALL_ML = 2.0  # lesion volume that splits the visibility and study figures (descriptive, not tuned)
VISIBLE_QUANTILE = 0.999
OWN_DIAMETERS_MM = (8.0, 16.0, 32.0)
OWN_SHIFT = 0.3
FLOOR_LEVEL = 0.05  # canonical intensity near the floor (``normalise`` maps the brain's 1st percentile to 0)
BRIGHT_LEVEL = 1.0  # canonical intensity of the brain's 99th percentile
EDGE_MM = 6.0


def canonical_pair(subject) -> tuple[Slices, Slices, np.ndarray]:
    """Slices of the lesion study and of its twin on the lesion study's grid, and the lesion truth."""
    lesion = canonicalise(subject.image)
    twin = np.asarray(subject.healthy_twin.get_fdata(dtype=np.float32))
    twin_volume = intensities(resample(twin - twin.min(), lesion.canonical_to_native_vox, SHAPE), lesion.mask)
    truth = lesion.to_canonical(subject.lesion_mask.astype(np.float32)) > 0.5
    slices = slice_volume(lesion)
    twin_slices = Slices(np.ascontiguousarray(twin_volume[:, :, slices.z].transpose(2, 0, 1)), slices.mask, slices.z)
    return slices, twin_slices, truth[:, :, slices.z].transpose(2, 0, 1) & slices.mask


def tissue_z(residual: np.ndarray, reconstruction: np.ndarray, brain: np.ndarray, classes: int = 3) -> np.ndarray:
    """Residual as a robust z within its study and tissue class (class read from the reconstruction)."""
    reference = ndimage.gaussian_filter(reconstruction, (0, 1, 1))[brain]
    label = GaussianMixture(classes, covariance_type="tied", random_state=0).fit(reference[::7, None]).predict(reference[:, None])
    values = ndimage.gaussian_filter(residual, (0, 1, 1))[brain]
    z = np.zeros_like(values)
    for c in range(classes):
        v = values[label == c]
        if len(v):
            median = np.median(v)
            z[label == c] = (v - median) / (1.4826 * np.median(np.abs(v - median)) + 1e-3)
    out = np.zeros(brain.shape, np.float32)
    out[brain] = z
    return out


def study_maps(detector: Detector, slices: Slices) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The maps, and the slice scores of every configuration."""
    maps = detector.reconstruct(slices)
    scores = detector.slice_scores(slices, maps, detector.embed(maps))
    volumes = {"flip": maps.symmetry, "residual": maps.residual, "context": maps.context_residual,
               "restored": maps.restoration_residual, "voxel": maps.voxel_score, "disorder": maps.disorder, "anomaly": maps.anomaly,
               "tissue": tissue_z(maps.residual, maps.reconstruction, slices.mask)}
    return volumes, scores


def own_disorders(detector: Detector, twin: Slices, twin_disorder: np.ndarray, rng: np.random.Generator) -> list[tuple]:
    """(diameter, share recovered by the restored residual, by the mirror-informed one, disorder
    probability visible) for a disorder of the restorer's own kind added to four of ``twin``'s slices
    per diameter; ``twin_disorder``: the twin's own disorder probability (its 99.9th percentile is
    the bar)."""
    bar = np.quantile(twin_disorder[twin.mask], VISIBLE_QUANTILE)
    candidates = np.flatnonzero(twin.mask.mean(axis=(1, 2)) > 0.25)  # slices with a quarter brain or more
    rows = []
    for diameter in OWN_DIAMETERS_MM if len(candidates) else ():
        chosen = rng.choice(candidates, min(4, len(candidates)), replace=False)
        weights = np.stack([disorders.shape(rng, twin.mask[i], diameter) for i in chosen])
        signs = rng.choice([-1.0, 1.0], size=len(chosen))[:, None, None]
        image = (np.clip(twin.image[chosen] + signs * OWN_SHIFT * weights, 0, 2) * twin.mask[chosen]).astype(np.float32)
        reference = rebuild(detector.reconstructor, detector.restorer, Slices(image, twin.mask[chosen], twin.z[chosen]))
        for j, inside in enumerate(weights > 0.5):
            if inside.sum() >= 3:
                recovered = [float(((image[j] - r[j]) * signs[j])[inside].mean() / OWN_SHIFT)
                             for r in (reference.restored, reference.mirrored)]
                rows.append((diameter, *recovered, bool(reference.disorder[j][inside].max() > bar)))
    return rows


def hot_spot_places(image: np.ndarray, brain: np.ndarray) -> dict[str, np.ndarray]:
    """Where a healthy hot spot may lie: at the intensity floor (as dark as the brain's darkest 1 %:
    a T1's or FLAIR's darkest CSF, a T2's darkest white matter, bone or air that the brain mask took
    in), above the brain's 99th percentile, within ``EDGE_MM`` of the mask's edge (in-plane and across
    slices)."""
    depth_mm = ndimage.distance_transform_edt(np.pad(brain, 1), sampling=SPACING_MM)[1:-1, 1:-1, 1:-1]
    return {"floor": brain & (image < FLOOR_LEVEL), "bright": brain & (image > BRIGHT_LEVEL), "edge": brain & (depth_mm < EDGE_MM)}


def hot_spot_census(volume: np.ndarray, places: dict[str, np.ndarray], brain: np.ndarray) -> dict[str, float]:
    """The shares of a map's top 0.1 % brain voxels at each of the study's ``hot_spot_places``."""
    top = brain & (volume >= np.quantile(volume[brain], VISIBLE_QUANTILE))
    return {where: float(np.mean(place[top])) for where, place in places.items()}


def map_statistics(volume: np.ndarray, brain: np.ndarray, threshold: float) -> dict[str, float]:
    values = np.sort(volume[brain])
    labels, n = ndimage.label((volume > threshold) & brain)
    largest = np.bincount(labels.ravel())[1:].max() if n else 0
    return {"top50": float(values[-50:].mean()), "top500": float(values[-500:].mean()),
            "mass": float(largest * SPACING_MM**3 / 1000.0)}


def cell_auroc(pairs: list[dict], key: str) -> tuple[float, int]:
    """AUROC of lesion studies against healthy twins within each anatomy x contrast cell, averaged
    over the cells with at least two pairs; and the number of such cells."""
    cells = defaultdict(list)
    for p in pairs:
        cells[(p["anatomy"], p["contrast"])].append(p)
    values = []
    for members in cells.values():
        if len(members) >= 2:
            lesion, twin = [m["lesion"][key] for m in members], [m["twin"][key] for m in members]
            values.append(roc_auc_score([1] * len(lesion) + [0] * len(twin), lesion + twin))
    return (float(np.mean(values)) if values else float("nan")), len(values)


def anatomy_offset(pairs: list[dict], key: str, seen: tuple[str, ...]) -> tuple[float, float]:
    """Between-anatomy spread of healthy medians over within-anatomy sd; unseen twins' FPR at the
    seen twins' 95th percentile."""
    by_anatomy = defaultdict(list)
    for p in pairs:
        by_anatomy[p["anatomy"]].append(p["twin"][key])
    within = np.sqrt(np.mean([np.var(v) for v in by_anatomy.values() if len(v) >= 2]))
    offset = float(np.std([np.median(v) for v in by_anatomy.values()]) / within) if within > 0 else float("nan")
    seen_values = [v for a, values in by_anatomy.items() if a in seen for v in values]
    unseen_values = [v for a, values in by_anatomy.items() if a not in seen for v in values]
    if not seen_values or not unseen_values:
        return offset, float("nan")
    threshold = np.quantile(seen_values, 0.95, method="higher")
    return offset, float(np.mean(np.array(unseen_values) > threshold))


def calibrated_rates(pairs: list[dict], thresholds: dict[str, float], seen: tuple[str, ...]) -> dict[str, dict]:
    """Per configuration and its calibrated study threshold: the healthy twins of seen and unseen
    anatomies above it (count, number, exact 95 % interval), and the share of focal lesion
    studies above it."""
    rates = {}
    for configuration, threshold in thresholds.items():
        key = f"study:{configuration}"
        row = {"threshold": float(threshold)}
        for group, members in (("seen", [p for p in pairs if p["anatomy"] in seen]),
                               ("unseen", [p for p in pairs if p["anatomy"] not in seen])):
            above = int(sum(p["twin"][key] > threshold for p in members))
            row[group] = {"above": above, "n": len(members), "interval": proportion_ci(above, len(members))}
        focal = [p for p in pairs if p["diameter_mm"] >= FOCAL_MIN_MM]
        row["focal_sensitivity"] = float(np.mean([p["lesion"][key] > threshold for p in focal])) if focal else float("nan")
        rates[configuration] = row
    return rates


def make_pair(job: tuple[int, str, str, str]) -> dict:
    """The lesion study of development index ``job[0]`` (kind, anatomy, contrast) and its twin on
    canonical slices."""
    index, kind, anatomy, contrast = job
    subject = make_subject(anatomy, subject_rng("development", index), contrast, kind, twin=True)
    slices, twin_slices, truth = canonical_pair(subject)
    return {"kind": kind, "anatomy": anatomy, "contrast": contrast, "slices": (slices, twin_slices),
            "truth": truth, "diameter_mm": subject.meta["lesion_diameter_mm"],
            "volume_ml": subject.meta["lesion_volume_ml"], "voxel_mm": subject.meta["voxel_mm"],
            "noise": subject.meta["noise"]}


def make_pairs(count: int, anatomies: list[str], first_index: int = FIRST_INDEX) -> list[dict]:
    """The development-stream lesion studies and their twins on canonical slices (model-independent),
    from development index ``first_index`` on (another index: an independent set of pairs), made in
    worker processes (``parallel.in_workers``: the same pairs as one after another)."""
    cells = [(a, c) for c in CONTRASTS for a in anatomies]
    plan = [(first_index + j * len(FOCAL_KINDS) + k, kind, *cells[(j * len(FOCAL_KINDS) + k) % len(cells)])
            for j in range(count) for k, kind in enumerate(FOCAL_KINDS)]
    return list(tqdm(in_workers(make_pair, plan), total=len(plan), desc="pairs", unit="pair"))


def pairs_key(count: int, anatomies: list[str], first_index: int = FIRST_INDEX) -> str:
    """What the pairs depend on: the plan, the anatomies' data and the code that makes them."""
    digest = hashlib.sha1(f"{count} {','.join(anatomies)} {first_index} {version_tag()}".encode())
    for module in (cohort, lesions, preprocess, slicing):
        digest.update(Path(module.__file__).read_bytes())
    for function in (make_pairs, make_pair, canonical_pair):
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()


def cached_pairs(count: int, anatomies: list[str], cache: Path | None, first_index: int = FIRST_INDEX) -> list[dict]:
    """``make_pairs``, kept in ``cache`` (a pickle) and reused while ``pairs_key`` is unchanged."""
    key = pairs_key(count, anatomies, first_index)
    if cache is not None and cache.exists():
        stored = pickle.loads(cache.read_bytes())
        if stored.get("key") == key:
            print(f"pairs from {cache}")
            return stored["pairs"]
        print(f"{cache} holds pairs of another plan or code: making them again")
    made = make_pairs(count, anatomies, first_index)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(cache.name + ".partial")
        partial.write_bytes(pickle.dumps({"key": key, "pairs": made}))
        partial.replace(cache)
    return made


def compare_models(results: list[dict]) -> dict[str, dict[str, dict]]:
    """Pooled AUROC of every later model minus the first's, per statistic both report, with a paired
    bootstrap 95 % interval (the same studies resampled for both): a difference whose interval holds
    0 is within the noise of this many pairs."""
    first = results[0]
    assert all(len(r["pairs"]) == len(first["pairs"]) for r in results), "models laddered on different pairs"
    focal = [p for p in first["pairs"] if p["diameter_mm"] >= FOCAL_MIN_MM]
    labels = np.r_[np.ones(len(focal)), np.zeros(len(first["pairs"]))]
    differences = {}
    for other in results[1:]:
        print(f"\npooled AUROC, {other['model']} minus {first['model']} (paired bootstrap 95 % interval, "
              f"{len(focal)} focal lesion studies, {len(first['pairs'])} healthy twins)")
        rows = {}
        for key in (k for k in first["summary"] if k in other["summary"]):
            first_scores, other_scores = (pooled_scores(r["pairs"], key) for r in (first, other))
            rows[key] = paired_auroc_difference(labels, first_scores, other_scores)
            lo, hi = rows[key]["interval"]
            print(f"  {key:22s} {rows[key]['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        differences[str(other["model"])] = rows | compare_voxels(first, other)
    return differences


def compare_voxels(first: dict, other: dict, n: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per map, the mean per-study voxel AUPRC and Dice (each at its own model's healthy 99th
    percentile) of ``other`` minus ``first`` over the focal lesion studies, with a paired bootstrap
    95 % interval (the same studies resampled for both)."""
    studies = [(p["voxel"], q["voxel"]) for p, q in zip(first["pairs"], other["pairs"]) if "voxel" in p]
    if not studies:
        return {}
    print(f"\nvoxel level, {other['model']} minus {first['model']}: mean per-study AUPRC and Dice "
          f"(paired bootstrap 95 % interval, {len(studies)} focal lesion studies)")
    rng, rows = np.random.default_rng(seed), {}
    for m in MAPS:
        row = {}
        for figure in ("ap", "dice"):
            gain = np.array([b[m][figure] - a[m][figure] for a, b in studies])
            means = [gain[rng.integers(len(gain), size=len(gain))].mean() for _ in range(n)]
            row[figure] = {"difference": float(gain.mean()), "interval": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}
        rows[f"voxel-{m}"] = row
        print(f"  {m:10s} AUPRC {row['ap']['difference']:+.3f} [{row['ap']['interval'][0]:+.3f}, {row['ap']['interval'][1]:+.3f}]"
              f"   Dice {row['dice']['difference']:+.3f} [{row['dice']['interval'][0]:+.3f}, {row['dice']['interval'][1]:+.3f}]")
    return rows


def pooled_scores(pairs: list[dict], key: str) -> np.ndarray:
    """A statistic of the focal lesion studies, then of every healthy twin (the pooled AUROC's order)."""
    return np.array([p["lesion"][key] for p in pairs if p["diameter_mm"] >= FOCAL_MIN_MM] + [p["twin"][key] for p in pairs])


def ladder(model: Path, made: list[dict], anatomies: list[str]) -> dict:
    """Print the ladder of one model bundle on the pairs; return its figures."""
    detector = Detector.load(model)
    seen = detector.anatomies() or TRAINING_ANATOMIES
    raw, own, rng = [], [], np.random.default_rng(0)
    for made_pair in tqdm(made, desc=f"maps {model}", unit="pair"):
        (slices, twin_slices), truth = made_pair["slices"], made_pair["truth"]
        lesion_maps, lesion_scores = study_maps(detector, slices)
        twin_maps, twin_scores = study_maps(detector, twin_slices)
        own += [(made_pair["anatomy"] in seen, *row) for row in own_disorders(detector, twin_slices, twin_maps["disorder"], rng)]
        contrast_in_lesion = float(np.abs(slices.image - twin_slices.image)[truth].mean()) if truth.any() else 0.0
        recovered = {m: float((lesion_maps[m] - twin_maps[m])[truth].mean()) / max(contrast_in_lesion, 1e-6)
                     for m in INTENSITY_MAPS} if truth.any() else {}
        visible = {m: float(lesion_maps[m][truth].max() / max(np.quantile(twin_maps[m][slices.mask], VISIBLE_QUANTILE), 1e-6))
                   for m in MAPS} if truth.any() else {}
        peak = {m: float(lesion_maps[m][truth].max()) for m in MAPS} if truth.any() else {}
        healthy_max = {m: float(twin_maps[m][slices.mask].max()) for m in MAPS}
        twin_places = hot_spot_places(twin_slices.image, slices.mask)
        hot_spots = {m: hot_spot_census(twin_maps[m], twin_places, slices.mask) for m in MAPS}
        places = {where: float(np.mean(place[slices.mask])) for where, place in twin_places.items()}
        raw.append({k: made_pair[k] for k in ("kind", "anatomy", "contrast", "diameter_mm", "volume_ml", "voxel_mm", "noise", "truth")}
                   | {"brain": slices.mask, "lesion_contrast": contrast_in_lesion, "recovered": recovered, "visible": visible,
                      "peak": peak, "healthy_max": healthy_max, "hot_spots": hot_spots, "places": places,
                      "maps": (lesion_maps, twin_maps), "scores": (lesion_scores, twin_scores),
                      "lesion_slices": truth.any(axis=(1, 2))})

    # healthy 99th percentile of each map over every twin's brain: the threshold of "mass"
    thresholds = {m: float(np.percentile(np.concatenate([r["maps"][1][m][r["brain"]] for r in raw]), 99)) for m in MAPS}
    pairs = []
    for r in raw:
        figures = []
        for side in (0, 1):
            stats = {f"study:{c}": study_score(r["scores"][side][c]) for c in CONFIGURATIONS}
            for m in MAPS:
                for name, value in map_statistics(r["maps"][side][m], r["brain"], thresholds[m]).items():
                    stats[f"{m}:{name}"] = value
            figures.append(stats)
        pairs.append({k: r[k] for k in ("kind", "anatomy", "contrast", "diameter_mm", "volume_ml", "voxel_mm", "noise", "lesion_contrast",
                                        "recovered", "visible", "peak", "healthy_max", "hot_spots", "places")} | {"lesion": figures[0], "twin": figures[1],
                                                         "slice_scores": [{c: v.tolist() for c, v in side.items()}
                                                                          for side in r["scores"]],
                                                         "lesion_slices": r["lesion_slices"].tolist()})

    focal = [p for p in pairs if p["diameter_mm"] >= FOCAL_MIN_MM]
    focal_raw = [r for r in raw if r["diameter_mm"] >= FOCAL_MIN_MM and r["truth"].any()]
    for p, r in zip(pairs, raw):
        if r["diameter_mm"] >= FOCAL_MIN_MM and r["truth"].any():
            p["voxel"] = {m: {"ap": float(average_precision_score(r["truth"][r["brain"]], r["maps"][0][m][r["brain"]])),
                              "dice": dice((r["maps"][0][m] > thresholds[m]) & r["brain"], r["truth"])} for m in MAPS}
    voxel = {}
    for m in MAPS:
        scores = np.concatenate([r["maps"][0][m][r["brain"]] for r in focal_raw])
        labels = np.concatenate([r["truth"][r["brain"]] for r in focal_raw])
        dice_by_study = [p["voxel"][m]["dice"] for p in pairs if "voxel" in p]
        voxel[m] = {"auprc": float(average_precision_score(labels, scores)), "dice": float(np.mean(dice_by_study)),
                    "dice_by_kind": {k: float(np.mean([d for d, r in zip(dice_by_study, focal_raw) if r["kind"] == k]))
                                     for k in FOCAL_KINDS if any(r["kind"] == k for r in focal_raw)}}
    keys = list(pairs[0]["lesion"])
    print(f"\n{len(pairs)} pairs ({len(focal)} focal >= {FOCAL_MIN_MM:g} mm), model {model}, "
          f"anatomies {', '.join(anatomies)} (seen: {', '.join(seen)}); SYNTHETIC development stream")
    print(f"oracle (twin as reconstruction): lesion contrast inside the lesion, median "
          f"{np.median([p['lesion_contrast'] for p in focal]):.3f} (canonical intensity units)")
    kinds = [k for k in FOCAL_KINDS if any(p["kind"] == k for p in pairs)]
    print(f"\n{'map:statistic':22s} {'paired':>6s} {'effect':>7s} {'cell AUROC':>10s} {'pooled [95 % interval]':>19s} {'offset':>6s} {'unseen FPR':>10s}   "
          + " ".join(f"{k[:6]:>6s}" for k in kinds) + "   " + " ".join(f"{c:>5s}" for c in CONTRASTS))
    summary = {}
    labels = np.r_[np.ones(len(focal)), np.zeros(len(pairs))]
    for key in keys:
        diff = np.array([p["lesion"][key] - p["twin"][key] for p in focal])
        spread = np.std([p["twin"][key] for p in pairs])
        paired = float(np.mean(diff > 0))
        auroc, n_cells = cell_auroc(focal, key)
        scores = pooled_scores(pairs, key)
        pooled, pooled_interval = float(roc_auc_score(labels, scores)), bootstrap_ci(labels, scores, np.inf)["auroc"]
        offset, unseen_fpr = anatomy_offset(pairs, key, seen)
        row = {"paired": paired, "effect": float(np.median(diff) / spread) if spread > 0 else float("nan"),
               "cell_auroc": auroc, "n_cells": n_cells, "pooled_auroc": pooled,
               "pooled_interval": pooled_interval, "offset": offset, "unseen_fpr": unseen_fpr,
               "paired_by_kind": {k: float(np.mean([p["lesion"][key] > p["twin"][key] for p in pairs if p["kind"] == k]))
                                  for k in kinds},
               "paired_by_contrast": {c: float(np.mean([p["lesion"][key] > p["twin"][key] for p in pairs if p["contrast"] == c]))
                                      if any(p["contrast"] == c for p in pairs) else float("nan") for c in CONTRASTS}}
        summary[key] = row
        print(f"{key:22s} {paired:6.2f} {row['effect']:7.2f} {auroc:6.2f} ({n_cells:>2d}) {pooled:6.2f} [{pooled_interval[0]:.2f}, {pooled_interval[1]:.2f}] {offset:6.2f} {unseen_fpr:10.2f}   "
              + " ".join(f"{v:6.2f}" for v in row["paired_by_kind"].values()) + "   "
              + " ".join(f"{v:5.2f}" for v in row["paired_by_contrast"].values()))
    print("\nrecovered share of the lesion contrast inside the lesion (median over focal pairs; oracle 1.0): "
          + ", ".join(f"{m} {np.median([p['recovered'][m] for p in focal if p['recovered']]):.2f}" for m in INTENSITY_MAPS))
    by_size = {"small": [p for p in focal if p["visible"] and p["volume_ml"] < SMALL_ML],
               "large": [p for p in focal if p["visible"] and p["volume_ml"] >= SMALL_ML]}
    twins = [p["twin"]["study:combined"] for p in pairs]
    print(f"\nby lesion volume (focal pairs < {SMALL_ML:g} ml / >= {SMALL_ML:g} ml: {len(by_size['small'])} / {len(by_size['large'])})")
    print("visible (lesion's peak above its twin's 99.9th brain percentile): "
          + ", ".join(f"{m} " + " / ".join(f"{np.mean([p['visible'][m] > 1 for p in ps]):.2f}" if ps else "-"
                                           for ps in by_size.values()) for m in MAPS))
    bars = {m: float(np.quantile([p["healthy_max"][m] for p in pairs], 0.95)) for m in MAPS}
    ceiling = {m: {name: float(np.mean([p["peak"][m] > bars[m] for p in ps])) if ps else float("nan")
                   for name, ps in by_size.items()} for m in MAPS}
    print("ceiling at 5 % FPR (lesion's peak above the 95th percentile of the twins' brain maxima): "
          + ", ".join(f"{m} " + " / ".join(f"{v:.2f}" for v in ceiling[m].values()) for m in MAPS))
    places = list(pairs[0]["places"])
    hot_spots = {}
    for m in MAPS:
        highest = np.quantile([p["healthy_max"][m] for p in pairs], 0.8)
        groups = (pairs, [p for p in pairs if p["healthy_max"][m] >= highest])
        hot_spots[m] = {where: [float(np.mean([p["hot_spots"][m][where] for p in g])) for g in groups] for where in places}
    print(f"where the twins' hot spots lie (shares of their top 0.1 % brain voxels, every twin / the fifth with the "
          f"highest maxima, which set a study threshold): at the intensity floor, above the 99th percentile, within "
          f"{EDGE_MM:g} mm of the mask's edge\n  "
          + "\n  ".join(f"{m:9s} " + ", ".join(f"{where} {v[0]:.2f} / {v[1]:.2f}" for where, v in hot_spots[m].items())
                         for m in MAPS)
          + "\n  (the brain itself: " + ", ".join(f"{where} {np.mean([p['places'][where] for p in pairs]):.2f}" for where in places) + ")")
    for name, ps in by_size.items():
        if ps:
            auroc = roc_auc_score([1] * len(ps) + [0] * len(twins), [p["lesion"]["study:combined"] for p in ps] + twins)
            print(f"study:combined, {name} lesions: paired {np.mean([p['lesion']['study:combined'] > p['twin']['study:combined'] for p in ps]):.2f}, "
                  f"pooled AUROC {auroc:.2f}")
    thresholds_calibrated = {}
    for configuration in CONFIGURATIONS:
        try:
            thresholds_calibrated[configuration] = detector.calibration(configuration)["threshold"]
        except RuntimeError:
            pass
    calibrated = calibrated_rates(pairs, thresholds_calibrated, seen)
    if calibrated:
        print("\nat the bundle's calibrated study threshold: healthy twins above it, seen / unseen anatomies "
              "[exact 95 % interval], and focal lesion studies above it")
        for configuration, row in calibrated.items():
            print(f"  study:{configuration:9s} {row['threshold']:7.3f}: " + ", ".join(
                f"{g} {row[g]['above']}/{row[g]['n']} [{row[g]['interval'][0]:.2f}, {row[g]['interval'][1]:.2f}]"
                for g in ("seen", "unseen")) + f", focal lesions {row['focal_sensitivity']:.2f}")
    else:
        print(f"\n{model} is not calibrated: `brainmirror calibrate` it to see its threshold on the twins")
    own_disorder = {}
    print(f"\nown disorders (restorer's training kind, shift +-{OWN_SHIFT:g}, on the twins' slices): share recovered by the "
          "restored / mirror-informed residual, and how often the disorder probability shows it")
    for label, group in (("seen", [r[1:] for r in own if r[0]]), ("unseen", [r[1:] for r in own if not r[0]])):
        if group:
            own_disorder[label] = {f"{d:g}": {"restored": float(np.median([r[1] for r in group if r[0] == d])),
                                              "mirrored": float(np.median([r[2] for r in group if r[0] == d])),
                                              "disorder_visible": float(np.mean([r[3] for r in group if r[0] == d]))}
                                   for d in OWN_DIAMETERS_MM}
            print(f"  {label:6s} anatomies: " + ", ".join(f"{d} mm {v['restored']:.2f} / {v['mirrored']:.2f}, visible {v['disorder_visible']:.2f}"
                                                        for d, v in own_disorder[label].items()))
    print(f"\nvoxel level over the {len(focal_raw)} focal lesion studies, threshold: the map's healthy 99th percentile")
    print(f"{'map':10s} {'AUPRC':>6s} {'Dice':>6s}   " + " ".join(f"{k[:6]:>6s}" for k in voxel[MAPS[0]]["dice_by_kind"]))
    for m, v in voxel.items():
        print(f"{m:10s} {v['auprc']:6.3f} {v['dice']:6.3f}   " + " ".join(f"{d:6.3f}" for d in v["dice_by_kind"].values()))
    return {"model": str(model), "pairs": pairs, "summary": summary, "voxel": voxel, "thresholds": thresholds,
            "own_disorders": own_disorder, "ceiling": ceiling, "hot_spots": hot_spots, "calibrated": calibrated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, nargs="+", default=[Path("models/brainmirror")],
                        help="model bundle(s), each laddered on the same pairs (default: the shipped one)")
    parser.add_argument("--pairs", type=int, default=3, help="pairs per focal lesion kind (default 3)")
    parser.add_argument("--anatomies", default=",".join(ANATOMIES), help="comma-separated (default: all)")
    parser.add_argument("--output", type=Path, default=None, help="write every pair's figures as JSON")
    parser.add_argument("--pairs-cache", type=Path, default=None, metavar="FILE",
                        help="keep the pairs in FILE (a pickle, about 7 MB a pair) and reuse them while the plan "
                             "and the code that makes them are unchanged: a later candidate is laddered on the "
                             "same pairs without making them again (a worker process per core makes them: 7 pairs "
                             "in 107 s on 2 cores, 143 s one after another)")
    parser.add_argument("--first-index", type=int, default=FIRST_INDEX, metavar="N",
                        help=f"development-stream index of the first pair (default {FIRST_INDEX}); a set uses {len(FOCAL_KINDS)} "
                             "indices per --pairs, and another set whose indices do not overlap is independent: "
                             "confirm there what one set suggested")
    args = parser.parse_args()

    anatomies = args.anatomies.split(",")
    made = cached_pairs(args.pairs, anatomies, args.pairs_cache, args.first_index)
    results = [ladder(model, made, anatomies) for model in args.model]
    differences = compare_models(results) if len(results) > 1 else {}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results[0] if len(results) == 1 else {"models": results, "differences": differences},
                                          indent=1, default=float) + "\n")
        print(f"written to {args.output}")


if __name__ == "__main__":
    main()
