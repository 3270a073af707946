"""What the widget tests share: a tiny random-weight model (a few steps, 32x32), a case of
random images, and waiting for a run; the fixtures built on them are in conftest.py."""

from __future__ import annotations

import numpy as np
import torch

from napari_diffseg import _layerdata as ld
from napari_diffseg.checkpoint import atomic_save, make_payload
from napari_diffseg.diffusion import DiffusionConfig
from napari_diffseg.geometry import Geometry
from napari_diffseg.unet import UNet, UNetConfig

CASE = "pat01"
AFFINE = np.array([[-1.5, 0, 0, 40.0], [0, 1.5, 0, -30.0], [0, 0, 3.0, 12.0], [0, 0, 0, 1]])
RUN_TIMEOUT_MS = 120_000


def tiny_unet(channels: int = 32) -> tuple[UNetConfig, UNet]:
    torch.manual_seed(0)
    config = UNetConfig(image_size=32, num_channels=channels, num_res_blocks=1, channel_mult="1,2",
                        attention_resolutions="", learn_sigma=True)
    model = UNet(config)
    torch.nn.init.normal_(model.out[2].weight, std=0.05)  # the output conv starts at zero
    return config, model


def save_tiny_checkpoint(path, resize_to=None):
    config, model = tiny_unet()
    sampling = {"timestep_respacing": "5", "sampler": "ddpm", "num_ensemble": 5}
    atomic_save(make_payload(config, DiffusionConfig(), Geometry(crop_border=0, resize_to=resize_to),
                             {"model": model.state_dict()}, sampling=sampling), path)
    return path


def save_tiny_region_checkpoint(path, resize_to=None):
    """A tiny untrained region model (WT, TC, ET: three mask channels), as diffseg-train --regions
    brats stores one."""
    torch.manual_seed(0)
    config = UNetConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
                        learn_sigma=True, in_channels=7, mask_channels=3)
    model = UNet(config)
    torch.nn.init.normal_(model.out[2].weight, std=0.05)
    sampling = {"timestep_respacing": "5", "sampler": "ddpm", "num_ensemble": 5}
    atomic_save(make_payload(config, DiffusionConfig(), Geometry(crop_border=0, resize_to=resize_to),
                             {"model": model.state_dict()}, sampling=sampling, regions="brats"), path)
    return path


def case_layers(shape=(32, 32), case=CASE, seed=0, truth=True):
    rng = np.random.default_rng(seed)
    images = rng.random((4, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[(slice(8, 20), slice(10, 24)) + (slice(None),) * (len(shape) - 2)] = 2
    return ld.case_layer_tuples(case, images, AFFINE, None, label if truth else None)


def add_layers(viewer, tuples):
    return [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in tuples]


def run_and_wait(qtbot, widget):
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)


def errors_since(start: int) -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records[start:] if str(n.severity) == "error"]


def notification_count() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def result_names(viewer) -> list[str]:
    return [layer.name for layer in viewer.layers if "diffseg" in layer.name]
