"""Segment slices or volumes with a loaded model: numpy in, numpy out, progress on the way.

:meth:`Segmenter.run` is a generator: it yields a :class:`Progress` after every denoising
step (so a GUI can show the mask emerging and cancel between steps) and returns a
:class:`Segmentation` in the input's geometry. It is used by the napari widget,
``diffseg-sample``, ``diffseg-eval`` and the benchmarks alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator

import numpy as np
import torch

from .checkpoint import ONE_PASS, LoadedModel, load_model
from .clicks import marks_to_hints
from .diffusion import Diffusion, space_timesteps
from .ensemble import THRESHOLD, autocast_context, ensemble_statistics, sample_ensemble
from ._settings import config_dir, write_json_atomically
from .errors import DiffSegError
from .preprocess import MODALITY_COUNT, InputSpec, neighbour_slices, normalise, volume_statistics

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda:"):
        index = name[len("cuda:"):]
        if not index.isdigit():
            raise DiffSegError(f"--device {name!r}: write cuda:N with N a GPU number, e.g. cuda:0")
        if not torch.cuda.is_available():
            raise DiffSegError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
        if int(index) >= torch.cuda.device_count():
            raise DiffSegError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                               f"numbered 0 to {torch.cuda.device_count() - 1}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DiffSegError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DiffSegError("--device mps: Apple-silicon GPU support is not available here; use --device cpu or auto")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise DiffSegError(f"--device {name!r} is unknown: use auto, cpu, cuda or mps")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """bf16 autocast pays on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere
    it is emulated and can be slower than fp32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:  # not Linux: no cheap way to tell, stay exact
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision to run; an explicit choice is checked. auto means fp16 on CUDA, bf16 on a
    CPU that computes it natively, else fp32 (their Dice cost is measured, docs/evaluation)."""
    name = (name or "auto").lower()
    if name not in PRECISIONS:
        raise DiffSegError(f"precision {name!r} is unknown: use {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda":
            # On an H200, fp16 moved the held-out Dice by 0.001 and bf16 by 0.008, at the same
            # speed; every CUDA GPU has fp16.
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise DiffSegError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
    return name


def has_c_compiler() -> bool:
    """torch.compile's CPU backend builds C++ and needs a compiler on the PATH."""
    return bool(shutil.which("cc") or shutil.which("gcc"))


def available_precisions() -> list[str]:
    """What the widget offers: fp16 only where CUDA can run it."""
    return [p for p in PRECISIONS if p != "fp16" or torch.cuda.is_available()]


def available_devices() -> list[str]:
    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


@dataclass
class Progress:
    step: int  # denoising steps done in this batch (1 .. total)
    total: int  # steps per batch
    batch: int  # 0-based batch of slices
    batches: int
    slices: list[int]  # slice indices (last axis of a volume; [0] for one slice)
    preview: np.ndarray | None  # (len(slices), H, W) chains' mean mask estimate, input geometry; None when throttled
    slices_done: int = 0  # slices finished before this batch
    slices_total: int = 1
    elapsed: float = 0.0  # seconds since sampling began (after any model load)

    @property
    def fraction(self) -> float:
        return (self.batch * self.total + self.step) / max(1, self.batches * self.total)

    @property
    def eta(self) -> float | None:
        """Seconds left at the pace so far; None before the first step has a pace."""
        done = self.fraction
        return None if done <= 0 or self.elapsed <= 0 else self.elapsed * (1 - done) / done


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"~{max(1, round(seconds))} s left"
    return f"~{seconds / 60:.1f} min left"


@dataclass
class Segmentation:
    probability: np.ndarray  # ensemble mean, float32, the input's spatial shape
    variance: np.ndarray  # ensemble variance, float32
    mask: np.ndarray  # uint8, probability > threshold
    samples: np.ndarray | None  # (N, *spatial) float32 member outputs, when kept
    num_ensemble: int
    steps: int
    sampler: str
    seed: int
    threshold: float = THRESHOLD
    settings: dict = field(default_factory=dict)

    def rethreshold(self, threshold: float) -> np.ndarray:
        return (self.probability > threshold).astype(np.uint8)


BATCHING_ENV = "NAPARI_DIFFSEG_BATCHING"  # the default batching where none is given (else auto)


def parse_batching(value: str | int | None) -> str | int:
    """"auto" (a timed probe picks it) or a positive number of chains per network call; None
    takes $NAPARI_DIFFSEG_BATCHING, else auto."""
    where = "batching"
    if value is None:
        value = os.environ.get(BATCHING_ENV) or "auto"
        where = f"${BATCHING_ENV}"
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise DiffSegError(f"{where} {value!r}: give auto or a number of chains per network call (at least 1)")
    return number


def most_chains(device: torch.device, net_height: int, net_width: int) -> int:
    """The largest network batch worth trying: memory grows with it, gains flatten out."""
    # 64 chains of 224^2 on a GPU; on a CPU 32 of 128^2 (about 10 of 224^2).
    pixels = (64 * 224 * 224) if device.type == "cuda" else (32 * 128 * 128)
    return max(1, pixels // max(1, net_height * net_width))


def batching_file() -> Path:
    return config_dir() / "batching.json"


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform reports."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def stored_batching(key: str) -> int | None:
    try:
        value = json.loads(batching_file().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 1 else None


def store_batching(key: str, chains: int) -> None:
    """Atomically add one choice to the file; a failure only costs a probe next time."""
    path = batching_file()
    try:
        try:
            table = json.loads(path.read_text())
            table = table if isinstance(table, dict) else {}
        except (OSError, ValueError):
            table = {}
        table[key] = int(chains)
        write_json_atomically(path, table)
    except OSError as exc:
        log.warning("could not keep the batching choice in %s (%s)", path, exc)


def batch_candidates(num_ensemble: int, num_slices: int, most: int) -> list[int]:
    """Chains per network call worth timing: 1 (chain by chain), one slice's N chains, and whole
    multiples of slices up to ``most`` (never fewer than one slice's worth)."""
    top = num_ensemble * max(1, min(num_slices, most // num_ensemble))
    return sorted({1, top, *[num_ensemble * 2**k for k in range(16) if num_ensemble * 2**k <= top]})


def probe_batching(model, device: torch.device, sizes: list[int], size: tuple[int, int], precision: str,
                   channels_last: bool = True, measure: Callable[[int], float] | None = None) -> tuple[int, dict]:
    """Time one network call at each batch size in ``sizes`` (ascending); return the size with
    the lowest seconds per chain, and the timings. Stops once the cost per chain climbs 15 %
    above the best so far, so a probe costs a few calls. ``measure(batch)`` -> seconds of one
    call replaces the timing (tests)."""
    began = time.perf_counter()
    measure = measure or _call_timer(model, device, size, precision, channels_last)
    per_chain: dict[int, float] = {}
    for batch in sizes:
        measure(batch)  # the first call at a shape allocates and picks kernels (and compiles, if on)
        seconds = measure(batch)
        if seconds < 0.2:  # cheap calls are noisy: the best of three
            seconds = min(seconds, measure(batch), measure(batch))
        per_chain[batch] = seconds / batch
        if per_chain[batch] > 1.15 * min(per_chain.values()):
            break
    best = min(per_chain, key=per_chain.get)
    return best, {"network_input": list(size), "precision": precision, "chosen": best,
                  "ms_per_chain": {b: round(1000 * v, 2) for b, v in per_chain.items()},
                  "probe_s": round(time.perf_counter() - began, 3)}


def _call_timer(model, device: torch.device, size: tuple[int, int], precision: str,
                channels_last: bool) -> Callable[[int], float]:
    """Seconds of one sampling call of the network (image stem + conditioned body) at a batch."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    inputs: dict[int, tuple] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(batch: int) -> float:
        if batch not in inputs:
            inputs[batch] = (torch.rand((batch, model.config.cond_channels, *size), generator=generator).to(device),
                             torch.randn((batch, 1, *size), generator=generator).to(device),
                             torch.full((batch,), 500, dtype=torch.long, device=device))
        images, x, t = inputs[batch]
        sync()
        start = time.perf_counter()
        with torch.inference_mode(), autocast_context(device, precision):
            condition = model.encode_condition(images.to(memory_format=layout))
            model.forward_conditioned(x.to(memory_format=layout), t, condition)
        sync()
        return time.perf_counter() - start

    return measure


def _brain_slices(volume: np.ndarray) -> list[int]:
    """Slices (last axis) where any modality is non-zero; the rest are left empty."""
    return [int(z) for z in np.flatnonzero(np.abs(volume).reshape(-1, volume.shape[-1]).max(axis=0) > 0)]


class Segmenter:
    """A loaded model on a device, with its geometry and sampling defaults."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "auto", precision: str = "fp32",
                 channels_last: bool | None = None, compile: bool = False, batching: str | int | None = None):
        self.loaded = loaded
        self.batching = parse_batching(batching)
        self._probed: dict[tuple, int] = {}
        self.probe_report: dict = {}  # the last probe's timings, for the benchmarks and the logs
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.precision = resolve_precision(precision, self.device)
        self.model = loaded.model.to(self.device).eval()
        if channels_last is None:
            # Faster on CPU (fp32 and bf16, measured) and CUDA; untested on MPS.
            channels_last = self.device.type != "mps"
        self.channels_last = bool(channels_last)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            if self.device.type == "cpu" and not has_c_compiler():
                raise DiffSegError("--compile on the CPU needs a C compiler (gcc) for torch.compile; "
                                   "install one or leave --compile out")
            # CUDA graphs on a GPU (3x per step for the paper config on an H200, measured);
            # plain compilation elsewhere.
            self.model.compile_body("reduce-overhead" if self.device.type == "cuda" else "default")
        self._diffusions: dict[str, Diffusion] = {}

    @classmethod
    def load(cls, path=None, device="auto", reference_flags=None, precision="fp32", **kwargs) -> "Segmenter":
        return cls(load_model(path, reference_flags=reference_flags), device=device, precision=precision, **kwargs)

    @property
    def defaults(self) -> dict:
        return self.loaded.sampling

    def diffusion(self, respacing: str | None) -> Diffusion:
        key = "" if respacing is None else str(respacing)
        if key not in self._diffusions:
            self._diffusions[key] = Diffusion.from_config(self.loaded.diffusion_config, key)
        return self._diffusions[key]

    def num_steps(self, respacing: str | None) -> int:
        return len(space_timesteps(self.loaded.diffusion_config.diffusion_steps, respacing))

    def chains_per_call(self, num_ensemble: int, num_slices: int, net_height: int, net_width: int,
                        precision: str) -> int:
        """How many chains go through the network together.

        A fixed ``batching`` is taken as it is. ``auto`` times one network call at 1, N, 2N, 4N
        ... chains (up to :func:`most_chains` and the chains there are) and keeps the cheapest
        per chain, once per input size and precision: in memory for this loaded model, and on
        disk (:func:`batching_file`) for later runs on this machine. Batching is not free
        on a CPU: for the paper config at 224x224 five chains cost more together than one by one
        (7.1 s against 5.5 s, issue 14), while the 128x128 demo model gains from it.
        """
        wanted = num_ensemble * num_slices
        if self.batching != "auto":
            return min(int(self.batching), wanted)
        if "_body" in vars(self.model):
            return min(num_ensemble, wanted)  # compiled: every batch size tried would compile anew
        sizes = batch_candidates(num_ensemble, num_slices, most_chains(self.device, net_height, net_width))
        if len(sizes) == 1:
            return sizes[0]
        key = (net_height, net_width, precision, tuple(sizes))
        if key not in self._probed:
            stored_as = self._stored_key(key)
            stored = stored_batching(stored_as)
            if stored in sizes:
                self._probed[key] = stored
                self.probe_report = {"network_input": [net_height, net_width], "precision": precision,
                                     "chosen": stored, "from": str(batching_file())}
            else:
                self._probed[key], self.probe_report = probe_batching(
                    self.model, self.device, sizes, (net_height, net_width), precision, self.channels_last)
                store_batching(stored_as, self._probed[key])
        return self._probed[key]

    def _stored_key(self, key: tuple) -> str:
        """The probe's choice is kept on disk per machine, architecture, input size and precision:
        later runs skip the probe and batch the same way, so a seed gives the same bits again."""
        architecture = json.dumps(self.loaded.unet_config.to_dict(), sort_keys=True, default=str)
        return "|".join([_device_name(self.device), f"threads {torch.get_num_threads()}", f"torch {torch.__version__}",
                         hashlib.sha1(architecture.encode()).hexdigest()[:12], "x".join(map(str, key[:2])), key[2],
                         "channels_last" if self.channels_last else "contiguous", ",".join(map(str, key[3]))])

    def _one_pass(self, images: torch.Tensor, precision: str) -> torch.Tensor:
        """The baseline's mask logits (S, 1, h, w): images with an all-zero mask channel, t = 0."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        zeros = torch.zeros((images.shape[0], 1, *images.shape[-2:]), device=images.device)
        t = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        with torch.inference_mode(), autocast_context(self.device, precision):
            condition = self.model.encode_condition(images.to(memory_format=layout))
            return self.model.forward_conditioned(zeros.to(memory_format=layout), t, condition).float()

    def _hints(self, marks: np.ndarray, zs: list[int]) -> torch.Tensor:
        """(S, 2, h, w) mark channels at the network's grid. A mark counts wherever it covers a
        fifth of a network pixel: a thin stroke must not vanish when the slice shrinks."""
        per_slice = torch.from_numpy(marks_to_hints(np.moveaxis(marks[..., zs], -1, 0)))
        shrunk = self.loaded.geometry.to_network(per_slice, self.loaded.unet_config.size_multiple)
        return (shrunk > 0.2).float().to(self.device)

    @staticmethod
    def _slices(array: np.ndarray, zs: list[int]) -> torch.Tensor:
        """(H, W, Z) -> (len(zs), 1, H, W) float, the layout the geometry works on."""
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(array[..., zs], -1, 0)))[:, None].float()

    def run(
        self,
        images: np.ndarray,
        num_ensemble: int | None = None,
        respacing: str | None = None,
        sampler: str | None = None,
        eta: float = 0.0,
        seed: int | None = 0,
        keep_samples: bool = True,
        slices: list[int] | None = None,
        batch_slices: int | None = None,
        preview_interval: float | None = 0.0,
        threshold: float = THRESHOLD,
        sink: Callable[[int, dict], None] | None = None,
        precision: str | None = None,
        allocate: Callable[[str, tuple, type], np.ndarray] | None = None,
        known_mask: np.ndarray | None = None,
        known_values: np.ndarray | None = None,
        init: np.ndarray | None = None,
        start_step: int | None = None,
        resample: int = 1,
        marks: np.ndarray | None = None,
        source: tuple[np.ndarray, int] | None = None,
    ) -> Generator[Progress, None, Segmentation]:
        """Sample an ensemble for a slice (4, H, W) or every brain slice of a volume (4, H, W, Z).

        preview_interval: seconds between previews (0 = every step, None = never).
        sink: called as sink(z, {"probability", "variance", "mask"}) for each finished slice,
        so a caller can stream a volume to disk.
        precision: this run's arithmetic (auto, fp32, bf16, fp16); None = the Segmenter's.
        allocate: called as allocate(name, shape, dtype) for each whole-input result array
        ("probability", "variance", "mask", "samples"); returning disk-backed arrays (e.g.
        numpy memmaps) streams a volume's results to disk as its slices finish, so memory
        does not grow with the volume. Default: zero-filled arrays in memory.
        known_mask, known_values: the input's spatial shape; pixels whose mask value the user
        gave (scribbles, accepted segmentation). Every member ends with exactly these values
        there, and the model fills in the rest consistently with them.
        init, start_step: refine instead of restart: the (N, *spatial) members of an earlier
        run, noised to the (respaced) step ``start_step``, then denoised from there; the run
        costs start_step + 1 steps.
        resample: with known pixels, each step is done this many times (RePaint's resampling);
        it multiplies the cost of the run.
        marks: the input's spatial shape, the user's marks (1 tumour, 2 not tumour, else none):
        a model trained with marks (``hint_channels``) also sees them as input, so it can
        follow them beyond the marked pixels; others ignore them. Give them as known pixels
        too, to make the members end exactly at them.
        source: (volume (4, H, W, Z), z) where a lone slice was cut from that volume: a model
        that reads neighbouring slices or volume statistics (``loaded.inputs``) takes them from
        there, as it would in a whole-volume run.
        """
        precision = self.precision if precision is None else resolve_precision(precision, self.device)
        images = np.asarray(images)
        cond = MODALITY_COUNT
        if images.ndim not in (3, 4) or images.shape[0] != cond:
            raise DiffSegError(
                f"images must be ({cond}, H, W) or ({cond}, H, W, Z) (t1, t1ce, t2, flair); got shape {images.shape}"
            )
        if not np.isfinite(images).all():
            raise DiffSegError("the images contain NaN or infinite values; fix or mask them before segmenting")
        num_ensemble = int(self.defaults["num_ensemble"] if num_ensemble is None else num_ensemble)
        if num_ensemble < 1:
            raise DiffSegError(f"the ensemble size must be at least 1 (got {num_ensemble})")
        if self.loaded.deterministic:
            num_ensemble = 1  # a deterministic model: more members would be copies
        respacing = self.defaults["timestep_respacing"] if respacing is None else respacing
        sampler = sampler or self.defaults["sampler"]
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**31))
        diffusion = self.diffusion(respacing)
        if (not self.loaded.deterministic and init is None and start_step is None
                and diffusion.num_timesteps == 1 and self.loaded.diffusion_config.diffusion_steps > 1):
            # improved-diffusion's spacing puts a lone step at t = 0: the network would take pure
            # noise for an almost clean mask and hand it back (Dice 0.04 on the held-out slices).
            raise DiffSegError(f"timestep respacing {respacing!r} keeps only the step t = 0, which cannot "
                               "turn noise into a mask; use 2 steps or more")
        if int(resample) < 1:
            raise DiffSegError(f"resample must be at least 1 (got {resample})")

        volume = images if images.ndim == 4 else images[..., None]
        height, width, depth = volume.shape[1:]
        spatial = images.shape[1:]
        if (known_mask is None) != (known_values is None):
            raise DiffSegError("known pixels need both a mask and their values")
        if known_mask is not None:
            if self.loaded.deterministic:
                raise DiffSegError("refinement with known pixels needs a diffusion model; this one is a one-pass U-Net")
            if np.shape(known_mask) != spatial or np.shape(known_values) != spatial:
                raise DiffSegError(f"the known pixels must have the image's shape {spatial}; got "
                                   f"{np.shape(known_mask)} and {np.shape(known_values)}")
            known_mask = np.asarray(known_mask, bool).reshape(height, width, depth)
            known_values = np.asarray(known_values, np.float32).reshape(height, width, depth)
        if init is not None:
            if np.shape(init) != (num_ensemble, *spatial):
                raise DiffSegError(f"the members to refine must have shape {(num_ensemble, *spatial)}; "
                                   f"got {np.shape(init)}")
            init = np.asarray(init, np.float32).reshape(num_ensemble, height, width, depth)
        if marks is not None:
            if np.shape(marks) != spatial:
                raise DiffSegError(f"the marks must have the image's shape {spatial}; got {np.shape(marks)}")
            marks = np.asarray(marks).reshape(height, width, depth)
            if not self.loaded.unet_config.hint_channels:
                marks = None  # the model was not trained to read them
        todo = _brain_slices(volume) if slices is None else [int(z) for z in slices]
        allocate = allocate or (lambda _name, shape, dtype: np.zeros(shape, dtype))
        probability = allocate("probability", (height, width, depth), np.float32)
        variance = allocate("variance", (height, width, depth), np.float32)
        mask = allocate("mask", (height, width, depth), np.uint8)
        samples = allocate("samples", (num_ensemble, height, width, depth), np.float32) if keep_samples else None

        geometry, multiple = self.loaded.geometry, self.loaded.unet_config.size_multiple
        spec = self.loaded.inputs
        context_volume, context_z = volume, None  # where the condition channels come from
        if source is not None and images.ndim == 3 and spec != InputSpec():
            context_volume, context_z = np.asarray(source[0]), int(source[1])
            if context_volume.shape[:3] != images.shape or not 0 <= context_z < context_volume.shape[-1]:
                raise DiffSegError(f"the source volume {context_volume.shape} and slice {context_z} do not hold "
                                   f"the slice {images.shape}")
        stats = torch.from_numpy(volume_statistics(context_volume, spec))  # of the whole input, once
        members_per_slice = 1 if self.loaded.deterministic else num_ensemble
        chains = self.chains_per_call(members_per_slice, len(todo), *geometry.network_size(height, width, multiple),
                                      precision) if todo else members_per_slice
        per_batch = batch_slices or max(1, chains // members_per_slice)
        batches = [todo[i : i + per_batch] for i in range(0, len(todo), per_batch)]
        last_preview = -np.inf
        began = time.monotonic()
        for b, zs in enumerate(batches):
            counts = {"slices_done": b * per_batch, "slices_total": len(todo)}
            batch = torch.from_numpy(neighbour_slices(context_volume, zs if context_z is None else [context_z], spec))
            net_in = normalise(geometry.to_network(batch, multiple), stats.expand(len(zs), -1, -1), spec)
            net_in = net_in.to(self.device)
            if self.loaded.deterministic:
                logits = self._one_pass(net_in, precision)
                back = geometry.from_network(torch.sigmoid(logits), height, width)[None, :, 0]
                yield Progress(1, 1, b, len(batches), list(zs), back[0].cpu().numpy() if preview_interval is not None else None,
                               **counts, elapsed=time.monotonic() - began)
                mean = back[0]
                var = mean * (1 - mean)  # Bernoulli variance of the predicted probability
            else:
                guide = {}
                if known_mask is not None:
                    known_in = self._slices(known_mask, zs) > 0.5  # (S, 1, H, W), the input's grid
                    values_in = self._slices(known_values, zs)
                    # Resampled to the network's grid: a pixel counts as known where most of it is, and
                    # its value is the majority over its known part only, so whatever a caller holds in
                    # the unknown pixels (zeros, the current mask) cannot leak in at a region's edge.
                    known_share = geometry.to_network(known_in.float(), multiple)
                    known_sum = geometry.to_network(values_in * known_in, multiple)
                    kv = (known_sum > 0.5 * known_share).float()
                    guide.update(known_mask=(known_share > 0.5).to(self.device), known_values=kv.to(self.device))
                if init is not None:
                    members_in = torch.from_numpy(np.ascontiguousarray(np.moveaxis(init[..., zs], -1, 0)))
                    members_in = members_in.reshape(-1, 1, height, width).float()  # (S*N, 1, H, W)
                    guide.update(init=geometry.to_network(members_in, multiple).to(self.device),
                                 start_step=start_step)
                elif start_step is not None:
                    guide.update(start_step=start_step)
                if marks is not None:
                    guide.update(hints=self._hints(marks, zs))
                steps = sample_ensemble(self.model, diffusion, net_in, num_ensemble, seed=seed, slice_keys=zs,
                                        sampler=sampler, eta=eta, precision=precision,
                                        clip_range=tuple(self.defaults["clip_range"]),
                                        clamp_variance=bool(self.defaults.get("clamp_variance", False)),
                                        chains_per_call=chains, resample=int(resample), **guide)
                final = None
                for step in steps:
                    final = step
                    preview = None
                    now = time.monotonic()
                    if preview_interval is not None and now - last_preview >= preview_interval:
                        estimate = step.pred_x0.reshape(len(zs), num_ensemble, *step.pred_x0.shape[-2:]).mean(1)
                        preview = geometry.from_network(estimate[:, None].clamp(0, 1), height, width)[:, 0].cpu().numpy()
                        last_preview = now
                    yield Progress(step.index + 1, step.total, b, len(batches), list(zs), preview, **counts,
                                   elapsed=time.monotonic() - began)
                members = final.x.reshape(len(zs), num_ensemble, *final.x.shape[-2:]).transpose(0, 1)
                # Back to the input geometry per member, then statistics there.
                back = geometry.from_network(members.reshape(-1, 1, *members.shape[-2:]).float(), height, width)
                back = back.reshape(num_ensemble, len(zs), height, width)
                if known_mask is not None:
                    # Exact at the input's own resolution, whatever the resampling did.
                    back = torch.where(known_in[:, 0].to(back.device)[None],
                                       values_in[:, 0].to(back.device, back.dtype)[None], back)
                mean, var, _ = ensemble_statistics(back)
            mean_np, var_np = mean.cpu().numpy(), var.cpu().numpy()
            for i, z in enumerate(zs):
                probability[..., z] = mean_np[i]
                variance[..., z] = var_np[i]
                mask[..., z] = mean_np[i] > threshold
                if samples is not None:
                    samples[..., z] = back[:, i].cpu().numpy()
                if sink is not None:
                    sink(z, {"probability": mean_np[i], "variance": var_np[i], "mask": mask[..., z]})

        if images.ndim == 3:
            probability, variance, mask = probability[..., 0], variance[..., 0], mask[..., 0]
            samples = samples[..., 0] if samples is not None else None
        if self.loaded.deterministic:
            sampler = ONE_PASS
        return Segmentation(
            probability=probability,
            variance=variance,
            mask=mask,
            samples=samples,
            num_ensemble=num_ensemble,
            steps=1 if self.loaded.deterministic else (diffusion.num_timesteps if start_step is None else start_step + 1),
            sampler=sampler,
            seed=int(seed),
            threshold=threshold,
            settings={"timestep_respacing": respacing, "eta": eta, "precision": precision,
                      "device": str(self.device), "model": self.loaded.source,
                      "chains_per_call": chains, "slices_per_batch": per_batch, "resample": int(resample)},
        )


def run_to_end(generator: Generator[Progress, None, Segmentation], on_progress=None) -> Segmentation:
    """Drive a :meth:`Segmenter.run` generator and return its result."""
    while True:
        try:
            progress = next(generator)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(progress)
