"""Tests of the evidence ladder (scripts/evidence_ladder.py): its hot-spot census on a toy volume, its pairs
cache, its comparison of two models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evidence_ladder.py"


@pytest.fixture(scope="module")
def ladder():
    spec = importlib.util.spec_from_file_location("evidence_ladder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toy_study() -> tuple[np.ndarray, np.ndarray]:
    """A 40 x 48 x 48 box of brain at intensity 0.6 (2 mm voxels), 2 voxels of air around it."""
    brain = np.zeros((44, 52, 52), bool)
    brain[2:-2, 2:-2, 2:-2] = True
    return np.where(brain, 0.6, 0.0).astype(np.float32), brain


def test_census_finds_a_hot_spot_at_the_intensity_floor_deep_inside(ladder):
    image, brain = toy_study()
    volume = np.where(brain, 0.1, 0.0).astype(np.float32)
    spot = (slice(19, 25), slice(23, 29), slice(23, 29))  # 216 voxels (0.1 % of the brain: 92), 34 mm deep
    image[spot], volume[spot] = 0.0, 5.0  # air taken into the mask, scored highest
    census = ladder.hot_spot_census(volume, ladder.hot_spot_places(image, brain), brain)
    assert census["floor"] == 1.0 and census["bright"] == 0.0 and census["edge"] == 0.0


def test_census_finds_a_bright_hot_spot_at_the_edge(ladder):
    image, brain = toy_study()
    volume = np.where(brain, 0.1, 0.0).astype(np.float32)
    spot = (slice(2, 40), slice(2, 4), slice(20, 24))  # the first two rows of the brain: 0-4 mm deep
    image[spot], volume[spot] = 1.3, 5.0
    census = ladder.hot_spot_census(volume, ladder.hot_spot_places(image, brain), brain)
    assert census["edge"] == 1.0 and census["bright"] == 1.0 and census["floor"] == 0.0


def test_census_of_a_map_without_hot_spots_is_the_brain_itself(ladder):
    image, brain = toy_study()
    rng = np.random.default_rng(0)
    volume = (rng.random(brain.shape) * brain).astype(np.float32)
    census = ladder.hot_spot_census(volume, ladder.hot_spot_places(image, brain), brain)
    assert census["floor"] == 0.0 and census["bright"] == 0.0
    edge_share = ladder.hot_spot_places(image, brain)["edge"][brain].mean()
    assert 0.2 < edge_share < 0.3  # two voxels (centres 2 and 4 mm deep) around a 80 x 96 x 96 mm box
    assert abs(census["edge"] - edge_share) < 0.1  # random hot spots sit at the edge as often as the brain does


def test_pairs_cache_is_reused_only_for_the_same_plan(ladder, monkeypatch, tmp_path):
    made = []

    def fake_make_pairs(count, anatomies, first_index):
        made.append((count, tuple(anatomies), first_index))
        return [{"kind": "tumour", "anatomy": anatomies[0], "index": i} for i in range(count)]

    monkeypatch.setattr(ladder, "make_pairs", fake_make_pairs)
    monkeypatch.setattr(ladder, "pairs_key", lambda count, anatomies, first_index: f"{count} {anatomies} {first_index}")
    cache = tmp_path / "pairs.pkl"
    first = ladder.cached_pairs(2, ["mni"], cache)
    assert ladder.cached_pairs(2, ["mni"], cache) == first and made == [(2, ("mni",), ladder.FIRST_INDEX)]
    assert len(ladder.cached_pairs(3, ["mni"], cache)) == 3 and made[-1] == (3, ("mni",), ladder.FIRST_INDEX)  # another plan
    assert ladder.cached_pairs(3, ["colin"], cache)[0]["anatomy"] == "colin"
    ladder.cached_pairs(3, ["colin"], cache, first_index=2500)
    assert made[-1] == (3, ("colin",), 2500)  # an independent set (another first index): made again


def test_pairs_key_follows_the_plan_and_the_code_that_makes_pairs(ladder):
    key = ladder.pairs_key(2, ["mni"])
    assert key == ladder.pairs_key(2, ["mni"])
    assert key != ladder.pairs_key(3, ["mni"]) and key != ladder.pairs_key(2, ["colin"])
    assert key != ladder.pairs_key(2, ["mni"], first_index=2500)


def test_compare_models_reports_the_difference_per_statistic(ladder):
    rng = np.random.default_rng(2)

    def result(name, shift):
        pairs = [{"diameter_mm": 12.0 if i < 30 else 5.0,  # the last ten pairs are not focal: left out
                  "lesion": {"study:combined": float(rng.normal() + shift)}, "twin": {"study:combined": float(rng.normal())}}
                 for i in range(40)]
        return {"model": name, "pairs": pairs, "summary": {"study:combined": {}}}

    differences = ladder.compare_models([result("shipped", 0.0), result("candidate", 3.0)])
    row = differences["candidate"]["study:combined"]
    assert 0 < row["interval"][0] < row["difference"] < row["interval"][1]
    same = ladder.compare_models([result("shipped", 0.0)] * 2)["shipped"]["study:combined"]
    assert same == {"difference": 0.0, "interval": [0.0, 0.0]}


def test_compare_voxels_pairs_each_focal_studys_voxel_figures(ladder):
    rng = np.random.default_rng(3)
    base = [rng.uniform(0.1, 0.5, size=2) for _ in range(30)]

    def result(name, gain):
        pairs = [{"voxel": {m: {"ap": float(b[0] + gain * (m == "anomaly")), "dice": float(b[1] + gain * (m == "anomaly"))}
                            for m in ladder.MAPS}} for b in base] + [{}] * 5  # twins without a lesion carry none
        return {"model": name, "pairs": pairs}

    rows = ladder.compare_voxels(result("shipped", 0.0), result("candidate", 0.1))
    assert rows["voxel-anomaly"]["dice"]["interval"] == [pytest.approx(0.1)] * 2  # the same gain in every study
    assert rows["voxel-flip"]["ap"] == {"difference": 0.0, "interval": [0.0, 0.0]}
    healthy_only = {"model": "a", "pairs": [{}] * 5}
    assert ladder.compare_voxels(healthy_only, healthy_only) == {}


def test_calibrated_rates_count_twins_of_seen_and_unseen_anatomies_and_focal_lesions_above(ladder):
    def pair(anatomy, diameter, twin, lesion):
        return {"anatomy": anatomy, "diameter_mm": diameter, "twin": {"study:combined": twin}, "lesion": {"study:combined": lesion}}

    pairs = [pair("mni", 16, 6.0, 9.0), pair("mni", 16, 4.0, 4.5), pair("bert", 12, 5.5, 4.0),
             pair("bert", 12, 1.0, 7.0), pair("robex", 6, 2.0, 8.0)]  # the 6 mm lesion is not focal
    rates = ladder.calibrated_rates(pairs, {"combined": 5.0}, ("mni",))["combined"]
    assert (rates["seen"]["above"], rates["seen"]["n"]) == (1, 2)
    assert (rates["unseen"]["above"], rates["unseen"]["n"]) == (1, 3)
    low, high = rates["unseen"]["interval"]
    assert 0.0 < low < 1 / 3 < high < 1.0  # exact interval around the observed share
    assert rates["focal_sensitivity"] == 0.5  # 9.0 and 7.0 above; 4.5 and 4.0 not; the 6 mm lesion left out
    assert ladder.calibrated_rates(pairs, {}, ("mni",)) == {}
