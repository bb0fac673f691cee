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


@dataclass(frozen=True)
class Resampling:
    """A series whose slice positions were put on a regular grid along the slice normal."""

    max_deviation_mm: float  # largest distance of a source slice from its grid position
    tolerance_mm: float  # the largest distance accepted (half the slice thickness)
    spacing_mm: float  # slice spacing of the regular grid
    slice_instances: tuple[str, ...]  # SOP Instance UID of the source slice of each grid slice, in grid order


@dataclass(frozen=True)
class SeriesReport:
    """What the SR says about the series assessed (or refused): which one, and how it was used."""

    description: str  # SeriesDescription ("" when absent)
    number: str  # SeriesNumber ("" when absent)
    contrast: str  # "T1", "T1 post-contrast", "T2", "FLAIR", "PD" or "unknown"
    resampling: Resampling | None = None  # set when the slices were put on a regular grid
    coverage: float | None = None  # fraction of a typical brain inside the field of view, once known
