"""Paired sensitivity: does a lesion raise a study's score above that of its own healthy twin?

Each lesion study of the virtual cohort (SYNTHETIC, the ``development`` stream, never used for
reported figures) is scored next to its healthy twin: the same anatomy, warp, contrast, bias,
pose, grid and noise, without the lesion. Between-subject variation cancels, so the fraction of
pairs in which the lesion study scores higher measures the detector's response to the lesion
alone (0.5: no response; 1.0: every lesion raises the score).

    .venv/bin/python scripts/paired_twins.py --pairs 4
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brainmirror.anatomies import ANATOMIES
from brainmirror.cohort import CONTRASTS, make_subject, subject_rng
from brainmirror.detector import CONFIGURATIONS, Detector, slice_volume
from brainmirror.lesions import FOCAL_KINDS
from brainmirror.preprocess import canonicalise

FIRST_INDEX = 200  # development-stream indices used here, apart from other development work


def study_scores(detector: Detector, image) -> dict[str, float]:
    slices = slice_volume(canonicalise(image))
    maps = detector.reconstruct(slices)
    per_slice = detector.slice_scores(slices, maps, detector.embed(maps))
    return {c: detector.study_score(per_slice[c]) for c in CONFIGURATIONS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/brainmirror"), help="model bundle")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per focal lesion kind (contrasts cycle)")
    parser.add_argument("--anatomy", default="mni", choices=ANATOMIES, help="default mni")
    args = parser.parse_args()

    detector = Detector.load(args.model)
    plan = list(itertools.product(FOCAL_KINDS, range(args.pairs)))
    higher = {c: [] for c in CONFIGURATIONS}
    for index, (kind, j) in enumerate(tqdm(plan, desc="pairs", unit="pair"), start=FIRST_INDEX):
        contrast = CONTRASTS[j % len(CONTRASTS)]
        subject = make_subject(args.anatomy, subject_rng("development", index), contrast, kind, twin=True)
        lesion, twin = study_scores(detector, subject.image), study_scores(detector, subject.healthy_twin)
        for c in CONFIGURATIONS:
            higher[c].append(lesion[c] > twin[c])
        tqdm.write(f"{kind:12s} {contrast:5s} {subject.meta['lesion_volume_ml']:6.1f} ml  "
                   + "  ".join(f"{c} {lesion[c]:6.2f} vs {twin[c]:6.2f}" for c in CONFIGURATIONS))
    print(f"\nlesion study scores above its healthy twin ({len(plan)} pairs, {args.anatomy} anatomy):")
    for c in CONFIGURATIONS:
        print(f"  {c:9s} {int(np.sum(higher[c]))} of {len(plan)} ({np.mean(higher[c]):.2f})")


if __name__ == "__main__":
    main()
