"""The python API of the core: diffusion sampling, respacing, ensembles and the Segmenter.

Everything runs on the CPU with a tiny UNet (a few hundred thousand parameters) and a
handful of steps, so the whole file takes seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffseg import checkpoint
from napari_diffseg.diffusion import Diffusion, DiffusionConfig, make_betas, space_timesteps
from napari_diffseg.ensemble import ensemble_statistics, sample_ensemble
from napari_diffseg.errors import DiffSegError
from napari_diffseg.geometry import Geometry
from napari_diffseg.inference import Segmenter, run_to_end
from napari_diffseg.options import SamplingOptions
from napari_diffseg.unet import UNet, UNetConfig

from support import TINY, final_members, random_images, save_tiny_checkpoint, tiny_model

@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return tiny_model()


@pytest.fixture(scope="module")
def diffusion10():
    return Diffusion.from_config(DiffusionConfig(), "10")


# -- diffusion and ensemble API -------------------------------------------------------------

def test_sampling_yields_every_step_with_ensemble_states(model, diffusion10):
    assert diffusion10.num_timesteps == 10
    steps = list(sample_ensemble(model, diffusion10, random_images(2), SamplingOptions(3, seed=1)))
    assert len(steps) == diffusion10.num_timesteps
    assert [s.index for s in steps] == list(range(10))
    assert all(s.total == 10 for s in steps)
    assert all(tuple(s.x.shape) == (6, 1, 16, 16) for s in steps)
    assert all(tuple(s.pred_x0.shape) == (6, 1, 16, 16) for s in steps)
    ts = [s.t for s in steps]
    assert ts == sorted(ts, reverse=True) and ts[0] == 999 and ts[-1] == 0
    assert torch.isfinite(steps[-1].x).all()


def test_seeded_sampling_is_reproducible(model, diffusion10):
    images = random_images(2)
    a = final_members(model, diffusion10, images, 2, seed=7)
    b = final_members(model, diffusion10, images, 2, seed=7)
    c = final_members(model, diffusion10, images, 2, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # The chains of one slice differ from each other too.
    assert not torch.allclose(a[0], a[1])


def test_slice_result_does_not_depend_on_its_batch(model, diffusion10):
    images = random_images(2)
    together = final_members(model, diffusion10, images, 2, seed=3, slice_keys=[4, 9])
    alone = final_members(model, diffusion10, images[1:], 2, seed=3, slice_keys=[9])
    torch.testing.assert_close(together[2:], alone, rtol=1e-4, atol=1e-5)
    other_key = final_members(model, diffusion10, images[1:], 2, seed=3, slice_keys=[4])
    assert not torch.allclose(alone, other_key)


def test_ddim_eta0_is_deterministic_given_start_noise(model):
    diffusion = Diffusion.from_config(DiffusionConfig(), "ddim10")
    images = random_images(1)
    with torch.inference_mode():
        condition = model.encode_condition(images.repeat(2, 1, 1, 1))

    def denoise(x, t):
        with torch.inference_mode():
            return model.forward_conditioned(x, t, condition)

    start = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))

    def run(draw):
        last = None
        for last in diffusion.sample(denoise, start.clone(), draw_noise=draw, sampler="ddim", eta=0.0):
            pass
        return last.x

    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a = run(lambda: torch.randn((2, 1, 16, 16), generator=gen_a))
    b = run(lambda: torch.randn((2, 1, 16, 16), generator=gen_b))
    assert torch.equal(a, b)
    # eta > 0 does use the noise.
    gen_c, gen_d = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    last_c = last_d = None
    for last_c in diffusion.sample(denoise, start.clone(), lambda: torch.randn((2, 1, 16, 16), generator=gen_c),
                                   sampler="ddim", eta=1.0):
        pass
    for last_d in diffusion.sample(denoise, start.clone(), lambda: torch.randn((2, 1, 16, 16), generator=gen_d),
                                   sampler="ddim", eta=1.0):
        pass
    assert not torch.allclose(last_c.x, last_d.x)


def test_ensemble_statistics_on_hand_made_samples():
    samples = torch.tensor([[0.0, 1.0, 0.2], [1.0, 1.0, 0.2], [1.0, 0.0, 0.2], [0.0, 1.0, 0.2]])
    mean, variance, mask = ensemble_statistics(samples)
    torch.testing.assert_close(mean, torch.tensor([0.5, 0.75, 0.2]))
    torch.testing.assert_close(variance, torch.tensor([0.25, 0.1875, 0.0]))
    assert mask.dtype == torch.uint8
    assert mask.tolist() == [0, 1, 0]  # strictly greater than one half
    _, _, low = ensemble_statistics(samples, threshold=0.1)
    assert low.tolist() == [1, 1, 1]
    m1, v1, k1 = ensemble_statistics(torch.tensor([[0.7, 0.3]]))
    torch.testing.assert_close(m1, torch.tensor([0.7, 0.3]))
    assert torch.count_nonzero(v1) == 0 and k1.tolist() == [1, 0]


@pytest.mark.parametrize("spec, fix", [("ddim300", "plain form 300"), ("ddim0", "take 2 to 1000"),
                                       ("ddim1", "take 2 to 1000"), ("ddim5000", "take 2 to 1000")])
def test_an_impossible_ddim_count_names_a_fix_that_works(spec, fix):
    with pytest.raises(DiffSegError, match=fix):
        space_timesteps(1000, spec)
    if fix.startswith("plain form"):
        assert len(space_timesteps(1000, fix.split()[-1])) == 300


@pytest.mark.parametrize("spec, count", [("10", 10), ("ddim10", 10), ("25,25", 50), ("", 1000)])
def test_respacing_counts_and_alpha_bar(spec, count):
    use = space_timesteps(1000, spec)
    assert len(use) == count
    assert use == sorted(set(use)) and use[0] == 0 and use[-1] <= 999
    if spec == "ddim10":
        assert use == list(range(0, 1000, 100))
    if spec == "10":
        assert use[-1] == 999
    if spec == "25,25":
        assert sum(t < 500 for t in use) == 25 and sum(t >= 500 for t in use) == 25
    diffusion = Diffusion.from_config(DiffusionConfig(), spec)
    assert diffusion.num_timesteps == count and diffusion.timestep_map == use
    original = np.cumprod(1.0 - make_betas("linear", 1000))
    np.testing.assert_allclose(diffusion.arrays["alphas_cumprod"], original[use], rtol=1e-10, atol=0)


# -- Segmenter ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def segmenters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-checkpoints")
    geometries = {"pad": Geometry(), "resize": Geometry(resize_to=32), "reference": Geometry.reference()}
    return {name: Segmenter.load(save_tiny_checkpoint(folder / f"{name}.pt", g), device="cpu")
            for name, g in geometries.items()}


def _run(segmenter, images, slices=None, keep_samples=True, **options):
    progress = []
    result = run_to_end(segmenter.run(images, SamplingOptions(**options), slices=slices, keep_samples=keep_samples),
                        progress.append)
    return result, progress


def _check_outputs(result, shape, n):
    assert result.probability.shape == shape and result.probability.dtype == np.float32
    assert result.variance.shape == shape and result.variance.dtype == np.float32
    assert result.mask.shape == shape and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {0, 1}
    assert np.isfinite(result.probability).all() and (result.variance >= 0).all()
    assert result.samples is not None and result.samples.shape == (n, *shape)


@pytest.mark.parametrize("geometry", ["pad", "resize"])
def test_segmenter_slice_keeps_odd_input_shape(segmenters, geometry):
    images = np.random.default_rng(0).random((4, 37, 45)).astype(np.float32)
    result, progress = _run(segmenters[geometry], images, num_ensemble=2, respacing="3", seed=0,
                            keep_samples=True)
    _check_outputs(result, (37, 45), 2)
    assert len(progress) == 3 * 1
    assert [p.step for p in progress] == [1, 2, 3] and progress[-1].fraction == pytest.approx(1.0)
    assert result.steps == 3 and result.num_ensemble == 2
    np.testing.assert_allclose(result.probability, result.samples.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("geometry", ["pad", "resize"])
def test_segmenter_volume_skips_empty_slices(segmenters, geometry):
    volume = np.random.default_rng(1).random((4, 37, 45, 4)).astype(np.float32)
    volume[..., 1] = 0  # outside the brain: no work, no mask
    result, progress = _run(segmenters[geometry], volume, num_ensemble=2, respacing="3", seed=0,
                            keep_samples=True, batch_slices=2)
    _check_outputs(result, (37, 45, 4), 2)
    assert len(progress) == 3 * 2  # slices 0, 2, 3 in batches of two
    assert {p.batches for p in progress} == {2}
    assert [p.slices for p in progress[::3]] == [[0, 2], [3]]
    for array in (result.probability, result.variance, result.mask, result.samples[..., 1]):
        assert not np.any(array[..., 1])
    assert np.any(result.probability[..., 0])


def _outside_scan_band(shape, seed):
    """Random images whose top rows are 0 in every modality (outside the scanned head), and a
    pixel there where one modality alone is not 0 (inside: one modality is enough)."""
    images = np.random.default_rng(seed).random(shape).astype(np.float32)
    images[:, :6] = 0
    images[2, 1, 1] = 0.5
    outside = np.zeros(shape[1:3], bool)
    outside[:6] = True
    outside[1, 1] = False
    return images, outside


@pytest.mark.parametrize("geometry", ["pad", "resize"])
def test_nothing_is_segmented_or_uncertain_outside_the_scan(segmenters, geometry):
    images, outside = _outside_scan_band((4, 37, 45), seed=4)
    result, progress = _run(segmenters[geometry], images, num_ensemble=3, respacing="3", seed=0, keep_samples=True)
    previews = [p.preview[0] for p in progress]
    for array in (result.probability, result.variance, result.mask, *result.samples, *previews):
        assert not np.any(array[outside])
    assert len(previews) == 3 and np.any(previews[0][~outside])
    # the tiny random network puts something almost everywhere else, the lone pixel included
    assert np.count_nonzero(result.samples[:, ~outside]) > 0.5 * result.samples[:, ~outside].size
    assert np.all(result.samples[:, 1, 1] != 0)
    np.testing.assert_allclose(result.probability, result.samples.mean(0), rtol=1e-5, atol=1e-6)


def test_segmenter_reference_geometry_240(segmenters):
    images = np.random.default_rng(2).random((4, 240, 240)).astype(np.float32)
    result, progress = _run(segmenters["reference"], images, num_ensemble=1, respacing="3", seed=0,
                            keep_samples=True)
    _check_outputs(result, (240, 240), 1)
    assert len(progress) == 3
    border = np.ones((240, 240), bool)
    border[8:-8, 8:-8] = False
    for array in (result.probability, result.variance, result.mask, result.samples[0]):
        assert not np.any(array[border])
    assert np.any(result.probability[8:-8, 8:-8])
    assert not np.any(result.variance)  # one member: no spread


def test_segmenter_one_slice_equals_the_same_slice_of_a_volume_run(segmenters):
    volume = np.random.default_rng(3).random((4, 32, 32, 3)).astype(np.float32)
    seg = segmenters["pad"]
    whole, _ = _run(seg, volume, num_ensemble=2, respacing="3", seed=5, batch_slices=3)
    alone, progress = _run(seg, volume, num_ensemble=2, respacing="3", seed=5, slices=[2])
    assert len(progress) == 3
    np.testing.assert_allclose(alone.probability[..., 2], whole.probability[..., 2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(alone.variance[..., 2], whole.variance[..., 2], rtol=1e-4, atol=1e-5)
    assert not np.any(alone.probability[..., :2])
    again, _ = _run(seg, volume, num_ensemble=2, respacing="3", seed=5, batch_slices=3)
    np.testing.assert_array_equal(again.probability, whole.probability)
    other, _ = _run(seg, volume, num_ensemble=2, respacing="3", seed=6, batch_slices=3)
    assert not np.allclose(other.probability, whole.probability)


def test_checkpoint_clip_range_reaches_the_sampler(tmp_path):
    """A model trained here stores clip_range [0, 1]; its x0 estimates and final members
    then stay in the mask's range, while the reference default keeps [-1, 1]."""
    state = {k: v.detach().clone() for k, v in tiny_model(3).state_dict().items()}
    members = {}
    for name, clip in (("mask", [0.0, 1.0]), ("reference", [-1.0, 1.0])):
        path = tmp_path / f"{name}.pt"
        checkpoint.atomic_save(checkpoint.make_payload(
            UNetConfig(**TINY), DiffusionConfig(), Geometry(), {"model": state},
            sampling={"timestep_respacing": "5", "sampler": "ddpm", "num_ensemble": 3, "clip_range": clip}), path)
        segmenter = Segmenter.load(path, device="cpu")
        assert list(segmenter.defaults["clip_range"]) == clip
        result, _ = _run(segmenter, random_images(1, 16, 16, seed=4)[0].numpy(), seed=2)
        members[name] = result.samples
    assert members["mask"].min() >= 0.0 and members["mask"].max() <= 1.0
    assert members["reference"].min() < 0.0  # this random model's x0 estimates go negative unclipped at 0


def test_precision_auto_follows_native_bf16_and_bad_choices_are_refused(monkeypatch):
    from napari_diffseg import inference

    cpu = torch.device("cpu")
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.resolve_precision("auto", cpu) == "fp32"
    assert inference.resolve_precision("BF16", cpu) == "bf16"
    assert inference.resolve_precision("auto", torch.device("cuda")) == "fp16"  # the closer to fp32 there
    with pytest.raises(DiffSegError, match="fp16 needs a CUDA GPU"):
        inference.resolve_precision("fp16", cpu)
    with pytest.raises(DiffSegError, match="unknown"):
        inference.resolve_precision("int8", cpu)


def test_run_precision_overrides_the_segmenter_and_bf16_stays_close(segmenters):
    segmenter = segmenters["pad"]
    assert segmenter.precision == "fp32"
    images = np.random.default_rng(1).random((4, 24, 24)).astype(np.float32)
    exact, _ = _run(segmenter, images, num_ensemble=2, respacing="3", seed=0)
    fast, _ = _run(segmenter, images, num_ensemble=2, respacing="3", seed=0, precision="bf16")
    assert exact.settings["precision"] == "fp32" and fast.settings["precision"] == "bf16"
    assert segmenter.precision == "fp32"  # the override is per run
    difference = np.abs(exact.samples - fast.samples)
    assert 0 < difference.max() < 0.1  # bf16 arithmetic ran, and changes the members only a little


def test_compile_option_runs_the_network_under_torch_compile(tmp_path):
    """Segmenter(compile=True), as --compile: the same chains through the compiled network (a few
    seconds of compiling for this tiny one; CUDA graphs are checked on a GPU in test_cuda)."""
    path = save_tiny_checkpoint(tmp_path / "tiny.pt", Geometry())
    images = np.random.default_rng(5).random((4, 16, 16)).astype(np.float32)
    segmenter = Segmenter.load(path, device="cpu", compile=True)
    assert "_body" in vars(segmenter.model)  # the instance's body is the compiled one
    try:
        compiled, _ = _run(segmenter, images, num_ensemble=2, respacing="3")
    finally:
        torch._dynamo.reset()
    plain, _ = _run(Segmenter.load(path, device="cpu"), images, num_ensemble=2, respacing="3")
    np.testing.assert_allclose(compiled.samples, plain.samples, atol=1e-4)


def test_compile_without_a_c_compiler_is_a_clear_error(tmp_path, monkeypatch):
    from napari_diffseg import inference


    monkeypatch.setattr(inference.shutil, "which", lambda name: None)
    with pytest.raises(DiffSegError, match="needs a C compiler"):
        Segmenter.load(save_tiny_checkpoint(tmp_path / "tiny.pt", Geometry()), device="cpu", compile=True)


def test_group_norm_takes_bf16_directly_when_sampling_on_the_cpu():
    """Sampling in bf16 on the CPU skips the float round trip of GroupNorm32: same result to
    bf16 rounding, bf16 out; with gradients on (training) the float path stays."""
    from napari_diffseg.unet import GroupNorm32

    norm = GroupNorm32(8, 32)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (3 * torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(0)) + 1).bfloat16()
    x = x.to(memory_format=torch.channels_last)
    exact = torch.nn.functional.group_norm(x.float(), 8, norm.weight, norm.bias, norm.eps)
    with torch.inference_mode():
        fast = norm(x)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), exact, rtol=1e-2, atol=2e-2)
    trained = norm(x.detach().requires_grad_())
    assert trained.dtype == torch.bfloat16
    torch.testing.assert_close(trained.float(), exact.bfloat16().float(), rtol=0, atol=0)  # cast once at the end


def test_fewer_norm_groups_let_the_network_see_a_uniform_mask_offset():
    """At 32 channels the reference's 32 groups normalise every feature map on its own, which
    removes a uniform offset of the noisy mask: the output barely moves (chains then drift to
    all-tumour unchecked). With 8 groups the offset reaches the output."""
    x = torch.randn(1, 5, 32, 32, generator=torch.Generator().manual_seed(0))
    shifted = x.clone()
    shifted[:, 4] += 1.0
    response = {}
    for groups in (32, 8):
        torch.manual_seed(0)
        model = UNet(UNetConfig(**TINY, norm_groups=groups)).eval()
        with torch.no_grad():
            model.out[2].weight.normal_(0.0, 0.05)
            change = model(shifted, torch.tensor([500])) - model(x, torch.tensor([500]))
        response[groups] = float(change[:, 0, 4:-4, 4:-4].mean().abs())  # away from the zero padding
    assert response[8] > 10 * response[32]


def test_norm_groups_round_trip_and_old_checkpoints_default_to_32(tmp_path):
    path = tmp_path / "groups.pt"
    torch.manual_seed(0)
    config = UNetConfig(**TINY, norm_groups=8)
    checkpoint.atomic_save(checkpoint.make_payload(config, DiffusionConfig(), Geometry(),
                                                   {"model": UNet(config).state_dict()}), path)
    assert checkpoint.load_model(path).unet_config.norm_groups == 8
    legacy = {k: v for k, v in UNetConfig(**TINY).to_dict().items() if k != "norm_groups"}
    assert UNetConfig.from_flags(legacy).norm_groups == 32
    with pytest.raises(ValueError, match="norm_groups 7 must divide"):
        UNet(UNetConfig(**TINY, norm_groups=7))
