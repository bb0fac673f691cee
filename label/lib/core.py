"""The brainmirror core as the label server uses it: load a study, assess it, order studies for
review, tell confirmed normals from confirmed abnormals, calibrate a copy of the shipped bundle.

No MONAI Label import here (the tasks in ``lib.infers``, ``lib.activelearning``, ``lib.scoring`` and
``lib.trainers`` are the glue), so the review rules can be tested without a server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from brainmirror.data import iter_studies
from brainmirror.detector import Detector
from brainmirror.slicing import Slices, slice_volume
from brainmirror.preprocess import PREPROCESSING_VERSION, Canonical, canonicalise
from brainmirror.result import Assessment
from brainmirror.training import calibrate

logger = logging.getLogger(__name__)

CONFIGURATION = "combined"
INFO_KEY = "brainmirror"  # image info key holding a study's latest assessment summary
SITE_PREFIX = "brainmirror-site-"
REPORT = "calibration-report.json"
NORMAL, ABNORMAL = "normal", "abnormal"


class NotAssessed(Exception):
    """A study brainmirror cannot assess; the message is one sentence for the user."""


class BundleError(Exception):
    """The active model bundle cannot be loaded (a set-up problem, not the study's)."""


# -- review rules (pure) ---------------------------------------------------------------------
def review_outcome(label: np.ndarray, label_info: dict[str, Any] | None = None) -> str:
    """What a radiologist's final label says about a study: ``normal`` or ``abnormal``.

    An explicit ``{"review": "normal" | "abnormal"}`` in the label's info wins. Otherwise an
    empty final label (every voxel 0: nothing abnormal kept or drawn) confirms the study normal,
    and a label with any region confirms it abnormal.
    """
    explicit = str((label_info or {}).get("review", "")).strip().lower()
    if explicit in (NORMAL, ABNORMAL):
        return explicit
    return ABNORMAL if np.any(np.asarray(label) != 0) else NORMAL


def review_order(scores: dict[str, float], threshold: float) -> list[dict[str, Any]]:
    """Studies ordered for review: smallest ``|score - threshold|`` first (ties by id).

    The threshold is the healthy-only quantile of confirmed-normal scores, so studies near it are
    those whose verdict is least certain and whose confirmation moves the recalibrated threshold;
    studies far below it are confidently normal and those far above confidently abnormal.
    Studies without a finite score are left out.
    """
    rows = [{"id": k, "score": float(v), "distance": abs(float(v) - threshold)}
            for k, v in scores.items() if v is not None and np.isfinite(v)]
    return sorted(rows, key=lambda r: (r["distance"], r["id"]))


def study_thresholds(metadata: dict) -> dict[str, float]:
    """The study (``combined``) and voxel thresholds of a bundle's metadata."""
    calibration = metadata.get("calibration", {})
    study = calibration.get("study", {}).get(CONFIGURATION, {})
    voxel = calibration.get("voxel", {})
    return {"study_threshold": study.get("threshold"), "study_fpr": study.get("fpr"),
            "voxel_threshold": voxel.get("threshold"), "voxel_fpr": voxel.get("fpr"),
            "n_studies": study.get("n_studies"), "study_fpr_upper_95": study.get("fpr_upper_95"),
            "data_source": calibration.get("data_source", "")}


# -- studies ---------------------------------------------------------------------------------
def load_study(uri: str | Path) -> nib.Nifti1Image:
    """The volume of a NIfTI file or of the one DICOM series in a folder."""
    path = Path(uri)
    if not path.exists():
        raise NotAssessed(f"the image {path.name} does not exist in the datastore")
    try:
        volumes = list(iter_studies(path))
    except Exception as error:  # unreadable input: say what, never a traceback
        raise NotAssessed(f"{path.name} cannot be read: {' '.join(str(error).split())[:300]}") from error
    if not volumes:
        raise NotAssessed(f"{path.name} holds no NIfTI volume or usable DICOM series")
    if len(volumes) > 1:
        raise NotAssessed(f"{path.name} holds {len(volumes)} volumes; a study here is one series")
    return volumes[0][1]


def study_key(uri: str | Path) -> str:
    """Identifies a study's content cheaply (path, sizes, modification times, preprocessing version)."""
    path = Path(uri)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parts = [f"{os.path.realpath(path)}|v{PREPROCESSING_VERSION}"]
    parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:20]


@dataclass
class Result:
    """One assessment as the server returns it."""

    assessment: Assessment
    image: nib.Nifti1Image
    summary: dict[str, Any]

    def label_image(self) -> nib.Nifti1Image:
        """The anomaly label map (1 = anomaly) on the image grid."""
        label = (np.asarray(self.assessment.segmentation) > 0).astype(np.uint8)
        out = nib.Nifti1Image(label, self.image.affine)
        out.set_qform(self.image.affine, code=1)
        out.set_sform(self.image.affine, code=1)
        return out


class Brainmirror:
    """The shipped bundle, its site-calibrated copies and a cache of canonical slices.

    The active bundle is the newest ``brainmirror-site-*`` folder in ``site_dir`` with a model in
    it, else the shipped bundle; it is reloaded when a newer one appears. The shipped bundle is
    only ever read.
    """

    def __init__(self, shipped: Path | str, site_dir: Path | str, cache_dir: Path | str):
        self.shipped = Path(shipped).resolve()
        self.site_dir = Path(site_dir).resolve()
        self.cache_dir = Path(cache_dir)
        if not (self.shipped / "configs" / "metadata.json").exists():
            raise FileNotFoundError(f"no brainmirror model bundle at {self.shipped} (missing configs/metadata.json)")
        self._lock = threading.Lock()
        self._detector: Detector | None = None
        self._loaded: Path | None = None

    # bundles
    def site_bundles(self) -> list[Path]:
        if not self.site_dir.is_dir():
            return []
        return sorted(p for p in self.site_dir.glob(f"{SITE_PREFIX}*")
                      if (p / "configs" / "metadata.json").exists() and p.resolve() != self.shipped)

    def active_bundle(self) -> Path:
        site = self.site_bundles()
        return site[-1] if site else self.shipped

    def detector(self) -> Detector:
        with self._lock:
            bundle = self.active_bundle()
            if self._detector is None or bundle != self._loaded:
                logger.info("brainmirror: loading bundle %s", bundle)
                try:
                    self._detector, self._loaded = Detector.load(bundle), bundle
                except (OSError, ValueError, KeyError, RuntimeError) as error:
                    raise BundleError(f"the model bundle {bundle} cannot be loaded: {error}") from error
            return self._detector

    def thresholds(self) -> dict[str, Any]:
        return study_thresholds(self.detector().metadata) | {"bundle": str(self.active_bundle())}

    # studies
    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / f"slices-{key}.npz"

    def _canonical(self, uri: str | Path) -> tuple[nib.Nifti1Image, Canonical, str]:
        image = load_study(uri)
        try:
            canonical = canonicalise(image)
        except ValueError as error:  # PreprocessingError and what the volume checks raise
            raise NotAssessed(f"{Path(uri).name} cannot be assessed: {error}") from error
        key = study_key(uri)
        path = self._cache_path(key)
        if not path.exists():
            slices = slice_volume(canonical)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, image=slices.image, mask=slices.mask, z=slices.z)
            tmp.replace(path)
        return image, canonical, key

    def assess(self, uri: str | Path) -> Result:
        """Assess one study with the active bundle."""
        clock = time.perf_counter()
        image, canonical, key = self._canonical(uri)
        detector = self.detector()
        try:
            assessment = detector.assess(canonical, CONFIGURATION)
        except ValueError as error:
            raise NotAssessed(f"{Path(uri).name} cannot be assessed: {error}") from error
        summary = {
            "verdict": assessment.verdict, "score": float(assessment.study_score),
            "threshold": float(assessment.threshold), "false_positive_rate": float(assessment.false_positive_rate),
            "voxel_threshold": float(assessment.voxel_threshold), "configuration": assessment.configuration,
            "findings": [{"label": f.label, "volume_ml": round(f.volume_ml, 2), "hemisphere": f.hemisphere,
                          "slice_range": list(f.slice_range), "peak_score": round(f.peak_score, 3)}
                         for f in assessment.findings],
            "brain_extraction": assessment.brain_extraction, "model_version": assessment.model_version,
            "bundle": str(self._loaded), "key": key, "seconds": round(time.perf_counter() - clock, 1),
        }
        return Result(assessment, image, summary)

    def slices(self, uri: str | Path) -> Slices:
        """Canonical slices of a study (cached by content, so calibration reuses assessments)."""
        path = self._cache_path(study_key(uri))
        if not path.exists():
            self._canonical(uri)
        with np.load(path) as data:
            return Slices(data["image"], data["mask"], data["z"])

    def score(self, uri: str | Path, cached: dict[str, Any] | None) -> dict[str, Any]:
        """The assessment summary of a study, reusing ``cached`` when it is of the same content."""
        if cached and cached.get("key") == study_key(uri) and ("score" in cached or "error" in cached):
            return cached
        try:
            return self.assess(uri).summary
        except NotAssessed as error:
            return {"error": str(error), "key": study_key(uri)}

    # calibration
    def calibrate_site(self, normals: dict[str, str], abnormal: list[str], not_assessed: dict[str, str],
                       source: str, study_fpr: float | None = None, voxel_fpr: float | None = None) -> dict[str, Any]:
        """Calibrate a copy of the shipped bundle on the confirmed-normal studies (id -> image uri)
        and write it as a new ``brainmirror-site-*`` bundle; return the report (old vs new)."""
        if len(normals) < 2:
            raise ValueError(f"calibration needs at least 2 studies confirmed normal, found {len(normals)} "
                             "(confirm a study normal by submitting an empty final label)")
        detector = Detector.load(self.shipped)
        shipped = study_thresholds(detector.metadata)
        active = self.thresholds()
        study_fpr = float(study_fpr or shipped["study_fpr"] or 0.05)
        voxel_fpr = float(voxel_fpr or shipped["voxel_fpr"] or 0.01)
        studies = [self.slices(uri) for uri in normals.values()]
        calibrate(detector, studies, study_fpr, voxel_fpr,
                  description=f"site: {len(studies)} studies confirmed normal in MONAI Label ({source})",
                  progress=False)
        self.site_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = self.site_dir / f"{SITE_PREFIX}{stamp}"
        n = 1
        while out.exists():
            n += 1
            out = self.site_dir / f"{SITE_PREFIX}{stamp}-{n}"
        if out.resolve() == self.shipped:
            raise ValueError("refusing to overwrite the shipped bundle")
        tmp = self.site_dir / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        detector.save(tmp)
        report = {
            "bundle": str(out), "calibrated_from": str(self.shipped), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "old": {k: active[k] for k in ("study_threshold", "voxel_threshold", "n_studies", "bundle")},
            "shipped": {k: shipped[k] for k in ("study_threshold", "voxel_threshold", "n_studies")},
            "new": {k: v for k, v in study_thresholds(detector.metadata).items() if k != "data_source"},
            "confirmed_normal": sorted(normals), "excluded_confirmed_abnormal": sorted(abnormal),
            "excluded_not_assessed": not_assessed,
        }
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        tmp.rename(out)
        logger.info("brainmirror: calibrated %s: study threshold %.3f -> %.3f, voxel %.3f -> %.3f",
                    out, report["old"]["study_threshold"], report["new"]["study_threshold"],
                    report["old"]["voxel_threshold"], report["new"]["voxel_threshold"])
        return report

    def latest_report(self) -> dict[str, Any]:
        site = self.site_bundles()
        path = site[-1] / REPORT if site else None
        return json.loads(path.read_text()) if path and path.exists() else {}
