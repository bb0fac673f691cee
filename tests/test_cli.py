"""The command line as a new user runs it: help, train, calibrate, run (small and real)."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from brainmirror.preprocess import PREPROCESSING_VERSION
from conftest import REPO, stack_limit


def brainmirror(*args: str, timeout: int = 900, stack_mib: int | None = None) -> subprocess.CompletedProcess:
    """``python -m brainmirror ARGS``; ``stack_mib``: its soft stack limit (as ``ulimit -s``), where allowed."""
    return subprocess.run([sys.executable, "-m", "brainmirror", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=stack_limit(stack_mib) if stack_mib else None)


@pytest.mark.parametrize("command, option", [
    ("train", "--synthetic"), ("finetune", "--model"), ("calibrate", "--study-fpr"),
    ("run", "--configuration"), ("evaluate", "--quick"), ("bench", "--repeats"), ("demo-data", "--study"),
])
def test_every_command_explains_its_options(command, option):
    proc = brainmirror(command, "--help", timeout=120)
    assert proc.returncode == 0 and option in proc.stdout


def test_train_defaults_are_the_training_recipe():
    """`brainmirror train` without options trains what the README's recipe and the bundle record."""
    from brainmirror.cli import build_parser
    from brainmirror.training import TrainingConfig

    args = build_parser().parse_args(["train", "--output", "m"])
    recipe = TrainingConfig()
    assert (args.unet_steps, args.restorer_steps, args.vae_steps, args.batch_size, args.latent, args.beta, args.seed) == \
        (recipe.unet_steps, recipe.restorer_steps, recipe.vae_steps, recipe.batch_size, recipe.latent, recipe.beta,
         recipe.seed)


def test_missing_data_folder_is_a_clear_error(tmp_path):
    proc = brainmirror("train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "m"), timeout=120)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_a_new_restorer_without_steps_is_a_clear_error(tmp_path):
    proc = brainmirror("finetune", "--synthetic", "4", "--restorer-features", "4,4,8,8,16,4", "--restorer-steps", "0",
                       "--output", str(tmp_path / "m"), "--work", str(tmp_path / "w"), timeout=120)
    assert proc.returncode != 0 and "--restorer-steps" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()  # refused before any work


@pytest.mark.slow
def test_train_calibrate_finetune_run_on_a_fresh_folder(tmp_path):
    """Tiny budgets: checks the commands and the bundle they write, not the model quality."""
    from brainmirror.cohort import make_subject, subject_rng

    data = tmp_path / "healthy"
    data.mkdir()
    for i in range(4):  # a site's folder of healthy NIfTI studies
        nib.save(make_subject("mni", subject_rng("test", i)).image, data / f"sub-{i:02d}_T1w.nii.gz")
    model, work = tmp_path / "model", tmp_path / "work"
    small = ["--unet-steps", "3", "--restorer-steps", "3", "--vae-steps", "3", "--batch-size", "2", "--latent", "16", "--quiet"]
    proc = brainmirror("train", "--data", str(data), "--output", str(model), "--work", str(work), *small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metadata = json.loads((model / "configs" / "metadata.json").read_text())
    assert metadata["network"]["latent"] == 16
    assert metadata["training"]["studies"] == 2 and metadata["training"]["normative_studies"] == 2  # at least 2 held out
    assert len(set(metadata["training"]["normative_keys"])) == 2
    assert metadata["training"]["anatomies"] == []  # site data: no virtual-cohort anatomy seen
    for name in ("reconstruction.pt", "restoration.pt", "embedding.pt", "normative.npz"):
        assert (model / "models" / name).exists()

    proc = brainmirror("calibrate", "--model", str(model), "--data", str(data), "--work", str(work), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    calibration = json.loads((model / "configs" / "metadata.json").read_text())["calibration"]
    assert calibration["study"]["combined"]["fpr"] == 0.05 and calibration["voxel"]["fpr"] == 0.01

    tuned = tmp_path / "tuned"
    proc = brainmirror("finetune", "--model", str(model), "--data", str(data), "--output", str(tuned),
                       "--work", str(work), "--restorer-features", "4,4,8,8,16,4", *small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned_metadata = json.loads((tuned / "configs" / "metadata.json").read_text())
    assert tuned_metadata["training"]["fine_tuned_from"] and tuned_metadata["network"]["restorer_features"] == [4, 4, 8, 8, 16, 4]
    assert tuned_metadata["training"]["normative_keys"] == metadata["training"]["normative_keys"]  # the base's stay normative
    assert torch.load(tuned / "models" / "restoration.pt")["unet.conv_0.conv_0.conv.weight"].shape[0] == 4  # new, that size

    refitted = tmp_path / "refitted"  # no steps: the healthy statistics are refitted, the networks kept
    proc = brainmirror("finetune", "--model", str(model), "--data", str(data), "--output", str(refitted), "--work",
                       str(work), "--unet-steps", "0", "--restorer-steps", "0", "--vae-steps", "0", "--latent", "16", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("reconstruction.pt", "restoration.pt", "embedding.pt"):
        before, after = torch.load(model / "models" / name), torch.load(refitted / "models" / name)
        assert all(torch.equal(before[k], after[k]) for k in before)
    metadata = json.loads((refitted / "configs" / "metadata.json").read_text())
    assert metadata["preprocessing"] == PREPROCESSING_VERSION and metadata["training"]["base_training"]["studies"] == 2
    assert metadata["training"]["normative_keys"] == json.loads((model / "configs" / "metadata.json").read_text())[
        "training"]["normative_keys"]  # its own studies: the networks saw the others, which stay out

    site = tmp_path / "site"  # another site's normals, which no network has seen: all give healthy statistics
    site.mkdir()
    for study in sorted(data.iterdir()):
        (site / study.name).symlink_to(study)
    adapted = tmp_path / "adapted"
    proc = brainmirror("finetune", "--model", str(model), "--data", str(site), "--output", str(adapted), "--work",
                       str(work), "--unet-steps", "0", "--restorer-steps", "0", "--vae-steps", "0", "--latent", "16", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    training = json.loads((adapted / "configs" / "metadata.json").read_text())["training"]
    assert (training["studies"], training["normative_studies"]) == (0, 4)

    study = data / "sub-00_T1w.nii.gz"
    proc = brainmirror("run", str(study), "--model", str(model), "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "sub-00_T1w_result.json").read_text())
    assert result["verdict"] in ("normal", "abnormal")
    anomaly = nib.load(str(tmp_path / "out" / "sub-00_T1w_anomaly.nii.gz"))
    source = nib.load(str(study))
    assert anomaly.shape == source.shape and np.allclose(anomaly.affine, source.affine)
    assert len(result["slice_scores"]) == source.shape[0]


def test_calibrate_prepares_virtual_cohort_studies_in_worker_processes(tmp_path):
    """From the command line, virtual-cohort studies are prepared in worker processes (spawned:
    each imports brainmirror afresh) and calibration on them finishes as on one core."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "brainmirror", model)
    proc = brainmirror("calibrate", "--model", str(model), "--synthetic", "2", "--work", str(tmp_path / "work"), "--quiet",
                       stack_mib=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Holoscan, which MONAI imports in every process, warns below a 32 MiB stack; no worker runs it
    assert "stack size" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("combined  threshold") == 1
    assert len(list((tmp_path / "work").rglob("*.npz"))) == 2
    assert json.loads((model / "configs" / "metadata.json").read_text())["calibration"]["study"]["combined"]["n_studies"] == 2
