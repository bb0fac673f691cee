"""What an assessment of one study returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Finding:
    """One connected anomaly region, in the native grid of the input series."""

    label: int  # segment number in the SEG (1-based)
    volume_ml: float
    hemisphere: str  # "left", "right" or "bilateral" (patient left/right)
    slice_range: tuple[int, int]  # first and last native slice index (0-based, inclusive)
    peak_score: float  # maximum voxel anomaly score inside the region
    centroid_ijk: tuple[float, float, float]  # native voxel coordinates


@dataclass
class Assessment:
    """The outcome for one study: verdict, scores and maps on the input's native grid.

    Native arrays are indexed like the input volume (``hd.Volume.array`` axes: slice, row, column).
    """

    verdict: str  # "abnormal" | "normal"
    study_score: float
    threshold: float  # study-level threshold the score is compared with
    false_positive_rate: float  # operating point the threshold was calibrated at (study level)
    voxel_threshold: float
    voxel_false_positive_rate: float
    configuration: str  # scoring configuration name (mse | symmetry | vae | combined)
    slice_scores: np.ndarray  # one score per native slice (NaN where no brain)
    anomaly_map: np.ndarray  # float32 voxel anomaly scores, native grid
    segmentation: np.ndarray  # uint8 labels (0 background, finding.label inside), native grid
    findings: list[Finding] = field(default_factory=list)
    brain_extraction: str = "deepbet"  # method that produced the brain mask
    model_version: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def is_abnormal(self) -> bool:
        return self.verdict == "abnormal"


@dataclass(frozen=True)
class NotAssessed:
    """A study brainmirror cannot assess, and why (one clear sentence)."""

    reason: str
    code: str  # short machine-readable reason, e.g. "no-suitable-series"
