"""Does another study-level aggregation of the same maps separate healthy from lesion studies better?

Scores virtual-cohort studies (SYNTHETIC, the ``development`` stream, never used for reported
figures; every anatomy with every contrast, as in the evaluation suite) and compares, by AUROC,
the shipped study score (mean of the top-3 slice scores) with whole-volume statistics of the
standardised voxel map (mean of its k highest voxels, fraction of voxels above t).

    .venv/bin/python scripts/study_aggregation.py --healthy 16 --lesion 24
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from brainmirror.anatomies import ANATOMIES
from brainmirror.cohort import CONTRASTS, make_subject, subject_rng
from brainmirror.detector import Detector
from brainmirror.slicing import slice_volume
from brainmirror.study_statistic import CONFIGURATIONS, study_score
from brainmirror.lesions import LESION_KINDS
from brainmirror.preprocess import canonicalise

FIRST_HEALTHY, FIRST_LESION = 600, 700  # development-stream indices used here, apart from other development work


def aggregations(detector: Detector, image) -> dict[str, float]:
    slices = slice_volume(canonicalise(image))
    maps = detector.reconstruct(slices)
    per_slice = detector.slice_scores(slices, maps, detector.embed(maps))
    voxels = np.sort(maps.voxel_score[slices.mask])
    values = {f"top-3 slices {c}": study_score(per_slice[c]) for c in CONFIGURATIONS}
    values |= {f"top {k} voxels": float(voxels[-k:].mean()) for k in (50, 200, 1000, 5000)}
    values |= {f"fraction > {t}": float((voxels > t).mean()) for t in (3, 5, 8)}
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/brainmirror"), help="model bundle")
    parser.add_argument("--healthy", type=int, default=16, help="healthy studies (default 16)")
    parser.add_argument("--lesion", type=int, default=24, help="lesion studies, lesion kinds cycled (default 24)")
    args = parser.parse_args()

    detector = Detector.load(args.model)
    combinations = list(itertools.product(ANATOMIES, CONTRASTS))
    plan = [(FIRST_HEALTHY + i, None) for i in range(args.healthy)]
    plan += [(FIRST_LESION + i, LESION_KINDS[i % len(LESION_KINDS)]) for i in range(args.lesion)]
    labels, rows = [], []
    for index, kind in tqdm(plan, desc="studies", unit="study"):
        anatomy, contrast = combinations[index % len(combinations)]
        subject = make_subject(anatomy, subject_rng("development", index), contrast, kind)
        labels.append(int(kind is not None))
        rows.append(aggregations(detector, subject.image))
    print(f"\nAUROC, {args.healthy} healthy vs {args.lesion} lesion studies (development stream):")
    for name in rows[0]:
        print(f"  {name:28s} {roc_auc_score(labels, [r[name] for r in rows]):.3f}")


if __name__ == "__main__":
    main()
