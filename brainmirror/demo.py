"""Demo DICOM studies: a real anatomy (Colin27, Debian mricron-data) as an MR series.

SYNTHETIC: the anatomy is real, but the contrast remap, warp and any lesion are synthetic
(``brainmirror.cohort`` and ``brainmirror.lesions``). Colin27 is one of the training anatomies
(``anatomies.TRAINING_ANATOMIES``); the demo stream's warps and lesions are not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cohort import make_subject, subject_rng
from .dicom import write_mr_series

DEMO_STUDIES = {  # name -> (lesion kind or None, contrast, index in the demo stream)
    "tumour": ("tumour", "flair", 0),
    "normal": (None, "t1", 1),
}


def make_demo_study(out_dir: Path | str, name: str = "tumour") -> tuple[list[Path], np.ndarray | None]:
    """Write demo study ``name`` as a DICOM MR series; return the files and the lesion truth."""
    if name not in DEMO_STUDIES:
        raise ValueError(f"unknown demo study {name!r}; choose from {sorted(DEMO_STUDIES)}")
    kind, contrast, index = DEMO_STUDIES[name]
    anatomy = "colin"
    subject = make_subject(anatomy, subject_rng("demo", index), contrast=contrast, lesion_kind=kind,
                           acquisition="clean")
    paths = write_mr_series(
        subject.image, Path(out_dir), patient_id=f"BM-DEMO-{index + 1:03d}",
        patient_name=f"Demo^{name.capitalize()}", series_description=f"{contrast.upper()} 3D (synthetic demo)",
        study_description="MR BRAIN (brainmirror demo, synthetic)",
    )
    return paths, subject.lesion_mask
