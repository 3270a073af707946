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
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Generator

import numpy as np
import torch

from .augment import brain_mask
from .batching import (
    BatchingChoice, PaceTuner, batch_candidates, batching_file, device_name, drop_batching, most_chains,
    probe_batching, store_batching, stored_batching,
)
from .checkpoint import ONE_PASS, LoadedModel, load_model
from .clicks import marks_to_hints
from .data import brain_slices
from .diffusion import Diffusion, space_timesteps
from .ensemble import LEFT_RIGHT, THRESHOLD, autocast_context, ensemble_statistics, sample_ensemble
from .errors import DiffSegError
from .options import PRECISIONS, Guidance, SamplingOptions, parse_batching
from .preprocess import MODALITY_COUNT, InputSpec, neighbour_slices, normalise, volume_statistics
from .regions import labels_from_probability, labels_to_regions

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
            raise DiffSegError(f"device {name!r}: write cuda:N with N a GPU number, e.g. cuda:0", setting="device")
        if not torch.cuda.is_available():
            raise DiffSegError(f"device {name}: no CUDA GPU is available here; use cpu or auto", setting="device")
        if int(index) >= torch.cuda.device_count():
            raise DiffSegError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                               f"numbered 0 to {torch.cuda.device_count() - 1}", setting="device")
    if name == "cuda" and not torch.cuda.is_available():
        raise DiffSegError("device cuda: no CUDA GPU is available here; use cpu or auto", setting="device")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DiffSegError("device mps: Apple-silicon GPU support is not available here; use cpu or auto",
                           setting="device")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise DiffSegError(f"device {name!r} is unknown: use auto, cpu, cuda or mps", setting="device")
    return torch.device(name)




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
        raise DiffSegError(f"precision {name!r} is unknown: use {', '.join(PRECISIONS)}", setting="precision")
    if name == "auto":
        if device.type == "cuda":
            # On an H200, fp16 moved the held-out Dice by 0.001 and bf16 by 0.008, at the same
            # speed; every CUDA GPU has fp16.
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise DiffSegError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on this device", setting="precision")
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
    chains: int = 0  # chains per network call in this batch
    batching: str = ""  # the same, with where the number came from ("30 chains per call (stored)")

    @property
    def fraction(self) -> float:
        """Of the whole run, counted in slices (batches may change size during a volume)."""
        return (self.slices_done + len(self.slices) * self.step / max(1, self.total)) / max(1, self.slices_total)

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
    """A run's result on the input's grid. A region model (``regions`` "brats") puts a region
    axis (WT, TC, ET) first in probability, variance and mask, and after the member axis in
    samples, and adds the BraTS label map they give (:mod:`regions`)."""

    probability: np.ndarray  # ensemble mean, float32, the input's spatial shape ((3, *spatial): regions)
    variance: np.ndarray  # ensemble variance, float32
    mask: np.ndarray  # uint8, probability > threshold (regions: those masks nested, the regions of labels)
    samples: np.ndarray | None  # (N, *spatial) float32 member outputs, when kept ((N, 3, *spatial): regions)
    num_ensemble: int
    steps: int
    sampler: str
    seed: int
    threshold: float = THRESHOLD
    settings: dict = field(default_factory=dict)
    regions: str = "wt"
    labels: np.ndarray | None = None  # regions: uint8 BraTS labels 0/1/2/4, the spatial shape


class Segmenter:
    """A loaded model on a device, with its geometry and sampling defaults."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "auto", precision: str = "fp32",
                 channels_last: bool | None = None, compile: bool = False, batching: str | int | None = None):
        self.loaded = loaded
        self.batching = parse_batching(batching)
        self._probed: dict[tuple, BatchingChoice] = {}  # by network input size and precision
        self.probe_report: dict = {}  # the last probe's timings, for the benchmarks and the logs
        self.probes = 0  # probes run by this Segmenter
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
                raise DiffSegError("compiling the network on the CPU needs a C compiler (gcc) for torch.compile; "
                                   "install one or run without compiling", setting="compile")
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
        """How many chains go through the network together (see :meth:`batching_choice`)."""
        return self.batching_choice(num_ensemble, num_slices, net_height, net_width, precision).chains

    def batching_choice(self, num_ensemble: int, num_slices: int, net_height: int, net_width: int,
                        precision: str, reprobe: bool = False, batching: str | int | None = None) -> BatchingChoice:
        """How many chains go through the network together, and why.

        ``batching``: a run's own ("auto" or a number; None: this Segmenter's). A fixed one is
        taken as it is. ``auto`` picks among 1, N, 2N, 4N ... chains (up
        to :func:`most_chains` and the chains there are) by timing them (:func:`probe_batching`),
        once per network input size and precision: in memory for this loaded model, and on disk
        (:func:`batching_file`) for later runs on this machine when the timings agreed. A stored
        choice is a hint: :meth:`run` checks it against every volume's own pace and tries
        larger batches there (:class:`batching.PaceTuner`).
        ``reprobe`` times again whatever is known.
        """
        wanted = num_ensemble * num_slices
        batching = self.batching if batching is None else batching
        if batching != "auto":
            return BatchingChoice(min(int(batching), wanted), "fixed")
        if "_body" in vars(self.model):  # compiled: every batch size tried would compile anew
            return BatchingChoice(min(num_ensemble, wanted), "compiled")
        sizes = batch_candidates(num_ensemble, num_slices, most_chains(self.device, net_height, net_width))
        if len(sizes) == 1:
            return BatchingChoice(sizes[0], "fixed")
        key = (net_height, net_width, precision)
        known = None if reprobe else self._probed.get(key)
        if known is None and not reprobe:
            known = stored_batching(self._stored_key(key))
            if known is not None and known.covers(sizes):
                self.probe_report = {"network_input": [net_height, net_width], "precision": precision,
                                     "chosen": known.restricted(sizes).chains, "from": str(batching_file()),
                                     "ms_per_chain": dict(known.ms_per_chain)}
        probed = known is None or not known.covers(sizes)
        if probed:
            chosen, self.probe_report = probe_batching(
                self.model, self.device, sizes, (net_height, net_width), precision, self.channels_last)
            known = BatchingChoice(chosen, "re-probed" if reprobe else "probed",
                                   {b: ms for b, ms in self.probe_report["ms_per_chain"].items()},
                                   self.probe_report["capped"], self.probe_report["settled"])
            if known.settled:
                store_batching(self._stored_key(key), known)
            else:
                log.info("batching probe did not settle (busy machine?): %s chains per call for this session only, "
                         "not stored", chosen)
                if reprobe:  # the stored choice was off: better no entry than that one (issue 24)
                    drop_batching(self._stored_key(key))
            self.probes += 1
        self._probed[key] = known
        # Kept from an earlier run (the file, or this session when the timings did not settle).
        return known.restricted(sizes, None if probed else "stored" if known.settled else "session")

    def _record_pace(self, key: tuple, tuned: BatchingChoice) -> None:
        """Keep what a volume learned (its paces, a size tuned on it): in memory, and on disk
        where the choice is stored."""
        known = self._probed.get(key)
        if known is None:
            return
        known.chains, known.source = tuned.chains, tuned.source
        known.pace_ms.update(tuned.pace_ms)
        if known.settled:
            store_batching(self._stored_key(key), known)

    def forget_batching(self) -> None:
        """Forget this model's choices held in memory (see also :func:`batching.forget_batching`)."""
        self._probed.clear()

    def _stored_key(self, key: tuple) -> str:
        """One entry per machine, threads, torch, architecture, input size, precision and layout."""
        architecture = json.dumps(self.loaded.unet_config.to_dict(), sort_keys=True, default=str)
        return "|".join([device_name(self.device), f"threads {torch.get_num_threads()}", f"torch {torch.__version__}",
                         hashlib.sha1(architecture.encode()).hexdigest()[:12], "x".join(map(str, key[:2])), key[2],
                         "channels_last" if self.channels_last else "contiguous"])

    def _one_pass(self, images: torch.Tensor, precision: str) -> torch.Tensor:
        """The baseline's mask logits (S, K, h, w), one per region: images with all-zero mask
        channels, t = 0."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        zeros = torch.zeros((images.shape[0], self.loaded.unet_config.mask_channels, *images.shape[-2:]),
                            device=images.device)
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
        """(H, W, Z) -> (len(zs), 1, H, W) float, the layout the geometry works on; a region
        model's (K, H, W, Z) -> (len(zs), K, H, W)."""
        slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array[..., zs], -1, 0)))
        return (slices[:, None] if array.ndim == 3 else slices).float()

    def run(
        self,
        images: np.ndarray,
        options: SamplingOptions = SamplingOptions(),
        guidance: Guidance | None = None,
        *,
        slices: list[int] | None = None,
        keep_samples: bool = True,
        preview_interval: float | None = 0.0,
        threshold: float = THRESHOLD,
        sink: Callable[[int, dict], None] | None = None,
        allocate: Callable[[str, tuple, type], np.ndarray] | None = None,
        source: tuple[np.ndarray, int] | None = None,
    ) -> Generator[Progress, None, Segmentation]:
        """Sample an ensemble for a slice (4, H, W) or every brain slice of a volume (4, H, W, Z).

        options: how to sample (:class:`options.SamplingOptions`; None settings: the model's).
        guidance: known pixels, marks, members to refine from (:class:`options.Guidance`, arrays
        of the input's spatial shape; init (N, *spatial); a region model's with a region axis,
        (K, *spatial) and (N, K, *spatial): :func:`refine.region_known_pixels`).
        slices: the slices (last axis) of a volume to sample (default: every brain slice).
        preview_interval: seconds between previews (0 = every step, None = never).
        sink: called as sink(z, {"probability", "variance", "mask"}) for each finished slice
        (a region model's with "labels"), so a caller can stream a volume to disk.
        allocate: called as allocate(name, shape, dtype) for each whole-input result array
        ("probability", "variance", "mask", "samples", a region model's "labels"); returning
        disk-backed arrays (e.g. numpy memmaps) streams a volume's results to disk as its slices
        finish, so memory does not grow with the volume. Default: zero-filled arrays in memory.
        source: (volume (4, H, W, Z), z) where a lone slice was cut from that volume: a model
        that reads neighbouring slices or volume statistics (``loaded.inputs``) takes them from
        there, as it would in a whole-volume run.
        """
        images = _checked_images(images)
        plan = self._plan(images, options, guidance or Guidance(), slices, source)
        results = _Results.allocate(allocate or _zeros, plan, keep_samples, self.loaded.unet_config.mask_channels)
        previews = _Throttle(preview_interval)
        began = time.monotonic()
        chains, done, b = plan.tuner.chains, 0, 0
        while done < len(plan.todo):
            per_batch = plan.options.batch_slices or max(1, chains // plan.options.num_ensemble)
            zs = plan.todo[done : done + per_batch]
            batches = b + -(-(len(plan.todo) - done) // per_batch)  # the batches left at this size
            counts = {"slices_done": done, "slices_total": len(plan.todo), "chains": chains,
                      "batching": plan.tuner.describe()}

            def progress(step: int, total: int, preview: np.ndarray | None) -> Progress:
                return Progress(step, total, b, batches, list(zs), preview, **counts, elapsed=time.monotonic() - began)

            members, mean, var = yield from self._run_batch(plan, zs, chains, previews, progress)
            results.write(zs, members, mean, var, threshold, sink)
            done, b = done + len(zs), b + 1
            chains = plan.tuner.batch_done(last=done == len(plan.todo))
        return self._segmentation(plan, results, images.ndim, chains, threshold)

    def _plan(self, images: np.ndarray, options: SamplingOptions, guidance: Guidance, slices: list[int] | None,
              source: tuple[np.ndarray, int] | None) -> "_RunPlan":
        """What a run settles before its first batch: the options filled in, the chain, the guidance
        and the condition's source checked against the input, the slices, the batching."""
        deterministic = self.loaded.deterministic
        precision = self.precision if options.precision is None else resolve_precision(options.precision, self.device)
        options = options.resolved(self.defaults, precision, self.batching, deterministic)
        diffusion = self.diffusion(options.respacing)
        if (not deterministic and not guidance.starts_late and diffusion.num_timesteps == 1
                and self.loaded.diffusion_config.diffusion_steps > 1):
            # improved-diffusion's spacing puts a lone step at t = 0: the network would take pure
            # noise for an almost clean mask and hand it back (Dice 0.04 on the held-out slices).
            raise DiffSegError(f"timestep respacing {options.respacing!r} keeps only the step t = 0, which cannot "
                               "turn noise into a mask; use 2 steps or more", setting="timestep_respacing")
        volume = images if images.ndim == 4 else images[..., None]
        # A region model's known pixels and members carry a region axis (checked there).
        guidance = guidance.for_volume(images.shape[1:], options.num_ensemble, deterministic,
                                       reads_marks=bool(self.loaded.unet_config.hint_channels),
                                       regions=self.loaded.unet_config.mask_channels)
        todo = brain_slices(volume) if slices is None else [int(z) for z in slices]
        context_volume, context_z = self._condition_source(images, volume, source)
        stats = torch.from_numpy(volume_statistics(context_volume, self.loaded.inputs))  # of the whole input, once
        height, width = volume.shape[1:3]
        tuner = self._tuner(options, len(todo), int(guidance.resample) == 1, (height, width))
        return _RunPlan(options, guidance, diffusion, todo, volume.shape[1:], context_volume, context_z, stats, tuner,
                        volume)

    def _condition_source(self, images: np.ndarray, volume: np.ndarray,
                          source: tuple[np.ndarray, int] | None) -> tuple[np.ndarray, int | None]:
        """The volume the condition channels come from, and the slice where a lone slice sits in it."""
        if source is None or images.ndim != 3 or self.loaded.inputs == InputSpec():
            return volume, None
        context_volume, context_z = np.asarray(source[0]), int(source[1])
        if context_volume.shape[:3] != images.shape or not 0 <= context_z < context_volume.shape[-1]:
            raise DiffSegError(f"the source volume {context_volume.shape} and slice {context_z} do not hold "
                               f"the slice {images.shape}")
        return context_volume, context_z

    def _tuner(self, options: SamplingOptions, num_slices: int, plain_steps: bool, size: tuple[int, int]) -> PaceTuner:
        """The run's chains per network call: the batching choice, checked and tuned on the
        volume's own pace as it goes (batching.PaceTuner) unless fixed, resampled or one slice."""
        members, precision = options.num_ensemble, options.precision
        net_size = self.loaded.geometry.network_size(*size, self.loaded.unet_config.size_multiple)
        probes = self.probes
        choice = (self.batching_choice(members, num_slices, *net_size, precision, batching=options.batching)
                  if num_slices else BatchingChoice(members, "fixed"))
        tune = num_slices > 1 and plain_steps and not options.batch_slices
        sizes = batch_candidates(members, num_slices, most_chains(self.device, *net_size))
        return PaceTuner(
            choice if tune else BatchingChoice(choice.chains, choice.source, settled=choice.settled),
            sizes, fresh=self.probes != probes,
            reprobe=lambda: self.batching_choice(members, num_slices, *net_size, precision, reprobe=True,
                                                 batching=options.batching),
            record=lambda tuned: self._record_pace((*net_size, precision), tuned))

    def _run_batch(self, plan: "_RunPlan", zs: list[int], chains: int, previews: "_Throttle",
                   progress: Callable[[int, int, np.ndarray | None], Progress]):
        """Sample one batch of slices, yielding a Progress per step; returns its members (N, S, H, W)
        and their mean and variance (S, H, W), on the input's grid (a region model: (N, S, K, H, W)
        and (S, K, H, W); its previews show the whole tumour)."""
        clock = time.perf_counter()
        net_in = self._network_input(plan, zs)
        outside = _outside_scan(plan.volume, zs).to(self.device)  # (S, 1, H, W), once for the batch
        height, width = plan.shape[:2]
        regions = self.loaded.unet_config.mask_channels
        if self.loaded.deterministic:
            network = torch.sigmoid(self._one_pass(net_in, plan.options.precision))
            if plan.options.flip_members:  # test-time flips: the mirrored slice's pass, mirrored back, averaged
                mirrored = torch.sigmoid(self._one_pass(net_in.flip(LEFT_RIGHT), plan.options.precision))
                network = (network + mirrored.flip(LEFT_RIGHT)) / 2
            probabilities = self.loaded.geometry.from_network(network, height, width)
            probabilities = probabilities.masked_fill(outside, 0)
            members = probabilities[None, :, 0] if regions == 1 else probabilities[None]
            preview = None
            if previews.enabled:
                preview = (members[0] if regions == 1 else members[0, :, 0]).cpu().numpy()
            plan.tuner.step(time.perf_counter() - clock, len(zs))
            yield progress(1, 1, preview)
            mean = members[0]
            return members, mean, mean * (1 - mean)  # Bernoulli variance of the predicted probability
        guidance, exact = self._batch_guidance(plan, zs)
        num_ensemble = plan.options.num_ensemble
        steps = sample_ensemble(self.model, plan.diffusion, net_in, plan.options, guidance, slice_keys=zs,
                                chains_per_call=chains, clip_range=tuple(self.defaults["clip_range"]),
                                clamp_variance=bool(self.defaults.get("clamp_variance", False)))
        final = None
        for step in steps:
            final = step
            preview = None
            if previews.due():
                if regions == 1:
                    estimate = step.pred_x0.reshape(len(zs), num_ensemble, *step.pred_x0.shape[-2:]).mean(1)
                else:  # the whole tumour's channel
                    estimate = step.pred_x0[:, 0].reshape(len(zs), num_ensemble, *step.pred_x0.shape[-2:]).mean(1)
                back = self.loaded.geometry.from_network(estimate[:, None].clamp(0, 1), height, width)
                preview = back.masked_fill(outside, 0)[:, 0].cpu().numpy()  # as the result will be
            plan.tuner.step(time.perf_counter() - clock, len(zs) * num_ensemble)  # not the consumer's time
            yield progress(step.index + 1, step.total, preview)
            clock = time.perf_counter()
        if regions > 1:
            members = final.x.reshape(len(zs), num_ensemble, regions, *final.x.shape[-2:]).transpose(0, 1)
            back = self.loaded.geometry.from_network(members.reshape(-1, regions, *members.shape[-2:]).float(),
                                                     height, width)
            back = back.reshape(num_ensemble, len(zs), regions, height, width).masked_fill(outside, 0)
            if exact is not None:
                # Each region exact where it is known, on the input's grid (mask (S, K, H, W)); the
                # label map is nested after the mean (_Results.write), whatever was known.
                known_in, values_in = exact
                back = torch.where(known_in.to(back.device)[None], values_in.to(back.device, back.dtype)[None], back)
            mean, var, _ = ensemble_statistics(back)
            return back, mean, var
        members = final.x.reshape(len(zs), num_ensemble, *final.x.shape[-2:]).transpose(0, 1)
        # Back to the input geometry per member, then statistics there.
        back = self.loaded.geometry.from_network(members.reshape(-1, 1, *members.shape[-2:]).float(), height, width)
        back = back.reshape(num_ensemble, len(zs), height, width).masked_fill(outside[:, 0], 0)
        if exact is not None:
            # Exact at the input's own resolution, whatever the resampling did.
            known_in, values_in = exact
            back = torch.where(known_in[:, 0].to(back.device)[None], values_in[:, 0].to(back.device, back.dtype)[None],
                               back)
        mean, var, _ = ensemble_statistics(back)
        return back, mean, var

    def _network_input(self, plan: "_RunPlan", zs: list[int]) -> torch.Tensor:
        """The batch's condition channels at the network's size, normalised, on the device."""
        geometry, spec = self.loaded.geometry, self.loaded.inputs
        batch = torch.from_numpy(neighbour_slices(plan.context_volume, zs if plan.context_z is None else [plan.context_z],
                                                  spec))
        net_in = normalise(geometry.to_network(batch, self.loaded.unet_config.size_multiple),
                           plan.stats.expand(len(zs), -1, -1), spec)
        return net_in.to(self.device)

    def _batch_guidance(self, plan: "_RunPlan", zs: list[int]) -> tuple[Guidance, tuple | None]:
        """The batch's guidance on the network's grid, and its known pixels on the input's grid
        ((S, K, H, W) mask and values, K the mask channels; None without) to make them exact in
        the result."""
        given, geometry = plan.guidance, self.loaded.geometry
        multiple = self.loaded.unet_config.size_multiple
        known_mask = known_values = init = marks = exact = None
        if given.known:
            known_in = self._slices(given.known_mask, zs) > 0.5  # (S, 1, H, W), the input's grid
            values_in = self._slices(given.known_values, zs)
            # Resampled to the network's grid: a pixel counts as known where most of it is, and
            # its value is the majority over its known part only, so whatever a caller holds in
            # the unknown pixels (zeros, the current mask) cannot leak in at a region's edge.
            known_share = geometry.to_network(known_in.float(), multiple)
            known_sum = geometry.to_network(values_in * known_in, multiple)
            known_mask = (known_share > 0.5).to(self.device)
            known_values = (known_sum > 0.5 * known_share).float().to(self.device)
            exact = (known_in, values_in)
        if given.init is not None:
            members_in = torch.from_numpy(np.ascontiguousarray(np.moveaxis(given.init[..., zs], -1, 0)))
            channels = self.loaded.unet_config.mask_channels
            members_in = members_in.reshape(-1, channels, *plan.shape[:2]).float()  # (S*N, K, H, W)
            init = geometry.to_network(members_in, multiple).to(self.device)
        if given.marks is not None:
            marks = self._hints(given.marks, zs)
        return Guidance(known_mask, known_values, marks, init, given.start_step, given.resample), exact

    def _segmentation(self, plan: "_RunPlan", results: "_Results", ndim: int, chains: int,
                      threshold: float) -> Segmentation:
        options, deterministic = plan.options, self.loaded.deterministic
        if ndim == 3:
            results = results.first_slice()
        start_step = plan.guidance.start_step
        return Segmentation(
            probability=results.probability,
            variance=results.variance,
            mask=results.mask,
            samples=results.samples,
            regions=self.loaded.regions,
            labels=results.labels,
            num_ensemble=options.num_ensemble,
            steps=1 if deterministic else (plan.diffusion.num_timesteps if start_step is None else start_step + 1),
            sampler=ONE_PASS if deterministic else options.sampler,
            seed=options.seed,
            threshold=threshold,
            settings={"timestep_respacing": options.respacing, "eta": options.eta, "precision": options.precision,
                      "device": str(self.device), "model": self.loaded.source, "chains_per_call": chains,
                      "slices_per_batch": options.batch_slices or max(1, chains // options.num_ensemble),
                      "batching": plan.tuner.choice.source, "batching_settled": plan.tuner.choice.settled,
                      "resample": int(plan.guidance.resample), "flip_members": bool(options.flip_members)},
        )


def _checked_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    cond = MODALITY_COUNT
    if images.ndim not in (3, 4) or images.shape[0] != cond:
        raise DiffSegError(
            f"images must be ({cond}, H, W) or ({cond}, H, W, Z) (t1, t1ce, t2, flair); got shape {images.shape}"
        )
    if not np.isfinite(images).all():
        raise DiffSegError("the images contain NaN or infinite values; fix or mask them before segmenting")
    return images


def _outside_scan(volume: np.ndarray, zs: list[int]) -> torch.Tensor:
    """(S, 1, H, W) bool: where every modality of slice z is 0 (the complement of
    augment.brain_mask, the rule training and normalisation use). Outside the scanned
    (skull-stripped) head there is no tissue, so members, mean, variance and previews are 0 there:
    left alone the chains scatter faint members there (the seventh model: 3 % of the background
    above a variance of 0.01), which the heatmap shows as speckle around the head."""
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume[..., zs], -1, 0)))  # (S, 4, H, W)
    return ~brain_mask(slices)[:, :1]


def _zeros(_name: str, shape: tuple, dtype) -> np.ndarray:
    return np.zeros(shape, dtype)


@dataclass
class _RunPlan:
    """What :meth:`Segmenter.run` settles before its first batch."""

    options: SamplingOptions  # every setting filled in
    guidance: Guidance  # checked, on the input's grid as (H, W, Z) arrays
    diffusion: Diffusion
    todo: list[int]  # the slices to sample
    shape: tuple[int, int, int]  # (H, W, Z) of the input (Z = 1 for a slice)
    context_volume: np.ndarray  # where the condition channels come from
    context_z: int | None  # the lone slice's place in context_volume, if it came from one
    stats: torch.Tensor  # the input's volume statistics (preprocess.InputSpec)
    tuner: PaceTuner
    volume: np.ndarray  # the input as (4, H, W, Z)


@dataclass
class _Results:
    """The run's whole-input result arrays, (H, W, Z) (samples (N, H, W, Z)), filled per batch; a
    region model's with the region axis (K, H, W, Z) ((N, K, H, W, Z)) and its label map (H, W, Z)."""

    probability: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    samples: np.ndarray | None
    labels: np.ndarray | None = None

    @classmethod
    def allocate(cls, allocate: Callable[[str, tuple, type], np.ndarray], plan: _RunPlan,
                 keep_samples: bool, regions: int = 1) -> "_Results":
        shape = plan.shape
        if regions > 1:
            per_region = (regions, *shape)
            samples = (allocate("samples", (plan.options.num_ensemble, *per_region), np.float32)
                       if keep_samples else None)
            return cls(allocate("probability", per_region, np.float32), allocate("variance", per_region, np.float32),
                       allocate("mask", per_region, np.uint8), samples, allocate("labels", shape, np.uint8))
        samples = allocate("samples", (plan.options.num_ensemble, *shape), np.float32) if keep_samples else None
        return cls(allocate("probability", shape, np.float32), allocate("variance", shape, np.float32),
                   allocate("mask", shape, np.uint8), samples)

    def write(self, zs: list[int], members: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, threshold: float,
              sink: Callable[[int, dict], None] | None) -> None:
        """A batch's slices into the arrays (and to ``sink``, slice by slice)."""
        mean_np, var_np = mean.cpu().numpy(), var.cpu().numpy()
        for i, z in enumerate(zs):
            self.probability[..., z] = mean_np[i]
            self.variance[..., z] = var_np[i]
            if self.labels is None:
                self.mask[..., z] = mean_np[i] > threshold
            else:  # one rule for the label map and the region masks: the masks are the map's regions
                self.labels[..., z] = labels_from_probability(mean_np[i], threshold)
                self.mask[..., z] = labels_to_regions(self.labels[..., z])
            if self.samples is not None:
                self.samples[..., z] = members[:, i].cpu().numpy()
            if sink is not None:
                out = {"probability": mean_np[i], "variance": var_np[i], "mask": self.mask[..., z]}
                if self.labels is not None:
                    out["labels"] = self.labels[..., z]
                sink(z, out)

    def first_slice(self) -> "_Results":
        """The arrays of a 2D input: its one slice."""
        return _Results(self.probability[..., 0], self.variance[..., 0], self.mask[..., 0],
                        None if self.samples is None else self.samples[..., 0],
                        None if self.labels is None else self.labels[..., 0])


class _Throttle:
    """Previews at most every ``interval`` seconds (0: every step, None: never)."""

    def __init__(self, interval: float | None):
        self.interval, self.last = interval, -np.inf

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def due(self) -> bool:
        now = time.monotonic()
        if self.interval is None or now - self.last < self.interval:
            return False
        self.last = now
        return True


def run_to_end(generator: Generator[Progress, None, Segmentation], on_progress=None) -> Segmentation:
    """Drive a :meth:`Segmenter.run` generator and return its result."""
    while True:
        try:
            progress = next(generator)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(progress)
