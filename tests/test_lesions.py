"""Tests of the synthetic lesion generator on a small toy brain phantom."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from brainmirror.lesions import (
    CONTRASTS,
    FOCAL_KINDS,
    LESION_KINDS,
    MASK_TOLERANCE_FRACTION,
    SIZE_RANGE_MM,
    SUBTLE_CONTRAST_RATIO,
    Lesion,
    insert_lesion,
    tissue_stats,
)

# tissue intensities (csf, gm, wm, skull) and an arbitrary scale per contrast
INTENSITY = {
    "t1": (0.25, 0.55, 0.80, 0.60),
    "t2": (1.00, 0.55, 0.40, 0.20),
    "flair": (0.10, 0.60, 0.45, 0.20),
    "pd": (0.90, 0.75, 0.60, 0.30),
}
SCALE = {"t1": 1.0, "t2": 1000.0, "flair": 250.0, "pd": 1.0}
SHAPE = (96, 112, 96)
BRAIN_CENTRE = (45.3, 56.0, 46.0)  # off the array centre: the midline is the brain's, not the array's
BRAIN_AXES = (42.0, 52.0, 40.0)


def _phantom():
    """Ellipsoid head: skull, CSF rim, GM shell, WM core, two ventricles, a midline fissure."""
    x, y, z = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    d = [x - BRAIN_CENTRE[0], y - BRAIN_CENTRE[1], z - BRAIN_CENTRE[2]]
    rho = np.sqrt(sum((di / a) ** 2 for di, a in zip(d, BRAIN_AXES)))
    dist = np.sqrt(sum(di.astype(float) ** 2 for di in d))
    sd = dist * (1 - rho) / np.maximum(rho, 1e-6)  # mm inside the brain surface
    label = np.zeros(SHAPE, np.int8)  # 0 background, 1 CSF, 2 GM, 3 WM, 4 skull
    label[(sd > -6) & (sd <= -2)] = 4
    label[sd > 0] = 1
    label[sd > 2] = 2
    label[sd > 5] = 3
    fissure = (np.abs(d[0]) < 1.0) & (d[2] > -12) & (sd > 0)
    label[(np.abs(d[0]) < 2.5) & (d[2] > -12) & (label == 3)] = 2
    label[fissure] = 1
    for sx in (-1, 1):
        v = (
            ((x - (BRAIN_CENTRE[0] + sx * 7)) / 4.0) ** 2
            + ((y - (BRAIN_CENTRE[1] + 4)) / 16.0) ** 2
            + ((z - (BRAIN_CENTRE[2] + 4)) / 7.0) ** 2
        )
        label[v <= 1] = 1
    tissue = np.stack(
        [ndimage.gaussian_filter((label == k).astype(np.float32), 0.7) for k in (1, 2, 3)]
    ).astype(np.float32)
    skull = ndimage.gaussian_filter((label == 4).astype(np.float32), 0.7)
    rng = np.random.default_rng(1234)
    head = (tissue.sum(0) + skull) > 0.05
    images = {}
    for c, (csf, gm, wm, sk) in INTENSITY.items():
        img = tissue[0] * csf + tissue[1] * gm + tissue[2] * wm + skull * sk
        img = img + head * rng.normal(0, 0.02, SHAPE)
        images[c] = (np.clip(img, 0, None) * SCALE[c]).astype(np.float32)
    return tissue, images


TISSUE, IMAGES = _phantom()
BRAIN = TISSUE.sum(0) > 0.5
_xs = np.flatnonzero(BRAIN.any(axis=(1, 2)))
X_MID = 0.5 * (_xs[0] + _xs[-1])
_CACHE: dict[tuple[str, str, int], Lesion] = {}


def lesion(kind: str, contrast: str, seed: int = 0) -> Lesion:
    key = (kind, contrast, seed)
    if key not in _CACHE:
        _CACHE[key] = insert_lesion(IMAGES[contrast], TISSUE, contrast, kind, np.random.default_rng(seed))
    return _CACHE[key]


def _components(mask):
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    return labels, n


def test_constants():
    assert LESION_KINDS == ("tumour", "metastases", "stroke", "ms", "haemorrhage", "small", "bilateral", "atrophy")
    assert FOCAL_KINDS == tuple(k for k in LESION_KINDS if k != "atrophy")
    assert set(SIZE_RANGE_MM) == set(FOCAL_KINDS)
    assert dataclasses.is_dataclass(Lesion)


def test_tissue_stats_recovers_phantom_intensities():
    for c, (csf, gm, wm, _) in INTENSITY.items():
        st = tissue_stats(IMAGES[c], TISSUE)
        k = SCALE[c]
        assert st.gm == pytest.approx(gm * k, rel=0.03)
        assert st.wm == pytest.approx(wm * k, rel=0.03)
        assert st.csf == pytest.approx(csf * k, rel=0.15)
        assert st.noise_sd == pytest.approx(0.02 * k, rel=0.2)
        assert st.tolerance == pytest.approx(MASK_TOLERANCE_FRACTION * abs(st.gm - st.wm))


@pytest.mark.parametrize("contrast", CONTRASTS)
@pytest.mark.parametrize("kind", LESION_KINDS)
def test_lesion_contract(kind, contrast):
    img = IMAGES[contrast]
    les = lesion(kind, contrast)
    assert isinstance(les, Lesion) and les.kind == kind
    assert les.image.dtype == np.float32 and les.image.shape == img.shape
    assert les.mask.dtype == bool and les.mask.shape == img.shape
    assert np.isfinite(les.image).all()
    assert les.mask.any()
    assert not (les.mask & ~BRAIN).any(), "lesion outside the brain"
    # the mask is exactly the set of voxels changed by more than the tolerance
    tol = tissue_stats(img, TISSUE).tolerance
    assert les.tolerance == pytest.approx(tol)
    diff = np.abs(les.image.astype(np.float64) - img.astype(np.float64))
    assert np.array_equal(diff > tol, les.mask)
    assert diff[~les.mask].max() <= tol
    assert diff[~BRAIN].max() == 0.0
    # reported measurements
    _, n = _components(les.mask)
    assert les.n_components == n >= 1
    assert les.volume_ml == pytest.approx(les.mask.sum() / 1000.0)
    if kind in FOCAL_KINDS:
        lo, hi = SIZE_RANGE_MM[kind]
        assert 0.7 * lo - 1.0 <= les.max_diameter_mm <= 1.15 * hi + 2.0, les.max_diameter_mm
    # contrast ratio: mean change inside the mask in units of the GM/WM contrast
    st = tissue_stats(img, TISSUE)
    assert les.contrast_ratio == pytest.approx(diff[les.mask].mean() / st.contrast, rel=1e-6)
    assert les.stratum == ("subtle" if les.contrast_ratio < SUBTLE_CONTRAST_RATIO else "typical")


@pytest.mark.parametrize("contrast", CONTRASTS)
@pytest.mark.parametrize("kind", LESION_KINDS)
def test_deterministic_per_seed(kind, contrast):
    a = lesion(kind, contrast, 0)
    again = insert_lesion(IMAGES[contrast], TISSUE, contrast, kind, np.random.default_rng(0))
    assert np.array_equal(a.image, again.image) and np.array_equal(a.mask, again.mask)
    assert a.max_diameter_mm == again.max_diameter_mm and a.n_components == again.n_components
    other = lesion(kind, contrast, 1)
    assert not np.array_equal(a.mask, other.mask)
    assert not np.array_equal(a.image, other.image)


def test_inputs_untouched():
    img = IMAGES["t2"].copy()
    tis = TISSUE.copy()
    insert_lesion(img, tis, "t2", "tumour", np.random.default_rng(5))
    assert np.array_equal(img, IMAGES["t2"]) and np.array_equal(tis, TISSUE)


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_bilateral_lesions_mirror_about_brain_midline(contrast):
    for seed in (0, 1, 2):
        les = lesion("bilateral", contrast, seed)
        labels, n = _components(les.mask)
        cx = np.array([c[0] for c in ndimage.center_of_mass(les.mask, labels, range(1, n + 1))])
        sizes = ndimage.sum(les.mask, labels, range(1, n + 1))
        assert (cx < X_MID).any() and (cx > X_MID).any()
        left, right = cx[cx < X_MID][np.argmax(sizes[cx < X_MID])], cx[cx > X_MID][np.argmax(sizes[cx > X_MID])]
        assert abs(0.5 * (left + right) - X_MID) < 5.0  # near-mirror about the brain's (not array's) midline


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_oedema_direction(contrast):
    st = tissue_stats(IMAGES[contrast], TISSUE)
    for seed in (0, 1, 2):
        les = lesion("tumour", contrast, seed)
        depth = ndimage.distance_transform_edt(les.mask)
        shell = les.mask & (depth >= 2) & (depth <= 4) & (TISSUE[2] > 0.9)  # oedema ring in WM
        assert shell.sum() > 20
        med = float(np.median(les.image[shell]))
        if contrast == "t1":
            assert med < st.wm - 0.5 * st.contrast  # darker than WM
        else:
            assert med > st.gm  # brighter than GM (and so than WM)


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_small_lesion_is_low_contrast(contrast):
    st = tissue_stats(IMAGES[contrast], TISSUE)
    les = lesion("small", contrast)
    change = (les.image.astype(np.float64) - IMAGES[contrast])[les.mask]
    assert les.n_components == 1
    assert np.percentile(np.abs(change), 99) < 0.4 * st.contrast
    assert les.stratum == "subtle"
    sign = -1 if contrast == "t1" else 1
    assert sign * np.median(change) > 0


def test_ms_periventricular_in_both_hemispheres():
    vent = (TISSUE[0] > 0.5) & (ndimage.distance_transform_edt(BRAIN) > 12)
    dv = ndimage.distance_transform_edt(~vent)
    for seed in (0, 1, 2):
        les = lesion("ms", "flair", seed)
        labels, n = _components(les.mask)
        assert 4 <= n <= 15
        cen = np.array(ndimage.center_of_mass(les.mask, labels, range(1, n + 1)))
        assert (cen[:, 0] < X_MID).any() and (cen[:, 0] > X_MID).any()
        near = [dv[tuple(np.round(c).astype(int))] for c in cen]
        assert np.median(near) < 12.0


def test_metastases_count_and_sizes():
    for seed in (0, 1, 2):
        les = lesion("metastases", "t2", seed)
        assert 2 <= les.n_components <= 6


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_atrophy_moves_intensity_towards_csf(contrast):
    st = tissue_stats(IMAGES[contrast], TISSUE)
    les = lesion("atrophy", contrast)
    change = (les.image.astype(np.float64) - IMAGES[contrast])[les.mask]
    assert les.volume_ml > 5.0
    # GM/WM replaced by CSF: the change points from parenchyma towards CSF
    assert np.sign(np.median(change)) == np.sign(st.csf - 0.5 * (st.gm + st.wm))


def test_scale_invariance():
    img = IMAGES["t1"]
    a = insert_lesion(img, TISSUE, "t1", "haemorrhage", np.random.default_rng(7))
    b = insert_lesion(img * 37.5, TISSUE, "t1", "haemorrhage", np.random.default_rng(7))
    inter, union = (a.mask & b.mask).sum(), (a.mask | b.mask).sum()
    assert inter / union > 0.99
    assert b.tolerance == pytest.approx(37.5 * a.tolerance, rel=1e-5)


def test_bad_arguments():
    img = IMAGES["t1"]
    with pytest.raises(ValueError):
        insert_lesion(img, TISSUE, "t1", "wart", np.random.default_rng(0))
    with pytest.raises(ValueError):
        insert_lesion(img, TISSUE, "dwi", "tumour", np.random.default_rng(0))
    with pytest.raises(ValueError):
        insert_lesion(img[:-1], TISSUE, "t1", "tumour", np.random.default_rng(0))
