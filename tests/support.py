"""What several test modules share: tiny models and their checkpoints, random inputs, the
training flags of a tiny run. (Fixtures live in conftest.py; the widget's helpers in
gui_support.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from napari_diffseg import checkpoint
from napari_diffseg.diffusion import DiffusionConfig
from napari_diffseg.ensemble import sample_ensemble
from napari_diffseg.geometry import Geometry
from napari_diffseg.options import SamplingOptions
from napari_diffseg.unet import UNet, UNetConfig

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
            num_heads=1, learn_sigma=True)


def tiny_model(seed: int = 0, **config) -> UNet:
    """A tiny UNet (TINY, with ``config`` on top) whose output layer is not zero."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(**{**TINY, **config}))
    with torch.no_grad():  # the output layer starts at zero: give the network something to say
        model.out[2].weight.normal_(0.0, 0.05)
    return model.eval()


def save_tiny_checkpoint(path, geometry: Geometry, seed: int = 0):
    model = tiny_model(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint.atomic_save(checkpoint.make_payload(UNetConfig(**TINY), DiffusionConfig(), geometry,
                                                   {"model": state}), path)
    return path


def random_images(s: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand((s, 4, h, w), generator=torch.Generator().manual_seed(seed))


def final_members(model, diffusion, images, n, seed=0, **kwargs) -> torch.Tensor:
    last = None
    for last in sample_ensemble(model, diffusion, images, SamplingOptions(n, seed=seed), **kwargs):
        pass
    return last.x.clone()


TINY_FLAGS = ["--num_channels", "32", "--channel_mult", "1,2", "--num_res_blocks", "1", "--attention_resolutions", "",
              "--crop_border", "0", "--resize_to", "32", "--batch_size", "4", "--lr", "2e-3", "--ema_rate", "0.9",
              "--no_progress", "--log_interval", "1", "--save_interval", "100", "--device", "cpu", "--seed", "0",
              "--learn_sigma", "True", "--norm_groups", "8"]


def tiny_state(seed: int = 0, **overrides) -> dict:
    torch.manual_seed(seed)
    return UNet(UNetConfig(**{**TINY, **overrides})).state_dict()


def write_bad_checkpoint(kind: str, folder: Path, good: Path) -> Path:
    """A file of ``kind`` that a user might pick as the checkpoint, made beside ``good``."""
    path = folder / f"{kind}.pt"
    rng = np.random.default_rng(0)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":  # an interrupted copy of a real checkpoint
        raw = good.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "text":  # the file that gave "IndexError: pop from empty list" with a traceback
        path.write_text("# notes\nmodel: savedmodel050000.pt\nlr = 1e-4\n" * 20)
    elif kind == "binary":  # not a torch file at all (random bytes that start like no known format)
        path.write_bytes(b"\x00\x01" + rng.bytes(4000))
    elif kind == "classifier":  # a torchvision-style classification state dict
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
                    "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, path)
    elif kind == "image_unet":  # an improved-diffusion UNet for 3-channel images
        torch.save(tiny_state(in_channels=3), path)
    elif kind == "flags_json":  # the flags JSON given where the checkpoint goes
        path = folder / "flags.json"
        path.write_text(json.dumps({"num_channels": 32, "num_res_blocks": 1, "learn_sigma": True}))
    elif kind == "nested":  # another framework's training checkpoint
        torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3}, path)
    elif kind == "ours_without_weights":
        payload = checkpoint.make_payload(UNetConfig(**TINY), DiffusionConfig(), Geometry(), {})
        torch.save(payload, path)
    else:
        raise ValueError(kind)
    return path


# kind -> words the one-line message must contain (besides the file's path)
BAD_KINDS = {
    "empty": ["empty"],
    "truncated": ["damaged or incomplete", "copy it again"],
    "text": ["text file", "model.pt"],
    "binary": ["not a PyTorch checkpoint", "model.pt"],
    "classifier": ["not a diffusion-segmentation model", "fc.weight"],
    "image_unet": ["3-channel", "not a segmentation model"],
    "flags_json": ["flags JSON", "not a checkpoint"],
    "nested": ["not a model checkpoint", "state_dict"],
    "ours_without_weights": ["without model weights"],
}


def table_timer(per_call: dict, calls: list | None = None, spikes: dict | None = None):
    """A batching probe's measure(batch) -> seconds from a table instead of the clock; ``spikes``
    {batch: [seconds, ...]} are handed out first, as a busy machine would."""
    spikes = {b: list(v) for b, v in (spikes or {}).items()}

    def measure(batch):
        if calls is not None:
            calls.append(batch)
        return spikes[batch].pop(0) if spikes.get(batch) else per_call[batch]

    return measure
