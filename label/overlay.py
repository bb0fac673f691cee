"""Ask a running brainmirror MONAI Label server for its infer answer on one study and render the
anomaly label over the image (three orthogonal slices through the largest finding) to a PNG.

    .venv/bin/python label/overlay.py --server http://127.0.0.1:8000 --image <image id> --out overlay.png

Uses only the server's answer (label map and verdict, score and threshold) and the image the
server's datastore serves; runs with the main .venv (matplotlib, nibabel, requests).
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import gzip
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import requests


def parse_infer_answer(content_type: str, body: bytes) -> tuple[dict, bytes]:
    """The JSON params and the label file of a MONAI Label multipart infer answer."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    params, label = None, None
    for part in message.iter_parts():
        disposition = part.get("Content-Disposition", "")
        if 'name="params"' in disposition:
            params = json.loads(part.get_payload(decode=True))
        elif 'name="image"' in disposition:
            label = part.get_payload(decode=True)
    if params is None or label is None:
        raise ValueError("the infer answer holds no params or no label image")
    return params, label


def load_nifti(data: bytes) -> nib.Nifti1Image:
    """A NIfTI image from bytes (gzipped or not)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    image = nib.Nifti1Image.from_bytes(data)
    return nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)


def infer(server: str, image_id: str, timeout: float = 600) -> tuple[dict, nib.Nifti1Image]:
    answer = requests.post(f"{server}/infer/brainmirror", params={"image": image_id}, timeout=timeout)
    answer.raise_for_status()
    params, label = parse_infer_answer(answer.headers["content-type"], answer.content)
    return params, load_nifti(label)


def fetch_image(server: str, image_id: str, timeout: float = 120) -> nib.Nifti1Image:
    answer = requests.get(f"{server}/datastore/image", params={"image": image_id}, timeout=timeout)
    answer.raise_for_status()
    return load_nifti(answer.content)


def render(image: nib.Nifti1Image, label: nib.Nifti1Image, params: dict, out: Path | str, title: str = "") -> Path:
    """Three orthogonal slices (RAS-oriented) through the label's largest region, label in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, label = nib.as_closest_canonical(image), nib.as_closest_canonical(label)
    data = np.asarray(image.get_fdata(dtype=np.float32))
    mask = np.asarray(label.dataobj) > 0
    if mask.shape != data.shape:
        raise ValueError(f"label grid {mask.shape} is not the image grid {data.shape}")
    centre = np.array(data.shape) // 2
    if mask.any():  # through the largest region
        from scipy import ndimage

        regions, n = ndimage.label(mask)
        largest = 1 + int(np.argmax(ndimage.sum_labels(mask, regions, index=np.arange(1, n + 1))))
        centre = np.round(np.argwhere(regions == largest).mean(axis=0)).astype(int)
    low, high = np.percentile(data, [1, 99.9])
    views = [("axial", data[:, :, centre[2]], mask[:, :, centre[2]]),
             ("coronal", data[:, centre[1], :], mask[:, centre[1], :]),
             ("sagittal", data[centre[0], :, :], mask[centre[0], :, :])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="black")
    for ax, (name, plane, region) in zip(axes, views):
        ax.imshow(plane.T, cmap="gray", origin="lower", vmin=low, vmax=high)
        ax.imshow(np.ma.masked_where(~region.T, region.T), cmap="autumn", origin="lower", alpha=0.55)
        ax.set_title(name, color="white", fontsize=10)
        ax.axis("off")
    verdict = str(params.get("verdict", "?")).upper()
    fig.suptitle(f"{title}  brainmirror (MONAI Label infer answer): {verdict}, score {params['score']:.2f} vs "
                 f"threshold {params['threshold']:.2f}; {len(params.get('findings', []))} finding(s) in red\n"
                 "SYNTHETIC demo data - research software, NOT FOR CLINICAL USE", color="white", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90, facecolor="black")
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--image", required=True, help="image id in the server's datastore")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "brainmirror-overlay.png")
    args = parser.parse_args()
    params, label = infer(args.server, args.image)
    out = render(fetch_image(args.server, args.image), label, params, args.out, title=args.image)
    print(f"{args.image}: {params['verdict']} (score {params['score']:.2f}, threshold {params['threshold']:.2f}); wrote {out}")


if __name__ == "__main__":
    main()
