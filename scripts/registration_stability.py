"""Registration stability: how far does a lesion move the rigid alignment of its study?

``preprocess.register_rigid`` samples every template brain voxel, so it is deterministic; what
remains is how much the pose depends on the image content. Each focal lesion study of the
virtual cohort (SYNTHETIC, ``development`` stream) is registered next to its healthy twin (the
same study without the lesion); the script prints the largest displacement, in mm, of the
corners of a brain-sized box between the two poses. Large values would mean that a lesion
shifts the whole canonical grid, the per-voxel healthy statistics and the mirror with it.

    .venv/bin/python scripts/registration_stability.py --studies 7
"""

from __future__ import annotations

import argparse

import numpy as np

from brainmirror.cohort import CONTRASTS, make_subject, subject_rng
from brainmirror.lesions import FOCAL_KINDS
from brainmirror.preprocess import extract_brain, register_rigid

FIRST_INDEX = 300  # development-stream indices used here, apart from other development work
BOX_MM = np.array([[x, y, z, 1.0] for x in (-70, 70) for y in (-100, 70) for z in (-50, 80)]).T


def corner_displacement(a: np.ndarray, b: np.ndarray) -> float:
    """Largest displacement (mm) of the box corners between two canonical-to-native transforms."""
    return float(np.abs((a - b) @ BOX_MM)[:3].max())


def pose(image) -> np.ndarray:
    data = np.asarray(image.get_fdata(dtype=np.float32))
    data = data - data.min()
    mask = extract_brain(image)
    return register_rigid(data * mask if mask is not None else data, image.affine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=7, help="lesion studies (kinds and contrasts cycle)")
    args = parser.parse_args()

    shifts = []
    for i in range(args.studies):
        kind, contrast = FOCAL_KINDS[i % len(FOCAL_KINDS)], CONTRASTS[i % len(CONTRASTS)]
        subject = make_subject("mni", subject_rng("development", FIRST_INDEX + i), contrast, kind, twin=True)
        shifts.append(corner_displacement(pose(subject.image), pose(subject.healthy_twin)))
        print(f"{kind:12s} {contrast:5s} {subject.meta['lesion_volume_ml']:6.1f} ml  "
              f"pose shift against the healthy twin: {shifts[-1]:5.2f} mm", flush=True)
    print(f"median {np.median(shifts):.2f} mm, max {np.max(shifts):.2f} mm over {len(shifts)} studies")


if __name__ == "__main__":
    main()
