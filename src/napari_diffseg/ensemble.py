"""N sampling chains per slice, run as one batch; ensemble mean, variance and mask.

The chains of one slice share its conditioning images: the images pass through the
network's first layer once (``UNet.encode_condition``) and every step only feeds the
(S*N, 1, h, w) mask states. Chain noise comes from one generator per slice, seeded from
(seed, slice key), so a slice's result does not depend on which other slices share its
batch: the widget's current-slice run and a whole-volume run agree.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator, Sequence

import torch

from .diffusion import Diffusion, SamplerStep
from .errors import DiffSegError
from .options import Guidance, SamplingOptions
from .unet import UNet

THRESHOLD = 0.5  # the authors' rule: tumour where the ensemble mean exceeds one half
# The slice's first axis (X: left-right in BraTS' grid), the axis training flips (augment.py)
LEFT_RIGHT = -2


def slice_generator(seed: int, key: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    # Distinct, reproducible streams per (seed, slice); the odd multiplier spreads nearby keys.
    generator.manual_seed((int(seed) * 1_000_003 + int(key) * 7_919) % (2**63 - 1))
    return generator


def autocast_context(device: torch.device, precision: str):
    """bf16 on CPU or CUDA, fp16 on CUDA, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def sample_ensemble(
    model: UNet,
    diffusion: Diffusion,
    images: torch.Tensor,
    options: SamplingOptions,
    guidance: Guidance | None = None,
    *,
    slice_keys: Sequence[int] | None = None,
    chains_per_call: int | None = None,
    clip: bool = True,
    clip_range: tuple[float, float] = (-1.0, 1.0),
    clamp_variance: bool = False,
) -> Iterator[SamplerStep]:
    """Yield every step of ``options.num_ensemble`` chains for each of the S slices in ``images``.

    images: (S, C, h, w) at the network's size, on the model's device. The states in the
    yielded steps are (S * N, K, h, w), the N chains of slice s at rows s*N .. s*N+N-1, with K
    the model's mask channels (1 for whole tumour; WT, TC, ET for a region model).
    options: the ensemble size, seed, sampler, eta and precision (a None sampler or precision
    means ddpm or fp32; :meth:`inference.Segmenter.run` fills in the model's own).
    guidance: on the network's grid (:class:`options.Guidance`): known pixels shared by a slice's
    chains ((S, K, h, w): each region known or not on its own), mark channels (ignored by a model
    without), and members to start from at an earlier step ((S * N, K, h, w)), so that a
    refinement costs start_step + 1 steps instead of the whole chain.

    chains_per_call: at most this many chains go through the network together (None: all
    S * N). Every chain's noise comes from its slice's generator whatever the split, so only
    the speed changes, and the last bits of the arithmetic: on a CPU, GroupNorm (channels-last)
    and matrix products split their sums differently with the batch size.
    """
    guidance = guidance or Guidance()
    num_ensemble = options.num_ensemble
    if num_ensemble is None:
        raise ValueError("sample_ensemble needs the ensemble size (options.num_ensemble)")
    first = guidance.check_chain(diffusion)
    device = images.device
    s = images.shape[0]
    keys = list(range(s)) if slice_keys is None else list(slice_keys)
    generators = [slice_generator(options.seed or 0, k, device) for k in keys]
    mask_channels = int(getattr(getattr(model, "config", None), "mask_channels", 1))
    mask_shape = (num_ensemble, mask_channels, *images.shape[-2:])
    for what, given in (("known pixels", guidance.known_mask), ("known values", guidance.known_values),
                        ("members to refine", guidance.init)):
        # One channel would broadcast over a region model's three without a word: say so instead.
        if given is not None and (given.ndim != 4 or given.shape[1] != mask_channels):
            raise DiffSegError(f"the {what} must have the model's {mask_channels} mask channel(s) second, "
                               f"(rows, {mask_channels}, h, w); got shape {tuple(given.shape)}")

    def draw() -> torch.Tensor:
        return torch.cat([torch.randn(mask_shape, generator=g, device=device) for g in generators])

    def per_chain(per_slice: torch.Tensor) -> torch.Tensor:
        return per_slice.to(device).repeat_interleave(num_ensemble, dim=0)

    rows = s * num_ensemble
    # Test-time flips: a mirrored chain lives in the mirrored frame from start to end, so what
    # comes in (members, known pixels) is mirrored for it and what it yields mirrored back.
    mirror = mirrored_chains(rows, num_ensemble, device) if options.flip_members else None

    def frame(chains: torch.Tensor) -> torch.Tensor:
        if mirror is None:
            return chains
        return torch.where(mirror.view(-1, *[1] * (chains.ndim - 1)), chains.flip(LEFT_RIGHT), chains)

    if guidance.init is not None:
        x_start = diffusion.q_sample(frame(guidance.init.to(device).float()), first, draw())
    else:
        x_start = draw()
    known_mask = known_values = None
    if guidance.known:
        known_mask, known_values = frame(per_chain(guidance.known_mask)), frame(per_chain(guidance.known_values).float())

    precision = options.precision or "fp32"
    channels_last = images.ndim == 4 and next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode(), autocast_context(device, precision):
        conditioning = [images.to(memory_format=layout)]
        if guidance.marks is not None:  # a model without mark channels ignores them
            conditioning.append(guidance.marks.to(device).to(memory_format=layout))
        condition = model.encode_condition(*conditioning)

        chunk = rows if chains_per_call is None else max(1, min(int(chains_per_call), rows))
        # A split that cuts through a slice's chains needs the condition per chain, not per slice.
        per_row = condition.repeat_interleave(num_ensemble, dim=0) if chunk < rows or mirror is not None else None
        if mirror is not None:  # so do mirrored chains: theirs is the mirrored slice's
            mirrored = model.encode_condition(*[c.flip(LEFT_RIGHT) for c in conditioning])
            per_row = torch.where(mirror.view(-1, 1, 1, 1), mirrored.repeat_interleave(num_ensemble, dim=0), per_row)

        def denoise(x: torch.Tensor, t: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
            x = x.to(memory_format=layout)
            if x0_prev is not None:
                x0_prev = x0_prev.to(memory_format=layout)
            if per_row is None:
                return model.forward_conditioned(x, t, condition, x0_prev).float()
            return torch.cat([
                model.forward_conditioned(x[i : i + chunk], t[i : i + chunk], per_row[i : i + chunk],
                                          None if x0_prev is None else x0_prev[i : i + chunk]).float()
                for i in range(0, rows, chunk)
            ])

        self_condition = bool(getattr(getattr(model, "config", None), "self_condition", False))
        steps = diffusion.sample(denoise, x_start, draw_noise=draw, sampler=options.sampler or "ddpm",
                                 eta=options.eta, clip=clip, clip_range=clip_range,
                                 clamp_variance=clamp_variance, start_step=guidance.start_step,
                                 known_mask=known_mask, known_values=known_values,
                                 self_condition=self_condition, resample=int(guidance.resample))
        for step in steps:
            yield step if mirror is None else replace(step, x=frame(step.x), pred_x0=frame(step.pred_x0))


def mirrored_chains(rows: int, num_ensemble: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows,) bool: which chains run on the mirrored slice under test-time flips, every second
    member of each slice (members 1, 3, ...: a lone member is never mirrored)."""
    return (torch.arange(rows, device=device) % num_ensemble) % 2 == 1


def ensemble_statistics(samples: torch.Tensor, threshold: float = THRESHOLD):
    """samples: (N, ...) final chain outputs -> (mean, variance, mask).

    The variance is the population variance over the N members (0 for N = 1), the
    pixel-wise uncertainty map of the paper. Members with a region axis (N, 3, ...) give
    each region's own mean, variance and mask (not yet nested: :mod:`regions`)."""
    samples = samples.float()
    mean = samples.mean(dim=0)
    variance = samples.var(dim=0, unbiased=False)
    return mean, variance, (mean > threshold).to(torch.uint8)
