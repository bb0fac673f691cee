"""Unit tests of the computing core: geometry, masking, scoring, calibration."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from brainmirror import preprocess
from brainmirror.detector import Detector
from brainmirror.difference_maps import ANOMALY_MAP_VERSION, anomaly_map, raw_voxel_map
from brainmirror.networks import Reconstructor, checkerboard, hemispheres, training_mask
from brainmirror.slicing import slice_volume
from brainmirror.study_statistic import FEATURES, position_statistics, slice_features
from brainmirror.training import fpr_upper_bound, threshold_at_fpr

MODEL_DIR = Path(__file__).resolve().parents[1] / "models"
requires_model = pytest.mark.skipif(not (MODEL_DIR / "brainmirror" / "configs" / "metadata.json").exists(),
                                    reason="the shipped model bundle is not in models/ yet")


def _template_head(affine: np.ndarray) -> nib.Nifti1Image:
    """The MNI template as a native volume with the given voxel-to-world affine."""
    image, _ = preprocess.template()
    return nib.Nifti1Image(image * 1000.0, affine)


def test_masks_never_cover_a_pixel_and_its_mirror():
    left, right = hemispheres()
    assert np.array_equal(left + right, np.ones_like(left)) and np.array_equal(left[::-1], right)
    for mask in (left, right, checkerboard(0, 16), checkerboard(1, 12, offset=5)):
        assert not (mask.astype(bool) & mask[::-1].astype(bool)).any()
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = training_mask(rng).astype(bool)
        assert mask.any() and not (mask & mask[::-1]).any()


def test_canonical_space_is_mirror_symmetric_about_the_template_midline():
    image, mask = preprocess.template()
    assert np.array_equal(mask, mask[::-1])
    centre_x = preprocess.CANONICAL_AFFINE @ np.array([(preprocess.SHAPE[0] - 1) / 2, 0, 0, 1])
    assert centre_x[0] == pytest.approx(0.0)  # x = 0 mm is the mid-sagittal plane


def test_known_rigid_transform_is_recovered_and_maps_round_trip():
    """Register the template moved by a known rotation/shift; the estimate must undo it."""
    rotation = np.eye(4)
    rotation[:3, :3] = Rotation.from_euler("xyz", [6, -4, 8], degrees=True).as_matrix()
    rotation[:3, 3] = [4.0, -6.0, 3.0]
    moved = _template_head(rotation @ preprocess.CANONICAL_AFFINE)
    canonical = preprocess.canonicalise(moved)
    # canonical mm -> native mm must equal the transform we applied (within 1.5 mm over the brain)
    points = np.argwhere(canonical.mask)[::50]
    world = preprocess.CANONICAL_AFFINE[:3, :3] @ points.T + preprocess.CANONICAL_AFFINE[:3, 3:4]
    estimated = canonical.canonical_to_native_mm[:3, :3] @ world + canonical.canonical_to_native_mm[:3, 3:4]
    expected = rotation[:3, :3] @ world + rotation[:3, 3:4]
    assert np.linalg.norm(estimated - expected, axis=0).mean() < 1.5
    # a native map taken to canonical space and back is unchanged inside the brain
    native = np.zeros(moved.shape, np.float32)
    native[20:40, 30:60, 25:45] = 1.0
    back = canonical.to_native(canonical.to_canonical(native, order=0), order=0)
    inside = canonical.native_mask
    assert (back[inside] == native[inside]).mean() > 0.97


def test_registration_is_deterministic():
    """Every brain voxel sampled, on one thread: repeated runs give the same pose to the last bit,
    whatever the process's default thread count (with two threads, runs differed by up to 6e-6)."""
    import SimpleITK as sitk

    moved = _template_head(preprocess.CANONICAL_AFFINE)
    data = moved.get_fdata(dtype=np.float32)
    default = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        poses = []
        for threads in (2, 2, 1):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            poses.append(preprocess.register_rigid(data, moved.affine))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default)
    assert all(np.array_equal(poses[0], pose) for pose in poses[1:])


def test_scaling_ignores_a_one_sided_bright_lesion():
    """A bright lesion on one side must not set the scale of the healthy brain."""
    image, mask = preprocess.template()
    lesioned = image.copy()
    lesioned[20:34, 40:60, 30:45] = 3.0 * image[mask].max()  # ~13 ml, right hemisphere only
    healthy = mask.copy()
    healthy[20:34, 40:60, 30:45] = False
    before, after = preprocess.normalise(image, mask), preprocess.normalise(lesioned, mask)
    assert np.abs(after[healthy] - before[healthy]).max() < 0.02
    plain = np.clip(lesioned / np.percentile(lesioned[mask], 99), 0, 2)  # what plain percentiles would do
    assert np.abs(plain[healthy] - before[healthy]).max() > 0.1


def test_a_coil_bias_field_is_corrected_before_scaling():
    """A smooth multiplicative field that differs between the hemispheres (a coil's) is a left-right
    difference no mirror predicts: the canonical intensities take it out, plain scaling does not."""
    image, mask = preprocess.template()
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in image.shape), indexing="ij")
    field = np.exp(0.15 * x + 0.1 * y * z - 0.1 * (x - 0.3) ** 2).astype(np.float32)  # up to ~30 % left vs right
    clean = preprocess.intensities(image, mask)
    corrected, plain = preprocess.intensities(image * field, mask), preprocess.normalise(image * field, mask)
    error = lambda a: float(np.abs(a - clean)[mask].mean())  # noqa: E731
    assert error(plain) > 0.04
    assert error(corrected) < 0.35 * error(plain)
    asymmetry = lambda a: float(np.abs(a - a[::-1])[mask & mask[::-1]].mean())  # noqa: E731
    assert asymmetry(corrected) < asymmetry(clean) + 0.3 * (asymmetry(plain) - asymmetry(clean))
    assert np.array_equal(preprocess.intensities(image * field, mask), corrected)  # deterministic


def test_raw_voxel_map_is_relative_to_the_study_level():
    rng = np.random.default_rng(0)
    residual, context, restoration = rng.random((3, 3, 96, 112)).astype(np.float32)
    brain = np.ones((3, 96, 112), bool)
    brain[:, :10] = False
    one = raw_voxel_map(residual, context, restoration, brain)
    assert np.allclose(raw_voxel_map(7.0 * residual, 7.0 * context, 7.0 * restoration, brain), one, rtol=1e-4)
    assert np.median(one[brain]) == pytest.approx(1.0, rel=1e-3)
    assert not one[~brain].any()


def test_preprocessing_rejects_volumes_without_content():
    with pytest.raises(preprocess.PreprocessingError):
        preprocess.canonicalise(nib.Nifti1Image(np.zeros((64, 64, 40), np.float32), np.eye(4)))
    with pytest.raises(preprocess.PreprocessingError):
        preprocess.canonicalise(nib.Nifti1Image(np.ones((64, 64, 1), np.float32), np.eye(4)))


def test_a_stripped_inputs_background_is_kept_out_of_its_brain_mask():
    from scipy import ndimage

    data = np.zeros((40, 40, 40), np.float32)
    brain = np.zeros(data.shape, bool)
    brain[10:30, 10:30, 10:30] = True
    data[brain] = 1.0
    data[19:21, 19:21, 19:21] = 0.0  # a zero-valued pocket inside the brain, closed off from the background
    extracted = ndimage.binary_dilation(brain, iterations=3)  # an extractor that took in background
    kept = preprocess.without_stripped_background(extracted, data)
    assert np.array_equal(kept, brain), "the stripped background inside the mask, and only it, is removed"
    noisy = data + np.random.default_rng(0).uniform(0.01, 0.05, data.shape).astype(np.float32)
    noisy -= noisy.min()  # as canonicalise gives it: one voxel at zero, outside the brain
    assert np.array_equal(preprocess.without_stripped_background(extracted, noisy), extracted)


def test_studies_of_a_brain_only_anatomy_are_skull_stripped_and_the_others_are_not():
    from brainmirror.cohort import make_subject, subject_rng

    stripped = make_subject("mni", subject_rng("test", 92), "t2").image.get_fdata(dtype=np.float32)
    zero = stripped == 0
    assert 0.3 < zero.mean() < 0.95 and (stripped[~zero] > 0).all()
    head = make_subject("colin", subject_rng("test", 92), "t2").image.get_fdata(dtype=np.float32)
    assert (head == 0).mean() < 0.01, "a head with skull keeps its noisy background"


def test_threshold_at_fpr_gives_the_requested_false_positive_rate():
    for n in (24, 100, 4000):
        values = np.random.default_rng(n).normal(size=n)
        for fpr in (0.01, 0.05, 0.2):
            observed = (values > threshold_at_fpr(values, fpr)).mean()
            assert fpr - 1 / n - 1e-12 <= observed <= fpr + 1e-12


def test_the_fpr_bound_covers_the_true_fpr_of_a_calibrated_threshold_95_percent_of_the_time():
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    for n, fpr in ((24, 0.05), (60, 0.05), (200, 0.1)):
        covered = []
        for _ in range(2000):
            values = rng.normal(size=n)
            threshold = threshold_at_fpr(values, fpr)
            covered.append(norm.sf(threshold) <= fpr_upper_bound(n, int((values > threshold).sum())))
        assert 0.93 <= np.mean(covered) <= 0.97  # a bound without the order statistics' Beta law misses this
    assert fpr_upper_bound(60, 2) > 0.05  # 60 studies cannot promise 5 % tightly: about 10 %
    with pytest.raises(ValueError):
        fpr_upper_bound(10, 10)


def test_position_statistics_pool_neighbouring_slices():
    z = [np.arange(80)] * 10
    values = [np.full(80, 2.0) + 0.1 * i for i in range(10)]
    mean, std = position_statistics(values, z)
    assert mean[40] == pytest.approx(2.45)
    assert std[40] == pytest.approx(np.std([2.0 + 0.1 * i for i in range(10)]))


@requires_model
def test_bundles_fitted_for_other_inference_masks_are_refused(tmp_path):
    """A bundle whose healthy statistics were fitted with other inference masks gives a clear error
    rather than scores against the wrong healthy statistics."""
    import json
    import shutil

    for name, inference in (("checkerboard", {"masks": "checkerboard"}), ("unrecorded", None),
                            ("unsealed", {"masks": "hemispheres"}),
                            ("unrestored", {"masks": "hemispheres", "mirror": "sealed"})):
        bundle = tmp_path / name
        shutil.copytree(MODEL_DIR / "brainmirror", bundle)
        path = bundle / "configs" / "metadata.json"
        metadata = json.loads(path.read_text())
        metadata.pop("inference")
        if inference:
            metadata["inference"] = inference
        path.write_text(json.dumps(metadata))
        with pytest.raises(ValueError, match="retrain it"):
            Detector.load(bundle)
    # the previous release's restorer returned the restored slice only (no disorder map)
    from monai.networks.nets import BasicUNet
    bundle = tmp_path / "restorer-without-locator"
    shutil.copytree(MODEL_DIR / "brainmirror", bundle)
    older = BasicUNet(spatial_dims=2, in_channels=2, out_channels=1, features=(16, 16, 32, 64, 128, 16))
    torch.save({f"unet.{k}": v.half() for k, v in older.state_dict().items()}, bundle / "models" / "restoration.pt")
    with pytest.raises(ValueError, match="restoration network is not the one this brainmirror runs.*retrain it"):
        Detector.load(bundle)
    Detector.load(MODEL_DIR)  # the shipped one loads


@requires_model
def test_a_voxel_threshold_calibrated_on_an_earlier_anomaly_map_is_refused(tmp_path):
    """A bundle calibrated before the voxel anomaly map changed asks for calibration instead of
    segmenting at a threshold of another map."""
    import json
    import shutil

    bundle = tmp_path / "earlier-map"
    shutil.copytree(MODEL_DIR / "brainmirror", bundle)
    path = bundle / "configs" / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata["calibration"]["voxel"].pop("anomaly_map")
    path.write_text(json.dumps(metadata))
    with pytest.raises(RuntimeError, match="earlier voxel anomaly map: run `brainmirror calibrate`"):
        Detector.load(bundle).calibration("combined")
    assert Detector.load(MODEL_DIR).calibration("combined")["voxel"]["anomaly_map"] == ANOMALY_MAP_VERSION


@requires_model
def test_a_bundle_fitted_on_another_preprocessing_is_refused(tmp_path):
    """Healthy statistics and thresholds fitted on other intensities (before bias-field correction)
    would score every study against the wrong healthy reference: refused, with the refit command."""
    import json
    import shutil

    bundle = tmp_path / "version-3"
    shutil.copytree(MODEL_DIR / "brainmirror", bundle)
    path = bundle / "configs" / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata.pop("preprocessing")
    path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="preprocessing version 3 or earlier.*brainmirror finetune.*--unet-steps 0"):
        Detector.load(bundle)
    assert Detector.load(bundle, refit=True).metadata["calibration"]  # what finetune starts from
    metadata["preprocessing"] = preprocess.PREPROCESSING_VERSION
    metadata["calibration"]["preprocessing"] = preprocess.PREPROCESSING_VERSION - 1
    path.write_text(json.dumps(metadata))
    with pytest.raises(RuntimeError, match="calibrated on another preprocessing.*brainmirror calibrate"):
        Detector.load(bundle).calibration("combined")
    assert Detector.load(MODEL_DIR).calibration("combined")  # the shipped bundle is consistent


@requires_model
def test_a_bundle_without_healthy_statistics_of_the_peak_is_refused(tmp_path):
    """A bundle whose healthy statistics predate the anomaly-map peak in ``combined`` asks to be
    retrained instead of failing on a missing key (or scoring against another statistic)."""
    import shutil

    bundle = tmp_path / "earlier-statistics"
    shutil.copytree(MODEL_DIR / "brainmirror", bundle)
    path = bundle / "models" / "normative.npz"
    with np.load(path) as data:
        normative = {k: data[k] for k in data.files if not k.startswith("peak_")}
    np.savez_compressed(path, **normative)
    with pytest.raises(ValueError, match="no healthy statistics of the slice statistic peak.*retrain it"):
        Detector.load(bundle)


def test_peak_feature_is_the_anomaly_map_maximum_inside_the_brain():
    """The slice feature behind ``combined`` is the highest voxel anomaly inside each slice's brain."""
    from brainmirror.difference_maps import DifferenceMaps
    from brainmirror.slicing import Slices

    n = 3
    brain = np.zeros((n, 96, 112), bool)
    brain[:, 20:80, 20:90] = True
    anomaly = np.zeros((n, 96, 112), np.float32)
    anomaly[0, 30, 30] = 2.5
    anomaly[1, 5, 5] = 9.0  # outside the brain: not counted
    zeros = np.zeros((n, 96, 112), np.float32)
    maps = DifferenceMaps(*(zeros,) * 7, anomaly)
    features = slice_features(Slices(zeros, brain, np.arange(n)), maps, np.zeros((n, 4), np.float32),
                              {"embedding_mean": np.zeros(4, np.float32), "embedding_precision": np.eye(4, dtype=np.float32)})
    np.testing.assert_array_equal(features["peak"], [2.5, 0.0, 0.0])
    assert tuple(features) == FEATURES  # the statistics a bundle must bring (``Detector.load`` checks)


def test_anomaly_map_needs_both_a_difference_and_a_disorder_and_bridges_no_slice_gap():
    """Zero where either the standardised difference is not positive or the restorer found no
    disorder; smoothing reaches the neighbouring canonical slice but not across a gap."""
    from brainmirror.slicing import Slices

    n, z = 4, np.array([10, 11, 12, 30])
    brain = np.zeros((n, 96, 112), bool)
    brain[:, 20:80, 20:90] = True
    slices = Slices(np.zeros((n, 96, 112), np.float32), brain, z)
    score, disorder = np.zeros((n, 96, 112), np.float32), np.zeros((n, 96, 112), np.float32)
    score[1, 40:50, 30:40], disorder[1, 40:50, 30:40] = 8.0, 0.9  # both: a lesion
    score[1, 40:50, 60:70] = 8.0  # a difference the restorer does not call a disorder
    disorder[1, 60:70, 30:40] = 0.9  # a disorder call where the difference is healthy
    score[1, 60:70, 60:70], disorder[1, 60:70, 60:70] = -4.0, 0.9  # below the healthy mean
    anomaly = anomaly_map(score, disorder, slices)
    assert anomaly[1, 45, 35] > 0.3 * 8.0 * 0.9  # the smoothing spreads it over neighbouring slices
    assert anomaly[1, 45, 65] < 0.05 * anomaly[1, 45, 35] and anomaly[1, 65, 35] < 0.05 * anomaly[1, 45, 35]
    assert anomaly[1, 65, 65] < 0.05 * anomaly[1, 45, 35]
    assert anomaly[0, 45, 35] > 0.2 * anomaly[1, 45, 35]  # the neighbouring slice
    score[1], disorder[1] = 0.0, 0.0
    score[2, 40:50, 30:40], disorder[2, 40:50, 30:40] = 8.0, 0.9
    assert anomaly_map(score, disorder, slices)[3].max() == 0.0  # slice 30 is 18 slices away
    assert (anomaly[~brain] == 0).all()


@requires_model
def test_mahalanobis_matches_direct_numpy_computation():
    detector = Detector.load(MODEL_DIR)
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(5, detector.normative["embedding_mean"].shape[0])).astype(np.float32)
    mean = detector.normative["embedding_mean"].astype(np.float64)
    precision = detector.normative["embedding_precision"].astype(np.float64)
    expected = [np.sqrt((e - mean) @ precision @ (e - mean)) for e in embeddings.astype(np.float64)]
    image, mask = preprocess.template()
    canonical = preprocess.Canonical(image, mask, preprocess.SHAPE, preprocess.CANONICAL_AFFINE, np.eye(4), mask, "template")
    slices = slice_volume(canonical)
    maps = detector.reconstruct(slices)
    n = 5
    sub = type(slices)(slices.image[:n], slices.mask[:n], slices.z[:n])
    sub_maps = type(maps)(*(getattr(maps, f)[:n] for f in maps.__dataclass_fields__))
    features = slice_features(sub, sub_maps, embeddings, detector.normative)
    np.testing.assert_allclose(features["vae"], expected, rtol=1e-3)


@requires_model
def test_symmetry_masked_reconstruction_removes_a_one_sided_lesion():
    """Bright blobs in the left hemisphere are rebuilt as healthy tissue from their mirror, and the
    restorer removes them while keeping healthy tissue.

    Three blobs (8-14 mm radius) on three slices: the masked hemisphere is rebuilt from its mirror,
    so the property is asserted on their mean, and the ghost suppression on each.
    """
    detector = Detector.load(MODEL_DIR)
    image, mask = preprocess.template()
    lesioned = image.copy()
    xx, yy, zz = np.meshgrid(*map(np.arange, image.shape), indexing="ij")
    blobs = {z: ((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) <= r**2
             for x, y, z, r in [(30, 60, 45, 5), (25, 40, 35, 7), (35, 75, 55, 4)]}
    for blob in blobs.values():
        lesioned[blob] = 1.6
    canonical = preprocess.Canonical(lesioned, mask, preprocess.SHAPE, preprocess.CANONICAL_AFFINE, np.eye(4), mask, "template")
    slices = slice_volume(canonical)
    maps = detector.reconstruct(slices)
    ratios = []
    for z, blob in blobs.items():
        k = int(np.flatnonzero(slices.z == z)[0])
        blob2d = blob[:, :, z]
        lesion_error = np.abs(lesioned[:, :, z] - image[:, :, z])[blob2d].mean()
        ratios.append(np.abs(maps.reconstruction[k] - image[:, :, z])[blob2d].mean() / lesion_error)
        # the voxel anomaly score is high on the blob and lower on its mirror (the ghost is suppressed)
        score = maps.voxel_score[k]
        assert np.median(score[blob2d]) > 2 * max(np.median(score[blob2d[::-1]]), 1.0)
    # the reconstruction is nearer the healthy slices than the lesioned ones (measured: 0.25, 0.26,
    # 0.34 with hemisphere inference; 0.57, 0.18, 0.21 with the former 32 mm checkerboard blocks)
    assert np.mean(ratios) < 0.4, ratios
    # the restorer removes each blob (its residual there is the blob's contrast: measured 0.92-1.19)
    # and keeps healthy tissue closer than the reconstruction does (99th percentile of the residual
    # away from the blobs and their mirrors: measured 0.56 of the reconstruction's); it also says
    # where the blobs are, and not at their mirrors (mean probability 0.97-0.99 and 0.02-0.05)
    restored, located, marked = [], [], []
    threshold = detector.calibration("combined")["voxel"]["threshold"]
    for z, blob in blobs.items():
        k = int(np.flatnonzero(slices.z == z)[0])
        contrast = np.abs(lesioned[:, :, z] - image[:, :, z])[blob[:, :, z]].mean()
        restored.append(maps.restoration_residual[k][blob[:, :, z]].mean() / contrast)
        located.append((maps.disorder[k][blob[:, :, z]].mean(), maps.disorder[k][blob[::-1][:, :, z]].mean()))
        marked.append((np.median(maps.anomaly[k][blob[:, :, z]]), np.median(maps.anomaly[k][blob[::-1][:, :, z]])))
    assert min(restored) > 0.6, restored
    assert all(inside > 0.8 and mirror < 0.2 for inside, mirror in located), located
    # the voxel anomaly map marks each blob at the calibrated voxel threshold, and not its mirror
    # (measured: medians 11-22 on the blobs, 0.03-0.05 on their mirrors, threshold 0.76)
    assert all(inside > threshold > mirror for inside, mirror in marked), (marked, threshold)
    away = slices.mask.copy()
    for blob in blobs.values():
        near = blob | blob[::-1]
        away &= ~near[:, :, slices.z].transpose(2, 0, 1)
    assert np.percentile(maps.restoration_residual[away], 99) < 0.7 * np.percentile(maps.residual[away], 99)


def test_reconstructor_never_sees_a_voxel_it_rebuilds():
    """Changing the masked hemisphere (a lesion there) changes nothing the network is given."""
    torch.manual_seed(0)
    net = Reconstructor((4, 4, 8, 8, 16, 4)).eval()
    x = torch.rand(1, 1, 96, 112)
    left, _ = hemispheres()
    m = torch.from_numpy(left)[None, None]
    lesioned = x + 5 * m * torch.rand_like(x)
    with torch.no_grad():
        assert torch.equal(net(x, m), net(lesioned, m))
        unmasked = torch.zeros_like(m)
        assert not torch.allclose(net(x, unmasked), net(lesioned, unmasked))


def test_a_checkpoint_resumes_only_its_own_run(tmp_path):
    """A finished checkpoint in --work is reused by the same run and ignored by any other."""
    from brainmirror.training import _checkpointed_loop

    def run(key: str) -> int:
        model, calls = torch.nn.Linear(2, 1), []

        def step(i: int) -> torch.Tensor:
            calls.append(i)
            return model(torch.ones(1, 2)).sum()

        _checkpointed_loop("tiny", model, 3, step, tmp_path, 1e-3, False, key)
        return len(calls)

    assert run("a") == 3 and run("a") == 0  # finished: nothing left to do
    assert run("b") == 3  # other data or settings: trained afresh, not resumed


def test_batches_made_by_worker_processes_are_the_main_process_batches():
    """On a GPU machine the restorer's batches are made ahead by workers: the same seeded batches,
    in step order, also when a run resumes part-way."""
    from brainmirror.training import _prefetched

    def make_batch(i: int) -> tuple[torch.Tensor]:
        return (torch.from_numpy(np.random.default_rng([0, 3, i]).random(4)),)

    inline, ahead = _prefetched(make_batch, 6, workers=0), _prefetched(make_batch, 6, workers=2)
    for i in (0, 1, 2, 4, 5):  # step 3 skipped: a resumed run starts its batches afresh at step 4
        assert torch.equal(inline(i)[0], make_batch(i)[0]) and torch.equal(ahead(i)[0], make_batch(i)[0])


def test_the_restorers_pool_is_made_once_and_half_its_crops_hold_a_disorder(tmp_path):
    """The restorer trains on crops of a pool of disordered slices with their reconstructions, made
    once: kept for a resumed run, remade for another; crops of the asked size, half of them centred
    near a disorder."""
    from brainmirror.training import _crops, _restorer_pool

    made = []

    def make_batch(i: int) -> tuple[torch.Tensor, ...]:
        made.append(i)
        x = torch.from_numpy(np.random.default_rng(i).random((4, 1, 96, 112)).astype(np.float32))
        weight = torch.zeros_like(x)
        weight[..., 40:44, 50:54] = 1  # a 4 x 4 pixel disorder
        return x, x.clone(), weight, torch.ones_like(x)

    reconstructor, cpu, path = Reconstructor((4, 4, 8, 8, 16, 4)).eval(), torch.device("cpu"), tmp_path / "pool.npz"
    pool = _restorer_pool(make_batch, 3, reconstructor, cpu, path, "a", False)
    assert pool["x"].shape == pool["r"].shape == (12, 1, 96, 112) and made == [0, 1, 2]
    assert np.array_equal(_restorer_pool(make_batch, 3, reconstructor, cpu, path, "a", False)["r"], pool["r"])
    assert made == [0, 1, 2]  # reused
    _restorer_pool(make_batch, 3, reconstructor, cpu, path, "b", False)
    assert made == [0, 1, 2, 0, 1, 2]  # another run's pool: remade
    x, reconstruction, target, weight, brain = _crops(pool, 32, 400, np.random.default_rng(0))
    assert x.shape == reconstruction.shape == weight.shape == (400, 1, 32, 32)
    holding = float((weight.flatten(1).amax(1) > 0.5).float().mean())
    assert 0.5 < holding < 0.85  # every crop centred near the disorder holds it, some of the others too


def test_studies_prepared_in_worker_processes_are_those_prepared_here(tmp_path):
    """Uncached virtual-cohort studies are prepared in parallel processes, bit for bit as in this
    one, cached, and read back in source order."""
    from brainmirror.training import _prepare_one, prepare, synthetic_sources

    sources = list(synthetic_sources("development", 2))
    prepared = prepare(sources, tmp_path, progress=False, workers=2)
    assert len(prepared) == 2 and len(list(tmp_path.rglob("*.npz"))) == 2
    here = _prepare_one(sources[1][1])
    there = list(prepared.values())[1]
    assert np.array_equal(here.image, there.image) and np.array_equal(here.mask, there.mask)
    assert np.array_equal(here.z, there.z)
    assert prepare(sources, tmp_path, progress=False, workers=2).keys() == prepared.keys()  # from the cache


def test_reconstructor_withholds_the_mirror_when_asked():
    torch.manual_seed(0)
    net = Reconstructor((4, 4, 8, 8, 16, 4)).eval()
    x = torch.rand(2, 1, 96, 112)
    m = torch.from_numpy(hemispheres()[0])[None, None].expand(2, -1, -1, -1)
    with torch.no_grad():
        a = net(x, m, torch.tensor([1.0, 0.0]))
        b = net(x, m, torch.tensor([0.0, 0.0]))
    assert torch.allclose(a[1], b[1]) and not torch.allclose(a[0], b[0])


def test_healthy_twin_differs_from_the_lesion_study_only_at_the_lesion():
    from scipy import ndimage

    from brainmirror.cohort import make_subject, subject_rng

    plain = make_subject("mni", subject_rng("test", 90), "flair", "tumour")
    paired = make_subject("mni", subject_rng("test", 90), "flair", "tumour", twin=True)
    image = paired.image.get_fdata(dtype=np.float32)
    twin = paired.healthy_twin.get_fdata(dtype=np.float32)
    assert np.array_equal(image, plain.image.get_fdata(dtype=np.float32)), "asking for the twin changed the study"
    assert plain.healthy_twin is None and np.array_equal(paired.image.affine, paired.healthy_twin.affine)
    difference = np.abs(image - twin)
    near = ndimage.binary_dilation(paired.lesion_mask, iterations=2)
    bright = np.percentile(image[image > 0], 95)
    assert difference[~near].max() < 0.02 * bright  # the same noise, bias, pose and grid everywhere else
    assert difference[paired.lesion_mask].mean() > 0.05 * bright
    assert make_subject("mni", subject_rng("test", 91), "t1", twin=True).healthy_twin is None


def test_training_disorders_change_only_the_brain_inside_their_weight():
    """The restorer's training disorders: inputs untouched, nothing outside the brain or outside
    the returned weight changes, both signs and foreign patches occur, some slices stay clean."""
    from brainmirror import disorders

    image, mask = preprocess.template()
    slice_, brain = image[:, :, 40].copy(), mask[:, :, 40]
    donors = np.stack([image[:, :, z] for z in (30, 50)])
    before = (slice_.copy(), donors.copy())
    clean, signs = 0, set()
    for seed in range(60):
        corrupted, weight = disorders.corrupt(slice_, brain, donors, np.random.default_rng(seed))
        assert corrupted.shape == slice_.shape and 0 <= weight.min() and weight.max() <= 1
        assert not corrupted[~brain].any() and not weight[~brain].any()
        assert np.allclose(corrupted[weight == 0], slice_[weight == 0], atol=1e-6)
        clean += not weight.any()
        signs |= set(np.sign(np.round(corrupted - slice_, 3)[weight > 0.5]).astype(int).tolist())
    assert np.array_equal(before[0], slice_) and np.array_equal(before[1], donors)
    assert 0 < clean < 30 and {-1, 1} <= signs


def test_a_training_disorder_of_a_given_diameter_has_about_that_size():
    """``disorders.shape(..., diameter_mm)`` (the evidence ladder's own-disorder check): the core of
    a shape (weight > 0.5) covers about the disc of that diameter on the 2 mm slice grid."""
    from brainmirror import disorders

    _, mask = preprocess.template()
    brain = mask[:, :, 40]
    for diameter in (8.0, 32.0):
        disc = np.pi * (diameter / disorders.PIXEL_MM / 2) ** 2
        areas = [(disorders.shape(np.random.default_rng(seed), brain, diameter) > 0.5).sum() for seed in range(20)]
        assert 0.3 * disc < np.median(areas) < 2.0 * disc, (diameter, disc, np.median(areas))


def test_training_disorders_share_nothing_with_the_evaluation_lesions():
    """The evaluation stays a test of generalisation: the disorder generator imports no lesion code."""
    import ast
    import inspect

    from brainmirror import disorders

    tree = ast.parse(inspect.getsource(disorders))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {str(n.module) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("lesion" in name or "cohort" in name for name in imported), imported


def test_a_base_bundles_normative_studies_stay_normative_when_studies_are_added():
    """Fine-tuning on more studies never moves a study the networks were trained on into the
    healthy statistics, nor a normative one into training."""
    from brainmirror.slicing import Slices
    from brainmirror.training import TrainingConfig, split

    def studies(n: int) -> dict[str, Slices]:
        return {f"study-{i}": Slices(np.full((1, 96, 112), i, np.float32), np.ones((1, 96, 112), bool), np.array([i]))
                for i in range(n)}

    config = TrainingConfig()
    fit, normative, keys = split(studies(48), config)
    assert (len(fit), len(normative)) == (36, 12) and split(studies(48), config)[2] == keys  # seeded
    more_fit, more_normative, more_keys = split(studies(84), config, keys)
    assert more_keys == keys and len(more_fit) == 72
    trained = {int(s.z[0]) for s in fit}
    assert trained <= {int(s.z[0]) for s in more_fit} and not trained & {int(s.z[0]) for s in more_normative}
    assert sorted(split(studies(84), config)[2]) != sorted(keys)  # no base: a fresh seeded split of all 84
    # a refit of the healthy statistics alone: a site's studies (no network sees them) all give statistics,
    # while the base's own studies keep their roles
    site_fit, site_normative, site_keys = split(studies(16), config, ["elsewhere-1", "elsewhere-2"], refit_only=True)
    assert (len(site_fit), len(site_normative)) == (0, 16) and site_keys == list(studies(16))
    assert split(studies(84), config, keys, refit_only=True)[2] == keys
