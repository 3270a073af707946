"""N sampling chains per slice, run as one batch; ensemble mean, variance and mask.

The chains of one slice share its conditioning images: the images pass through the
network's first layer once (``UNet.encode_condition``) and every step only feeds the
(S*N, 1, h, w) mask states. Chain noise comes from one generator per slice, seeded from
(seed, slice key), so a slice's result does not depend on which other slices share its
batch: the widget's current-slice run and a whole-volume run agree.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from .diffusion import Diffusion, SamplerStep
from .unet import UNet

THRESHOLD = 0.5  # the authors' rule: tumour where the ensemble mean exceeds one half


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
    num_ensemble: int,
    seed: int = 0,
    slice_keys: Sequence[int] | None = None,
    sampler: str = "ddpm",
    eta: float = 0.0,
    precision: str = "fp32",
    clip: bool = True,
    clip_range: tuple[float, float] = (-1.0, 1.0),
    clamp_variance: bool = False,
    known_mask: torch.Tensor | None = None,
    known_values: torch.Tensor | None = None,
    start_step: int | None = None,
    init: torch.Tensor | None = None,
    chains_per_call: int | None = None,
    resample: int = 1,
    hints: torch.Tensor | None = None,
) -> Iterator[SamplerStep]:
    """Yield every step of ``num_ensemble`` chains for each of the S slices in ``images``.

    images: (S, C, h, w) at the network's size, on the model's device. The states in the
    yielded steps are (S * N, 1, h, w), the N chains of slice s at rows s*N .. s*N+N-1.

    Refinement (the user's marks steer the chains):
    known_mask, known_values: (S, 1, h, w) pixels whose mask value is known, shared by the
    slice's chains (:meth:`Diffusion.sample`).
    start_step, init: start at this (respaced) step from ``init``, the (S * N, 1, h, w) clean
    masks of earlier members, noised to that step, instead of from pure noise at the end of
    the chain: a refinement then costs start_step + 1 steps instead of the whole chain.
    resample: RePaint's resampling with known pixels (:meth:`Diffusion.sample`).
    hints: (S, hint_channels, h, w) the user's marks for a model trained with them (its
    ``hint_channels``); the network sees them at every step. Ignored by a model without.

    chains_per_call: at most this many chains go through the network together (None: all
    S * N). Every chain's noise comes from its slice's generator whatever the split, so only
    the speed changes, and the last bits of the arithmetic: on a CPU, GroupNorm (channels-last)
    and matrix products split their sums differently with the batch size.
    """
    if num_ensemble < 1:
        raise ValueError("num_ensemble must be at least 1")
    device = images.device
    s = images.shape[0]
    keys = list(range(s)) if slice_keys is None else list(slice_keys)
    generators = [slice_generator(seed, k, device) for k in keys]
    mask_shape = (num_ensemble, 1, *images.shape[-2:])

    def draw() -> torch.Tensor:
        return torch.cat([torch.randn(mask_shape, generator=g, device=device) for g in generators])

    def per_chain(per_slice: torch.Tensor) -> torch.Tensor:
        return per_slice.to(device).repeat_interleave(num_ensemble, dim=0)

    if init is not None:
        if start_step is None:
            raise ValueError("init needs a start_step: the step its noised copy starts from")
        x_start = diffusion.q_sample(init.to(device).float(), diffusion.start_index(start_step), draw())
    elif start_step is not None and start_step != diffusion.num_timesteps - 1:
        raise ValueError("a chain that starts before its last step needs init (the members to refine)")
    else:
        x_start = draw()
    if known_mask is not None:
        known_mask, known_values = per_chain(known_mask), per_chain(known_values).float()

    channels_last = images.ndim == 4 and next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode(), autocast_context(device, precision):
        conditioning = [images.to(memory_format=layout)]
        if hints is not None:  # a model without mark channels ignores them
            conditioning.append(hints.to(device).to(memory_format=layout))
        condition = model.encode_condition(*conditioning)

        rows = s * num_ensemble
        chunk = rows if chains_per_call is None else max(1, min(int(chains_per_call), rows))
        # A split that cuts through a slice's chains needs the condition per chain, not per slice.
        per_row = condition.repeat_interleave(num_ensemble, dim=0) if chunk < rows else None

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
        yield from diffusion.sample(denoise, x_start, draw_noise=draw, sampler=sampler, eta=eta, clip=clip,
                                     clip_range=clip_range, clamp_variance=clamp_variance, start_step=start_step,
                                     known_mask=known_mask, known_values=known_values, self_condition=self_condition,
                                     resample=resample)


def ensemble_statistics(samples: torch.Tensor, threshold: float = THRESHOLD):
    """samples: (N, ...) final chain outputs -> (mean, variance, mask).

    The variance is the population variance over the N members (0 for N = 1), the
    pixel-wise uncertainty map of the paper."""
    samples = samples.float()
    mean = samples.mean(dim=0)
    variance = samples.var(dim=0, unbiased=False)
    return mean, variance, (mean > threshold).to(torch.uint8)
