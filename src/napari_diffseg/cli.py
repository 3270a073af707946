"""What the command-line tools share: the reference's model/diffusion flags, sampling flags and error exits."""

from __future__ import annotations

import argparse
import functools
import math
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from .checkpoint import BUNDLED_MODELS, BUNDLED_TITLES, MODEL_FLAG_DEFAULTS, bundled_model, reference_flags
from .errors import DiffSegError
from .options import SamplingOptions

def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


# One line per flag for --help; the values follow improved-diffusion's meaning of each flag.
MODEL_FLAG_HELP = {
    "image_size": "nominal image size: picks channel_mult when that is '' and scales --attention_resolutions",
    "num_channels": "base channel count of the UNet",
    "num_res_blocks": "residual blocks per resolution level",
    "num_heads": "attention heads per attention block",
    "num_heads_upsample": "attention heads in the decoder (-1: as --num_heads)",
    "num_head_channels": "channels per attention head, overriding --num_heads (-1: off)",
    "attention_resolutions": "feature-map sizes (relative to --image_size) with self-attention, comma-separated; "
                             "'' for none",
    "channel_mult": "channel multiplier per resolution level, e.g. 1,2,2,4 ('': chosen by --image_size)",
    "dropout": "dropout rate in the residual blocks",
    "class_cond": "class-conditional model (not part of this method; keep False)",
    "use_checkpoint": "gradient checkpointing (accepted for the reference's scripts; has no effect here)",
    "use_scale_shift_norm": "the timestep scales and shifts the normalised features (FiLM) instead of being added",
    "resblock_updown": "residual blocks instead of plain (de)convolutions for down- and upsampling",
    "use_fp16": "the reference's fp16 training (accepted; has no effect here: use --precision)",
    "use_new_attention_order": "split q, k, v before the heads (improved-diffusion's newer attention order)",
    "learn_sigma": "the network also outputs the variance interpolation (2 output channels; the paper: True)",
    "diffusion_steps": "number of diffusion steps T",
    "noise_schedule": "beta schedule: linear or cosine",
    "timestep_respacing": "sampling steps: '' for all, or e.g. 50 or ddim50",
    "use_kl": "train on the variational bound alone (not part of this method; keep False)",
    "predict_xstart": "the network outputs the clean mask x0 instead of the noise epsilon",
    "rescale_timesteps": "show the network timesteps scaled to 0..1000 (matters with fewer diffusion steps)",
    "rescale_learned_sigmas": "weight the variational-bound term by diffusion_steps / 1000",
}


def _default_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return "''" if value == "" else str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default after its description, as "(default: X)".

    Left out where a default would say nothing (None, a store_true's False) or where the
    description already explains it ("default: the model's stored setting").
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is argparse.SUPPRESS
                or (action.nargs == 0 and default is False) or "default" in text.lower()):
            return text
        return f"{text} (default: {_default_text(default).replace('%', '%%')})"


def make_parser(prog: str, description: str, parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ArgumentParser every diffseg-* command starts from (shared help layout)."""
    return parser_class(prog=prog, description=description, formatter_class=HelpFormatter)


def add_model_flags(parser: argparse.ArgumentParser, with_defaults: bool = True, skip: tuple[str, ...] = ()) -> None:
    """The reference's flags; without defaults they read None unless given (to merge later)."""
    title = "model and diffusion (the reference's flags)" if with_defaults else \
        "model and diffusion flags of a reference checkpoint (napari-diffseg checkpoints store their own)"
    group = parser.add_argument_group(title)
    for name, default in MODEL_FLAG_DEFAULTS.items():
        if name in skip:
            continue
        kind = str2bool if isinstance(default, bool) else type(default)
        text = MODEL_FLAG_HELP[name]
        if not with_defaults:
            text += f" (default: the flags JSON's, else {_default_text(default)})".replace("%", "%%")
        group.add_argument(f"--{name}", type=kind, default=default if with_defaults else None,
                           metavar=type(default).__name__.upper(), help=text)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The sampler settings diffseg-sample and diffseg-eval share."""
    parser.add_argument("--timestep_respacing", default=None,
                        help="sampling steps: '' for all, 50, 100, ddim50 ... (default: the model's stored "
                        "setting; all steps for a reference checkpoint)")
    parser.add_argument("--use_ddim", type=str2bool, nargs="?", const=True, default=None,
                        help="deterministic DDIM steps instead of ancestral DDPM (default: the model's "
                        "stored sampler)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    parser.add_argument("--flip_members", type=str2bool, nargs="?", const=True, default=None,
                        help="test-time flips: every second member segments the left-right mirrored slice "
                        "(a U-Net baseline averages both passes); same cost (default: the model's stored "
                        "choice, off unless trained with --flip_members)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling noise")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                        help="fp32 (exact, default); bf16 (CPU or CUDA) or fp16 (CUDA) autocast, faster; "
                        "auto: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32")
    parser.add_argument("--compile", action="store_true",
                        help="run the network under torch.compile (CUDA graphs on a GPU): about a minute "
                        "to compile, then faster steps; pays for long runs on a GPU")
    parser.add_argument("--batching", default=None, metavar="auto|N",
                        help="chains per network call: auto (default, or $NAPARI_DIFFSEG_BATCHING: a short timed "
                        "probe picks the fastest for this model, input size and precision and keeps the choice "
                        "for later runs) or a number; it changes the speed and only the rounding of the results")


def add_model_path_flags(parser: argparse.ArgumentParser, dest: str = "model_path") -> None:
    """The checkpoint to run (``--model_path``, or the demo's ``--model``) and, where none is given,
    which bundled model (``--bundled``)."""
    parser.add_argument(f"--{dest}", default=None,
                        help="checkpoint (default: the bundled model that --bundled names)")
    parser.add_argument("--bundled", choices=list(BUNDLED_MODELS), default=None,
                        help="the bundled model to run when no checkpoint is given: "
                        + "; ".join(f"{key} {title}" for key, title in BUNDLED_TITLES.items()) + " (default: wt)")


def model_path_from_args(args: argparse.Namespace, dest: str = "model_path") -> Path:
    """The checkpoint ``args`` name: the given one, else the chosen bundled model (DiffSegError where
    both are given, or the bundled one is not installed)."""
    given = getattr(args, dest)
    if given:
        if args.bundled is not None:
            raise DiffSegError(f"--bundled {args.bundled} and --{dest} {given}: give one of them (--bundled chooses "
                               f"among the bundled models, --{dest} names any other checkpoint)")
        return Path(given).expanduser()
    return bundled_model(args.bundled or "wt")


def sampling_options_from_args(args: argparse.Namespace, **given) -> SamplingOptions:
    """The sampling flags (:func:`add_sampling_flags`) as the options of a run, with the settings
    ``given`` (e.g. the ensemble size); the sampler is the model's unless --use_ddim was given."""
    sampler = None if args.use_ddim is None else ("ddim" if args.use_ddim else "ddpm")
    return SamplingOptions(**{"respacing": args.timestep_respacing, "sampler": sampler, "eta": args.eta,
                              "precision": args.precision, "batching": args.batching, "seed": args.seed,
                              "flip_members": args.flip_members, **given})


def model_flags_from_args(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in MODEL_FLAG_DEFAULTS if hasattr(args, name)}


def reference_flags_from_args(args: argparse.Namespace) -> dict:
    """A reference checkpoint's model flags: the flags JSON (--flags_json) and the model flags given
    on the command line (:func:`checkpoint.reference_flags`). --timestep_respacing is a sampling
    flag here: a sampler setting, not part of the model."""
    given = {name: value for name, value in model_flags_from_args(args).items() if name != "timestep_respacing"}
    return reference_flags(args.flags_json, given)


# How the command line spells a setting that core errors name (by default --SETTING).
SETTING_FLAGS = {"model_flags": "--flags_json or the model flags (--num_channels, --num_res_blocks ...)"}


def error_text(exc: DiffSegError) -> str:
    """A core error as the command line says it, naming the flag of the setting at fault: "device
    cuda: ..." becomes "--device cuda: ...", other messages get the flag in front."""
    message, setting = str(exc), exc.setting
    if setting is None:
        return message
    if setting not in SETTING_FLAGS and message.startswith(f"{setting} "):
        return f"--{message}"
    return f"{SETTING_FLAGS.get(setting, '--' + setting)}: {message}"


def guarded(main):
    """Turn user errors into one line on stderr and exit status 2, without a traceback."""

    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        # A kill or a scheduler's timeout (SIGTERM) stops a run like Ctrl-C does, so its temporary
        # files are cleaned up on the way out (a command may install its own handler instead).
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return main(argv) or 0
        except DiffSegError as exc:
            print(f"error: {error_text(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def slice_range(value: str) -> slice:
    """START:STOP (Python's meaning: STOP excluded, either may be left out) of a volume's
    slice axis, as --slices takes it."""
    start, colon, stop = value.partition(":")
    try:
        if not colon:
            raise ValueError
        bounds = [int(part) if part.strip() else None for part in (start, stop)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP slice numbers, e.g. 40:90, got {value!r}") from None
    return slice(*bounds)


def slice_text(slab: slice) -> str:
    """START:STOP as the user writes it (the inverse of :func:`slice_range`)."""
    return f"{'' if slab.start is None else slab.start}:{'' if slab.stop is None else slab.stop}"


def json_safe(value):
    """JSON-safe copy: nan/inf -> None, numpy scalars -> Python, tuple -> list, int keys -> str."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def slab_indices(slab: slice, depth: int, where: str) -> range:
    """The slice numbers --slices picks out of a volume of `depth` slices; a DiffSegError naming
    the volume's range when it picks none (a reversed or out-of-range START:STOP)."""
    picked = range(depth)[slab]
    if len(picked) == 0:
        raise DiffSegError(f"--slices {slice_text(slab)} picks no slice of {where}, which has "
                           f"slices 0 to {depth - 1}; give START:STOP with START < STOP inside that range")
    return picked


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number
