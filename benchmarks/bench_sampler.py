"""Sampling speed, side by side, in one run with the same weights and inputs.

Modes (all draw a 5-member ensemble for one slice):

(a) reference-style: what the reference implementation does, written here: the chains one
    after another at batch 1, fp32, contiguous memory, torch.no_grad, the 4 images and the
    mask state concatenated into a (1, 5, H, W) tensor and the full UNet.forward at every
    step, posterior coefficients taken from numpy schedule arrays at every step, x0 clipped
    to [-1, 1], all 1000 steps.
(b) faithful: our sampler (ensemble.sample_ensemble, as Segmenter.run uses it) with all
    1000 steps, fp32, channels-last: the same chain maths as (a), N chains as one batch,
    the images through the first layer once. Also timed in the fast mode's reduced precision
    (b_bf16, b_fp16 on CUDA): all steps, not bit-faithful.
(c) fast: the model's stored sampling preset (the demo model's: 50 respaced DDPM steps),
    in bf16 where the device computes it natively (CPU: AVX512-BF16/AMX; CUDA: fp16 too, and
    instead where bf16 is missing); also in fp32.
floor: not a sampler; the network's convolutions alone, each layer timed on its own, the time no
    mode can beat, and the largest gain over (a) it leaves.
--compile adds c_compiled (and b_compiled when --modes names it): the same with the UNet body
under torch.compile (--compile_mode reduce-overhead replays CUDA graphs), as
``Segmenter(compile=True)`` and ``--compile`` on the command line run it.

Full chains take hours on a CPU, so every mode times ``--steps`` steps after ``--warmup``
untimed ones and extrapolates to its chain length; the output says so. (a) and (b) use the
same noise, so their chain states after those steps must agree: the output reports the
largest difference. Separately, the widget's own code path (``_gui.job.run_job`` with a
fresh model cache, as a first Run in napari) is timed on the demo model end to end: model
load, the first live preview frame and the whole ensemble at the default settings.

    .venv/bin/python benchmarks/bench_sampler.py                 # paper + demo, auto device
    .venv/bin/python benchmarks/bench_sampler.py --quick         # tiny, seconds (the tests)

The last line printed is the results as one JSON object (also written to --json PATH).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

from napari_diffseg.checkpoint import (  # noqa: E402
    DEFAULT_SAMPLING, MASK_CLIP_RANGE, atomic_save, load_model, make_payload,
)
from napari_diffseg.diffusion import Diffusion, DiffusionConfig  # noqa: E402
from napari_diffseg.ensemble import sample_ensemble, slice_generator  # noqa: E402
from napari_diffseg.errors import DiffSegError  # noqa: E402
from napari_diffseg.geometry import Geometry  # noqa: E402
from napari_diffseg.inference import (  # noqa: E402
    batch_candidates, has_c_compiler, most_chains, probe_batching,
)
from napari_diffseg.options import SamplingOptions  # noqa: E402
from napari_diffseg.unet import UNet, UNetConfig, count_parameters  # noqa: E402

SEED = 0
REFERENCE_CLIP = (-1.0, 1.0)  # the reference clamps x0 to the image code's range
# The demo model's preset, for the paper config (random weights store no preset).
FALLBACK_PRESET = {**DEFAULT_SAMPLING, "timestep_respacing": "50", "clip_range": list(MASK_CLIP_RANGE)}
FIRST_FRAME_TARGET_S = 1.0  # the targets on a 2-core CPU
ENSEMBLE_TARGET_S = 10.0


# -- the reference-style loop ----------------------------------------------------------------------
def _extract(schedule: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One schedule value per batch element, from the float64 numpy array at every call and
    broadcast over ``like``: the per-step host-side lookup the reference does."""
    values = torch.from_numpy(schedule).to(device=t.device)[t].float()
    return values.reshape(-1, *([1] * (like.ndim - 1))).expand(like.shape)


class EnsembleNoise:
    """``sample_ensemble``'s noise stream for one slice, handed out chain by chain.

    sample_ensemble draws (N, 1, h, w) from the slice's generator once for x_T and once per
    step with t > 0; chain i takes row i. A loop that runs chain 0 to the end before chain 1
    needs those rows out of order, so the draws for the first ``steps`` steps are made up
    front (a few MB for a handful of steps). ``noise(chain, 0)`` is x_T, ``noise(chain, k)``
    the noise of step k; past the stream (the t = 0 step, whose noise is masked) it is zero.
    """

    def __init__(self, seed: int, key: int, num_ensemble: int, size: tuple[int, int], steps: int,
                 num_timesteps: int, device: torch.device):
        generator = slice_generator(seed, key, device)
        shape = (num_ensemble, 1, *size)
        draws = 1 + min(steps, num_timesteps - 1)
        self.draws = [torch.randn(shape, generator=generator, device=device) for _ in range(draws)]

    def __call__(self, chain: int, k: int) -> torch.Tensor:
        if k < len(self.draws):
            return self.draws[k][chain : chain + 1]
        return torch.zeros_like(self.draws[0][chain : chain + 1])


def reference_style_ensemble(model: UNet, diffusion: Diffusion, images: torch.Tensor, num_ensemble: int,
                             steps: int | None = None, noise=None, clip: bool = True,
                             on_step=None) -> torch.Tensor:
    """Mode (a): ``num_ensemble`` chains one after another at batch 1, as the reference runs them.

    images: (1, 4, h, w). ``steps`` stops each chain early (None: the whole chain, t = T-1 .. 0).
    ``noise(chain, k)``: x_T for k = 0, the noise of step k after; None draws randn as the
    reference does (at every step, t = 0 included). ``on_step(chain, k)`` is called after
    every step. Returns the chains' last states, (num_ensemble, 1, h, w).
    """
    device = images.device
    size = images.shape[-2:]
    arrays = diffusion.arrays
    timestep_map = np.asarray(diffusion.timestep_map, dtype=np.int64)
    order = list(reversed(range(diffusion.num_timesteps)))[:steps]
    finals = []
    with torch.no_grad():
        for chain in range(num_ensemble):
            x = noise(chain, 0) if noise is not None else torch.randn((1, 1, *size), device=device)
            for k, t in enumerate(order, start=1):
                t_batch = torch.tensor([t], device=device)
                model_t = torch.from_numpy(timestep_map).to(device)[t_batch]
                if diffusion.rescale_timesteps:
                    model_t = model_t.float() * (1000.0 / diffusion.original_num_steps)
                output = model(torch.cat([images, x], dim=1), model_t)
                eps, v = output[:, :1], output[:, 1:2]
                # Learned-range variance between beta_t and the clipped posterior variance.
                frac = (v + 1) / 2
                log_variance = frac * _extract(np.log(arrays["betas"]), t_batch, x) + (1 - frac) * _extract(
                    arrays["posterior_log_variance_clipped"], t_batch, x
                )
                pred_x0 = _extract(arrays["sqrt_recip_alphas_cumprod"], t_batch, x) * x - _extract(
                    arrays["sqrt_recipm1_alphas_cumprod"], t_batch, x
                ) * eps
                if clip:
                    pred_x0 = pred_x0.clamp(*REFERENCE_CLIP)
                mean = _extract(arrays["posterior_mean_coef1"], t_batch, pred_x0) * pred_x0 + _extract(
                    arrays["posterior_mean_coef2"], t_batch, x
                ) * x
                z = noise(chain, k) if noise is not None else torch.randn_like(x)
                nonzero = (t_batch != 0).float().reshape(-1, 1, 1, 1)
                x = mean + nonzero * torch.exp(0.5 * log_variance) * z
                if on_step is not None:
                    on_step(chain, k)
            finals.append(x)
    return torch.cat(finals)


# -- inputs and configs ----------------------------------------------------------------------------
def input_slice(size: int = 224) -> tuple[np.ndarray, str]:
    """(4, size, size) float32 in [0, 1], core order: the bundled BraTS sample slice cropped
    at the centre as the reference crops (240 -> 224), or a synthetic phantom without it."""
    try:
        from napari_diffseg._sample_data import BRATS_SLICE, sample_files
        from napari_diffseg.data import load_case

        images = load_case(sample_files(BRATS_SLICE)).images
        source = f"bundled sample {BRATS_SLICE}"
    except (DiffSegError, ImportError, OSError):
        from napari_diffseg.synthetic import make_phantom

        images = make_phantom(7, size=max(size, 240))["images"]
        source = "synthetic phantom (seed 7)"
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise SystemExit(f"error: the input slice ({height}x{width}) is smaller than {size}x{size}")
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(images[:, top : top + size, left : left + size], dtype=np.float32), source


@dataclass
class Config:
    name: str
    model: UNet
    diffusion_config: DiffusionConfig
    images: torch.Tensor  # (1, 4, h, w), the network's input
    preset: dict  # the fast mode's sampling settings
    description: str
    model_path: str | None = None  # for the widget timing (None: the bundled demo model)
    extra: dict = field(default_factory=dict)


def _tiny_checkpoint(folder: Path) -> Path:
    """A tiny diffusion checkpoint standing in for the demo model in --quick runs."""
    flags = common.TINY_FLAGS
    model = common.random_model(flags, SEED)
    path = folder / "tiny.pt"
    sampling = {**FALLBACK_PRESET, "timestep_respacing": "4"}
    atomic_save(make_payload(UNetConfig.from_flags(flags), DiffusionConfig.from_flags(flags),
                             Geometry(resize_to=common.TINY_INPUT), {"model": model.state_dict()},
                             sampling=sampling), path)
    return path


def build_config(name: str, quick: bool, device: torch.device, slice224: np.ndarray, workdir: Path) -> Config:
    if name == "paper":
        flags = common.TINY_FLAGS if quick else common.paper_flags()
        size = common.TINY_INPUT if quick else common.PAPER_INPUT
        model = common.random_model(flags, SEED).to(device)
        top = (slice224.shape[-1] - size) // 2
        images = torch.from_numpy(slice224[None, :, top : top + size, top : top + size].copy())
        try:
            preset = dict(load_model(None).sampling)
        except DiffSegError:
            preset = dict(FALLBACK_PRESET)
        what = "tiny stand-in (--quick)" if quick else "PAPER flags (reference README), random weights"
        return Config(name, model, DiffusionConfig.from_flags(flags), images.to(device), preset,
                      f"{what}, {count_parameters(model):,} parameters, input {size}x{size}")
    if name == "demo":
        path = _tiny_checkpoint(workdir) if quick else None
        loaded = load_model(path)
        multiple = loaded.unet_config.size_multiple
        images = loaded.geometry.to_network(torch.from_numpy(slice224)[None], multiple)
        what = "tiny stand-in checkpoint (--quick)" if quick else "bundled demo model"
        h, w = images.shape[-2:]
        return Config(name, loaded.model.eval().to(device), loaded.diffusion_config,
                      images.float().contiguous().to(device), dict(loaded.sampling),
                      f"{what}, {count_parameters(loaded.model):,} parameters, a {slice224.shape[-2]}x"
                      f"{slice224.shape[-1]} slice -> network input {h}x{w}",
                      model_path=None if path is None else str(path))
    raise SystemExit(f"error: --configs: unknown config {name!r}; use paper and/or demo")


# -- timing the modes -------------------------------------------------------------------------------
def _mode_result(label: str, chain_steps: int, timed: int, seconds: float, mem: common.PeakMemory, **extra) -> dict:
    ms = 1000.0 * seconds / max(timed, 1)
    return {"label": label, "steps": chain_steps, "timed_steps": timed, "ms_per_step": ms,
            "s_per_ensemble": ms * chain_steps / 1000.0, "extrapolated_from": timed,
            "peak_mem_mib": mem.mib, "status": "ok", **extra}


def time_reference_style(cfg: Config, device: torch.device, num_ensemble: int, warmup: int, steps: int,
                         noise: EnsembleNoise) -> tuple[dict, torch.Tensor]:
    model = cfg.model.to(memory_format=torch.contiguous_format)
    diffusion = Diffusion.from_config(cfg.diffusion_config, "")
    warm = min(warmup, diffusion.num_timesteps - 1)
    total = min(warm + steps, diffusion.num_timesteps)
    marks: dict[tuple[int, int], float] = {}

    def on_step(chain: int, k: int) -> None:
        if k in (warm, total):
            common.sync(device)
            marks[(chain, k)] = time.perf_counter()

    images = cfg.images.contiguous()
    with common.PeakMemory(device) as mem:
        common.sync(device)
        began = time.perf_counter()
        final = reference_style_ensemble(model, diffusion, images, num_ensemble, steps=total, noise=noise,
                                         on_step=on_step)
    # Each chain's own warm-up steps are left out; without any, timing starts at the chain's start.
    seconds = sum(marks[(c, total)] - marks.get((c, warm), began if c == 0 else marks[(c - 1, total)])
                  for c in range(num_ensemble))
    result = _mode_result("(a) reference-style: chains in turn at batch 1, fp32, contiguous, no_grad",
                          diffusion.num_timesteps, total - warm, seconds, mem, precision="fp32",
                          channels_last=False, batch=1, sampler="ddpm", respacing="",
                          sample_shape=list(final.shape))
    return result, final


def time_reference_forward(cfg: Config, device: torch.device, num_ensemble: int, batch: int, warmup: int,
                           calls: int) -> dict:
    """The reference's own code path shape, without the loop around it: the full ``UNet.forward``
    on the concatenated (B, 5, h, w) input at t = 500, fp32, contiguous memory, torch.no_grad,
    B chains per call. One step of the N-chain ensemble costs ceil(N / B) such calls."""
    model = cfg.model.to(memory_format=torch.contiguous_format)
    generator = torch.Generator(device=device).manual_seed(SEED)
    x = torch.cat([cfg.images.expand(batch, -1, -1, -1),
                   torch.randn((batch, 1, *cfg.images.shape[-2:]), generator=generator, device=device)], dim=1)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    with common.PeakMemory(device) as mem, torch.no_grad():
        for _ in range(max(warmup, 1)):
            model(x, t)
        times = []
        for _ in range(calls):
            with common.Timer(device) as timer:
                model(x, t)
            times.append(timer.seconds)
    per_call = float(np.median(times))
    per_step = per_call * -(-num_ensemble // batch)
    steps = Diffusion.from_config(cfg.diffusion_config, "").num_timesteps
    result = _mode_result(f"reference code path shape: UNet.forward at batch {batch}, fp32, contiguous, no_grad",
                          steps, 1, per_step, mem, precision="fp32", channels_last=False, batch=batch,
                          s_per_call=per_call, calls_timed=calls)
    result["extrapolated_from"] = f"median of {calls} calls"
    return result


def time_sampler(cfg: Config, device: torch.device, num_ensemble: int, warmup: int, steps: int, label: str,
                 respacing: str, sampler: str, precision: str, clip_range,
                 compiled: bool = False) -> tuple[dict, torch.Tensor]:
    model = cfg.model.to(memory_format=torch.channels_last)  # our default layout (Segmenter)
    diffusion = Diffusion.from_config(cfg.diffusion_config, respacing)
    # Compiling happens in the first call: it is always a warm-up step, timed on its own.
    warm = min(max(warmup, 1 if compiled else 0), diffusion.num_timesteps - 1)
    total = min(warm + steps, diffusion.num_timesteps)
    # Chains per network call as the product picks them (Segmenter's batching "auto"): timed apart.
    size = tuple(cfg.images.shape[-2:])
    chains, probe = probe_batching(model, device, batch_candidates(num_ensemble, 1, most_chains(device, *size)),
                                   size, precision) if not compiled else (num_ensemble, None)
    options = SamplingOptions(num_ensemble, sampler=sampler, precision=precision, seed=SEED)
    generator = sample_ensemble(model, diffusion, cfg.images, options, clip_range=tuple(clip_range),
                                clamp_variance=bool(cfg.preset.get("clamp_variance", False)),
                                chains_per_call=chains)
    extra = {} if probe is None else {"probe": probe}
    try:
        with common.PeakMemory(device) as mem:
            for i in range(warm):
                with common.Timer(device) as first:
                    last = next(generator)
                if compiled and i == 0:
                    extra["compile_s"] = first.seconds
            with common.Timer(device) as timer:
                for _ in range(total - warm):
                    last = next(generator)
    finally:
        generator.close()
    result = _mode_result(label, diffusion.num_timesteps, total - warm, timer.seconds, mem, precision=precision,
                          channels_last=True, batch=chains, sampler=sampler, respacing=respacing,
                          sample_shape=list(last.x.shape), **extra)
    return result, last.x


def conv_layers(cfg: Config, device: torch.device) -> list[tuple[torch.nn.Conv2d, tuple[int, ...]]]:
    """Every convolution one forward at batch 1 runs, with the shape of its input."""
    seen: list[tuple[torch.nn.Conv2d, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, tuple(inp[0].shape))))
             for m in cfg.model.modules() if isinstance(m, torch.nn.Conv2d)]
    x = torch.cat([cfg.images, torch.zeros_like(cfg.images[:, :1])], dim=1)
    try:
        with torch.no_grad():
            cfg.model.to(memory_format=torch.contiguous_format)(x, torch.full((1,), 500, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def conv_gflop(layers) -> float:
    total = 0
    for conv, shape in layers:
        h = (shape[-2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
        w = (shape[-1] + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
        total += 2 * conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] * h * w // conv.groups
    return total / 1e9


def time_convolutions(layers, device: torch.device, batch: int, precision: str, channels_last: bool,
                      calls: int = 2) -> float:
    """Seconds per chain for the convolutions of one forward alone, each layer timed on its own
    (fastest of ``calls`` after a warm-up) on random input of its shape at ``batch``. Nothing
    else of the network runs, so no sampler in this layout and precision can be faster."""
    from napari_diffseg.ensemble import autocast_context

    layout = torch.channels_last if channels_last else torch.contiguous_format
    total = 0.0
    with torch.no_grad(), autocast_context(device, precision):
        for conv, shape in layers:
            layer = copy.deepcopy(conv).to(memory_format=layout)
            x = torch.randn((batch, *shape[1:]), device=device).to(memory_format=layout)
            layer(x)
            best = float("inf")
            for _ in range(calls):
                with common.Timer(device) as timer:
                    layer(x)
                best = min(best, timer.seconds)
            total += best
            del layer, x
    return total / batch


def time_conv_floor(cfg: Config, device: torch.device, num_ensemble: int, precisions: list[str]) -> dict:
    """The floor under every mode: what the network's convolutions alone cost per chain and
    forward, in fp32 (contiguous as the reference, channels-last as ours) and in the fast
    precision, at batch 1 and at the ensemble's batch. Divided into (a)'s time per chain and
    forward it gives the largest speed-up over (a) that this device allows without doing less
    arithmetic."""
    layers = conv_layers(cfg, device)
    rows = []
    settings = [("fp32", False), ("fp32", True)] + [(p, True) for p in precisions if p != "fp32"]
    for precision, channels_last in settings:
        for batch in sorted({1, num_ensemble}):
            seconds = time_convolutions(layers, device, batch, precision, channels_last)
            rows.append({"precision": precision, "channels_last": channels_last, "batch": batch,
                         "s_per_chain_forward": seconds})
    gflop = conv_gflop(layers)
    for row in rows:
        row["gflop_per_s"] = gflop / row["s_per_chain_forward"]
    return {"gflop_per_forward": gflop, "layers": len(layers), "rows": rows}


def time_compiled(cfg: Config, device: torch.device, num_ensemble: int, warmup: int, steps: int, label: str,
                  respacing: str, sampler: str, precision: str, clip_range, mode: str = "default") -> dict:
    """A mode with the UNet body under torch.compile; skipped or failed is reported, not raised.

    mode "reduce-overhead" replays CUDA graphs: on a GPU, launching the network's few hundred
    small kernels one by one can cost as much as running them."""
    label += " + torch.compile" + ("" if mode == "default" else f" ({mode})")
    if device.type == "cpu" and not has_c_compiler():
        return {"label": label, "status": "skipped: no C compiler for torch.compile's CPU backend"}
    model = cfg.model
    try:
        model.compile_body(mode)  # what Segmenter(compile=True) does
        result, _ = time_sampler(cfg, device, num_ensemble, warmup, steps, label, respacing, sampler, precision,
                                 clip_range, compiled=True)
        return result
    except Exception as exc:  # noqa: BLE001 - any compiler failure is a result here, not a crash
        first = " ".join(str(exc).split())[:200]
        return {"label": label, "status": f"failed: {type(exc).__name__}: {first}"}
    finally:
        model.__dict__.pop("_body", None)
        torch._dynamo.reset()


def bench_config(cfg: Config, device: torch.device, args) -> dict:
    n, warmup, steps = args.ensemble, args.warmup, args.steps
    reference_steps = args.reference_steps or steps
    wanted = set(args.modes.split(",")) if args.modes else None
    fast = common.fast_precisions(device)
    preset = cfg.preset
    respacing, sampler, clip = str(preset["timestep_respacing"]), preset["sampler"], preset["clip_range"]
    fast_label = f"(c) fast: preset ({respacing or 'all'} {sampler.upper()} steps)"
    # key -> (label, respacing, sampler, precision, clip); (a) is separate, "compiled" rows need --compile
    plan = {"b": ("(b) faithful: our sampler, all steps, fp32, channels-last", "", "ddpm", "fp32", REFERENCE_CLIP)}
    for precision in fast:  # the same 1000 steps in reduced precision: faster, not bit-faithful
        if precision != "fp32":
            plan[f"b_{precision}"] = (f"(b) all steps, {precision}, channels-last", "", "ddpm", precision,
                                      REFERENCE_CLIP)
    plan["c_fp32"] = (f"{fast_label}, fp32", respacing, sampler, "fp32", clip)
    for i, precision in enumerate(fast):
        if precision != "fp32":
            plan["c" if i == 0 else f"c_{precision}"] = (f"{fast_label}, {precision}", respacing, sampler,
                                                         precision, clip)
    compiled = {"b_compiled": (f"(b) all steps, {fast[0]}", "", "ddpm", fast[0], REFERENCE_CLIP),
                "c_compiled": (f"{fast_label}, {fast[0]}", respacing, sampler, fast[0], clip)}

    def run(key: str) -> bool:
        return wanted is None or key in wanted

    full = Diffusion.from_config(cfg.diffusion_config, "")
    noise = EnsembleNoise(SEED, 0, n, tuple(cfg.images.shape[-2:]), warmup + max(steps, reference_steps),
                          full.num_timesteps, device)
    modes: dict[str, dict] = {}
    states = {}
    if run("a"):
        modes["a"], states["a"] = time_reference_style(cfg, device, n, warmup, reference_steps, noise)
    for batch in sorted({1, n}):
        if run(f"ref_b{batch}"):
            modes[f"ref_b{batch}"] = time_reference_forward(cfg, device, n, batch, warmup, max(1, min(steps, 3)))
    for key, (label, spacing, kind, precision, clip_range) in plan.items():
        if run(key):
            modes[key], state = time_sampler(cfg, device, n, warmup, steps, label, spacing, kind, precision,
                                             clip_range)
            states.setdefault(key, state)
    if fast[0] == "fp32" and run("c"):  # no fast reduced precision here: the fast mode is the fp32 one
        modes["c"] = dict(modes.get("c_fp32") or {}, label="(c) fast: the fp32 row (no native bf16 here)",
                          note="same run as c_fp32")
    if args.compile:
        for key, (label, spacing, kind, precision, clip_range) in compiled.items():
            if run(key) or (wanted is None and key == "c_compiled"):
                modes[key] = time_compiled(cfg, device, n, warmup, steps, label, spacing, kind, precision,
                                           clip_range, args.compile_mode)
    ratios = {}
    if "a" in modes:
        a = modes["a"]["s_per_ensemble"]
        ratios = {f"{k}/a": m["s_per_ensemble"] / a for k, m in modes.items()
                  if k != "a" and m.get("status") == "ok"}
    floor = time_conv_floor(cfg, device, n, fast) if run("floor") else None
    if floor is not None:
        # (a)'s seconds per chain and forward: from (a) itself, else from the bare forward at batch 1
        a_forward = (modes["a"]["ms_per_step"] / 1000.0 / n if "a" in modes
                     else modes["ref_b1"]["s_per_call"] if "ref_b1" in modes else None)
        floor["a_s_per_chain_forward"] = a_forward
        best: dict[str, float] = {}
        for r in floor["rows"]:
            best[r["precision"]] = min(best.get(r["precision"], float("inf")), r["s_per_chain_forward"])
        floor["ceiling_vs_a"] = {p: a_forward / s for p, s in best.items()} if a_forward else {}
    cfg.model.to(memory_format=torch.contiguous_format)
    result = {
        "description": cfg.description,
        "params": count_parameters(cfg.model),
        "network_input": list(cfg.images.shape[-2:]),
        "ensemble": n,
        "preset": {"timestep_respacing": respacing, "sampler": sampler, "clip_range": list(clip)},
        "modes": modes,
        "ratios": ratios,
        "convolutions": floor,
    }
    if "a" in states and "b" in states and reference_steps == steps:
        # Same noise, same weights, same number of steps: the claim "faithful" in one number.
        result["a_vs_b_max_abs_diff"] = float((states["a"].float() - states["b"].float()).abs().max())
    return result


# -- the widget's path --------------------------------------------------------------------------------
def time_widget(model_path: str | None, slice_core: np.ndarray, device: torch.device, num_ensemble: int,
                runs: int) -> dict:
    """The widget's Run on one slice with its default settings: ``_gui.job.run_job`` with a fresh
    model cache, so the model loads inside the run as it does in napari the first time; then
    again with it cached."""
    from napari_diffseg import _layerdata as ld
    from napari_diffseg._gui.inputs import Inputs
    from napari_diffseg._gui.job import PREVIEW_INTERVAL, RunRequest, run_job
    from napari_diffseg._gui.models import ModelCache
    from napari_diffseg._gui.settings import Settings

    class TimedCache(ModelCache):
        load_s = 0.0

        def get(self, *a, **k):
            began = time.perf_counter()
            try:
                return super().get(*a, **k)
            finally:
                self.load_s = time.perf_counter() - began

    cache = TimedCache()
    arrays = [np.ascontiguousarray(ld.to_display(image)) for image in slice_core]  # layers hold display order
    inputs = Inputs(arrays=arrays, spatial_ndim=2, display_shape=arrays[0].shape, case="benchmark", reference=None)
    settings = Settings(model_path=model_path or "", device=str(device), num_ensemble=num_ensemble, seed=SEED)
    request = RunRequest(inputs=inputs, settings=settings)
    results = []
    for run in range(runs):
        began = time.perf_counter()
        first_frame = None
        previews = 0
        job = run_job(request, cache)
        while True:
            try:
                progress = next(job)
            except StopIteration as stop:
                outcome = stop.value
                break
            if progress.preview is not None:
                previews += 1
                if first_frame is None:
                    first_frame = time.perf_counter() - began
        total = time.perf_counter() - began
        load = cache.load_s
        seg = outcome.segmentation
        results.append({
            "run": "first Run (model loads at Run)" if run == 0 else "next Run (model cached)",
            "load_s": load,
            "first_frame_s": first_frame,
            "first_frame_after_load_s": None if first_frame is None else first_frame - load,
            "ensemble_s": total,
            "ensemble_after_load_s": total - load,
            "steps": seg.steps,
            "num_ensemble": seg.num_ensemble,
            "sampler": seg.sampler,
            "precision": seg.settings.get("precision"),
            "previews": previews,
            "result_shape": list(seg.probability.shape),
        })
    # A shared 2-core machine varies by +-10 % from run to run: the median is the figure to quote.
    return {"preview_interval_s": PREVIEW_INTERVAL, "input": list(slice_core.shape[1:]), "runs": results,
            "median_first_frame_s": float(np.median([r["first_frame_s"] for r in results if r["first_frame_s"]])),
            "median_ensemble_s": float(np.median([r["ensemble_s"] for r in results]))}


# -- a whole volume ---------------------------------------------------------------------------------
VALIDATION_VOLUME = common.REPO.parent / "shared" / "brats18" / "Brats18_CBICA_ABM_1"  # held out until the sixth model


def _quick_volume(folder: Path) -> tuple[str, "object"]:
    """--quick: three phantom slices stacked into a small volume, with its label."""
    from napari_diffseg.synthetic import make_phantom

    slices = [make_phantom(seed, size=48) for seed in (1, 2, 3)]
    images = np.stack([p["images"] for p in slices], axis=-1).astype(np.float32)
    label = np.stack([p["label"] > 0 for p in slices], axis=-1).astype(np.uint8)
    return str(_tiny_checkpoint(folder)), (images, label, (1.0, 1.0, 1.0), "3 phantom slices (--quick)")


def time_volume(volume: str, device: torch.device, num_ensemble: int, quick: bool, workdir: Path) -> dict:
    """``diffseg-sample``'s path on a whole volume: the bundled model, its preset, precision
    auto, every brain slice, batching as the probe picks it (the probe's time included)."""
    from napari_diffseg import data, metrics
    from napari_diffseg.inference import Segmenter, run_to_end

    if quick:
        model_path, (images, label, spacing, source) = _quick_volume(workdir)
    else:
        model_path = None
        try:
            case = data.load_case(data.find_case_files(volume))
        except DiffSegError as exc:
            return {"status": f"skipped: {exc}"}
        images, label, spacing, source = case.images, case.label, case.voxel_size, case.name
    began = time.perf_counter()
    segmenter = Segmenter.load(model_path, device=device, precision="auto", batching="auto")
    load_s = time.perf_counter() - began
    with common.Timer(device) as timer:
        result = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=num_ensemble), keep_samples=False,
                                          preview_interval=None))
    brain = int((np.abs(images).reshape(-1, images.shape[-1]).max(axis=0) > 0).sum())
    out = {"status": "ok", "volume": source, "shape": list(images.shape[1:]), "brain_slices": brain,
           "num_ensemble": result.num_ensemble, "steps": result.steps, "sampler": result.sampler,
           "precision": result.settings["precision"], "chains_per_call": result.settings["chains_per_call"],
           "slices_per_batch": result.settings["slices_per_batch"], "probe": segmenter.probe_report,
           "batching": result.settings["batching"],  # "tuned": the volume's own pace moved it off the probe's
           "load_s": load_s, "seconds": timer.seconds, "s_per_slice": timer.seconds / max(1, brain)}
    if label is not None:
        out["dice"] = metrics.dice(result.mask, label)
        out["hd95"] = metrics.hd95(result.mask, label, spacing=spacing)
    return out


def print_volume(volume: dict) -> None:
    print("\n== whole volume (diffseg-sample's path: bundled model, its preset, precision auto, every brain slice)")
    if volume.get("status") != "ok":
        print(volume.get("status"))
        return
    dice = f", Dice {volume['dice']:.3f}, HD95 {volume['hd95']:.1f} mm" if "dice" in volume else ""
    print(f"{volume['volume']} {volume['shape']}: {volume['brain_slices']} brain slices, {volume['num_ensemble']} x "
          f"{volume['steps']} {volume['sampler']} steps, {volume['precision']}, {volume['chains_per_call']} chains "
          f"per call ({volume['slices_per_batch']} slice(s) per batch): {volume['seconds']:.1f} s "
          f"({volume['s_per_slice']:.2f} s a slice; model load {volume['load_s']:.2f} s){dice}")
    probe = volume.get("probe") or {}
    # a stored choice carries its timings too, but no probe time: it was not timed in this run
    if "from" in probe:
        print(f"batching: {probe['chosen']} chains per call, the choice an earlier probe stored in {probe['from']}")
    elif "ms_per_chain" in probe:
        per_chain = ", ".join(f"{b}: {ms:.1f}" for b, ms in probe["ms_per_chain"].items())
        print(f"batching probe ({probe['probe_s']:.2f} s, included): ms per chain by chains per call: {per_chain}")


# -- output -------------------------------------------------------------------------------------------
def print_config(name: str, result: dict, args, device: torch.device) -> None:
    print(f"\n== {name}: {result['description']}; ensemble {result['ensemble']}, device {device}")
    rows = []
    for key, mode in result["modes"].items():
        if mode.get("status") != "ok":
            rows.append([key, mode["label"], "-", "-", "-", "-", "-", mode["status"]])
            continue
        ratio = result["ratios"].get(f"{key}/a", 1.0 if key == "a" else None)
        speedup = "" if not ratio else f" ({1 / ratio:.1f}x faster)" if ratio < 1 else ""
        note = f"compile {mode['compile_s']:.1f} s" if "compile_s" in mode else mode.get("note", "")
        if mode.get("probe"):
            note = f"{mode['batch']} chain(s) per call (probe {mode['probe']['probe_s']:.1f} s) {note}".strip()
        rows.append([key, mode["label"], str(mode["steps"]), common.fmt(mode["ms_per_step"]),
                     common.fmt(mode["s_per_ensemble"], ".2f"), common.fmt(mode["peak_mem_mib"]),
                     common.fmt(ratio, ".3f") + speedup, note])
    print(common.table(rows, ["key", "mode", "steps", "ms/step", "s/ensemble", "peak MiB", "vs (a)", ""]))
    reference = f" ((a): {args.reference_steps})" if args.reference_steps else ""
    print(f"ms/step is one step of all {result['ensemble']} chains; s/ensemble is extrapolated from "
          f"{args.steps} timed steps{reference} (after {args.warmup} warm-up) to the chain length in 'steps'.")
    if "a_vs_b_max_abs_diff" in result:
        print(f"(a) vs (b), same noise, after {args.warmup + args.steps} steps: largest difference "
              f"{result['a_vs_b_max_abs_diff']:.2e}")
    floor = result.get("convolutions")
    if floor:
        print(f"\nconvolutions alone ({floor['layers']} layers, {floor['gflop_per_forward']:.1f} GFLOP per chain and "
              "forward), each layer timed on its own: the floor under any mode")
        rows = [[r["precision"], "channels-last" if r["channels_last"] else "contiguous", str(r["batch"]),
                 common.fmt(r["s_per_chain_forward"], ".3f"), common.fmt(r["gflop_per_s"], ".0f")]
                for r in floor["rows"]]
        print(common.table(rows, ["precision", "layout", "batch", "s per chain-forward", "GFLOP/s"]))
        if floor["ceiling_vs_a"]:
            ceilings = ", ".join(f"{p} {v:.2f}x" for p, v in floor["ceiling_vs_a"].items())
            print(f"(a) spends {floor['a_s_per_chain_forward']:.3f} s per chain-forward; the most any mode can gain "
                  f"over (a) without doing less arithmetic: {ceilings}")


def print_widget(widget: dict) -> None:
    print(f"\n== widget path (_gui.job.run_job, demo model, one {widget['input'][0]}x{widget['input'][1]} slice, "
          f"default settings, previews every {widget['preview_interval_s']} s)")
    rows = []
    for run in widget["runs"]:
        rows.append([run["run"], common.fmt(run["load_s"], ".2f"), common.fmt(run["first_frame_after_load_s"], ".2f"),
                     common.fmt(run["first_frame_s"], ".2f"), common.fmt(run["ensemble_s"], ".2f"),
                     f"{run['num_ensemble']} x {run['steps']} {run['sampler']} {run['precision']}"])
    print(common.table(rows, ["run", "load s", "1st frame s", "incl. load", "ensemble s", "settings"]))
    print(f"median over the {len(widget['runs'])} runs: first frame {widget['median_first_frame_s']:.2f} s, "
          f"ensemble {widget['median_ensemble_s']:.2f} s")
    print(f"measured, not extrapolated; targets on a 2-core CPU: first frame <= {FIRST_FRAME_TARGET_S:g} s, "
          f"ensemble <= {ENSEMBLE_TARGET_S:g} s")


def print_reference(device: torch.device) -> dict | None:
    measured = common.reference_timings()
    if measured is None or device.type != "cpu":
        return None
    paper = measured["paper"]["p_sample_b1"]["median"]
    small = measured["small"]["p_sample_b1"]["median"]
    print(f"\nreference implementation as measured ({measured['machine']}): one p_sample at batch 1 "
          f"{paper * 1000:.0f} ms (PAPER) / {small * 1000:.0f} ms (SMALL) -> "
          f"{measured['paper']['extrapolated_reference_ensemble_5x1000_b1_s']:.0f} s per PAPER ensemble; "
          "compare with (a) above to see how close the reference-style loop is to it")
    return {"paper_p_sample_b1_s": paper, "small_p_sample_b1_s": small,
            "paper_ensemble_s": measured["paper"]["extrapolated_reference_ensemble_5x1000_b1_s"]}


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 5; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--configs", default="paper,demo", help="comma-separated: paper, demo")
    parser.add_argument("--modes", default="",
                        help="comma-separated mode keys to run (a, ref_b1, ref_b5, b, b_bf16, c_fp32, c, c_fp16, "
                        "b_compiled, c_compiled, floor: the convolutions alone); default: all but b_compiled")
    parser.add_argument("--reference_steps", type=int, default=None,
                        help="timed steps for (a) alone (default: --steps); (a) then is not compared with (b)")
    parser.add_argument("--ensemble", type=int, default=5, help="chains per slice")
    parser.add_argument("--widget_runs", type=int, default=2,
                        help="widget-path runs on the demo model (the first loads the model; 0: none)")
    parser.add_argument("--volume", default=str(VALIDATION_VOLUME),
                        help="a BraTS case folder segmented whole with the bundled model ('none': skip; default: "
                        "CBICA_ABM_1, held out by the earlier models' split; the seventh trained on it, so its Dice is no "
                        "held-out figure)")
    parser.add_argument("--compile", action="store_true", help="also time the fast mode under torch.compile")
    parser.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile's mode for --compile (reduce-overhead: CUDA graphs)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.steps = (1 if args.quick else 5) if args.steps is None else args.steps
    if args.steps < 1 or args.warmup < 0 or args.ensemble < 1 or (args.reference_steps or 1) < 1:
        raise SystemExit("error: --steps, --reference_steps and --ensemble must be at least 1, --warmup at least 0")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    device, info = common.start(args, "sampler")
    slice224, source = input_slice()
    print(f"input: {source}, {slice224.shape[1]}x{slice224.shape[2]}")
    results = {"benchmark": "sampler", "quick": args.quick, "device": str(device), "machine": info,
               "timed_steps": args.steps, "reference_timed_steps": args.reference_steps or args.steps,
               "warmup_steps": args.warmup, "ensemble": args.ensemble,
               "input": source, "configs": {}, "widget": None, "volume": None}
    with tempfile.TemporaryDirectory(prefix="diffseg-bench-") as tmp:
        if "demo" in names and args.widget_runs > 0:
            # Before any config is built: the first run is this process's first use of the model,
            # with no 114 M-parameter paper model in memory beside it, as in napari.
            path = str(_tiny_checkpoint(Path(tmp))) if args.quick else None
            results["widget"] = time_widget(path, slice224, device, args.ensemble, args.widget_runs)
            print_widget(results["widget"])
        if args.volume.lower() != "none":
            results["volume"] = time_volume(args.volume, device, args.ensemble, args.quick, Path(tmp))
            print_volume(results["volume"])
        configs = [build_config(name, args.quick, device, slice224, Path(tmp)) for name in names]
        for cfg in configs:
            torch.manual_seed(SEED)
            results["configs"][cfg.name] = bench_config(cfg, device, args)
            print_config(cfg.name, results["configs"][cfg.name], args, device)
    results["reference_measured"] = print_reference(device)
    line = common.write_json(results, args.json)
    print(line)
    return results


if __name__ == "__main__":
    main()
