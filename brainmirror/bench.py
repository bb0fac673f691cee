"""Benchmark: per-stage latency, peak memory, FLOPs and a diffusion baseline, in one run.

Each demo study is assessed stage by stage, exactly as the application's operators do, and
then once more through the whole MONAI Deploy application (``app.py`` in a subprocess) for
the end-to-end wall time and peak RSS. The diffusion-style baseline is a MONAI
``DiffusionModelUNet`` of comparable size; its cost per denoising step over the study's slices
is measured and multiplied by the step count (50 and 250), which is how such a model runs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .detector import Detector
from .networks import SLICE_SHAPE, hemispheres
from .slicing import slice_volume

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def stage_timings(detector: Detector, study: Path) -> dict[str, float]:
    """Seconds per stage for one DICOM study folder (the operators' work, in process)."""
    from .data import read_dicom_series
    from .dicom import read_series, volume_to_nifti, write_assessment
    from .preprocess import canonicalise

    t: dict[str, float] = {}
    clock = time.perf_counter()
    series = read_dicom_series(study)
    t["load"] = time.perf_counter() - clock
    clock = time.perf_counter()
    datasets = max(series.values(), key=len)  # the demo study has one series
    volume = read_series(datasets)
    image = volume_to_nifti(volume)
    t["series_to_volume"] = time.perf_counter() - clock
    canonical = canonicalise(image)
    t.update({f"preprocess_{k}": v for k, v in canonical.timings.items()})
    clock = time.perf_counter()
    slices = slice_volume(canonical)
    t["slicer"] = time.perf_counter() - clock
    clock = time.perf_counter()
    maps = detector.reconstruct(slices)
    t["reconstruction"] = time.perf_counter() - clock
    clock = time.perf_counter()
    embeddings = detector.embed(maps)
    t["embedding"] = time.perf_counter() - clock
    clock = time.perf_counter()
    assessment = detector.score(canonical, slices, maps, embeddings)
    t["scoring"] = time.perf_counter() - clock
    with tempfile.TemporaryDirectory() as out:
        clock = time.perf_counter()
        write_assessment(datasets, volume, assessment, Path(out), algorithm_version=detector.version)
        t["writers"] = time.perf_counter() - clock
    t["n_slices"] = float(len(slices.z))
    return t


def network_flops(detector: Detector, n_slices: int) -> dict[str, float]:
    """FLOPs per study of each network, counted by torch's flop counter."""
    x = torch.zeros(1, 1, *SLICE_SHAPE, device=detector.device)
    m = torch.from_numpy(hemispheres()[0])[None, None].to(detector.device)
    with torch.no_grad():
        unet = _flops(lambda: detector.reconstructor(x, m, True))
        restorer = _flops(lambda: detector.restorer(x, x))
        vae = _flops(lambda: detector.vae.encode(torch.zeros(1, 2, *SLICE_SHAPE, device=detector.device)))
    return {"reconstruction": (4.0 * unet + restorer) * n_slices, "embedding": float(vae * n_slices),
            "unet_per_pass": float(unet), "plain_reconstruction": 2.0 * unet * n_slices}


def diffusion_baseline(n_slices: int, device: torch.device, steps_measured: int = 2) -> dict[str, float]:
    """Seconds and FLOPs per denoising step of a DDPM U-Net over ``n_slices`` slices."""
    from monai.networks.nets import DiffusionModelUNet

    net = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64, 64),
                             attention_levels=(False, False, False), num_res_blocks=1, num_head_channels=32).to(device).eval()
    x = torch.randn(n_slices, 1, *SLICE_SHAPE, device=device)
    t = torch.full((n_slices,), 500, device=device, dtype=torch.long)
    with torch.no_grad():
        flops = _flops(lambda: net(x[:1], t[:1])) * n_slices
        net(x[:4], t[:4])  # warm-up
        clock = time.perf_counter()
        for _ in range(steps_measured):
            for i in range(0, n_slices, 32):
                net(x[i:i + 32], t[i:i + 32])
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - clock) / steps_measured
    return {"seconds_per_step": per_step, "flops_per_step": float(flops),
            "parameters": float(sum(p.numel() for p in net.parameters()))}


def end_to_end(study: Path, models: Path) -> dict[str, float]:
    """Wall time and peak RSS of the whole application on one study (subprocess)."""
    with tempfile.TemporaryDirectory() as out:
        clock = time.perf_counter()
        proc = subprocess.run(
            ["bash", "-c", f'ulimit -s 32768 2>/dev/null; "{sys.executable}" app.py -i "{study}" -o "{out}" -m "{models}"'],
            cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - clock
    if proc.returncode != 0:
        raise RuntimeError(f"app.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"wall_s": wall, "peak_rss_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN)}


def run_benchmark(models: Path, studies: list[Path], repeats: int, out: Path, app: bool = True) -> dict:
    detector = Detector.load(models)
    per_study = []
    for study in studies:
        for _ in range(repeats):
            per_study.append(stage_timings(detector, study))
    stages = [k for k in per_study[0] if k != "n_slices"]
    n_slices = int(statistics.median(s["n_slices"] for s in per_study))
    summary = {k: {"median": statistics.median(s[k] for s in per_study),
                   "min": min(s[k] for s in per_study), "max": max(s[k] for s in per_study)} for k in stages}
    core_total = [sum(s[k] for k in stages) for s in per_study]
    flops = network_flops(detector, n_slices)
    diffusion = diffusion_baseline(n_slices, detector.device)
    recon_s = summary["reconstruction"]["median"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(detector.device),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "studies": [str(s) for s in studies], "repeats": repeats, "slices_per_study": n_slices,
        "stages_s": summary,
        "core_total_s": {"median": statistics.median(core_total), "min": min(core_total), "max": max(core_total)},
        "peak_rss_mb_in_process": _peak_rss_mb(),
        "flops": flops,
        "achieved_gflops": {"reconstruction": flops["reconstruction"] / recon_s / 1e9,
                            "embedding": flops["embedding"] / summary["embedding"]["median"] / 1e9},
        "baselines": {
            "plain_reconstruction": {"note": "same U-Net, mirror withheld: 2 of brainmirror's 4 reconstruction "
                                             "passes (its restoration pass left out); seconds pro rata of FLOPs",
                                     "seconds": recon_s * flops["plain_reconstruction"] / flops["reconstruction"],
                                     "flops": flops["plain_reconstruction"]},
        },
    }
    for steps in (50, 250):
        result["baselines"][f"diffusion_{steps}_steps"] = {
            "seconds": diffusion["seconds_per_step"] * steps, "flops": diffusion["flops_per_step"] * steps,
            "parameters": diffusion["parameters"],
            "note": f"measured per-step time x {steps} (DDPM/DDIM-style sampling over every slice)",
        }
    for name, b in result["baselines"].items():
        b["time_ratio_vs_brainmirror_reconstruction"] = b["seconds"] / recon_s
        b["flop_ratio_vs_brainmirror_reconstruction"] = b["flops"] / flops["reconstruction"]
    if torch.cuda.is_available():
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if app:
        runs = [end_to_end(study, models) for study in studies for _ in range(repeats)]
        walls = [r["wall_s"] for r in runs]
        result["end_to_end_app"] = {"wall_s": {"median": statistics.median(walls), "min": min(walls), "max": max(walls)},
                                    "throughput_studies_per_hour": 3600.0 / statistics.median(walls),
                                    "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# brainmirror benchmark ({r['date']})\n",
             f"Machine: {m['processor']}, {m['cpus']} CPUs, torch threads {m['torch_threads']}, device {m['device']}"
             + (f" ({m['gpu']})" if m["gpu"] else "") + f". {len(r['studies'])} demo studies x {r['repeats']} repeats, "
             f"{r['slices_per_study']} canonical slices per study.\n",
             "| stage | median s | min s | max s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} |" for k, v in r["stages_s"].items()]
    lines.append(f"| **core total** | **{r['core_total_s']['median']:.2f}** | {r['core_total_s']['min']:.2f} | {r['core_total_s']['max']:.2f} |")
    if "end_to_end_app" in r:
        e = r["end_to_end_app"]
        lines.append(f"\nWhole application (`app.py`, new process per study, incl. Python/holoscan start-up and model load): "
                     f"median {e['wall_s']['median']:.1f} s (min {e['wall_s']['min']:.1f}, max {e['wall_s']['max']:.1f}), "
                     f"{e['throughput_studies_per_hour']:.0f} studies/hour, peak RSS {e['peak_rss_mb']:.0f} MB.")
    lines.append(f"\nPeak RSS of the in-process benchmark: {r['peak_rss_mb_in_process']:.0f} MB.")
    f = r["flops"]
    lines += [f"\nFLOPs per study: reconstruction {f['reconstruction'] / 1e9:.1f} GFLOP "
              f"({r['achieved_gflops']['reconstruction']:.1f} GFLOP/s achieved), embedding {f['embedding'] / 1e9:.2f} GFLOP "
              f"({r['achieved_gflops']['embedding']:.1f} GFLOP/s).\n",
              "| reconstruction | seconds per study | GFLOP per study | time ratio vs brainmirror | FLOP ratio vs brainmirror |",
              "|---|---|---|---|---|",
              f"| brainmirror (4 masked passes + restoration) | {r['stages_s']['reconstruction']['median']:.2f} | {f['reconstruction'] / 1e9:.1f} | 1 | 1 |"]
    for name, b in r["baselines"].items():
        lines.append(f"| {name} | {b['seconds']:.2f} | {b['flops'] / 1e9:.1f} | {b['time_ratio_vs_brainmirror_reconstruction']:.2f} | "
                     f"{b['flop_ratio_vs_brainmirror_reconstruction']:.2f} |")
    return "\n".join(lines) + "\n"


def demo_studies(folder: Path, count: int) -> list[Path]:
    """``count`` demo studies (alternating tumour / normal), written once into ``folder``."""
    from .demo import make_demo_study

    studies = []
    for i in range(count):
        name = ("tumour", "normal")[i % 2]
        path = folder / f"{i:02d}-{name}"
        if not path.exists() or not any(path.iterdir()):
            make_demo_study(path, name)
        studies.append(path)
    return studies

