"""Checkpoints: our format (config embedded) and the reference's bare state dicts.

A checkpoint is data. Everything loads with ``torch.load(weights_only=True)``, so a file
carrying pickled code is refused instead of run. Writes go to a temporary file in the same
folder and are renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .diffusion import DIFFUSION_FLAG_DEFAULTS, DiffusionConfig
from .errors import DiffSegError
from .files import atomic_write
from .geometry import Geometry
from .preprocess import InputSpec
from .regions import REGION_SETS, region_names
from .unet import UNET_FLAG_DEFAULTS, UNet, UNetConfig

FORMAT = "napari-diffseg-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"
# The bundled models, by the regions they segment (diffseg-train --regions). Either file may be
# missing from an installation (the region model came later): bundled_model() says so.
BUNDLED_MODELS = {"wt": WEIGHTS_DIR / "demo_brats2d.pt", "brats": WEIGHTS_DIR / "demo_brats2d_regions.pt"}
BUNDLED_TITLES = {"wt": "the whole tumour", "brats": "the tumour's parts (WT, TC, ET)"}
DEMO_MODEL = BUNDLED_MODELS["wt"]

# Sampler settings a checkpoint falls back to when it records none (the paper's method).
DEFAULT_SAMPLING = {"timestep_respacing": "", "sampler": "ddpm", "num_ensemble": 5, "clip_range": [-1.0, 1.0],
                    "clamp_variance": False}
# Models trained here clip the x0 estimate to the mask's own range {0, 1}: with the
# reference's [-1, 1], chains of a briefly trained model drift to negative masks.
MASK_CLIP_RANGE = [0.0, 1.0]
# How results of a deterministic (segmentation-objective) model name their "sampler".
ONE_PASS = "one pass (deterministic U-Net)"


# The reference's model and diffusion flags with its defaults: a reference checkpoint holds no
# configuration, so its flags are these, overridden by its flags JSON and any flags given.
MODEL_FLAG_DEFAULTS = {**UNET_FLAG_DEFAULTS, **DIFFUSION_FLAG_DEFAULTS}
# Reference flags for what this method does not do.
UNSUPPORTED_FLAGS = {"class_cond": "class-conditional models", "use_kl": "the pure KL loss"}


def read_flags_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        flags = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DiffSegError(f"{path}: cannot read the flags JSON ({exc}); give a JSON object of model flags",
                           setting="flags_json") from None
    if not isinstance(flags, dict):
        raise DiffSegError(f"{path}: the flags JSON must be an object of flag names to values", setting="flags_json")
    return flags


def check_unsupported_flags(flags: dict) -> None:
    for name, what in UNSUPPORTED_FLAGS.items():
        if flags.get(name):
            raise DiffSegError(f"{name} True: {what} are not part of this method; leave it False", setting=name)


def reference_flags(flags_file: str | os.PathLike | None = None, given: dict | None = None) -> dict:
    """The model flags of a reference checkpoint: the reference's defaults, overridden by the
    flags JSON, overridden by the flags ``given`` one by one (None: not given)."""
    flags = dict(MODEL_FLAG_DEFAULTS)
    if flags_file:
        flags.update(read_flags_file(flags_file))
    flags.update({name: value for name, value in (given or {}).items() if value is not None})
    check_unsupported_flags(flags)
    return flags


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
    inputs: InputSpec = field(default_factory=InputSpec)  # normalisation and neighbouring slices
    # What the mask holds: "wt" (whole tumour, one channel) or "brats" (WT, TC, ET: regions.py)
    regions: str = "wt"

    @property
    def deterministic(self) -> bool:
        return self.objective == "segmentation"

    @property
    def region_names(self) -> tuple[str, ...]:
        return region_names(self.regions)

    @property
    def multi_region(self) -> bool:
        """Whether the mask has a region axis (a ``--regions brats`` model), not one whole-tumour mask."""
        return len(self.region_names) > 1


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffSegError(f"{path.parent}: cannot write there ({exc.strerror}); choose a writable folder") from None

    def write(handle) -> None:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())

    atomic_write(path, write, "wb")


# The flags a reference checkpoint most often needs, for the messages that ask for them.
REFERENCE_FLAGS_EXAMPLE = "num_channels, num_res_blocks, attention_resolutions, learn_sigma ..."
# What to give instead, shared by the messages below (they show in the CLI and in the widget).
WANTED = "give model.pt written by diffseg-train or a reference savedmodelNNNNNN.pt"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTO = 0x80  # the first opcode of torch.save's legacy format (a pickle, protocol >= 2)


def _looks_like_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut off by the end of ``head`` is still text.
        return exc.start >= len(head) - 3
    return True


def _not_torch_file(path: Path, head: bytes) -> DiffSegError:
    """The error for a file whose first bytes are not a torch.save file's."""
    if not head:
        return DiffSegError(f"{path}: the file is empty (0 bytes), not a checkpoint; an interrupted copy or "
                            f"download leaves this: copy it again, or {WANTED}")
    if _looks_like_text(head):
        if _is_flags_json(path):
            return DiffSegError(f"{path}: is a model-flags JSON, not a checkpoint; give it as the flags JSON "
                                "and the .pt weights file as the checkpoint", setting="flags_json")
        return DiffSegError(f"{path}: is a text file, not a PyTorch checkpoint; {WANTED}")
    kind = {b"\x1f\x8b": "gzip data (e.g. a .nii.gz image)", b"\x89H": "an HDF5 file (a Keras/TensorFlow model?)",
            b"\x89P": "a PNG image", b"\x93N": "a NumPy .npy array"}.get(head[:2], "binary data of another kind")
    return DiffSegError(f"{path}: not a PyTorch checkpoint (it holds {kind}); {WANTED}")


def _is_flags_json(path: Path) -> bool:
    """A JSON object whose keys include the reference's model flags (a common mix-up)."""
    try:
        if path.stat().st_size > 1_000_000:
            return False
        flags = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(flags, dict) and any(key in MODEL_FLAG_DEFAULTS for key in flags)


def _first_sentence(text: str, limit: int = 160) -> str:
    return " ".join(text.split()).split(". ")[0][:limit]


def _unpickler_reason(exc: Exception) -> str:
    """The telling part of torch's weights_only refusal, which wraps it in paragraphs of advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return _first_sentence(line.removeprefix("WeightsUnpickler error:")).split(" was not an allowed")[0]
        if line.startswith("Trying to load unsupported"):
            return _first_sentence(line)
    return _first_sentence(lines[-1]) if lines else "unsupported content"


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file as data, with one-line errors for what users get wrong.

    The first bytes are checked before torch.load sees the file: the unpickler reads any other
    file (a text file, say) as opcodes and fails with whatever it hit (IndexError, KeyError ...).
    """
    path = Path(path)
    if path.is_dir():
        raise DiffSegError(f"{path}: is a folder; give the checkpoint file in it (e.g. model.pt)")
    if not path.is_file():
        raise DiffSegError(f"{path}: checkpoint not found; check the path")
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        raise DiffSegError(f"{path}: cannot read the checkpoint ({exc.strerror or exc}); check its permissions") from None
    legacy = head[:1] == bytes([_PICKLE_PROTO])
    if not (head.startswith(_ZIP_MAGIC) or legacy):
        raise _not_torch_file(path, head)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # A cut-off legacy file also ends in a half-read name the unpickler refuses.
        damaged = ", or is damaged" if legacy else ""
        raise DiffSegError(
            f"{path}: refused to load: the file holds more than tensors and plain data{damaged} "
            f"({_unpickler_reason(exc)}); only weight files are accepted, never pickled code"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes torch.load raise
        if not legacy and zipfile.is_zipfile(path):  # a whole zip archive, but not torch's layout
            raise DiffSegError(f"{path}: a zip archive but not a PyTorch checkpoint; {WANTED}") from None
        reason = _first_sentence(str(exc)) or type(exc).__name__
        raise DiffSegError(
            f"{path}: the checkpoint is damaged or incomplete ({reason}); an interrupted copy or download "
            f"does this: copy it again, or {WANTED}"
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


def _build(unet_config: UNetConfig, state: dict, path: Path, hint: str, setting: str | None = None) -> UNet:
    try:
        model = UNet(unet_config)
    except (ValueError, KeyError) as exc:
        raise DiffSegError(f"{path}: the model flags are not valid ({exc})", setting=setting) from None
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
        raise DiffSegError(f"{path}: the weights do not fit the model flags ({detail}); {hint}", setting=setting)
    model.load_state_dict(state)
    return model.eval()


# Every UNet of this method (and of the reference) has these; other models' state dicts do not.
UNET_KEYS = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")
IN_CHANNELS = 5  # four MR modalities and the noisy mask


def _is_state_dict(payload) -> bool:
    return isinstance(payload, dict) and bool(payload) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in payload.items())


def _keys_text(keys, count: int = 3) -> str:
    keys = list(keys)
    return ", ".join(str(key)[:60] for key in keys[:count]) + (", ..." if len(keys) > count else "")


def _check_unet_weights(state: dict, path: Path) -> None:
    """Refuse a state dict of some other network with a message saying so, not asking for flags."""
    missing = [key for key in UNET_KEYS if key not in state]
    if missing:
        raise DiffSegError(
            f"{path}: not a diffusion-segmentation model: its weights ({_keys_text(state)}) are not those of "
            f"this method's UNet (no {missing[0]}); {WANTED}"
        )
    first = state["input_blocks.0.0.weight"]
    if first.ndim != 4 or first.shape[1] != IN_CHANNELS:
        channels = first.shape[1] if first.ndim > 1 else "?"
        raise DiffSegError(
            f"{path}: a diffusion UNet for {channels}-channel input, not a segmentation model of 4 MR "
            f"modalities and a mask ({IN_CHANNELS} channels); {WANTED}"
        )


def _our_parts(payload: dict, path: Path, use_ema: bool) -> tuple[UNetConfig, DiffusionConfig, dict]:
    """Configuration and weights of our checkpoint; a one-line error when a part is missing."""
    damaged = "the file is damaged or was written by another program: train again or copy it again"
    for key in ("unet_config", "diffusion_config", "weights"):
        if not isinstance(payload.get(key), dict):
            raise DiffSegError(f"{path}: a napari-diffseg checkpoint without '{key}'; {damaged}")
    weights = payload["weights"]
    state = weights.get("ema") if use_ema and weights.get("ema") else weights.get("model")
    if not _is_state_dict(state):
        raise DiffSegError(f"{path}: a napari-diffseg checkpoint without model weights; {damaged}")
    try:
        unet_config = UNetConfig.from_flags(payload["unet_config"])
        diffusion_config = DiffusionConfig.from_flags(payload["diffusion_config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise DiffSegError(f"{path}: the configuration stored in the checkpoint is not valid ({exc}); "
                           f"{damaged}") from None
    return unet_config, diffusion_config, state


def installed_bundled_models() -> list[str]:
    """The regions ("wt", "brats") whose bundled model this installation holds."""
    return [regions for regions, path in BUNDLED_MODELS.items() if path.is_file()]


def bundled_model(regions: str = "wt") -> Path:
    """The bundled model's file for ``regions`` (DiffSegError naming the fix where it is missing)."""
    if regions not in BUNDLED_MODELS:
        raise DiffSegError(f"no bundled model segments {regions!r}; the bundled models are "
                           f"{', '.join(BUNDLED_MODELS)} ({', '.join(BUNDLED_TITLES.values())})")
    path = BUNDLED_MODELS[regions]
    if not path.is_file():
        raise DiffSegError(f"{path}: the bundled model of {BUNDLED_TITLES[regions]} is not installed; reinstall "
                           "napari-diffseg or give a model checkpoint", setting="model_path")
    return path


def _stored_regions(payload: dict, unet_config: UNetConfig, path: Path) -> str:
    """The regions a checkpoint's model segments ("wt" where it records none: every checkpoint
    written before regions existed), checked against its network's mask channels."""
    regions = payload.get("regions", "wt")
    if regions not in REGION_SETS:
        raise DiffSegError(f"{path}: the checkpoint names unknown regions {regions!r} (known: "
                           f"{', '.join(REGION_SETS)}); it was written by a newer napari-diffseg or is damaged")
    if len(REGION_SETS[regions]) != unet_config.mask_channels:
        raise DiffSegError(f"{path}: the checkpoint's regions ({regions}) do not match its network's "
                           f"{unet_config.mask_channels} mask channel(s); the file is damaged")
    return regions


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
    if path in BUNDLED_MODELS.values():
        bundled_model(next(r for r, p in BUNDLED_MODELS.items() if p == path))  # missing: says so
    payload = read_checkpoint(path)
    if is_ours(payload):
        unet_config, diffusion_config, state = _our_parts(payload, path, use_ema)
        try:
            inputs = InputSpec.from_dict(payload.get("inputs"))
        except (DiffSegError, TypeError, ValueError) as exc:
            raise DiffSegError(f"{path}: the input settings stored in the checkpoint are not valid ({exc}); "
                               "the file is damaged or was written by another program") from None
        if inputs.channels != unet_config.cond_channels:
            raise DiffSegError(f"{path}: the checkpoint's input settings ({inputs.channels} image channels) do not "
                               f"match its network ({unet_config.cond_channels}); the file is damaged")
        regions = _stored_regions(payload, unet_config, path)
        model = _build(unet_config, state, path, "the file may be damaged")
        return LoadedModel(
            model=model,
            unet_config=unet_config,
            diffusion_config=diffusion_config,
            geometry=Geometry.from_dict(payload.get("geometry", {})),
            sampling={**DEFAULT_SAMPLING, **payload.get("sampling", {})},
            source=str(path),
            objective=str(payload.get("objective", "diffusion")),
            inputs=inputs,
            regions=regions,
        )
    if _is_state_dict(payload):
        _check_unet_weights(payload, path)
        if reference_flags is None:
            raise DiffSegError(
                f"{path}: a reference checkpoint holds no model configuration; give the model flags it was "
                f"trained with ({REFERENCE_FLAGS_EXAMPLE}) as a flags JSON, e.g. the flags.json beside it",
                setting="model_flags")
        unet_config = UNetConfig.from_flags(reference_flags)
        model = _build(unet_config, payload, path, "give the model flags it was trained with: its flags JSON (e.g. the "
                       f"flags.json beside it) or the flags one by one ({REFERENCE_FLAGS_EXAMPLE})", "model_flags")
        return LoadedModel(
            model=model,
            unet_config=unet_config,
            diffusion_config=DiffusionConfig.from_flags(reference_flags),
            geometry=Geometry.reference(),
            sampling={**DEFAULT_SAMPLING, "timestep_respacing": reference_flags.get("timestep_respacing", "")},
            source=str(path),
            is_reference=True,
        )
    if isinstance(payload, dict):
        what = f"a dict with keys {_keys_text(payload)}" if payload else "an empty dict"
    else:
        what = "a single tensor" if isinstance(payload, torch.Tensor) else f"a {type(payload).__name__}"
    raise DiffSegError(
        f"{path}: not a model checkpoint: it holds {what}, neither a napari-diffseg checkpoint nor a state "
        f"dict of tensors; {WANTED}"
    )
