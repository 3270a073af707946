"""The sampling job that runs in the worker thread: the request the widget builds, loading (or
reusing) the model, sampling with progress, the outcome, and what to tell the user when it fails
(no Qt: it is plain Python and numpy, so it can be tested without a display).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from .. import _layerdata as ld
from ..data import normalise_intensity
from ..errors import DiffSegError
from ..options import Guidance, SamplingOptions
from ..preprocess import InputSpec
from ..refine import refine_chain
from ..regions import clean_labels, region_names
from .figures import evaluate_result
from .inputs import Inputs
from .models import MODEL_CACHE, ModelCache, model_to_load
from .settings import Settings

PREVIEW_INTERVAL = 0.1  # seconds between preview redraws (at most ~10 a second)


MAX_MEMBERS_BYTES = 1_000_000_000  # larger member stacks are not kept (the core allocates them too)


@dataclass
class RunRequest:
    inputs: Inputs
    settings: Settings  # the form at Run time: the model, the device and the sampler's options
    z: int | None = None  # the core slice index for "current slice" on a volume; None = everything
    keep_members: bool = False  # show the members as a layer
    keep_samples: bool = True  # keep the members in the result (what a later Refine starts from)
    # A refine (one slice): the known pixels (core order, the slice's (X, Y)) and, when the slice
    # has members from an earlier run, those members (N, X, Y) to start from half-way; a region
    # model's with the region axis, (3, X, Y) and (N, 3, X, Y).
    known_mask: np.ndarray | None = None
    known_values: np.ndarray | None = None
    init: np.ndarray | None = None
    marks: np.ndarray | None = None  # the scribbles (1 tumour, 2 not tumour), for a model that reads them
    note: str = ""  # what the refine holds fixed, for the closing message

    @property
    def is_refine(self) -> bool:
        return self.known_mask is not None


def plan_run(inputs: Inputs, settings: Settings, z: int | None) -> RunRequest:
    """The request of a Run: the members are kept (for Refine) even when not shown, unless they
    would be huge; then the inputs' warnings say so."""
    ensemble = settings.num_ensemble
    voxels = int(np.prod(inputs.display_shape if z is None else inputs.display_shape[1:]))
    members_bytes = 4 * voxels * ensemble
    keep_samples = members_bytes <= MAX_MEMBERS_BYTES
    if not keep_samples:
        inputs.warnings.append(
            f"the {ensemble} ensemble members of the whole volume would take "
            f"{members_bytes / 1e9:.1f} GB: not kept this time (segment the current slice to see "
            "them; Refine then runs whole chains)"
        )
    return RunRequest(inputs, settings, z, keep_members=settings.keep_members and keep_samples,
                      keep_samples=keep_samples)


@dataclass
class RunOutcome:
    segmentation: object  # inference.Segmentation (2D when z is given, else the input's shape)
    z: int | None
    slices: list[int]  # core slice indices sampled (volume), [0] for a 2D input
    metrics: dict | None
    seconds: float
    device: str = ""
    start_step: int | None = None  # a refine from members: the step it started at
    chain_steps: int = 0  # the steps of a whole chain at this respacing
    cleanup_voxels: int = 0  # the model's 3D clean-up size (0: it stores none)
    cleaned: bool = False  # the metrics are of the cleaned-up mask (a whole-volume run with clean-up on)


def _normalised(array: np.ndarray, z: int | None) -> np.ndarray:
    """One modality in core order, scaled as the model expects (whole volume), sliced at z."""
    core = ld.to_core(array)
    if core.min() >= 0 and core.max() <= 1:
        out = core if z is None else core[..., z]
        return np.asarray(out, dtype=np.float32)
    scaled = normalise_intensity(core)
    return scaled if z is None else scaled[..., z]


def prepare_images(inputs: Inputs, z: int | None) -> np.ndarray:
    """(4, X, Y[, Z]) float32 in [0, 1], or (4, X, Y) for slice z of a volume."""
    return np.ascontiguousarray(np.stack([_normalised(array, z) for array in inputs.arrays]))


class Partial:
    """The finished slices of a volume run, filled from the worker thread as they finish, so
    that a cancelled run still hands over what it completed (read after the worker has stopped)."""

    def __init__(self):
        self.total = 0  # slices the run would sample
        self.probability: dict[int, np.ndarray] = {}
        self.variance: dict[int, np.ndarray] = {}
        self.num_ensemble = 0
        self.regions: tuple[str, ...] = ("wt",)  # the model's (a region axis first when more than one)

    def add(self, z: int, result: dict) -> None:
        self.probability[int(z)] = np.array(result["probability"], np.float32)
        self.variance[int(z)] = np.array(result["variance"], np.float32)

    @property
    def finished(self) -> list[int]:
        return sorted(self.probability)


def check_refine_fits(request: RunRequest, regions: tuple[str, ...], spatial_ndim: int) -> None:
    """A refine's known pixels are built for the result on screen (a region axis for a region
    model's); the model chosen now must segment the same regions (DiffSegError otherwise)."""
    if not request.is_refine:
        return
    per_region = np.ndim(request.known_mask) > spatial_ndim
    if per_region == (len(regions) > 1):
        return
    chosen = ", ".join(name.upper() for name in regions) if len(regions) > 1 else "the whole tumour"
    made = "a region model (WT, TC, ET)" if per_region else "a whole-tumour model (or no run yet)"
    raise DiffSegError(f"the chosen model segments {chosen}, but this slice's result is of {made}: Run the slice "
                       "with this model first, then Refine")


def run_job(request: RunRequest, cache: ModelCache = MODEL_CACHE, partial: Partial | None = None) -> Generator:
    """Load (or reuse) the model, sample, evaluate: yields inference.Progress, returns RunOutcome.

    ``partial`` (volume runs) collects each slice as it finishes, for a cancelled run."""
    from ..data import brain_slices

    start = time.monotonic()
    settings = request.settings
    segmenter = cache.get(model_to_load(settings), settings.flags_path or None, settings.device)
    images = prepare_images(request.inputs, request.z)
    check_refine_fits(request, segmenter.loaded.region_names, images.ndim - 1)
    source = None
    if request.z is not None and segmenter.loaded.inputs != InputSpec():
        # a model that reads neighbouring slices or volume statistics takes them from the volume
        source = (prepare_images(request.inputs, None), request.z)
    # A bad step spec fails here (num_steps), before any work.
    if request.init is not None:
        respacing, chain_steps, start_step = refine_chain(segmenter, settings.respacing)
    else:
        respacing = segmenter.defaults["timestep_respacing"] if settings.respacing is None else settings.respacing
        chain_steps, start_step = segmenter.num_steps(respacing), None
    slices: set[int] = set()
    todo = None
    if partial is not None and images.ndim == 4:
        todo = brain_slices(images)  # what run() would choose; known up front for "7/16 slices"
        partial.total = len(todo)
        partial.num_ensemble = settings.num_ensemble
        partial.regions = segmenter.loaded.region_names
    generator = segmenter.run(
        images,
        # num_ensemble, sampler, eta, precision, seed: as the form has them
        SamplingOptions(respacing=respacing, **settings.run_options()),
        Guidance(known_mask=request.known_mask, known_values=request.known_values, marks=request.marks,
                 init=request.init, start_step=start_step),
        keep_samples=request.keep_samples,
        preview_interval=PREVIEW_INTERVAL,
        slices=todo,
        sink=partial.add if todo is not None else None,
        source=source,
    )
    while True:
        try:
            progress = next(generator)
        except StopIteration as stop:
            segmentation = stop.value
            break
        slices.update(progress.slices)
        yield progress
    done = sorted(slices) if request.z is None else [request.z]
    cleanup_voxels = int(segmenter.defaults.get("cleanup_min_voxels", 0) or 0)
    cleaned = settings.cleanup and cleanup_voxels > 0 and request.z is None and images.ndim == 4
    regions = region_names(segmentation.regions)
    metrics = None
    if request.inputs.truth is not None:
        truth = ld.to_core(request.inputs.truth)
        # the proposal as the widget shows it: a region model's label map (threshold 0.5 per region)
        mask = segmentation.mask if len(regions) == 1 else segmentation.labels
        if request.z is not None:
            truth = truth[..., request.z]
            metrics = evaluate_result(mask, truth, request.inputs.spacing[:2], regions=regions)
        else:
            if cleaned:  # a 0/1 mask is a label map of one label
                mask = clean_labels(mask, cleanup_voxels)
            metrics = evaluate_result(mask, truth, request.inputs.spacing, done if truth.ndim == 3 else None,
                                      regions=regions)
    return RunOutcome(segmentation, request.z, done, metrics, time.monotonic() - start, str(segmenter.device),
                      start_step, chain_steps, cleanup_voxels, cleaned)


class JobFailed(Exception):
    """Carries a RuntimeError out of the worker: superqt's generator worker swallows RuntimeErrors
    (it takes them for a deleted Qt object) and would never report the end of the run."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


def guarded_job(request: RunRequest, cache: ModelCache = MODEL_CACHE, partial: Partial | None = None) -> Generator:
    """``run_job`` for a thread_worker: every exception reaches the worker's errored signal."""
    try:
        return (yield from run_job(request, cache, partial))
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
        raise JobFailed(exc) from exc


def _unwrap(exc: BaseException) -> BaseException:
    return exc.original if isinstance(exc, JobFailed) else exc


def is_out_of_memory(exc: BaseException) -> bool:
    exc = _unwrap(exc)
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def error_message(exc: BaseException, request: RunRequest | None) -> str:
    """What to tell the user about an exception from the worker (one line)."""
    exc = _unwrap(exc)
    if isinstance(exc, DiffSegError):
        return " ".join(str(exc).split())  # one line, whatever the message holds
    if is_out_of_memory(exc):
        members = f"{request.settings.num_ensemble} chains" if request else "the chains"
        where = request.settings.device if request else "the device"
        return (
            f"out of memory on {where} while sampling {members}: lower the ensemble size, segment the "
            "current slice instead of the whole volume, or choose the cpu device, then run again"
        )
    if isinstance(exc, ValueError) and ("too small" in str(exc) or "cannot crop" in str(exc)):
        return f"the images do not fit this model ({exc}); choose larger images or another model"
    first = " ".join(str(exc).split())[:300]
    return (
        f"segmentation failed ({type(exc).__name__}: {first}); your layers are unchanged. "
        "If this persists, please report it with the model and image sizes"
    )
