"""Known-pixel sampling and refinement (the user's marks steer the chains): the core API.

A tiny random UNet is enough: the properties checked here (known pixels exact, the
unguided chain unchanged, steps saved by a late start) hold for any network."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_diffseg.checkpoint import LoadedModel
from napari_diffseg.diffusion import Diffusion, DiffusionConfig
from napari_diffseg.ensemble import sample_ensemble
from napari_diffseg.errors import DiffSegError
from napari_diffseg.geometry import Geometry
from napari_diffseg.inference import Segmenter, run_to_end
from napari_diffseg.options import Guidance, SamplingOptions
from napari_diffseg.unet import UNetConfig

from support import TINY, tiny_model


def _images(s: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand((s, 4, size, size), generator=torch.Generator().manual_seed(seed))


def _known(s: int = 2, size: int = 16):
    mask = torch.zeros(s, 1, size, size, dtype=torch.bool)
    values = torch.zeros(s, 1, size, size)
    mask[:, :, 2:6, 2:6] = True
    values[:, :, 2:6, 2:6] = 1.0  # a tumour scribble
    mask[:, :, 10:14, 10:14] = True  # a background scribble (values stay 0)
    return mask, values


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("predict_xstart", [False, True])
def test_known_pixels_end_exactly_at_the_given_values(model, sampler, predict_xstart):
    diffusion = Diffusion.from_config(DiffusionConfig(predict_xstart=predict_xstart), "10")
    mask, values = _known()
    steps = list(sample_ensemble(model, diffusion, _images(), SamplingOptions(3, sampler=sampler, seed=4),
                                 Guidance(known_mask=mask, known_values=values), clip_range=(0.0, 1.0)))
    final = steps[-1].x  # (S * N, 1, h, w)
    chains_mask = mask.repeat_interleave(3, dim=0)
    chains_values = values.repeat_interleave(3, dim=0)
    assert torch.equal(final[chains_mask], chains_values[chains_mask])
    # Midway the known pixels carry noise at the step's level, not the clean value.
    assert not torch.equal(steps[2].x[chains_mask], chains_values[chains_mask])


def test_no_known_pixels_and_the_chain_start_equal_the_plain_sampler_bit_for_bit(model):
    diffusion = Diffusion.from_config(DiffusionConfig(), "10")
    plain = list(sample_ensemble(model, diffusion, _images(), SamplingOptions(4, seed=9)))
    explicit = list(sample_ensemble(model, diffusion, _images(), SamplingOptions(4, seed=9),
                                    Guidance(start_step=diffusion.num_timesteps - 1)))
    assert len(plain) == len(explicit) == 10
    for a, b in zip(plain, explicit):
        assert torch.equal(a.x, b.x) and torch.equal(a.pred_x0, b.pred_x0)


class _Counting(torch.nn.Module):
    """The model, recording the timestep of every network evaluation."""

    def __init__(self, inner, calls: list):
        super().__init__()
        self.inner, self.calls = inner, calls

    def encode_condition(self, images):
        return self.inner.encode_condition(images)

    def forward_conditioned(self, x, t, condition, x0_prev=None):
        self.calls.append(int(t[0]))
        return self.inner.forward_conditioned(x, t, condition, x0_prev)


def test_refine_from_members_halfway_runs_half_the_chain(model):
    diffusion = Diffusion.from_config(DiffusionConfig(), "20")
    calls = []
    counted = _Counting(model, calls)
    full = list(sample_ensemble(counted, diffusion, _images(), SamplingOptions(3, seed=2)))
    full_calls = len(calls)
    members = full[-1].x
    calls.clear()
    refined = list(sample_ensemble(counted, diffusion, _images(), SamplingOptions(3, seed=2),
                                   Guidance(init=members, start_step=9)))
    assert full_calls == 20 and len(calls) == 10 == len(refined)
    assert refined[0].total == 10
    # Started from the members, not from scratch: closer to them than a fresh chain is.
    fresh = list(sample_ensemble(model, diffusion, _images(), SamplingOptions(3, seed=77)))[-1].x
    assert (refined[-1].x - members).abs().mean() < (fresh - members).abs().mean()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_resampling_repeats_every_step_but_the_last_and_keeps_the_known_pixels(model, sampler):
    diffusion = Diffusion.from_config(DiffusionConfig(predict_xstart=True), "20")
    mask, values = _known()
    members = list(sample_ensemble(model, diffusion, _images(), SamplingOptions(3, seed=2),
                                   clip_range=(0.0, 1.0)))[-1].x
    calls = []
    options = SamplingOptions(3, sampler=sampler, seed=5)
    refine = Guidance(known_mask=mask, known_values=values, init=members, start_step=9)
    once = list(sample_ensemble(_Counting(model, calls), diffusion, _images(), options, refine, clip_range=(0.0, 1.0)))
    assert len(calls) == 10
    calls.clear()
    thrice = list(sample_ensemble(_Counting(model, calls), diffusion, _images(), options, replace(refine, resample=3),
                                  clip_range=(0.0, 1.0)))
    # Steps 9..1 three times each, step 0 once; one yield per step all the same.
    assert len(calls) == 9 * 3 + 1 and len(thrice) == len(once) == 10
    assert calls[:3] == [calls[0]] * 3 and calls[-2] != calls[-1]
    chains_mask = mask.repeat_interleave(3, dim=0)
    chains_values = values.repeat_interleave(3, dim=0)
    assert torch.equal(thrice[-1].x[chains_mask], chains_values[chains_mask])
    assert not torch.equal(thrice[-1].x, once[-1].x)


def test_resampling_without_known_pixels_changes_nothing(model):
    diffusion = Diffusion.from_config(DiffusionConfig(), "10")
    plain = list(sample_ensemble(model, diffusion, _images(), SamplingOptions(2, seed=9)))[-1].x
    asked = list(sample_ensemble(model, diffusion, _images(), SamplingOptions(2, seed=9), Guidance(resample=4)))[-1].x
    assert torch.equal(plain, asked)
    with pytest.raises(DiffSegError, match="resample"):
        Guidance(resample=0)


def test_refine_needs_members_and_a_valid_start(model):
    diffusion = Diffusion.from_config(DiffusionConfig(), "10")
    with pytest.raises(DiffSegError, match="needs the members to refine"):
        next(sample_ensemble(model, diffusion, _images(), SamplingOptions(2), Guidance(start_step=4)))
    with pytest.raises(DiffSegError, match="outside"):
        next(sample_ensemble(model, diffusion, _images(), SamplingOptions(2),
                             Guidance(init=torch.zeros(4, 1, 16, 16), start_step=10)))
    with pytest.raises(DiffSegError, match="need the step they start from"):
        Guidance(init=torch.zeros(4, 1, 16, 16))


def _segmenter(seed: int = 0) -> Segmenter:
    config = UNetConfig(**TINY)
    loaded = LoadedModel(model=tiny_model(seed), unet_config=config, diffusion_config=DiffusionConfig(),
                         geometry=Geometry(crop_border=0, resize_to=32),
                         sampling={"timestep_respacing": "10", "sampler": "ddpm", "num_ensemble": 3,
                                   "clip_range": [0.0, 1.0]})
    return Segmenter(loaded, device="cpu")


def test_segmenter_refine_keeps_known_pixels_exact_at_the_input_resolution():
    segmenter = _segmenter()
    rng = np.random.default_rng(0)
    images = rng.random((4, 45, 37)).astype(np.float32)  # resampled to 32x32 and back
    first = run_to_end(segmenter.run(images, SamplingOptions(seed=1)))
    known = np.zeros((45, 37), bool)
    values = np.zeros((45, 37), np.float32)
    known[5:9, 3:30] = True
    values[5:9, 3:30] = 1.0
    known[30:33, 10:12] = True  # a thin background stroke, thinner than a network pixel
    refined = run_to_end(segmenter.run(images, SamplingOptions(seed=1), Guidance(known_mask=known, known_values=values,
                                                                                 init=first.samples, start_step=4)))
    assert refined.steps == 5
    assert np.array_equal(refined.samples[:, known], np.broadcast_to(values[known], (3, known.sum())))
    assert np.all(refined.probability[known] == values[known]) and np.all(refined.variance[known] == 0)
    # Refining the same members with the same seed and marks is reproducible.
    again = run_to_end(segmenter.run(images, SamplingOptions(seed=1), Guidance(known_mask=known, known_values=values,
                                                                               init=first.samples, start_step=4)))
    assert np.array_equal(again.samples, refined.samples)


def test_segmenter_refine_rejects_misshapen_marks():
    segmenter = _segmenter()
    images = np.zeros((4, 20, 20), np.float32)
    with pytest.raises(DiffSegError, match="image's shape"):
        run_to_end(segmenter.run(images, SamplingOptions(), Guidance(known_mask=np.zeros((10, 10), bool),
                                                                     known_values=np.zeros((10, 10)))))
    with pytest.raises(DiffSegError, match="members to refine"):
        run_to_end(segmenter.run(images, SamplingOptions(), Guidance(init=np.zeros((2, 20, 20)), start_step=3)))


def test_a_one_step_chain_samples(model):
    diffusion = Diffusion.from_config(DiffusionConfig(), "1")
    steps = list(sample_ensemble(model, diffusion, _images(), SamplingOptions(2, seed=0), clip_range=(0.0, 1.0)))
    assert len(steps) == 1 and torch.isfinite(steps[0].x).all()


def test_a_run_from_noise_on_the_lone_step_t0_is_refused_with_the_fix():
    """Spacing "1" keeps only t = 0, where the network reads its input as an almost clean mask:
    from noise that returns noise, so a fresh run says so instead of showing it."""
    segmenter = _segmenter()
    images = np.random.default_rng(0).random((4, 20, 20)).astype(np.float32)
    with pytest.raises(DiffSegError, match="2 steps or more"):
        run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2, respacing="1")))
    result = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2, respacing="2")))
    assert result.steps == 2


@pytest.mark.parametrize("preset, chain, steps_run", [("4", 10, 5), ("12", 12, 6)])
def test_a_refine_at_the_preset_runs_on_at_least_ten_steps(tmp_path, preset, chain, steps_run):
    """With the step count left at the model's preset, a refine runs on that chain but never on
    fewer than 10 steps (a 5-step preset would leave 3 steps after the noise); from the
    members it starts half-way down: 5 of 10 steps, 6 of 12."""
    from napari_diffseg import _layerdata as ld
    from napari_diffseg import checkpoint
    from napari_diffseg._gui.inputs import Inputs
    from napari_diffseg._gui.job import RunRequest, run_job
    from napari_diffseg._gui.models import ModelCache
    from napari_diffseg._gui.settings import Settings
    from napari_diffseg.refine import refine_respacing

    assert refine_respacing(5) == "10" and refine_respacing(10) is None and refine_respacing(1000) is None
    path = tmp_path / "tiny.pt"
    state = {k: v.detach().clone() for k, v in tiny_model(1).state_dict().items()}
    checkpoint.atomic_save(checkpoint.make_payload(
        UNetConfig(**TINY), DiffusionConfig(), Geometry(), {"model": state},
        sampling={"timestep_respacing": preset, "sampler": "ddpm", "num_ensemble": 2}), path)
    images = np.random.default_rng(3).random((4, 16, 16)).astype(np.float32)
    arrays = [np.ascontiguousarray(ld.to_display(image)) for image in images]
    known = np.zeros((16, 16), bool)
    known[4:7, 4:7] = True
    request = RunRequest(inputs=Inputs(arrays=arrays, spatial_ndim=2, display_shape=arrays[0].shape, case="c",
                                       reference=None),
                         settings=Settings(model_path=str(path), device="cpu", num_ensemble=2), known_mask=known,
                         known_values=known.astype(np.float32), init=np.zeros((2, 16, 16), np.float32))
    job = run_job(request, ModelCache())
    progress = []
    while True:
        try:
            progress.append(next(job))
        except StopIteration as stop:
            outcome = stop.value
            break
    assert outcome.chain_steps == chain and outcome.start_step == steps_run - 1
    assert len(progress) == steps_run and outcome.segmentation.steps == steps_run
    assert (outcome.segmentation.samples[:, known] == 1).all()  # the marks hold


def test_what_unknown_pixels_hold_does_not_reach_the_known_values():
    """The widget fills the pixels it does not know with 0, bench_interactive with the current
    mask; on the network's coarser grid a pixel at a region's edge mixes both, and only its
    known part may decide its value."""
    segmenter = _segmenter()
    rng = np.random.default_rng(2)
    images = rng.random((4, 45, 37)).astype(np.float32)  # resampled to 32x32 and back
    known = np.zeros((45, 37), bool)
    known[6:30, 4:21] = True  # edges that cut through network pixels
    inside = (rng.random((45, 37)) < 0.5).astype(np.float32)  # known values that vary within a network pixel
    zeros_outside = np.where(known, inside, 0.0).astype(np.float32)
    ones_outside = np.where(known, inside, 1.0).astype(np.float32)
    runs = [run_to_end(segmenter.run(images, SamplingOptions(seed=3), Guidance(known_mask=known, known_values=values)))
            for values in (zeros_outside, ones_outside)]
    assert np.array_equal(runs[0].samples, runs[1].samples)
    assert np.array_equal(runs[0].samples[:, known], np.broadcast_to(inside[known], (3, known.sum())))


# -- a region model (WT, TC, ET): known pixels per region -----------------------------------------

def _region_segmenter(seed: int = 0) -> Segmenter:
    config = UNetConfig(**{**TINY, "in_channels": 7, "mask_channels": 3})
    loaded = LoadedModel(model=tiny_model(seed, in_channels=7, mask_channels=3), unet_config=config,
                         diffusion_config=DiffusionConfig(), geometry=Geometry(crop_border=0, resize_to=32),
                         sampling={"timestep_respacing": "10", "sampler": "ddpm", "num_ensemble": 3,
                                   "clip_range": [0.0, 1.0]}, regions="brats")
    return Segmenter(loaded, device="cpu")


def test_a_region_model_refines_with_known_pixels_per_region_exact_in_every_member():
    """The whole-tumour marks become per-region known pixels (refine.region_known_pixels); each
    region holds exactly where it is known, in every member and at the input's resolution
    (45x37, resampled to 32x32 and back), and a refine from the members starts half-way."""
    from napari_diffseg.refine import region_known_pixels
    from napari_diffseg.regions import labels_to_regions

    segmenter = _region_segmenter()
    images = np.random.default_rng(0).random((4, 45, 37)).astype(np.float32)
    first = run_to_end(segmenter.run(images, SamplingOptions(seed=1)))
    assert first.samples.shape == (3, 3, 45, 37)
    scribbles = np.zeros((45, 37), np.uint8)
    scribbles[5:9, 3:12] = 1  # tumour, inside the drawn region
    scribbles[30:33, 10:12] = 2  # not tumour, a thin stroke
    region = np.zeros((45, 37), bool)
    region[2:36, 2:30] = True
    accepted = np.zeros((45, 37), np.uint8)  # a label map outside the region: oedema, core, enhancing
    accepted[38:44, 5:35] = 2
    accepted[39:43, 8:20] = 1
    accepted[40:42, 10:14] = 4
    known = region_known_pixels(scribbles, accepted, region)
    assert known.mask.shape == known.values.shape == (3, 45, 37)
    guidance = Guidance(known_mask=known.mask, known_values=known.values, init=first.samples, start_step=4)
    refined = run_to_end(segmenter.run(images, SamplingOptions(seed=1), guidance))
    assert refined.steps == 5 and refined.samples.shape == (3, 3, 45, 37)
    tumour, background, outside = scribbles == 1, scribbles == 2, ~region
    assert (refined.samples[:, 0][:, tumour] == 1).all()  # WT = 1 at a tumour mark, in every member
    assert (refined.samples[:, :, background] == 0).all()  # no tumour, no part
    outside_regions = labels_to_regions(accepted)
    for k in range(3):
        assert np.array_equal(refined.samples[:, k][:, outside],
                              np.broadcast_to(outside_regions[k][outside], (3, outside.sum())))
    # The label map: the accepted labels kept outside, nothing at the not-tumour marks, tumour
    # (some label) at the tumour marks.
    assert np.array_equal(refined.labels[outside], accepted[outside])
    assert (refined.labels[background] == 0).all() and (refined.labels[tumour] > 0).all()
    assert np.all(refined.variance[:, background] == 0) and np.all(refined.variance[0][tumour] == 0)
    # The parts at a tumour mark are free: the members may differ there (they are not held).
    assert not known.mask[1:, tumour].any()
    again = run_to_end(segmenter.run(images, SamplingOptions(seed=1), guidance))
    assert np.array_equal(again.samples, refined.samples)


def test_a_region_model_refines_a_volume_slice_from_whole_chains():
    """Known pixels per region on a volume (3, H, W, Z), no members: whole chains, marks held."""
    segmenter = _region_segmenter()
    images = np.random.default_rng(1).random((4, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((3, 32, 32, 3), bool)
    values = np.zeros((3, 32, 32, 3), np.float32)
    mask[0, 4:10, 4:10, 1] = True
    values[0, 4:10, 4:10, 1] = 1.0
    mask[:, 20:24, 20:24, 1] = True
    result = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2, seed=0),
                                      Guidance(known_mask=mask, known_values=values), slices=[1]))
    assert result.samples.shape == (2, 3, 32, 32, 3)
    assert (result.samples[:, 0, 4:10, 4:10, 1] == 1).all() and (result.samples[:, :, 20:24, 20:24, 1] == 0).all()
    assert (result.labels[4:10, 4:10, 1] > 0).all() and (result.labels[20:24, 20:24, 1] == 0).all()


def test_a_region_model_asks_for_the_region_axis():
    segmenter = _region_segmenter()
    images = np.zeros((4, 20, 20), np.float32)
    flat = np.zeros((20, 20), bool)
    flat[3, 3] = True
    with pytest.raises(DiffSegError, match="region axis first, shape \\(3, 20, 20\\)"):
        run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2), Guidance(flat, flat.astype(np.float32))))
    with pytest.raises(DiffSegError, match="region axis"):
        run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2),
                                 Guidance(np.zeros((2, 20, 20), bool), np.zeros((2, 20, 20)))))
    with pytest.raises(DiffSegError, match=r"members to refine must have shape \(2, 3, 20, 20\)"):
        run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2),
                                 Guidance(init=np.zeros((2, 20, 20)), start_step=3)))
    # The network's grid: one channel must not broadcast over three.
    with pytest.raises(DiffSegError, match="3 mask channel"):
        next(sample_ensemble(segmenter.model, segmenter.diffusion("10"), _images(), SamplingOptions(2),
                             Guidance(known_mask=torch.ones(2, 1, 16, 16, dtype=torch.bool),
                                      known_values=torch.ones(2, 1, 16, 16))))
    # A whole-tumour model is as before: no region axis.
    with pytest.raises(DiffSegError, match="image's shape"):
        run_to_end(_segmenter().run(images, SamplingOptions(num_ensemble=2),
                                    Guidance(np.zeros((3, 20, 20), bool), np.zeros((3, 20, 20)))))
