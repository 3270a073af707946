"""Levers for new patients (issue: a model that holds up on new patients): the model's input
normalisation and neighbouring slices, stored in the checkpoint and honoured at sampling; the
3D clean-up; the QU-BraTS uncertainty score."""

import numpy as np
import pytest
import torch

from napari_diffseg import checkpoint, synthetic, train
from napari_diffseg.diffusion import DiffusionConfig
from napari_diffseg.errors import DiffSegError
from napari_diffseg.geometry import Geometry
from napari_diffseg.inference import Segmenter, run_to_end
from napari_diffseg.metrics import entropy_uncertainty, qubrats_score, variance_to_uncertainty
from napari_diffseg.options import SamplingOptions
from napari_diffseg.postprocess import remove_small_components
from napari_diffseg.preprocess import InputSpec, neighbour_slices, normalise, volume_statistics
from napari_diffseg.unet import UNet, UNetConfig

TINY = dict(num_channels=16, channel_mult="1,2", num_res_blocks=1, attention_resolutions="", norm_groups=8,
            learn_sigma=True)


# -- neighbouring slices ----------------------------------------------------------------------

def _planes(depth: int) -> np.ndarray:
    """(4, 3, 3, depth): every voxel of slice z holds z, modality m adds 100 * m."""
    z = np.arange(depth, dtype=np.float32)
    return np.stack([np.broadcast_to(z + 100 * m, (3, 3, depth)) for m in range(4)]).copy()


def test_context_channels_are_the_slice_then_its_neighbours_with_edges_repeated():
    spec = InputSpec(context=2)
    assert spec.offsets == [0, -1, 1, -2, 2] and spec.channels == 20
    out = neighbour_slices(_planes(5), [0, 2, 4], spec)
    assert out.shape == (3, 20, 3, 3)
    picked = out[:, ::4, 0, 0]  # the t1 channel of each offset: the slice index it came from
    assert picked.tolist() == [[0, 0, 1, 0, 2], [2, 1, 3, 0, 4], [4, 3, 4, 2, 4]]
    assert out[1, 1::4, 0, 0].tolist() == [102, 101, 103, 100, 104]  # t1ce follows the same offsets


def test_a_lone_slice_repeats_itself_and_no_context_is_the_slice_as_before():
    lone = _planes(1)
    out = neighbour_slices(lone, [0], InputSpec(context=1))
    assert np.array_equal(out[0, :4], out[0, 4:8]) and np.array_equal(out[0, :4], out[0, 8:])
    volume = np.random.default_rng(0).random((4, 5, 6, 7), dtype=np.float32)
    plain = neighbour_slices(volume, [3, 5], InputSpec())
    assert np.array_equal(plain, np.moveaxis(volume[..., [3, 5]], -1, 0))


# -- normalisation -----------------------------------------------------------------------------

def test_zscore_uses_the_brain_keeps_the_background_and_survives_a_constant_modality():
    rng = np.random.default_rng(1)
    volume = np.zeros((4, 20, 20, 3), np.float32)
    volume[:, 5:15, 5:15] = rng.uniform(0.2, 0.9, (4, 10, 10, 3))
    volume[2, 5:15, 5:15] = 0.5  # constant inside the brain: std 0
    spec = InputSpec(input_norm="zscore")
    stats = torch.from_numpy(volume_statistics(volume, spec))
    images = torch.from_numpy(neighbour_slices(volume, [0, 1, 2], spec))
    out = normalise(images, stats.expand(3, -1, -1), spec)
    assert torch.isfinite(out).all()
    brain = torch.zeros(20, 20, dtype=torch.bool)
    brain[5:15, 5:15] = True
    assert (out[:, :, ~brain] == 0).all()  # background stays 0
    assert (out[:, 2][:, brain] == 0).all()  # the constant modality is centred, not divided by 0
    t1 = out[:, 0][:, brain]
    assert abs(float(t1.mean())) < 1e-4 and abs(float(t1.std(unbiased=False)) - 1) < 1e-3
    # percentile mode: nothing changes
    plain = InputSpec()
    assert torch.equal(normalise(images, torch.from_numpy(volume_statistics(volume, plain)).expand(3, -1, -1), plain),
                       images)


def test_zscore_cancels_a_scanner_gain_and_offset_inside_the_brain():
    rng = np.random.default_rng(2)
    volume = np.zeros((4, 16, 16, 2), np.float32)
    volume[:, 4:12, 4:12] = rng.uniform(0.1, 0.6, (4, 8, 8, 2))
    other = volume.copy()
    other[:, 4:12, 4:12] = 1.5 * other[:, 4:12, 4:12] + 0.2  # another scanner's gain and offset
    spec = InputSpec(input_norm="zscore")

    def model_input(v):
        stats = torch.from_numpy(volume_statistics(v, spec)).expand(2, -1, -1)
        return normalise(torch.from_numpy(neighbour_slices(v, [0, 1], spec)), stats, spec)

    assert torch.allclose(model_input(volume), model_input(other), atol=1e-4)


def test_input_spec_refuses_unknown_settings():
    with pytest.raises(DiffSegError, match="zscore"):
        InputSpec(input_norm="minmax")
    with pytest.raises(DiffSegError, match="0 or more"):
        InputSpec(context=-1)


# -- stored in the checkpoint, honoured at sampling ---------------------------------------------

def _save_model(path, spec: InputSpec, predict_xstart=True):
    config = UNetConfig(**TINY, image_size=32, in_channels=spec.channels + 1)
    torch.manual_seed(0)
    model = UNet(config)
    diffusion = DiffusionConfig.from_flags({"diffusion_steps": 100, "predict_xstart": predict_xstart})
    payload = checkpoint.make_payload(config, diffusion, Geometry(resize_to=32),
                                      weights={"model": model.state_dict()},
                                      sampling={**checkpoint.DEFAULT_SAMPLING, "timestep_respacing": "2",
                                                "clip_range": [0.0, 1.0]},
                                      inputs=spec.to_dict())
    checkpoint.atomic_save(payload, path)
    return path


def _volume(depth=6, gain=1.0):
    rng = np.random.default_rng(3)
    volume = np.zeros((4, 24, 24, depth), np.float32)
    volume[:, 4:20, 4:20] = gain * rng.uniform(0.1, 0.6, (4, 16, 16, depth))
    return volume


def test_the_spec_is_stored_and_the_sampler_feeds_normalised_neighbours(tmp_path, monkeypatch):
    spec = InputSpec(input_norm="zscore", context=1)
    segmenter = Segmenter.load(_save_model(tmp_path / "m.pt", spec), device="cpu", batching="1")
    assert segmenter.loaded.inputs == spec and segmenter.loaded.unet_config.in_channels == 13
    seen = []
    encode = segmenter.model.encode_condition

    def spy(images, hints=None):
        seen.append(images.detach().clone())
        return encode(images, hints)

    monkeypatch.setattr(segmenter.model, "encode_condition", spy)
    volume = _volume()
    result = run_to_end(segmenter.run(volume, SamplingOptions(num_ensemble=2), slices=[0, 3], preview_interval=None))
    assert result.probability.shape == volume.shape[1:]
    assert seen and seen[0].shape[1] == 12
    first = seen[0][0]  # slice 0: itself, then -1 (the edge repeated) and +1
    assert torch.equal(first[0:4], first[4:8]) and not torch.equal(first[0:4], first[8:12])
    assert float(first[0:4].min()) < 0  # z-scored: part of the brain lies below its mean
    # a gain on the input (another scanner) leaves a z-score model's input the same
    seen.clear()
    run_to_end(segmenter.run(_volume(gain=1.7), SamplingOptions(num_ensemble=2), slices=[0, 3], preview_interval=None))
    again = seen[0][0]
    assert torch.allclose(first, again, atol=2e-2)


def test_a_model_without_the_spec_samples_exactly_as_before(tmp_path):
    segmenter = Segmenter.load(_save_model(tmp_path / "m.pt", InputSpec()), device="cpu", batching="1")
    assert segmenter.loaded.inputs == InputSpec()
    volume = _volume()
    a = run_to_end(segmenter.run(volume, SamplingOptions(num_ensemble=2, seed=4), slices=[1, 2], preview_interval=None))
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["inputs"]  # a checkpoint from before the option
    torch.save(payload, tmp_path / "old.pt")
    b = run_to_end(Segmenter.load(tmp_path / "old.pt", device="cpu", batching="1").run(
        volume, SamplingOptions(num_ensemble=2, seed=4), slices=[1, 2], preview_interval=None))
    assert np.array_equal(a.samples, b.samples)


def test_a_spec_that_does_not_fit_the_network_is_a_clear_error(tmp_path):
    path = _save_model(tmp_path / "m.pt", InputSpec())
    payload = torch.load(path, weights_only=True)
    payload["inputs"] = {"input_norm": "zscore", "context": 2}
    torch.save(payload, path)
    with pytest.raises(DiffSegError, match="do not match its network"):
        checkpoint.load_model(path)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    synthetic.write_phantoms(root, n=2, seed=5, size=64)
    return root


def test_training_flags_are_stored_and_resume_refuses_other_inputs(phantom_dir, tmp_path):
    flags = ["--data_dir", str(phantom_dir), "--num_channels", "16", "--channel_mult", "1,2", "--num_res_blocks", "1",
             "--attention_resolutions", "", "--crop_border", "0", "--resize_to", "32", "--batch_size", "2",
             "--no_progress", "--device", "cpu", "--norm_groups", "8", "--predict_xstart", "True",
             "--input_norm", "zscore", "--context", "1", "--augment_intensity"]
    out = tmp_path / "run"
    assert train.main([*flags, "--out_dir", str(out), "--max_steps", "2", "--cleanup_min_voxels", "700"]) == 0
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["inputs"] == {"input_norm": "zscore", "context": 1}
    assert payload["sampling"]["cleanup_min_voxels"] == 700  # what diffseg-sample and the widget then use
    assert "flip_members" not in payload["sampling"]  # stored only when asked for (below)
    assert payload["unet_config"]["in_channels"] == 13
    loaded = checkpoint.load_model(out / "model.pt")
    assert loaded.inputs == InputSpec("zscore", 1)
    assert train.main([*flags, "--out_dir", str(tmp_path / "bad"), "--max_steps", "1",
                       "--cleanup_min_voxels", "-1"]) == 2
    other = [f if f != "zscore" else "percentile" for f in flags]
    assert train.main([*other, "--out_dir", str(out), "--max_steps", "3", "--resume", str(out)]) == 2


# -- clean-up ------------------------------------------------------------------------------------

def test_cleanup_removes_small_islands_and_never_the_largest_component():
    mask = np.zeros((20, 20, 10), bool)
    mask[2:8, 2:8, 2:6] = True  # 144 voxels: the lesion
    mask[15, 15, 8] = True  # a 1-voxel false positive
    mask[12:14, 2:4, 2:4] = True  # 8 voxels
    out = remove_small_components(mask, 10)
    assert out[2:8, 2:8, 2:6].all() and not out[15, 15, 8] and not out[12:14, 2:4, 2:4].any()
    assert remove_small_components(mask, 5)[12:14, 2:4, 2:4].all()
    # a size above every component keeps the largest alone
    only = remove_small_components(mask, 10_000)
    assert only.sum() == 144
    assert np.array_equal(remove_small_components(mask, 0), mask)
    assert not remove_small_components(np.zeros((4, 4, 4)), 5).any()
    # corners touch: one component (26-connectivity)
    diagonal = np.zeros((5, 5, 5), bool)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = True
    assert remove_small_components(diagonal, 2).sum() == 2


# -- QU-BraTS ------------------------------------------------------------------------------------

def test_qubrats_score_without_uncertainty_is_the_dice_and_nothing_filtered():
    truth = np.zeros((10, 10), bool)
    truth[2:6, 2:6] = True
    pred = np.zeros((10, 10), bool)
    pred[3:7, 2:6] = True
    scores = qubrats_score(np.zeros((10, 10)), pred, truth)
    assert scores["auc_ftp"] == 0 and scores["auc_ftn"] == 0
    assert scores["auc_dice"] == pytest.approx(0.75)
    assert scores["score"] == pytest.approx((0.75 + 2) / 3)


def test_qubrats_rewards_uncertainty_on_the_errors_and_penalises_it_everywhere():
    truth = np.zeros((10, 10), bool)
    truth[2:6, 2:6] = True
    pred = np.zeros((10, 10), bool)
    pred[3:7, 2:6] = True
    errors = (pred != truth).astype(np.float32)
    on_errors = qubrats_score(errors * 100, pred, truth)
    everywhere = qubrats_score(np.full((10, 10), 100.0), pred, truth)
    none = qubrats_score(np.zeros((10, 10)), pred, truth)
    assert on_errors["score"] > none["score"] > everywhere["score"]
    assert on_errors["auc_dice"] > 0.99 and on_errors["auc_ftp"] == 0
    # only the brain's true negatives count
    brain = np.zeros((10, 10), bool)
    brain[:, :8] = True
    outside = np.zeros((10, 10), np.float32)
    outside[:, 8:] = 100
    assert qubrats_score(outside, pred, truth, brain)["auc_ftn"] == 0


def test_uncertainty_scalings_span_zero_to_hundred():
    assert variance_to_uncertainty(np.array([0.0, 0.25]))[1] == pytest.approx(100)
    h = entropy_uncertainty(np.array([0.0, 0.5, 1.0]))
    assert h.tolist() == pytest.approx([0, 100, 0])


def _spy_on_condition(segmenter, monkeypatch) -> list:
    seen = []
    encode = segmenter.model.encode_condition

    def spy(images, hints=None):
        seen.append(images.detach().clone())
        return encode(images, hints)

    monkeypatch.setattr(segmenter.model, "encode_condition", spy)
    return seen


def test_a_lone_slice_with_its_source_volume_sees_what_a_volume_run_sees(tmp_path, monkeypatch):
    segmenter = Segmenter.load(_save_model(tmp_path / "m.pt", InputSpec("zscore", 2)), device="cpu", batching="1")
    seen = _spy_on_condition(segmenter, monkeypatch)
    volume = _volume()
    run_to_end(segmenter.run(volume, SamplingOptions(num_ensemble=1), slices=[1], preview_interval=None))
    one = SamplingOptions(num_ensemble=1)
    run_to_end(segmenter.run(volume[..., 1], one, preview_interval=None, source=(volume, 1)))
    run_to_end(segmenter.run(volume[..., 1], one, preview_interval=None))  # no source: itself
    assert torch.equal(seen[0], seen[1])
    assert not torch.equal(seen[0], seen[2])


def test_the_widget_job_hands_a_context_model_the_volume_of_a_current_slice_run(tmp_path, monkeypatch):
    from napari_diffseg import _layerdata as ld
    from napari_diffseg import inference
    from napari_diffseg._gui.inputs import Inputs
    from napari_diffseg._gui.job import RunRequest, run_job
    from napari_diffseg._gui.models import ModelCache
    from napari_diffseg._gui.settings import Settings

    path = _save_model(tmp_path / "m.pt", InputSpec("zscore", 1))
    volume = _volume()
    arrays = [np.ascontiguousarray(ld.to_display(image)) for image in volume]
    given = []
    original = inference.Segmenter.run

    def spy(self, images, *args, **kwargs):
        given.append(kwargs.get("source"))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(inference.Segmenter, "run", spy)
    request = RunRequest(inputs=Inputs(arrays=arrays, spatial_ndim=3, display_shape=arrays[0].shape, case="c",
                                       reference=None),
                         settings=Settings(model_path=str(path), device="cpu", num_ensemble=2), z=2)
    job = run_job(request, ModelCache())
    while True:
        try:
            next(job)
        except StopIteration:
            break
    assert given and given[0] is not None
    source_volume, z = given[0]
    assert z == 2 and source_volume.shape == volume.shape


def test_sample_cleanup_flag_removes_islands_and_defaults_to_the_models_size(tmp_path):
    from scipy import ndimage

    from napari_diffseg import data, sample

    spec = InputSpec()
    model = _save_model(tmp_path / "m.pt", spec, predict_xstart=False)  # untrained eps model: a speckled mask
    case_dir = tmp_path / "cases" / "vol"
    case_dir.mkdir(parents=True)
    volume = _volume(depth=5)
    volume[volume == 0] = 0.05  # scanned everywhere: nothing is segmented outside a scan, and the islands fall anywhere
    for index, modality in enumerate(data.MODALITIES):
        data.save_nifti(case_dir / f"vol_{modality}.nii.gz", volume[index], np.eye(4))

    def mask_of(*extra):
        out = tmp_path / ("out" + "_".join(extra))
        assert sample.main(["--model_path", str(model), "--data_dir", str(tmp_path / "cases"), "--out_dir", str(out),
                            "--num_ensemble", "2", "--device", "cpu", "--no_progress", *extra]) == 0
        return data.load_nifti(out / "vol" / "mask.nii.gz")[0].astype(bool)

    raw = mask_of("--cleanup", "0")
    parts = ndimage.label(raw, structure=np.ones((3, 3, 3)))[1]
    assert parts > 1  # the test needs islands to remove
    cleaned = mask_of("--cleanup", "1000000")
    assert np.array_equal(cleaned, remove_small_components(raw, 10**6)) and cleaned.sum() < raw.sum()
    # stored in the model: used when the flag is not given
    payload = torch.load(model, weights_only=True)
    payload["sampling"]["cleanup_min_voxels"] = 10**6
    torch.save(payload, model)
    assert np.array_equal(mask_of(), cleaned)


# -- test-time flips ---------------------------------------------------------------------------

def _flip_model():
    torch.manual_seed(0)
    model = UNet(UNetConfig(**TINY, image_size=16, in_channels=5))
    with torch.no_grad():  # the output layer starts at zero: give the network something to say
        model.out[2].weight.normal_(0.0, 0.05)
    return model.eval()


def _last(model, diffusion, images, options, **kwargs):
    from napari_diffseg.ensemble import sample_ensemble

    steps = list(sample_ensemble(model, diffusion, images, options, **kwargs))
    return steps[-1]


def test_a_flipped_member_is_the_mirrored_slice_segmented_and_mirrored_back():
    """Members 1, 3, ... of each slice run on the left-right mirrored slice, from the same noise,
    and come back in the slice's frame; members 0, 2, ... are unchanged."""
    from napari_diffseg.diffusion import Diffusion
    from napari_diffseg.ensemble import LEFT_RIGHT, mirrored_chains

    model, diffusion = _flip_model(), Diffusion.from_config(DiffusionConfig(), "4")
    images = torch.rand((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    assert mirrored_chains(6, 3).tolist() == [False, True, False, False, True, False]
    assert not mirrored_chains(2, 1).any()  # a lone member is never mirrored
    flipped = _last(model, diffusion, images, SamplingOptions(3, seed=2, flip_members=True))
    plain = _last(model, diffusion, images, SamplingOptions(3, seed=2))
    mirror = _last(model, diffusion, images.flip(LEFT_RIGHT), SamplingOptions(3, seed=2))
    for row in range(6):
        expected = mirror.x[row].flip(LEFT_RIGHT) if row % 3 == 1 else plain.x[row]
        torch.testing.assert_close(flipped.x[row], expected, rtol=1e-4, atol=1e-5)
        estimate = mirror.pred_x0[row].flip(LEFT_RIGHT) if row % 3 == 1 else plain.pred_x0[row]
        torch.testing.assert_close(flipped.pred_x0[row], estimate, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(flipped.x[1], plain.x[1])  # the tiny net is not mirror-symmetric


def test_flipped_members_hold_known_pixels_and_refine_from_members_in_the_slices_frame():
    """Known pixels and the members a refine starts from are given in the slice's frame: a
    mirrored chain gets them mirrored, so its result holds them where they were given."""
    from napari_diffseg.diffusion import Diffusion
    from napari_diffseg.ensemble import LEFT_RIGHT
    from napari_diffseg.options import Guidance

    model, diffusion = _flip_model(), Diffusion.from_config(DiffusionConfig(), "6")
    images = torch.rand((1, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    known = torch.zeros((1, 1, 16, 16), dtype=torch.bool)
    known[..., 2:6, 3:9] = True  # off the mirror axis: a mirrored chain would hold it elsewhere
    values = torch.zeros((1, 1, 16, 16))
    values[..., 2:6, 3:9] = 1.0
    members = torch.zeros((2, 1, 16, 16))
    members[1, :, 10:14, 1:5] = 1.0  # member 1 (a mirrored chain) had tumour here
    guidance = Guidance(known_mask=known, known_values=values, init=members, start_step=2)
    out = _last(model, diffusion, images, SamplingOptions(2, seed=0, flip_members=True), guidance=guidance,
                clip_range=(0.0, 1.0)).x
    assert torch.equal(out[:, known[0]], torch.ones_like(out[:, known[0]]))
    # Member 1 is what a plain run on the mirrored slice, given everything mirrored, makes of it
    mirrored = Guidance(known_mask=known.flip(LEFT_RIGHT), known_values=values.flip(LEFT_RIGHT),
                        init=members.flip(LEFT_RIGHT), start_step=2)
    mirror = _last(model, diffusion, images.flip(LEFT_RIGHT), SamplingOptions(2, seed=0), guidance=mirrored,
                   clip_range=(0.0, 1.0)).x
    torch.testing.assert_close(out[1], mirror[1].flip(LEFT_RIGHT), rtol=1e-4, atol=1e-5)
    plain = _last(model, diffusion, images, SamplingOptions(2, seed=0), guidance=guidance, clip_range=(0.0, 1.0)).x
    torch.testing.assert_close(out[0], plain[0], rtol=1e-4, atol=1e-5)


def test_flips_are_stored_by_training_honoured_at_sampling_and_overridable(phantom_dir, tmp_path):
    """diffseg-train --flip_members stores the default; a run follows it unless told otherwise;
    the one-pass U-Net averages its pass on the slice and on the mirrored slice."""
    flags = ["--data_dir", str(phantom_dir), "--num_channels", "16", "--channel_mult", "1,2", "--num_res_blocks", "1",
             "--attention_resolutions", "", "--crop_border", "0", "--resize_to", "32", "--batch_size", "2",
             "--no_progress", "--device", "cpu", "--norm_groups", "8", "--max_steps", "2", "--flip_members",
             "--sample_respacing", "2"]
    assert train.main([*flags, "--out_dir", str(tmp_path / "diffusion"), "--predict_xstart", "True"]) == 0
    assert torch.load(tmp_path / "diffusion" / "model.pt", weights_only=True)["sampling"]["flip_members"] is True
    volume = _volume()
    segmenter = Segmenter.load(tmp_path / "diffusion" / "model.pt", device="cpu", batching="3")
    stored = run_to_end(segmenter.run(volume, SamplingOptions(3, seed=1), slices=[2], preview_interval=None))
    on = run_to_end(segmenter.run(volume, SamplingOptions(3, seed=1, flip_members=True), slices=[2],
                                  preview_interval=None))
    off = run_to_end(segmenter.run(volume, SamplingOptions(3, seed=1, flip_members=False), slices=[2],
                                   preview_interval=None))
    assert stored.settings["flip_members"] and not off.settings["flip_members"]
    assert np.array_equal(stored.probability, on.probability)
    assert not np.array_equal(stored.probability, off.probability)

    assert train.main([*flags, "--out_dir", str(tmp_path / "unet"), "--objective", "segmentation"]) == 0
    unet = Segmenter.load(tmp_path / "unet" / "model.pt", device="cpu")
    both = run_to_end(unet.run(volume, SamplingOptions(), slices=[2], preview_interval=None)).probability[..., 2]
    one = run_to_end(unet.run(volume, SamplingOptions(flip_members=False), slices=[2],
                              preview_interval=None)).probability[..., 2]
    mirrored = run_to_end(unet.run(volume[:, ::-1].copy(), SamplingOptions(flip_members=False), slices=[2],
                                   preview_interval=None)).probability[..., 2]
    np.testing.assert_allclose(both, (one + mirrored[::-1]) / 2, atol=1e-5)
    assert not np.allclose(both, one, atol=1e-4)
