"""``diffseg-train``: train the conditional diffusion model on slice folders or BraTS volumes.

``--objective segmentation`` trains the comparison baseline instead: the same U-Net, fed
the images with an all-zero mask channel at t = 0, predicting the mask's logit in one
pass, with Dice + binary cross-entropy. Its checkpoint says so, and every command
and the widget then segment with one deterministic forward pass.

Runs as a plain command or under ``torchrun --nproc_per_node K`` (DistributedDataParallel:
gloo on CPU, NCCL on CUDA). Every batch, timestep and noise draw is a function of
(seed, rank, step), so a resumed run continues the same stream. Checkpoints hold the model,
optimizer, EMA and step, embed the configuration, and are written atomically; SIGINT or
SIGTERM saves and exits cleanly.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .augment import augment_batch
from .checkpoint import (DEFAULT_SAMPLING, MASK_CLIP_RANGE, atomic_save, is_ours,
                         make_payload, read_checkpoint)
from .clicks import HINT_CHANNELS, marks_to_hints, simulate_marks
from .cli import guarded
from .diffusion import Diffusion, DiffusionConfig
from .ensemble import autocast_context
from .errors import DiffSegError
from .files import check_writable_folder
from .geometry import Geometry
from .inference import resolve_device
from .losses import segmentation_losses, x0_dice_bce
from .preprocess import InputSpec, normalise
from .regions import region_count
from .train_config import TrainConfig, build_parser
from .train_log import LogRow, TrainingLog
from .trainset import SliceSet, build_slice_set
from .unet import UNet, UNetConfig, count_parameters

CHECKPOINT_NAME = "checkpoint.pt"  # full training state, for --resume
MODEL_NAME = "model.pt"  # weights + configuration, for sampling


# -- optimisation ------------------------------------------------------------------------------
def lr_factor(schedule: str, step: int, warmup_steps: int, progress: float) -> float:
    """Multiplier of the base learning rate: a linear warm-up over ``warmup_steps``, then
    constant or a half cosine that reaches zero when ``progress`` (0..1 of the run) ends."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return warm
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


# -- distributed helpers -----------------------------------------------------------------------
def _distributed() -> tuple[int, int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63 - 1)


class EMA:
    """Exponential moving average of the weights with a warm-up.

    The rate ramps as min(rate, (1 + n) / (10 + n)): with the reference's fixed 0.9999, a
    run of a few thousand steps would still be mostly its random initialisation."""

    def __init__(self, model: torch.nn.Module, rate: float):
        self.rate = rate
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.rate, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)



class Trainer:
    def __init__(self, config: TrainConfig | argparse.Namespace):
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_args(config)
        self.stop_requested = False
        self._start_processes()
        self.out_dir = self._prepare_out_dir()
        self._configure()
        self._build_model()
        self._load_data()

    def _start_processes(self) -> None:
        """Threads, the process group under torchrun, and this process's device."""
        c = self.config
        self.rank, self.world, local_rank = _distributed()
        if c.threads:
            torch.set_num_threads(c.threads)
        if self.world > 1:
            cuda = c.device.startswith("cuda") or (c.device == "auto" and torch.cuda.is_available())
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        device = resolve_device(c.device)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if c.precision == "fp16" and device.type != "cuda":
            raise DiffSegError("--precision fp16 needs a CUDA GPU; use bf16 or fp32")

    def _prepare_out_dir(self) -> Path:
        """The output folder, writable and free of an earlier run unless this one resumes it."""
        out_dir = Path(self.config.out_dir)
        if self.rank == 0:
            check_writable_folder(out_dir, setting="out_dir")
            earlier = out_dir / CHECKPOINT_NAME
            if earlier.exists() and not self.config.resume:
                raise DiffSegError(f"--out_dir {out_dir} holds an earlier run ({earlier}); continue it with --resume "
                                   f"{earlier}, or give another --out_dir (or delete that one)")
        return out_dir

    def _configure(self) -> None:
        """What the checkpoint records: network, diffusion, geometry, inputs, sampler defaults."""
        c = self.config
        flags = dict(c.model_flags)
        if c.segmentation:
            flags["learn_sigma"] = False  # one output channel per region: its logit
        self.segmentation = c.segmentation
        self.inputs = InputSpec(c.input_norm, c.context)
        masks = region_count(c.regions)
        self.unet_config = UNetConfig.from_flags({**flags, "in_channels": self.inputs.channels + masks,
                                                  "mask_channels": masks,
                                                  "norm_groups": c.norm_groups, "self_condition": c.self_condition,
                                                  "hint_channels": HINT_CHANNELS if c.click_fraction else 0})
        self.diffusion_config = DiffusionConfig.from_flags(flags)
        multiple = self.unet_config.size_multiple
        if c.resize_to and c.resize_to % multiple:
            raise DiffSegError(f"--resize_to {c.resize_to}: the network halves the slice {multiple.bit_length() - 1} "
                               f"times, so give a multiple of {multiple} (e.g. "
                               f"{max(multiple, c.resize_to // multiple * multiple)})")
        self.geometry = Geometry(crop_border=c.crop_border, resize_to=c.resize_to or None)
        self.sampling = {**DEFAULT_SAMPLING, "timestep_respacing": c.sample_respacing,
                         "clip_range": list(MASK_CLIP_RANGE), "clamp_variance": True}
        if self.segmentation:
            self.sampling["num_ensemble"] = 1
        if c.cleanup_min_voxels:  # only when given: a model without it stores what it always did
            self.sampling["cleanup_min_voxels"] = int(c.cleanup_min_voxels)
        if c.flip_members:  # likewise
            self.sampling["flip_members"] = True
        self.loss_terms = ("bce", "dice_loss") if self.segmentation else ("mse", "vb")
        if not self.segmentation and c.x0_loss_weight > 0:
            self.loss_terms += ("x0_loss",)
        self.diffusion = Diffusion.from_config(self.diffusion_config)

    def _build_model(self) -> None:
        """The network (fresh, from --init_from, or resumed), its EMA and optimizer."""
        c = self.config
        torch.manual_seed(c.seed)  # identical initial weights on every rank
        try:
            self.model = UNet(self.unet_config)
        except ValueError as exc:
            raise DiffSegError(f"model flags: {exc}") from None
        self.model.to(self.device)
        if c.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if c.init_from:
            self._init_from(Path(c.init_from))
        self.ema = EMA(self.model, c.ema_rate)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if c.precision == "fp16" else None
        self.step = 0
        self.elapsed_before = 0.0  # training seconds of earlier runs this one resumes
        self.run_started = time.time()
        if c.resume:
            self._resume(Path(c.resume))
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _load_data(self) -> None:
        c = self.config
        multiple = self.unet_config.size_multiple
        self.train_set = build_slice_set(c.data_dir, self.geometry, multiple, log=self.log, spec=self.inputs,
                                         regions=c.regions)
        self.val_set = (build_slice_set(c.val_dir, self.geometry, multiple, log=self.log, spec=self.inputs,
                                        regions=c.regions) if c.val_dir else None)
        self.log(
            f"model: {count_parameters(self.model):,} parameters, network input "
            f"{tuple(self.train_set.images.shape[-2:])}, device {self.device}, {self.world} process(es), "
            f"precision {c.precision}"
        )

    # -- bookkeeping -------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    def _resume(self, path: Path) -> None:
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        payload = read_checkpoint(path)
        if not is_ours(payload) or "optimizer" not in payload:
            raise DiffSegError(f"{path}: not a diffseg-train checkpoint; --resume takes the {CHECKPOINT_NAME} of an earlier run")
        if payload.get("objective", "diffusion") != self.config.objective:
            raise DiffSegError(f"{path}: was trained with --objective {payload.get('objective', 'diffusion')}; "
                               "give the same objective to resume")
        if payload.get("regions", "wt") != self.config.regions:
            raise DiffSegError(f"{path}: was trained with --regions {payload.get('regions', 'wt')}; give the same "
                               "regions to resume")
        if (UNetConfig.from_flags(payload["unet_config"]) != self.unet_config
                or InputSpec.from_dict(payload.get("inputs")) != self.inputs):
            raise DiffSegError(f"{path}: was trained with other model flags; give the same flags to resume")
        self.model.load_state_dict(payload["weights"]["model"])
        self.ema.shadow = {k: v.float().to(self.device) for k, v in payload["weights"]["ema"].items()}
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step = int(payload["step"])
        self.elapsed_before = float(payload.get("elapsed_s", 0.0))
        if "torch_rng" in payload:
            torch.set_rng_state(payload["torch_rng"])
        self.log(f"resumed from {path} at step {self.step}")

    def _init_from(self, path: Path) -> None:
        if path.is_dir():
            path = path / MODEL_NAME
        payload = read_checkpoint(path)
        if not is_ours(payload) or not isinstance(payload.get("weights"), dict):
            raise DiffSegError(f"{path}: not a diffseg-train model; --init_from takes the model.pt or checkpoint.pt "
                               "of an earlier run")
        source = UNetConfig.from_flags(payload["unet_config"])
        if (replace(source, hint_channels=0) != replace(self.unet_config, hint_channels=0)
                or source.hint_channels > self.unet_config.hint_channels
                or InputSpec.from_dict(payload.get("inputs")) != self.inputs):
            raise DiffSegError(f"{path}: was trained with other model flags; give the same flags to start from it "
                               "(only --click_fraction may add mark channels)")
        state = payload["weights"].get("ema") or payload["weights"]["model"]
        own = self.model.state_dict()
        for name, value in state.items():
            value = value.to(own[name].dtype)
            if value.shape != own[name].shape:  # the first layer, without the new mark channels
                padded = torch.zeros_like(own[name])
                padded[:, : value.shape[1]] = value
                value = padded
            own[name] = value
        self.model.load_state_dict(own)
        self.log(f"started from the weights of {path}")

    def save(self) -> None:
        if self.rank != 0:
            return
        weights = {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                   "ema": {k: v.cpu() for k, v in self.ema.shadow.items()}}
        common = dict(unet_config=self.unet_config, diffusion_config=self.diffusion_config,
                      geometry=self.geometry, sampling=self.sampling, objective=self.config.objective,
                      inputs=self.inputs.to_dict(), regions=self.config.regions)
        train_args = self.config.to_dict()
        atomic_save(make_payload(weights=weights, step=self.step, optimizer=self.optimizer.state_dict(),
                                 torch_rng=torch.get_rng_state(), train_args=train_args,
                                 elapsed_s=self.elapsed(), **common),
                    self.out_dir / CHECKPOINT_NAME)
        atomic_save(make_payload(weights=weights, step=self.step, train_args=train_args, **common),
                    self.out_dir / MODEL_NAME)

    def elapsed(self) -> float:
        """Training wall time of the whole run, earlier resumed runs included."""
        return self.elapsed_before + time.time() - self.run_started

    def progress(self) -> float:
        """How far the run is towards its end (0..1), by steps or by wall time."""
        done = 0.0
        if self.config.max_steps:
            done = self.step / self.config.max_steps
        if self.config.max_minutes:
            done = max(done, self.elapsed() / (60 * self.config.max_minutes))
        return min(done, 1.0)

    def current_lr(self) -> float:
        return self.config.lr * lr_factor(self.config.lr_schedule, self.step, self.config.warmup_steps, self.progress())

    # -- one optimizer step ------------------------------------------------------------------
    def _batch(self, dataset: SliceSet, rng: np.random.Generator, size: int, tumour_fraction: float = 0.0,
               augment: bool = True):
        idx = torch.from_numpy(dataset.draw(rng, size, tumour_fraction))
        images = dataset.images[idx].float()
        masks = dataset.masks[idx].float()
        if augment:
            images, masks = augment_batch(images, masks, rng, flip=self.config.augment,
                                          intensity=self.config.augment_intensity, spatial=self.config.augment_spatial,
                                          strong=self.config.augment_strong)
        if dataset.stats is not None:
            images = normalise(images, dataset.stats[idx], self.inputs)
        return images.to(self.device), masks.to(self.device)

    def _segmentation_losses(self, images, masks):
        x = torch.cat([images, torch.zeros_like(masks)], dim=1)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.zeros(images.shape[0], dtype=torch.long, device=self.device)
        with autocast_context(self.device, self.config.precision):
            logits = self.net(x, t)
        return segmentation_losses(logits.float(), masks)

    def _losses(self, images, masks, generator: torch.Generator):
        if self.segmentation:
            return self._segmentation_losses(images, masks)
        n = images.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=generator).to(self.device)
        noise = torch.randn(masks.shape, generator=generator).to(self.device)
        x_t = self.diffusion.q_sample(masks, t, noise)
        x = torch.cat([images, x_t], dim=1)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x0_prev = hints = None
        if self.unet_config.self_condition:
            x0_prev = self._self_condition_input(x, t, x_t, generator)
        if self.unet_config.hint_channels:
            hints = self._simulated_marks(x, t, x_t, masks, x0_prev, generator)
        with autocast_context(self.device, self.config.precision):
            output = self.net(x, t, x0_prev, hints)
        losses = self.diffusion.training_losses(output.float(), masks, x_t, t, noise)
        if self.config.x0_loss_weight > 0:
            x0_loss = x0_dice_bce(self.diffusion.x0_estimate(output.float(), x_t, t), masks)
            losses["x0_loss"] = x0_loss
            losses["loss"] = losses["loss"] + self.config.x0_loss_weight * x0_loss
        return losses

    def _self_condition_input(self, x, t, x_t, generator: torch.Generator) -> torch.Tensor:
        """The x0-estimate channel: for half the samples the model's own detached estimate
        without it (what sampling feeds from the previous step), zeros for the rest (what the
        first step sees)."""
        with torch.no_grad(), autocast_context(self.device, self.config.precision):
            first = self.net(x, t, torch.zeros_like(x_t)).float()
        clip = self.sampling["clip_range"]
        estimate = self.diffusion.x0_estimate(first, x_t, t).clamp(*clip)
        use = (torch.rand(x_t.shape[0], generator=generator) < 0.5).to(self.device)
        return torch.where(use.reshape(-1, 1, 1, 1), estimate, torch.zeros_like(estimate))

    def _simulated_marks(self, x, t, x_t, masks, x0_prev, generator: torch.Generator) -> torch.Tensor:
        """The mark channels: for a --click_fraction share of the slices, marks placed against
        the model's own (detached) estimate without marks, as a user would correct it; none for
        the rest (a plain run)."""
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
        hints = torch.zeros((x.shape[0], self.unet_config.hint_channels, *x.shape[2:]))
        chosen = np.flatnonzero(rng.random(x.shape[0]) < self.config.click_fraction)
        if chosen.size:
            rows = torch.from_numpy(chosen).to(self.device)
            # The bare module, not the DDP wrapper: ranks draw different counts, and a wrapped
            # forward on one rank only could wait on the others.
            with torch.no_grad(), autocast_context(self.device, self.config.precision):
                first = self.model(x[rows], t[rows], None if x0_prev is None else x0_prev[rows]).float()
            estimate = (self.diffusion.x0_estimate(first, x_t[rows], t[rows]) > 0.5)[:, 0].cpu().numpy()
            truth = (masks[rows, 0] > 0.5).cpu().numpy()
            for i, row in enumerate(chosen):
                hints[row] = torch.from_numpy(marks_to_hints(simulate_marks(estimate[i], truth[i], rng)))
        hints = hints.to(self.device)
        return hints.contiguous(memory_format=torch.channels_last) if self.config.channels_last else hints

    def train_step(self) -> dict[str, float]:
        rng = np.random.default_rng(_step_seed(self.config.seed, self.rank, self.step))
        generator = torch.Generator().manual_seed(_step_seed(self.config.seed + 1, self.rank, self.step))
        images, masks = self._batch(self.train_set, rng, self.config.batch_size, self.config.tumour_fraction)
        self.model.train()
        losses = self._losses(images, masks, generator)
        loss = losses["loss"].mean()
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        return {**{k: v.mean().item() for k, v in losses.items()}, "lr": lr}

    @torch.no_grad()
    def validation_loss(self, count: int = 32) -> float:
        """Mean hybrid loss on fixed slices, timesteps and noise, comparable across saves."""
        rng = np.random.default_rng(12345)
        generator = torch.Generator().manual_seed(54321)
        self.model.eval()
        total, seen = 0.0, 0
        for start in range(0, count, self.config.batch_size):
            # the held-out slices as they are: an augmented validation loss would measure the augmentation
            images, masks = self._batch(self.val_set, rng, min(self.config.batch_size, count - start), augment=False)
            total += self._losses(images, masks, generator)["loss"].sum().item()
            seen += images.shape[0]
        return total / max(seen, 1)

    # -- the loop ----------------------------------------------------------------------------
    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        if self.world > 1:
            dist.all_reduce(flag)  # stop together so the last save sees one step count
        return bool(flag.item() > 0)

    def run(self) -> int:
        c = self.config
        progress_log = self._open_log() if self.rank == 0 else None
        bar = None
        if self.rank == 0 and not c.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=c.max_steps or None, initial=self.step, unit="step", dynamic_ncols=True)
        sums = dict.fromkeys(("loss", *self.loss_terms), 0.0)
        self.run_started = time.time()
        count, interval_start = 0, time.time()
        if self.step == 0:
            self.save()  # a loadable checkpoint exists from the start
        try:
            while not c.max_steps or self.step < c.max_steps:
                if c.max_minutes and self.elapsed() > 60 * c.max_minutes:
                    self.stop_requested = True
                if self._should_stop():
                    self.log(f"stopping at step {self.step}")
                    break
                values = self.train_step()
                for k in sums:
                    sums[k] += values[k]
                count += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.4f}")
                val = None
                if self.step % c.save_interval == 0:
                    if self.val_set is not None:
                        val = self.validation_loss()
                    self.save()
                if progress_log is not None and (self.step % c.log_interval == 0 or val is not None):
                    now = time.time()
                    progress_log.write(LogRow(self.step, {k: v / max(count, 1) for k, v in sums.items()}, val,
                                              count / max(now - interval_start, 1e-9), round(self.elapsed(), 2),
                                              values["lr"]))
                    sums = dict.fromkeys(sums, 0.0)
                    count, interval_start = 0, now
        finally:
            self.save()
            if bar is not None:
                bar.close()
            if progress_log is not None:
                progress_log.close()
        self.log(f"saved {self.out_dir / MODEL_NAME} at step {self.step}")
        return 0

    def _open_log(self) -> TrainingLog:
        """progress.csv, appended to when resuming a run that has one."""
        csv_path = self.out_dir / "progress.csv"
        return TrainingLog(csv_path, append=csv_path.exists() and bool(self.config.resume), terms=self.loss_terms,
                           tensorboard=self._tensorboard())

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))


@guarded
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    trainer = Trainer(args)

    def request_stop(signum, frame):
        trainer.stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        return trainer.run()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
