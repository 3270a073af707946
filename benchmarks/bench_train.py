"""Training speed: diffseg-train's own training step against a plain loop, at the paper's batch size.

* plain: fp32, contiguous memory, no compile: sample a batch, q_sample the mask, UNet.forward
  on the 5 channels, the hybrid loss (Diffusion.training_losses), backward, AdamW step and an
  EMA update (the reference's TrainLoop keeps an EMA too), written out here.
* ours: ``napari_diffseg.train.Trainer.train_step`` itself, configured as diffseg-train runs
  with ``--precision bf16 --channels_last`` (fp16 on a CUDA GPU without bf16; fp32 on a CPU
  without native bf16). It includes the batch sampling and the EMA update.

Configs: the bundled demo model's network (its stored UNet config at its size, 128x128) and
the PAPER config (random weights, 224x224 input as the reference crops it). Both train on
synthetic phantom slices written to a temporary folder, so no data set is needed. The paper
config is slow on a CPU: it times only a couple of iterations.

    .venv/bin/python benchmarks/bench_train.py             # demo + paper, auto device
    .venv/bin/python benchmarks/bench_train.py --quick     # tiny, seconds (the tests)

The last line printed is the results as one JSON object (also written to --json PATH).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

from napari_diffseg import train  # noqa: E402
from napari_diffseg.checkpoint import load_model  # noqa: E402
from napari_diffseg.checkpoint import MODEL_FLAG_DEFAULTS  # noqa: E402
from napari_diffseg.diffusion import Diffusion, DiffusionConfig  # noqa: E402
from napari_diffseg.geometry import Geometry  # noqa: E402
from napari_diffseg.inference import has_c_compiler  # noqa: E402
from napari_diffseg.synthetic import write_phantoms  # noqa: E402
from napari_diffseg.unet import UNet, UNetConfig, count_parameters  # noqa: E402

SEED = 0
LR = 1e-4  # the reference's
EMA_RATE = 0.9999
PHANTOM_CASES = 4  # slices to draw batches from; the content does not change the timing


def config_setup(name: str, quick: bool) -> tuple[dict, Geometry, int, str]:
    """(model + diffusion flags, geometry, phantom size, description)."""
    if quick:
        return dict(common.TINY_FLAGS), Geometry(resize_to=common.TINY_INPUT), 64, "tiny stand-in (--quick), 32x32"
    if name == "demo":
        loaded = load_model(None)
        flags = {**loaded.unet_config.to_dict(), **loaded.diffusion_config.to_dict()}
        size = loaded.geometry.resize_to or 240
        return flags, loaded.geometry, 240, f"bundled demo model's network, {size}x{size}"
    if name == "paper":
        border = (240 - common.PAPER_INPUT) // 2
        return (common.paper_flags(), Geometry(crop_border=border), 240,
                f"PAPER flags, random weights, 240 -> {common.PAPER_INPUT}x{common.PAPER_INPUT}")
    raise SystemExit(f"error: --configs: unknown config {name!r}; use demo and/or paper")


def trainer_argv(flags: dict, geometry: Geometry, data_dir: Path, out_dir: Path, batch: int, device: torch.device,
                 precision: str, threads: int) -> list[str]:
    """diffseg-train's command line for this config (every model flag spelled out: the
    command's own defaults are the reference's generic ones, not this model's)."""
    argv = ["--data_dir", str(data_dir), "--out_dir", str(out_dir), "--batch_size", str(batch), "--lr", str(LR),
            "--ema_rate", str(EMA_RATE), "--device", str(device), "--seed", str(SEED), "--precision", precision,
            "--channels_last", "--no_progress", "--threads", str(threads),
            "--crop_border", str(geometry.crop_border), "--resize_to", str(geometry.resize_to or 0)]
    for name in (*MODEL_FLAG_DEFAULTS, "norm_groups"):
        if name in flags:
            argv += [f"--{name}", str(flags[name])]
    return argv


def time_ours(argv: list[str], device: torch.device, warmup: int, iters: int, compiled: bool = False) -> dict:
    """``compiled``: the UNet body under torch.compile (forward and backward); the first
    iteration compiles and is timed apart."""
    trainer = train.Trainer(train.build_parser().parse_args(argv))
    extra = {}
    try:
        with common.PeakMemory(device) as mem:
            if compiled:
                trainer.model.compile_body("default")
                with common.Timer(device) as first:
                    trainer.train_step()
                extra["compile_s"] = first.seconds
            for _ in range(warmup):
                trainer.train_step()
            with common.Timer(device) as timer:
                for _ in range(iters):
                    values = trainer.train_step()
        label = f"ours: Trainer.train_step, {trainer.config.precision} autocast, channels-last, EMA"
        return {"label": label + (" + torch.compile" if compiled else ""),
                "precision": trainer.config.precision, "channels_last": True, "s_per_it": timer.seconds / iters,
                "it_per_s": iters / timer.seconds, "timed_iters": iters, "peak_mem_mib": mem.mib,
                "loss": values["loss"], "status": "ok", **extra}
    finally:
        if compiled:
            trainer.model.__dict__.pop("_body", None)
            torch._dynamo.reset()
        del trainer
        gc.collect()


def time_plain(flags: dict, slices: train.SliceSet, batch: int, device: torch.device, warmup: int,
               iters: int) -> dict:
    torch.manual_seed(SEED)
    model = UNet(UNetConfig.from_flags(flags)).to(device).train()
    diffusion = Diffusion.from_config(DiffusionConfig.from_flags(flags))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    rng = np.random.default_rng(SEED)
    generator = torch.Generator().manual_seed(SEED)

    def step() -> float:
        idx = torch.from_numpy(rng.integers(0, len(slices), size=batch))
        images = slices.images[idx].float().to(device)
        masks = slices.masks[idx].float().to(device)
        t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=generator).to(device)
        noise = torch.randn(masks.shape, generator=generator).to(device)
        x_t = diffusion.q_sample(masks, t, noise)
        output = model(torch.cat([images, x_t], dim=1), t)
        loss = diffusion.training_losses(output, masks, x_t, t, noise)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for average, p in zip(ema, params):
                average.mul_(EMA_RATE).add_(p.detach(), alpha=1 - EMA_RATE)
        return loss.item()

    try:
        with common.PeakMemory(device) as mem:
            for _ in range(warmup):
                step()
            with common.Timer(device) as timer:
                for _ in range(iters):
                    loss = step()
        return {"label": "plain: fp32, contiguous, forward + hybrid loss + backward + AdamW + EMA",
                "precision": "fp32", "channels_last": False, "s_per_it": timer.seconds / iters,
                "it_per_s": iters / timer.seconds, "timed_iters": iters, "peak_mem_mib": mem.mib, "loss": loss,
                "status": "ok"}
    finally:
        del model, optimizer, ema, params
        gc.collect()


def _params(flags: dict) -> int:
    with torch.device("meta"):  # counts without allocating the weights
        return count_parameters(UNet(UNetConfig.from_flags(flags)))


def _guarded(label: str, run) -> dict:
    """A mode that runs out of memory is a result ("failed: out of memory"), not a crash."""
    try:
        return run()
    except (RuntimeError, MemoryError) as exc:
        if not common.is_out_of_memory(exc):
            raise
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"label": label, "status": "failed: out of memory (try --batch smaller)"}


def _compiled(argv: list[str], device: torch.device, warmup: int, iters: int) -> dict:
    """The compiled mode; a compiler failure is a result, not a crash."""
    label = "ours + torch.compile"
    if device.type == "cpu" and not has_c_compiler():
        return {"label": label, "status": "skipped: no C compiler for torch.compile's CPU backend"}
    try:
        return _guarded(label, lambda: time_ours(argv, device, warmup, iters, compiled=True))
    except Exception as exc:  # noqa: BLE001
        return {"label": label, "status": f"failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}


def bench_config(name: str, args, device: torch.device, workdir: Path) -> dict:
    flags, geometry, phantom_size, description = config_setup(name, args.quick)
    iters = args.paper_iters if (name == "paper" and not args.quick) else args.iters
    data_dir = workdir / f"{name}-data"
    write_phantoms(data_dir, PHANTOM_CASES if not args.quick else 2, SEED, size=phantom_size)
    multiple = UNetConfig.from_flags(flags).size_multiple
    slices = train.build_slice_set(data_dir, geometry, multiple, log=lambda *_: None)
    precision = common.train_precision(device)
    argv = trainer_argv(flags, geometry, data_dir, workdir / f"{name}-out", args.batch, device, precision,
                        args.threads)
    modes = {
        "plain": _guarded("plain", lambda: time_plain(flags, slices, args.batch, device, args.warmup, iters)),
        "ours": _guarded("ours", lambda: time_ours(argv, device, args.warmup, iters)),
    }
    if args.compile:
        modes["ours_compiled"] = _compiled(argv, device, args.warmup, iters)
    ok = all(m["status"] == "ok" for m in modes.values())
    return {
        "description": description,
        "params": _params(flags),
        "network_input": list(slices.images.shape[-2:]),
        "batch": args.batch,
        "warmup_iters": args.warmup,
        "modes": modes,
        "ratio_ours_over_plain": modes["ours"]["it_per_s"] / modes["plain"]["it_per_s"] if ok else None,
    }


def print_config(name: str, result: dict, device: torch.device) -> None:
    print(f"\n== {name}: {result['description']}, {result['params']:,} parameters, batch {result['batch']}, "
          f"device {device}")
    rows = []
    for mode in result["modes"].values():
        if mode["status"] != "ok":
            rows.append([mode["label"], "-", "-", "-", mode["status"]])
            continue
        note = f"{mode['timed_iters']} timed" + (f", compile {mode['compile_s']:.0f} s" if "compile_s" in mode else "")
        rows.append([mode["label"], common.fmt(mode["it_per_s"], ".3f"), common.fmt(mode["s_per_it"], ".2f"),
                     common.fmt(mode["peak_mem_mib"]), note])
    print(common.table(rows, ["mode", "it/s", "s/it", "peak MiB", ""]))
    ratio = result["ratio_ours_over_plain"]
    print(f"ours / plain: {common.fmt(ratio, '.2f')}x the iterations per second "
          f"(after {result['warmup_iters']} warm-up iteration(s) each)")


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__)
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 5; 1 with --quick)")
    parser.add_argument("--paper_iters", type=int, default=2, help="timed iterations for the paper config")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size (default {common.PAPER_BATCH}, the paper's; 2 with --quick)")
    parser.add_argument("--configs", default="demo,paper", help="comma-separated: demo, paper")
    parser.add_argument("--compile", action="store_true",
                        help="also time Trainer.train_step with the UNet body under torch.compile")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.iters = (1 if args.quick else 5) if args.iters is None else args.iters
    args.batch = (2 if args.quick else common.PAPER_BATCH) if args.batch is None else args.batch
    if min(args.iters, args.paper_iters, args.batch) < 1 or args.warmup < 0:
        raise SystemExit("error: --iters, --paper_iters and --batch must be at least 1, --warmup at least 0")
    device, info = common.start(args, "training")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    results = {"benchmark": "train", "quick": args.quick, "device": str(device), "machine": info,
               "batch": args.batch, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="diffseg-bench-train-") as tmp:
        for name in names:
            results["configs"][name] = bench_config(name, args, device, Path(tmp))
            print_config(name, results["configs"][name], device)
    print(common.write_json(results, args.json))
    return results


if __name__ == "__main__":
    main()
