"""Seeded synthetic lesions inserted into healthy brain volumes, for evaluation.

No lesion images exist offline, so anomalies are simulated: a lesion is painted into a healthy
volume, relative to the intensities this very image gives its own tissues, and the ground truth
is exactly what was changed.

Conventions
-----------
* Volumes are 3D ``float`` arrays on a 1 mm isotropic grid, RAS axes: axis 0 = x (high x is the
  patient's Right), axis 1 = y (posterior -> anterior), axis 2 = z (inferior -> superior).
  All sizes below are in mm = voxels.
* ``tissue`` is ``(3, X, Y, Z)``: probabilities of CSF, GM, WM (sum <= 1, zero outside the brain).
  The brain is ``tissue.sum(0) > 0.5``; nothing outside it is ever changed.
* Intensity unit: ``c = |mean(GM) - mean(WM)|`` where the tissue means are estimated from this image
  (weighted by the tissue probabilities of near-pure voxels), so any scale or contrast works.
  ``c`` is floored at 2 % of the largest tissue mean, for images with no GM/WM contrast.
* **Mask tolerance**: ``tol = MASK_TOLERANCE_FRACTION * c`` (5 % of the GM/WM contrast). The mask is
  exactly ``abs(lesion.image - image) > tol`` (computed in float64 from the two float32 arrays);
  every voxel outside it changed by at most ``tol`` (most by exactly 0: lesion weights have compact
  support). ``Lesion.tolerance`` holds the value used.
* Sizes: ``max_diameter_mm`` is the Feret diameter (largest distance between two voxel centres, plus
  1 voxel) of the largest 26-connected component of the mask; ``SIZE_RANGE_MM`` gives the ranges the
  focal kinds are drawn from (whole changed region, oedema included). A lesion cut by the brain
  surface or the midline can come out smaller than drawn. Tumours and haemorrhages push the
  surrounding tissue radially (mass effect; only the tissue model moves, the noise stays); the
  displacement vanishes inside the lesion's envelope, so the mask is not enlarged by it.

Appearance model (``s`` = -1 for T1, +1 for T2/FLAIR/PD: the direction "more water" moves a voxel):
oedema ``WM + s*k*c`` (k 1.5-2.4: T1 darker than GM, T2/FLAIR/PD brighter than GM); necrosis
CSF-like (FLAIR: half-way between suppressed CSF and WM, i.e. dark-ish); enhancing rim (T1 only,
as if post-contrast) brighter than WM; haematoma T1 mixed/bright, T2/FLAIR/PD mixed core with a dark
haemosiderin rim. Inside a lesion the image's own noise is kept (the residual ``image - tissue
model``, clipped at 3 noise sd, is carried over) and a smooth heterogeneity texture (10-15 % of the
lesion's contrast) is added, so lesions are neither noise-free nor flat.

Shapes are level sets of "ellipsoid radial distance + smoothed noise" with a smooth (C1
smoothstep, compact) 1-3 mm boundary ramp, randomly rotated.

Against published values (checked, nothing tuned to them; a miss is to be read by its stratum):

* The healthy GM/WM contrast that ``c`` is measured in (the virtual cohort's tissue means,
  GM/WM 0.71 on T1, 1.43 T2, 1.35 FLAIR, 1.26 PD) is of the order that published relaxation
  times give at 3 T: grey matter T1/T2 1143/78 ms, white matter 701/64 ms (Konar et al.,
  Cancers 2022;14(11):2651, doi:10.3390/cancers14112651), which for usual spin-echo and FLAIR
  timings and equal proton density give GM/WM about 0.8 (T1w), 1.4-1.5 (T2w) and 1.3 (FLAIR).
* Stroke here is a *visible* infarct: lesion over homologous contralateral tissue 1.3-1.7 on
  FLAIR (k 1.2-2.0). Hyperacute infarcts are subtler: a FLAIR signal-intensity ratio of at most
  1.18 identifies stroke within 6 h of onset (Legge et al., J Stroke Cerebrovasc Dis
  2017;26(7):1582-1587, doi:10.1016/j.jstrokecerebrovasdis.2017.02.030). The suite has none of
  those, so its stroke figures do not speak for hyperacute stroke.
* ``small`` (0.10-0.25 of the GM/WM contrast) is subtle by construction, subtler than any
  published lesion ratio found.
* Strata: every lesion records its ``contrast_ratio`` (mean absolute change inside its mask in
  units of ``c``). Below ``SUBTLE_CONTRAST_RATIO`` it is *subtle*, otherwise *typical*. The
  boundary is Legge et al.'s FLAIR signal-intensity ratio of 1.18 (the hyperacute limit above)
  for a lesion in white matter, in units of the cohort's FLAIR GM/WM contrast: 0.18 / 0.35 =
  0.51 c. Two assumptions, stated: the tissue replaced is white matter (in grey matter the same
  ratio is about 0.7 c), and the FLAIR anchor carries over to T1, T2 and PD in units of each
  image's own GM/WM contrast. Lesions with darker and brighter parts (haemorrhage, a T1 tumour
  with its rim) count both parts. The evaluation reports its figures by stratum, so a miss can be
  attributed to a lesion being subtle rather than to the detector alone.
* No offline source gave quantitative lesion-to-white-matter ratios for metastases, MS plaques,
  haemorrhage or peritumoural oedema; those kinds are not checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

LESION_KINDS = ("tumour", "metastases", "stroke", "ms", "haemorrhage", "small", "bilateral", "atrophy")
FOCAL_KINDS = tuple(k for k in LESION_KINDS if k != "atrophy")
CONTRASTS = ("t1", "t2", "flair", "pd")

MASK_TOLERANCE_FRACTION = 0.05
"""The mask holds the voxels changed by more than this fraction of |mean GM - mean WM|."""
SUBTLE_CONTRAST_RATIO = 0.5
"""Lesions whose mean absolute change inside the mask is below this many ``c`` are the subtle stratum."""

SIZE_RANGE_MM = {
    "tumour": (25.0, 60.0),  # whole lesion incl. oedema
    "metastases": (5.0, 15.0),  # each metastasis incl. its small oedema
    "stroke": (30.0, 70.0),  # wedge length (apex to cortex)
    "ms": (3.0, 12.0),  # long axis of each ovoid
    "haemorrhage": (15.0, 40.0),  # incl. the oedema ring
    "small": (5.0, 10.0),
    "bilateral": (10.0, 30.0),  # each of the two
}
"""Diameter ranges (mm) the focal kinds are drawn from."""

_SIGN = {"t1": -1.0, "t2": 1.0, "flair": 1.0, "pd": 1.0}
_FLUID_SIGN = {"t1": -3.0, "t2": 3.0, "flair": -2.0, "pd": 1.5}  # CSF fallback, in units of c


@dataclass(frozen=True)
class Lesion:
    """A healthy volume with one synthetic lesion (or lesion set) inserted."""

    image: np.ndarray  # float32 volume with the lesion
    mask: np.ndarray  # bool: voxels changed by more than ``tolerance``
    kind: str
    volume_ml: float
    max_diameter_mm: float  # Feret diameter of the largest connected component
    n_components: int  # 26-connected components of ``mask``
    tolerance: float = 0.0  # intensity change defining the mask (5 % of |GM - WM|)
    contrast_ratio: float = 0.0  # mean |change| inside the mask, in units of c = |GM - WM|

    @property
    def stratum(self) -> str:
        return stratum_of(self.contrast_ratio)


def stratum_of(contrast_ratio: float) -> str:
    """``subtle`` below ``SUBTLE_CONTRAST_RATIO`` (in units of the GM/WM contrast), else ``typical``."""
    return "subtle" if contrast_ratio < SUBTLE_CONTRAST_RATIO else "typical"


@dataclass(frozen=True)
class TissueStats:
    """Tissue intensities of one image, estimated from its tissue maps."""

    csf: float
    gm: float
    wm: float
    contrast: float  # c = |gm - wm| (floored), the intensity unit of the lesion model
    noise_sd: float  # noise sd estimated from first differences inside pure WM

    @property
    def tolerance(self) -> float:
        return MASK_TOLERANCE_FRACTION * self.contrast


# --------------------------------------------------------------------------------------------
# estimation


def _weighted_mean(img: np.ndarray, p: np.ndarray) -> float:
    for thr in (0.9, 0.5, 0.0):
        sel = p > thr
        if np.count_nonzero(sel) >= 20 or (thr == 0.0 and sel.any()):
            w = p[sel].astype(np.float64)
            return float(np.sum(w * img[sel]) / np.sum(w))
    return float("nan")


def _noise_sd(img: np.ndarray, wm: np.ndarray) -> float:
    pure = wm > 0.9
    if np.count_nonzero(pure) < 50:
        pure = wm > 0.5
    est = []
    for ax in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[ax] = slice(1, None)
        b[ax] = slice(None, -1)
        both = pure[tuple(a)] & pure[tuple(b)]
        if np.count_nonzero(both) < 20:
            continue
        d = img[tuple(a)][both].astype(np.float64) - img[tuple(b)][both]
        if d.size > 100_000:  # a deterministic subsample is plenty for a robust sd
            d = d[:: d.size // 100_000]
        est.append(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))
    return float(np.median(est)) if est else 0.0


def tissue_stats(image: np.ndarray, tissue: np.ndarray) -> TissueStats:
    """Mean CSF/GM/WM intensity (probability weighted, near-pure voxels), contrast unit, noise sd.

    A missing CSF class gives ``csf = nan`` (``insert_lesion`` then substitutes a contrast-typical
    value); GM and WM must be present.
    """
    img = np.asarray(image)
    tis = np.asarray(tissue)
    if tis.ndim != 4 or tis.shape[0] != 3 or tis.shape[1:] != img.shape:
        raise ValueError(f"tissue must be (3, *image.shape); got {tis.shape} for image {img.shape}")
    csf, gm, wm = (_weighted_mean(img, tis[k]) for k in range(3))
    if not (np.isfinite(gm) and np.isfinite(wm)):
        raise ValueError("tissue maps hold no grey or no white matter")
    scale = max(abs(gm), abs(wm), abs(csf) if np.isfinite(csf) else 0.0)
    c = max(abs(gm - wm), 0.02 * scale, 1e-12)
    return TissueStats(csf=csf, gm=gm, wm=wm, contrast=c, noise_sd=_noise_sd(img, tis[2]))


# --------------------------------------------------------------------------------------------
# geometry helpers


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ramp(sd: np.ndarray, edge: float) -> np.ndarray:
    """Soft membership from a signed distance (mm, > 0 inside): 0.5 at sd = 0, 0/1 beyond +-edge."""
    return _smoothstep((sd + edge) / (2.0 * edge))


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 2] = -q[:, 2]
    return q


def _frame(axis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation whose first column is ``axis`` (unit), the others random about it."""
    a = axis / np.linalg.norm(axis)
    t = rng.standard_normal(3)
    t -= t.dot(a) * a
    if np.linalg.norm(t) < 1e-6:
        t = np.array([1.0, 0.0, 0.0]) if abs(a[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        t -= t.dot(a) * a
    t /= np.linalg.norm(t)
    return np.stack([a, t, np.cross(a, t)], axis=1)


def _smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-sd Gaussian noise smoothed with ``sigma`` voxels (coarse grid for large sigma)."""
    step = max(1, int(sigma // 2))
    cshape = tuple(-(-s // step) + 1 for s in shape)
    n = rng.standard_normal(cshape).astype(np.float32)
    n = ndimage.gaussian_filter(n, sigma / step, mode="wrap")
    if step > 1:
        n = ndimage.zoom(n, step, order=1, grid_mode=False)
    n = n[tuple(slice(0, s) for s in shape)].astype(np.float64)
    n -= n.mean()
    sd = n.std()
    return n / sd if sd > 0 else n


def _coarse_edt(mask: np.ndarray, step: int = 2, pad: bool = False, return_indices: bool = False):
    """Euclidean distance (mm) from mask voxels to the nearest non-mask voxel, on a grid coarsened
    by ``step`` (``pad``: whether beyond the array counts as mask). With ``return_indices`` also the
    coarse nearest-zero index map ``(3, x, y, z)`` in full-grid voxel units (look up at ``ijk // step``).
    """
    small = np.pad(mask[::step, ::step, ::step], 1, constant_values=pad)
    if return_indices:
        d, idx = ndimage.distance_transform_edt(small, sampling=step, return_indices=True)
        idx = (idx[:, 1:-1, 1:-1, 1:-1] - 1) * step
    else:
        d = ndimage.distance_transform_edt(small, sampling=step)
    d = d[1:-1, 1:-1, 1:-1]
    big = d.repeat(step, 0).repeat(step, 1).repeat(step, 2)[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    big = np.where(mask, big, 0.0).astype(np.float32)
    return (big, idx) if return_indices else big


def _feret(points: np.ndarray) -> float:
    """Largest distance between two voxel centres, plus one voxel."""
    if len(points) == 1:
        return 1.0
    pts = points.astype(np.float64)
    if len(pts) > 8:
        try:
            pts = pts[ConvexHull(pts, qhull_options="QJ").vertices]
        except Exception:  # degenerate hull: fall back to all points (few, flat)
            pass
    return float(pdist(pts).max()) + 1.0


def _measure(mask: np.ndarray) -> tuple[int, float]:
    """(number of 26-connected components, Feret diameter of the largest one)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return 0, 0.0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    big = int(np.argmax(sizes))
    sl = ndimage.find_objects(labels, max_label=big)[big - 1]
    comp = labels[sl] == big
    surface = comp & ~ndimage.binary_erosion(comp)
    pts = np.argwhere(surface if surface.any() else comp)
    return n, _feret(pts)


# --------------------------------------------------------------------------------------------
# the painting context


class _Roi:
    def __init__(self, shape, centre, half):
        lo = [max(0, int(math.floor(c - h))) for c, h in zip(centre, half)]
        hi = [min(s, int(math.ceil(c + h)) + 1) for s, c, h in zip(shape, centre, half)]
        hi = [max(h, l_ + 1) for l_, h in zip(lo, hi)]
        self.sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        self.shape = tuple(b - a for a, b in zip(lo, hi))
        self.origin = np.array(lo, dtype=np.float64)
        self.grids = tuple(
            np.arange(a, b, dtype=np.float64).reshape([-1 if i == ax else 1 for i in range(3)])
            for ax, (a, b) in enumerate(zip(lo, hi))
        )


class _Ctx:
    def __init__(self, image, tissue, contrast, rng):
        self.src = np.asarray(image, dtype=np.float32)
        if self.src.ndim != 3:
            raise ValueError(f"image must be 3D; got shape {self.src.shape}")
        self.tissue = np.asarray(tissue, dtype=np.float32)
        st = tissue_stats(self.src, self.tissue)
        self.c = st.contrast
        self.sigma = st.noise_sd
        self.tol = st.tolerance
        self.contrast = contrast
        self.s = _SIGN[contrast]
        self.wm, self.gm = st.wm, st.gm
        self.csf = st.csf if np.isfinite(st.csf) else st.wm + _FLUID_SIGN[contrast] * self.c
        self.rng = rng
        self.shape = self.src.shape
        self.tsum = self.tissue.sum(0)
        self.brain = self.tsum > 0.5
        if not self.brain.any():
            raise ValueError("no brain: tissue.sum(0) > 0.5 nowhere")
        xs = np.flatnonzero(self.brain.any(axis=(1, 2)))
        self.x_mid = 0.5 * (xs[0] + xs[-1])
        mus = (self.csf, self.gm, self.wm)
        self.floor = 0.25 * min(mus) if (float(self.src.min()) >= 0 and min(mus) > 0) else -np.inf
        self.out = self.src.copy()
        self._hdepth = None
        self._depth = None
        self._xcoord = np.arange(self.shape[0], dtype=np.float32)[:, None, None]

    # ---- maps
    @property
    def depth(self) -> np.ndarray:
        """Distance (mm) from each brain voxel to the outside of the brain."""
        if self._depth is None:
            self._depth = _coarse_edt(self.brain)
        return self._depth

    @property
    def hdepth(self) -> np.ndarray:
        """Distance (mm) to the outside of the brain or to the midline plane."""
        if self._hdepth is None:
            self._hdepth = _coarse_edt(self.brain & (np.abs(self._xcoord - self.x_mid) >= 1.0))
        return self._hdepth

    def side_mask(self, side: float) -> np.ndarray:
        return (self._xcoord - self.x_mid) * side > 0

    @property
    def parenchyma(self) -> np.ndarray:
        return (self.tissue[1] + self.tissue[2]) > 0.5

    def water(self, k: float) -> float:
        """WM moved k contrast units towards 'more water' (oedema, gliosis, infarct)."""
        return max(self.wm + self.s * k * self.c, self.floor)

    def level(self, v: float) -> float:
        return max(v, self.floor)

    # ---- placement
    def pick(self, cand: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(cand)
        i = idx[self.rng.integers(len(idx))]
        return np.array(np.unravel_index(i, self.shape), dtype=np.float64) + self.rng.uniform(-0.5, 0.5, 3)

    def choose(self, base: np.ndarray, min_depth: float, depth: np.ndarray | None = None) -> np.ndarray:
        """A random voxel of ``base`` at least ``min_depth`` deep (relaxed until some exist)."""
        depth = self.hdepth if depth is None else depth
        if not (base & self.brain).any():
            base = self.brain
        base = base & self.brain
        for frac in (1.0, 0.8, 0.6, 0.45, 0.3):
            cand = base & (depth >= min_depth * frac)
            if cand.any():
                return self.pick(cand)
        d = np.where(base, depth, -1.0)
        return self.pick(d >= d.max() * 0.9)

    # ---- painting
    def roi(self, centre, half) -> _Roi:
        half = np.broadcast_to(np.asarray(half, dtype=np.float64), (3,))
        return _Roi(self.shape, centre, half)

    def factors(self, roi: _Roi, side: float | None) -> np.ndarray:
        """Fade to 0 at the brain boundary (tissue sum 0.5) and, for a side, at the midline."""
        f = _smoothstep((self.tsum[roi.sl].astype(np.float64) - 0.5) / 0.4)
        if side is not None:
            f = f * _smoothstep((side * (roi.grids[0] - self.x_mid) - 0.5) / 2.0)
        return f

    def model(self, tis: np.ndarray) -> np.ndarray:
        return tis[0] * self.csf + tis[1] * self.gm + tis[2] * self.wm

    def mass_effect(self, roi: _Roi, centre, radius: float, amp: float):
        """Radial push away from ``centre``: |u| = amp*r/R inside R, decaying to 0 at 2R.

        Only the tissue model moves (noise stays in place). Returns warped tissue and the
        resulting intensity change.
        """
        tis = self.tissue[(slice(None),) + roi.sl].astype(np.float64)
        d = [g - c for g, c in zip(roi.grids, centre)]
        r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        g = np.where(r <= radius, r / radius, np.clip((2 * radius - r) / radius, 0, 1) ** 2)
        inside = ndimage.gaussian_filter(self.brain[roi.sl].astype(np.float32), 2.0)
        u = amp * g * _smoothstep((inside - 0.5) / 0.4) / np.maximum(r, 1e-6)
        coords = np.stack(
            [np.broadcast_to(roi.grids[i] - u * d[i] - roi.origin[i], roi.shape) for i in range(3)]
        )
        warped = np.stack([ndimage.map_coordinates(t, coords, order=1, mode="nearest") for t in tis])
        return warped, self.model(warped) - self.model(tis)

    def tissue_roi(self, roi: _Roi) -> np.ndarray:
        return self.tissue[(slice(None),) + roi.sl].astype(np.float64)

    def paint(self, roi: _Roi, layers, side: float | None, tis=None, d_mass=None) -> None:
        """Blend layers (weight, target, texture amplitude) into the output, in order.

        Inside a layer the value is ``target + residual + texture``: the residual (image minus its
        tissue model, clipped at 3 noise sd) keeps the image's own noise in the lesion.
        """
        I = self.src[roi.sl].astype(np.float64)
        tis = self.tissue_roi(roi) if tis is None else tis
        resid = np.clip(I - self.model(self.tissue_roi(roi)), -3 * self.sigma, 3 * self.sigma)
        J = self.out[roi.sl].astype(np.float64)
        if d_mass is not None:
            J = J + d_mass
        f = self.factors(roi, side)
        for w, target, tex in layers:
            w = w * f
            val = target + resid
            if tex > 0:
                val = val + tex * np.clip(_smooth_noise(roi.shape, 1.5, self.rng), -3, 3)
            J += w * (val - J)
        self.out[roi.sl] = J.astype(np.float32)

    def blob(self, roi: _Roi, centre, radii, rot, irregular: float, edge: float, sigma=None):
        """Soft irregular ellipsoid: ramp(radial distance to the ellipsoid + irregular*noise)."""
        radii = np.asarray(radii, dtype=np.float64)
        d = [g - c for g, c in zip(roi.grids, centre)]
        q = [(rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2]) / radii[i] for i in range(3)]
        rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
        dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        sd = np.where(rho > 1e-6, dist * (1 - rho) / np.maximum(rho, 1e-6), radii.min())
        if irregular > 0:
            if sigma is None:
                sigma = float(np.clip(0.35 * radii.mean(), 1.0, 6.0))
            sd = sd + irregular * np.clip(_smooth_noise(roi.shape, sigma, self.rng), -2.5, 2.5)
        return _ramp(sd, edge)

    @staticmethod
    def fractions(tis: np.ndarray):
        """(parenchyma fraction of the tissue, WM fraction of the parenchyma)."""
        par = tis[1] + tis[2]
        return par / np.maximum(tis.sum(0), 1e-6), tis[2] / np.maximum(par, 1e-6)


def _nominal_radius(diameter: float, edge: float, irregular: float) -> float:
    """Ellipsoid semi-axis whose changed region spans about ``diameter``."""
    return max(diameter / 2 - 0.8 * edge - 1.5 * irregular - 0.5, 0.3 * diameter)


def _axes(rng, r_max: float, lo: float, hi: float) -> np.ndarray:
    return r_max * np.array([1.0, rng.uniform(lo, hi), rng.uniform(lo, hi)])


# --------------------------------------------------------------------------------------------
# kinds


def _tumour(ctx: _Ctx) -> None:
    rng, c = ctx.rng, ctx.c
    side = float(rng.choice([-1.0, 1.0]))
    D = rng.uniform(*SIZE_RANGE_MM["tumour"])
    edge = rng.uniform(1.5, 3.0)
    irr = rng.uniform(0.06, 0.12) * D / 2
    radii = _axes(rng, _nominal_radius(D, edge, irr), 0.65, 1.0)
    centre = ctx.choose((ctx.tissue[2] > 0.5) & ctx.side_mask(side), 0.9 * radii[1:].mean())
    rot = _rotation(rng)
    roi = ctx.roi(centre, radii.max() + 2.5 * irr + edge + 2)
    r_mass = 0.5 * radii.min()  # displacement vanishes at 2 * r_mass: inside the envelope
    tis, d_mass = ctx.mass_effect(roi, centre, r_mass, min(rng.uniform(0.15, 0.35) * r_mass, 6.0))
    par, wmf = ctx.fractions(tis)
    w_oed = ctx.blob(roi, centre, radii, rot, irr, edge) * par * (0.3 + 0.7 * wmf)
    k_oed = rng.uniform(1.5, 2.4)
    layers = [(w_oed, ctx.water(k_oed), 0.12 * k_oed * c)]
    fc = rng.uniform(0.4, 0.65)
    r_core = radii * fc
    w_core = ctx.blob(roi, centre, r_core, rot, 0.1 * r_core.mean(), rng.uniform(1.0, 2.0))
    enhancing = rng.random() < 0.5
    if ctx.contrast == "t1":
        k_solid = rng.uniform(0.6, 1.2) if enhancing else -rng.uniform(0.8, 1.3)
        solid = ctx.level(ctx.wm + k_solid * c)  # enhancing rim bright, else hypointense
    else:
        k_solid = rng.uniform(0.8, 1.4)
        solid = ctx.water(k_solid)
    layers.append((w_core, solid, 0.15 * abs(k_solid) * c))
    if rng.random() < 0.75:  # necrotic core, CSF-like (FLAIR: partly suppressed)
        r_nec = r_core * rng.uniform(0.4, 0.7)
        w_nec = ctx.blob(roi, centre, r_nec, rot, 0.1 * r_nec.mean(), rng.uniform(0.8, 1.5))
        mix = 0.5 if ctx.contrast == "flair" else 0.1
        nec = ctx.level(ctx.csf + mix * (ctx.wm - ctx.csf))
        layers.append((w_nec, nec, 0.1 * abs(nec - ctx.wm)))
    ctx.paint(roi, layers, side, tis, d_mass)


def _haemorrhage(ctx: _Ctx) -> None:
    rng, c = ctx.rng, ctx.c
    side = float(rng.choice([-1.0, 1.0]))
    D = rng.uniform(*SIZE_RANGE_MM["haemorrhage"])
    edge = rng.uniform(1.0, 2.0)
    irr = rng.uniform(0.05, 0.1) * D / 2
    radii = _axes(rng, _nominal_radius(D, edge, irr), 0.7, 1.0)
    centre = ctx.choose(ctx.parenchyma & ctx.side_mask(side), 0.9 * radii[1:].mean())
    rot = _rotation(rng)
    roi = ctx.roi(centre, radii.max() + 2.5 * irr + edge + 2)
    r_mass = 0.5 * radii.min()  # displacement vanishes at 2 * r_mass: inside the envelope
    tis, d_mass = ctx.mass_effect(roi, centre, r_mass, min(rng.uniform(0.15, 0.3) * r_mass, 5.0))
    par, _ = ctx.fractions(tis)
    k_oed = rng.uniform(1.3, 2.0)
    layers = [(ctx.blob(roi, centre, radii, rot, irr, edge) * par, ctx.water(k_oed), 0.1 * k_oed * c)]
    r_hae = radii * rng.uniform(0.7, 0.85)
    w_hae = ctx.blob(roi, centre, r_hae, rot, 0.08 * r_hae.mean(), rng.uniform(0.8, 1.5))
    bright, dark, rim = {
        "t1": ((0.6, 1.5), (-1.0, -0.5), None),
        "t2": ((2.0, 3.0), (-2.0, -1.0), (-2.5, -1.5)),
        "flair": ((1.5, 2.5), (-1.5, -0.8), (-2.0, -1.2)),
        "pd": ((1.0, 2.0), (-1.5, -0.8), (-1.8, -1.0)),
    }[ctx.contrast]
    kb, kd = rng.uniform(*bright), rng.uniform(*dark)
    # heterogeneous haematoma: smooth mixture of a bright and a dark component
    frac_bright = rng.uniform(0.5, 0.8) if ctx.contrast == "t1" else rng.uniform(0.3, 0.6)
    n = _smooth_noise(roi.shape, rng.uniform(2.0, 3.5), rng)
    m = _smoothstep((n - (0.5 - frac_bright) * 2.5 + 1.0) / 2.0)
    core = np.maximum(m * (ctx.wm + kb * c) + (1 - m) * (ctx.wm + kd * c), ctx.floor)
    if rim is None:
        layers.append((w_hae, core, 0.1 * kb * c))
    else:  # dark haemosiderin/deoxyhaemoglobin rim, then the heterogeneous core inside it
        kr = rng.uniform(*rim)
        layers.append((w_hae, ctx.level(ctx.wm + kr * c), 0.1 * abs(kr) * c))
        thick = rng.uniform(1.5, 3.0)
        r_in = np.maximum(r_hae - thick, 0.5)
        w_in = ctx.blob(roi, centre, r_in, rot, 0.05 * r_in.mean(), 1.0)
        layers.append((w_in, core, 0.1 * kb * c))
    ctx.paint(roi, layers, side, tis, d_mass)


def _metastases(ctx: _Ctx) -> None:
    rng, c = ctx.rng, ctx.c
    n = int(rng.integers(2, 7))
    gm, wm = ctx.tissue[1], ctx.tissue[2]
    junction = (wm > 0.5) & ndimage.binary_dilation(gm > 0.5, iterations=2)
    if not junction.any():
        junction = (gm > 0.2) & (wm > 0.2)
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(n):
        D = rng.uniform(*SIZE_RANGE_MM["metastases"])
        edge = rng.uniform(0.7, 1.2)
        irr = 0.05 * D / 2
        r = _nominal_radius(D, edge, irr)
        base = junction if (rng.random() < 0.75 and junction.any()) else ctx.parenchyma
        centre = None
        for _try in range(40):
            cand = ctx.choose(base, 0.7 * r)
            if all(np.linalg.norm(cand - p) > r + q + 4.0 for p, q in placed):
                centre = cand
                break
        if centre is None:
            continue
        placed.append((centre, r))
        side = 1.0 if centre[0] > ctx.x_mid else -1.0
        radii = _axes(rng, r, 0.8, 1.0)
        rot = _rotation(rng)
        roi = ctx.roi(centre, r + 2.5 * irr + edge + 2)
        tis = ctx.tissue_roi(roi)
        par, _ = ctx.fractions(tis)
        k_oed = rng.uniform(1.4, 2.2)
        layers = [(ctx.blob(roi, centre, radii, rot, irr, edge) * par, ctx.water(k_oed), 0.1 * k_oed * c)]
        r_core = radii * rng.uniform(0.55, 0.8)
        w_core = ctx.blob(roi, centre, r_core, rot, 0.05 * r_core.mean(), 0.8)
        if ctx.contrast == "t1":
            k_core = rng.uniform(0.5, 1.2) if rng.random() < 0.5 else -rng.uniform(0.3, 0.8)
            core = ctx.level(ctx.wm + k_core * c)  # enhancing, or iso/hypointense
        else:
            k_core = rng.uniform(0.6, 1.3)
            core = ctx.water(k_core)
        layers.append((w_core, core, 0.12 * abs(k_core) * c))
        ctx.paint(roi, layers, side, tis)


def _stroke(ctx: _Ctx) -> None:
    rng, c = ctx.rng, ctx.c
    side = float(rng.choice([-1.0, 1.0]))
    hemi = ctx.brain & ctx.side_mask(side)
    D = rng.uniform(*SIZE_RANGE_MM["stroke"])
    theta = math.radians(rng.uniform(22.0, 40.0))  # half-angle of the sector
    edge = rng.uniform(1.0, 2.0)
    irr = rng.uniform(1.0, 2.5)
    # sector radius giving a changed region about D across (apex to cortex, or rim chord)
    L = (D - 0.8 * edge - 1.5 * irr - 1.0) / max(1.0, 2.0 * math.sin(theta))
    # a cortical point, the sector opening towards it from an apex deep in the hemisphere
    away = np.abs(ctx._xcoord - ctx.x_mid) >= 6.0
    P = ctx.choose((ctx.tissue[1] > 0.5) & hemi & away & (ctx.depth <= 8.0), 0.0)
    H = np.array(ndimage.center_of_mass(hemi))
    axis = H - P
    if np.linalg.norm(axis) < 1e-3:
        axis = np.array([-side, 0.0, 0.0])
    out_dir = -axis / np.linalg.norm(axis)
    apex = P - out_dir * (L - 3.0)
    frame = _frame(out_dir, rng)
    rim = [apex, apex + out_dir * L]
    for phi in np.linspace(0, 2 * np.pi, 12, endpoint=False):
        rim.append(apex + L * (math.cos(theta) * out_dir
                               + math.sin(theta) * (math.cos(phi) * frame[:, 1] + math.sin(phi) * frame[:, 2])))
    rim = np.array(rim)
    lo, hi = rim.min(0) - (edge + 2.5 * irr + 2), rim.max(0) + (edge + 2.5 * irr + 2)
    roi = ctx.roi((lo + hi) / 2, (hi - lo) / 2)
    d = [g - a for g, a in zip(roi.grids, apex)]
    t = d[0] * out_dir[0] + d[1] * out_dir[1] + d[2] * out_dir[2]
    dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    perp = np.sqrt(np.maximum(dist ** 2 - t ** 2, 0.0))
    sd = np.minimum(t * math.sin(theta) - perp * math.cos(theta), L - dist)
    sd = sd + irr * np.clip(_smooth_noise(roi.shape, 4.0, rng), -2.5, 2.5)
    tis = ctx.tissue_roi(roi)
    par, _ = ctx.fractions(tis)
    k = rng.uniform(0.9, 1.6) if ctx.contrast == "t1" else rng.uniform(1.2, 2.0)
    target = np.maximum(ctx.model(tis) / np.maximum(tis.sum(0), 1e-6) + ctx.s * k * c, ctx.floor)
    ctx.paint(roi, [(_ramp(sd, edge) * par, target, 0.12 * k * c)], side, tis)


def _ms(ctx: _Ctx) -> None:
    rng, c = ctx.rng, ctx.c
    wm = ctx.tissue[2] > 0.5
    vent = (ctx.tissue[0] > 0.5) & (ctx.depth > 0.35 * float(ctx.depth.max()))
    if np.count_nonzero(vent) >= 10:
        dv, idx = _coarse_edt(~vent, pad=True, return_indices=True)
    else:  # no ventricles: radiate from the brain's centre
        dv, idx = None, None
        centre_b = np.array(ndimage.center_of_mass(ctx.brain))
    n = int(rng.integers(4, 16))
    sides = [-1.0, 1.0] + [float(rng.choice([-1.0, 1.0])) for _ in range(n - 2)]
    placed: list[tuple[np.ndarray, float]] = []
    for side in sides:
        Ld = rng.uniform(*SIZE_RANGE_MM["ms"])
        edge = rng.uniform(0.5, 0.8)
        r = max(Ld / 2 - 0.8 * edge - 0.2, 0.8)
        hemi = wm & ctx.side_mask(side)
        if dv is not None:
            band = hemi & (dv >= 1.0) & (dv <= 8.0)
            if not band.any():
                band = hemi & (dv <= 15.0)
        else:
            band = hemi & (ctx.depth >= 0.5 * float(ctx.depth.max()))
        centre = None
        for _try in range(40):
            cand = ctx.choose(band, 0.5 * r)
            if all(np.linalg.norm(cand - p) > r + q + 2.0 for p, q in placed):
                centre = cand
                break
        if centre is None:
            continue
        placed.append((centre, r))
        ijk = tuple(int(np.clip(round(v), 0, s - 1)) for v, s in zip(centre, ctx.shape))
        if idx is not None:
            nearest = idx[(slice(None),) + tuple(i // 2 for i in ijk)].astype(np.float64)
        else:
            nearest = centre_b
        axis = centre - nearest
        if np.linalg.norm(axis) < 1e-3:
            axis = rng.standard_normal(3)
        rot = _frame(axis, rng)  # long axis perpendicular to the ventricular wall
        radii = r * np.array([1.0, rng.uniform(0.4, 0.7), rng.uniform(0.4, 0.7)])
        radii = np.maximum(radii, 0.8)
        roi = ctx.roi(centre, r + edge + 2)
        tis = ctx.tissue_roi(roi)
        par, _ = ctx.fractions(tis)
        k = -rng.uniform(0.3, 1.0) if ctx.contrast == "t1" else rng.uniform(1.3, 2.3)
        w = ctx.blob(roi, centre, radii, rot, 0.08 * radii.min(), edge) * par
        ctx.paint(roi, [(w, ctx.level(ctx.wm + k * c), 0.1 * abs(k) * c)], side, tis)


def _small(ctx: _Ctx) -> None:
    rng, c = ctx.rng, ctx.c
    D = rng.uniform(*SIZE_RANGE_MM["small"])
    edge = rng.uniform(0.8, 1.2)
    irr = 0.08 * D / 2
    r = D / 2 - 0.2 * edge - irr - 0.3  # low contrast: the mask stops inside the ramp
    radii = _axes(rng, r, 0.75, 1.0)
    side = float(rng.choice([-1.0, 1.0]))
    centre = ctx.choose(ctx.parenchyma & ctx.side_mask(side), r + 1.0)
    roi = ctx.roi(centre, r + 2.5 * irr + edge + 2)
    tis = ctx.tissue_roi(roi)
    par, _ = ctx.fractions(tis)
    k = rng.uniform(0.10, 0.25)  # fraction of the GM/WM contrast: the hard case
    base = ctx.model(tis) / np.maximum(tis.sum(0), 1e-6)
    w = ctx.blob(roi, centre, radii, _rotation(rng), irr, edge) * par
    ctx.paint(roi, [(w, base + ctx.s * k * c, 0.1 * k * c)], side, tis)


def _bilateral(ctx: _Ctx) -> None:
    rng, c = ctx.rng, ctx.c
    D = rng.uniform(*SIZE_RANGE_MM["bilateral"])
    edge = rng.uniform(1.0, 2.0)
    irr = rng.uniform(0.05, 0.1) * D / 2
    radii = _axes(rng, _nominal_radius(D, edge, irr), 0.7, 1.0)
    side = float(rng.choice([-1.0, 1.0]))
    need = 0.9 * radii[1:].mean()
    # the first centre must have a deep-enough mirror partner in the other hemisphere
    xs = np.arange(ctx.shape[0])
    mirror_x = np.clip(np.round(2 * ctx.x_mid - xs).astype(int), 0, ctx.shape[0] - 1)
    ok_mirror = (ctx.hdepth[mirror_x] >= need * 0.6) & ctx.parenchyma[mirror_x]
    centre = ctx.choose(ctx.parenchyma & ctx.side_mask(side) & ok_mirror, need)
    rot = _rotation(rng)
    k = rng.uniform(1.2, 2.2)
    flip = np.diag([-1.0, 1.0, 1.0])
    for cen, sd in ((centre, side), (None, -side)):
        if cen is None:  # near-mirror partner: mirrored centre + jitter, slightly different size
            cen = np.array([2 * ctx.x_mid - centre[0], centre[1], centre[2]]) + np.clip(
                rng.normal(0, 1.5, 3), -3, 3)
            cen[0] = ctx.x_mid + sd * max(abs(cen[0] - ctx.x_mid), 2.0)
            rad = radii * rng.uniform(0.85, 1.15, 3)
            rt = flip @ rot
            kk = k * rng.uniform(0.85, 1.15)
        else:
            rad, rt, kk = radii, rot, k
        roi = ctx.roi(cen, rad.max() + 2.5 * irr + edge + 2)
        tis = ctx.tissue_roi(roi)
        par, _ = ctx.fractions(tis)
        w = ctx.blob(roi, cen, rad, rt, irr, edge) * par
        ctx.paint(roi, [(w, ctx.water(kk), 0.12 * kk * c)], sd, tis)


def _atrophy(ctx: _Ctx) -> None:
    rng = ctx.rng
    idx = np.argwhere(ctx.brain)
    lo, hi = np.maximum(idx.min(0) - 3, 0), np.minimum(idx.max(0) + 4, ctx.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    tis = ctx.tissue[(slice(None),) + sl].astype(np.float64)
    csf, gm, wm = tis
    # sulcal widening: GM next to CSF turns into CSF, with a regionally varying severity
    f = rng.uniform(0.3, 0.6)
    severity = np.clip(0.65 + 0.35 * _smooth_noise(csf.shape, 12.0, rng), 0.2, 1.0)
    prox = ndimage.gaussian_filter((csf > 0.5).astype(np.float32), 1.2).astype(np.float64)
    d_gm = f * severity * gm * np.clip(2.5 * prox, 0.0, 1.0)
    new_csf, new_gm, new_wm = csf + d_gm, gm - d_gm, wm.copy()
    # ventricular enlargement: parenchyma within `dil` mm of the ventricles turns into CSF
    depth = ctx.depth[sl]
    vent = (csf > 0.5) & (depth > 0.35 * float(ctx.depth.max()))
    if np.count_nonzero(vent) >= 10:
        dil = rng.uniform(1.5, 4.0)
        vi = np.argwhere(vent)
        m = int(math.ceil(dil)) + 3
        vlo, vhi = np.maximum(vi.min(0) - m, 0), np.minimum(vi.max(0) + m + 1, vent.shape)
        vs = tuple(slice(a, b) for a, b in zip(vlo, vhi))
        dv = ndimage.distance_transform_edt(~vent[vs])
        ramp = np.where(vent[vs], 0.0, _smoothstep(dil + 0.5 - dv))
        new_csf[vs] += ramp * (new_gm[vs] + new_wm[vs])
        new_gm[vs] *= 1 - ramp
        new_wm[vs] *= 1 - ramp
    d_img = (new_csf - csf) * ctx.csf + (new_gm - gm) * ctx.gm + (new_wm - wm) * ctx.wm
    f_brain = _smoothstep((ctx.tsum[sl].astype(np.float64) - 0.5) / 0.4)
    ctx.out[sl] = (ctx.out[sl].astype(np.float64) + d_img * f_brain).astype(np.float32)


_KINDS = {
    "tumour": _tumour,
    "metastases": _metastases,
    "stroke": _stroke,
    "ms": _ms,
    "haemorrhage": _haemorrhage,
    "small": _small,
    "bilateral": _bilateral,
    "atrophy": _atrophy,
}


def insert_lesion(
    image: np.ndarray, tissue: np.ndarray, contrast: str, kind: str, rng: np.random.Generator
) -> Lesion:
    """Insert one synthetic lesion of ``kind`` into a healthy volume (deterministic given ``rng``).

    ``image`` (X, Y, Z) any scale/contrast, ``tissue`` (3, X, Y, Z) CSF/GM/WM probabilities,
    ``contrast`` in ``CONTRASTS``. The inputs are not modified. Raises ``ValueError`` on an unknown
    kind/contrast, mismatched shapes or no brain.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown lesion kind {kind!r}; expected one of {LESION_KINDS}")
    contrast = str(contrast).lower()
    if contrast not in _SIGN:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
    for _attempt in range(5):
        ctx = _Ctx(image, tissue, contrast, rng)
        _KINDS[kind](ctx)
        out, src, tol = ctx.out, ctx.src, ctx.tol
        out[~ctx.brain] = src[~ctx.brain]
        diff = np.abs(out.astype(np.float64) - src)
        # no voxel within float32 rounding of the tolerance: revert those (change <= tol anyway)
        band = (diff > tol * (1 - 1e-5)) & (diff <= tol * (1 + 1e-5))
        if band.any():
            out[band] = src[band]
            diff[band] = 0.0
        mask = diff > tol
        if mask.any():
            break
    else:
        raise RuntimeError(f"could not insert a visible {kind} lesion into this image")
    n, diam = _measure(mask)
    return Lesion(
        image=out,
        mask=mask,
        kind=kind,
        volume_ml=float(np.count_nonzero(mask)) / 1000.0,
        max_diameter_mm=diam,
        n_components=n,
        tolerance=float(tol),
        contrast_ratio=float(diff[mask].mean() / ctx.c),
    )
