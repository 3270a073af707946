"""Checkpoints: our format (config embedded) and the reference's bare state dicts.

A checkpoint is data. Everything loads with ``torch.load(weights_only=True)``, so a file
carrying pickled code is refused instead of run. Writes go to a temporary file in the same
folder and are renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .diffusion import DiffusionConfig
from .errors import DiffSegError
from .geometry import Geometry
from .unet import UNet, UNetConfig

FORMAT = "napari-diffseg-checkpoint"
FORMAT_VERSION = 1
DEMO_MODEL = Path(__file__).parent / "weights" / "demo_brats2d.pt"

# Sampler settings a checkpoint falls back to when it records none (the paper's method).
DEFAULT_SAMPLING = {"timestep_respacing": "", "sampler": "ddpm", "num_ensemble": 5, "clip_range": [-1.0, 1.0]}
# Models trained here clip the x0 estimate to the mask's own range {0, 1}: with the
# reference's [-1, 1], chains of a briefly trained model drift to negative masks.
MASK_CLIP_RANGE = [0.0, 1.0]
# How results of a deterministic (segmentation-objective) model name their "sampler".
ONE_PASS = "one pass (deterministic U-Net)"


@dataclass
class LoadedModel:
    """A network ready for inference and everything needed to use it right."""

    model: UNet
    unet_config: UNetConfig
    diffusion_config: DiffusionConfig
    geometry: Geometry
    sampling: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLING))
    source: str = ""
    is_reference: bool = False
    # "diffusion" (the method) or "segmentation" (the deterministic U-Net baseline: one
    # forward pass at t = 0 with an all-zero mask channel gives the mask's logit)
    objective: str = "diffusion"

    @property
    def deterministic(self) -> bool:
        return self.objective == "segmentation"


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DiffSegError(f"{path.parent}: cannot write there ({exc.strerror}); choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file as data, with one-line errors for what users get wrong."""
    path = Path(path)
    if not path.is_file():
        raise DiffSegError(f"{path}: checkpoint not found; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise DiffSegError(
            f"{path}: refused to load: the file holds more than tensors and plain data "
            f"({first[:160]}); only weight files are accepted, never pickled code"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DiffSegError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}); "
            f"give a .pt file written by diffseg-train or by the reference's training"
        ) from None


def is_ours(payload) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def make_payload(
    unet_config: UNetConfig,
    diffusion_config: DiffusionConfig,
    geometry: Geometry,
    weights: dict,
    sampling: dict | None = None,
    **extra,
) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "unet_config": unet_config.to_dict(),
        "diffusion_config": diffusion_config.to_dict(),
        "geometry": geometry.to_dict(),
        "sampling": dict(sampling or DEFAULT_SAMPLING),
        "weights": weights,
        **extra,
    }


def _build(unet_config: UNetConfig, state: dict, path: Path, hint: str) -> UNet:
    try:
        model = UNet(unet_config)
    except (ValueError, KeyError) as exc:
        raise DiffSegError(f"{path}: the model flags are not valid ({exc})") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = (
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} with other shapes"
            + (f", e.g. {wrong[0]} is {tuple(state[wrong[0]].shape)} here but {tuple(expected[wrong[0]].shape)} for these flags" if wrong else "")
            + (f", e.g. missing {missing[0]}" if missing and not wrong else "")
        )
        raise DiffSegError(f"{path}: the weights do not fit the model flags ({detail}); {hint}")
    model.load_state_dict(state)
    return model.eval()


def load_model(
    path: str | os.PathLike | None = None,
    reference_flags: dict | None = None,
    use_ema: bool = True,
) -> LoadedModel:
    """Load our checkpoint (config inside) or a reference state dict with its flags.

    ``path`` None means the bundled demo model. A reference checkpoint
    (``savedmodelNNNNNN.pt``/``emasavedmodel_...pt``) holds no configuration, so its model
    flags must be given; it runs with the reference's geometry (240 -> 224 crop).
    """
    path = Path(path) if path is not None else DEMO_MODEL
    if path == DEMO_MODEL and not path.is_file():
        raise DiffSegError(f"{path}: the bundled demo model is missing; reinstall napari-diffseg or give --model_path")
    payload = read_checkpoint(path)
    if is_ours(payload):
        unet_config = UNetConfig.from_flags(payload["unet_config"])
        weights = payload["weights"]
        state = weights.get("ema") if use_ema and weights.get("ema") else weights["model"]
        model = _build(unet_config, state, path, "the file may be damaged")
        return LoadedModel(
            model=model,
            unet_config=unet_config,
            diffusion_config=DiffusionConfig.from_flags(payload["diffusion_config"]),
            geometry=Geometry.from_dict(payload.get("geometry", {})),
            sampling={**DEFAULT_SAMPLING, **payload.get("sampling", {})},
            source=str(path),
            objective=str(payload.get("objective", "diffusion")),
        )
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        if reference_flags is None:
            raise DiffSegError(
                f"{path}: a reference checkpoint holds no model configuration; give its model flags "
                f"(e.g. --num_channels 128 --num_res_blocks 2 ...) or a flags JSON file"
            )
        unet_config = UNetConfig.from_flags(reference_flags)
        model = _build(
            unet_config, payload, path,
            "give the model flags the checkpoint was trained with (--num_channels, --num_res_blocks, "
            "--attention_resolutions, --learn_sigma ...)",
        )
        return LoadedModel(
            model=model,
            unet_config=unet_config,
            diffusion_config=DiffusionConfig.from_flags(reference_flags),
            geometry=Geometry.reference(),
            sampling={**DEFAULT_SAMPLING, "timestep_respacing": reference_flags.get("timestep_respacing", "")},
            source=str(path),
            is_reference=True,
        )
    raise DiffSegError(
        f"{path}: not a model checkpoint (neither a napari-diffseg checkpoint nor a state dict of tensors)"
    )
