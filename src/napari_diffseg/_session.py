"""The widget's logic without Qt: picking layers by name, checking inputs, the model cache, the
sampling job run in the worker thread, the bookkeeping of results (re-threshold, ranking,
metrics), the known pixels of a refine and the "next mark" hint. Everything here is plain
Python/numpy so it can be tested without a display.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import MODALITIES
from . import _layerdata as ld
from .clicks import NOT_TUMOUR, TUMOUR
from .data import classify_file, normalise_intensity
from .errors import DiffSegError
from .preprocess import InputSpec

PREVIEW_INTERVAL = 0.1  # seconds between preview redraws (at most ~10 a second)
RESULT_TAG = "diffseg"  # our result layers carry it in their names; never picked as inputs


# ---------------------------------------------------------------------------------------------
# Layers by name
# ---------------------------------------------------------------------------------------------


def _tokens_name(name: str) -> str:
    return "_".join(name.split()) + ".nii.gz"


def modality_of(name: str) -> str | None:
    """t1/t1ce/t2/flair from a layer name ("t1ce", "Brats18_x flair", "case_T1c"), "seg" for a
    ground-truth name, None otherwise (and for our own result layers)."""
    lowered = name.lower()
    if RESULT_TAG in lowered:
        return None
    if ld.GROUND_TRUTH in lowered:
        return "seg"
    try:
        return classify_file(_tokens_name(name))
    except DiffSegError:  # names two modalities
        return None


_TOKEN = re.compile(r"[^\s_\-.]+")


def case_prefix(name: str) -> str:
    """The part of a layer name that names the case: "Brats18_x t1ce" -> "Brats18_x",
    "case_T1c" -> "case", "t1" -> "", "x ground truth" -> "x"."""
    text = re.sub(re.escape(ld.GROUND_TRUTH), " ", name, flags=re.IGNORECASE)
    spans = [(m.start(), m.group()) for m in _TOKEN.finditer(text)]
    end = len(text)
    while spans and modality_of(spans[-1][1]) is not None:
        end = spans.pop()[0]
    return text[:end].strip(" _-.")


@dataclass
class LayerInfo:
    """What the matcher needs to know of a layer."""

    name: str
    kind: str  # "image", "labels", ...
    case: str = ""  # from metadata, "" when unknown


def match_layers(layers: Sequence[LayerInfo]) -> tuple[dict[str, str | None], str | None]:
    """Choose one layer per modality and a ground truth, by name.

    The newest case (later in the list) that has all four modalities wins; otherwise each
    modality takes its newest match. Only Image layers are picked for modalities; the ground
    truth is a Labels (or Image) layer named "ground truth"/"seg"/"label" of the same case.
    """
    by_case: dict[str, dict[str, str]] = {}
    newest: dict[str, str] = {}
    truths: list[tuple[str, str]] = []
    for info in layers:
        kind = modality_of(info.name)
        case = info.case or case_prefix(info.name)
        if kind == "seg" and info.kind in ("labels", "image"):
            truths.append((case, info.name))
        elif kind in MODALITIES and info.kind == "image":
            by_case.setdefault(case, {})[kind] = info.name
            newest[kind] = info.name
    chosen: dict[str, str | None] = {m: newest.get(m) for m in MODALITIES}
    chosen_case = None
    for case in reversed(list(by_case)):
        if all(m in by_case[case] for m in MODALITIES):
            chosen = dict(by_case[case])
            chosen_case = case
            break
    truth = None
    for case, name in reversed(truths):
        if chosen_case is None or case == chosen_case:
            truth = name
            break
    return chosen, truth


# ---------------------------------------------------------------------------------------------
# Checking the chosen layers
# ---------------------------------------------------------------------------------------------


def layer_kind(layer) -> str:
    """"image", "labels", ... of a napari layer, or the class name of anything else.

    isinstance, not type(): a widget docked through napari's public API receives the viewer
    wrapped in a PublicOnlyProxy, and so are the layers it hands out; the proxy reports the
    wrapped class to isinstance (``__class__``) but ``type()`` of it is the proxy.
    """
    from napari import layers

    for kind in ("Image", "Labels", "Points", "Shapes", "Surface", "Tracks", "Vectors"):
        cls = getattr(layers, kind, None)
        if cls is not None and isinstance(layer, cls):
            return kind.lower()
    return layer.__class__.__name__.lower()


def _shape_text(shape: Iterable[int]) -> str:
    return "x".join(str(n) for n in shape)


@dataclass
class Inputs:
    """The checked inputs of a run (arrays in display order, not yet normalised)."""

    arrays: list[np.ndarray]  # t1, t1ce, t2, flair
    spatial_ndim: int
    display_shape: tuple[int, ...]
    case: str
    reference: object  # the t1 layer: its scale, translate and metadata go to the results
    truth: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)


def check_inputs(chosen: dict[str, object | None], truth_layer=None) -> Inputs:
    """Validate the layers chosen per modality; raise DiffSegError saying what to do."""
    missing = [m for m in MODALITIES if chosen.get(m) is None]
    if missing:
        raise DiffSegError(
            f"no layer chosen for {', '.join(missing)}: the model needs all four modalities "
            "(t1, t1ce, t2, flair); open a case (File > Open, or File > Open Sample > napari-diffseg) "
            "and pick one Image layer for each"
        )
    layers = [chosen[m] for m in MODALITIES]
    seen: dict[int, str] = {}
    for modality, layer in zip(MODALITIES, layers):
        if id(layer) in seen:
            raise DiffSegError(
                f"layer '{layer.name}' is chosen for both {seen[id(layer)]} and {modality}; "
                "each modality needs its own layer"
            )
        seen[id(layer)] = modality
    for modality, layer in zip(MODALITIES, layers):
        if layer_kind(layer) != "image":
            raise DiffSegError(
                f"layer '{layer.name}' (chosen as {modality}) is a {layer.__class__.__name__} layer, not an image; "
                f"choose the {modality} Image layer"
            )
        if getattr(layer, "rgb", False):
            raise DiffSegError(f"layer '{layer.name}' ({modality}) is an RGB picture; choose a grey-scale MR image")
        if getattr(layer, "multiscale", False):
            raise DiffSegError(
                f"layer '{layer.name}' ({modality}) is multiscale; open the image at full resolution only"
            )
        ndim = np.ndim(layer.data)
        if ndim not in (2, 3):
            raise DiffSegError(
                f"layer '{layer.name}' ({modality}) is {ndim}D (shape {_shape_text(layer.data.shape)}); "
                "choose 2D slices or 3D volumes"
            )
    shapes = {m: tuple(layer.data.shape) for m, layer in zip(MODALITIES, layers)}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{m} '{chosen[m].name}' {_shape_text(s)}" for m, s in shapes.items())
        raise DiffSegError(
            f"the chosen layers have different shapes ({listed}); choose the four modalities of one case, "
            "co-registered on the same voxel grid"
        )
    arrays = []
    for modality, layer in zip(MODALITIES, layers):
        array = np.asarray(layer.data)
        if array.dtype.kind not in "biuf":
            raise DiffSegError(f"layer '{layer.name}' ({modality}) holds {array.dtype} values; choose an MR image")
        if array.dtype.kind == "f":
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise DiffSegError(
                    f"layer '{layer.name}' ({modality}) has {bad} NaN or infinite voxels; replace them "
                    "(e.g. with 0: layer.data = numpy.nan_to_num(layer.data) in the console) and run again"
                )
        if not np.any(array):
            raise DiffSegError(f"layer '{layer.name}' ({modality}) is all zeros; choose the {modality} image")
        arrays.append(array)
    reference = layers[0]
    meta = getattr(reference, "metadata", {}) or {}
    case = meta.get(ld.CASE) or case_prefix(reference.name)
    inputs = Inputs(arrays, arrays[0].ndim, arrays[0].shape, case, reference)
    if truth_layer is not None:
        truth = np.asarray(truth_layer.data)
        if truth.shape != inputs.display_shape:
            inputs.warnings.append(
                f"ground truth '{truth_layer.name}' has shape {_shape_text(truth.shape)}, the images "
                f"{_shape_text(inputs.display_shape)}: Dice and HD95 are not computed"
            )
        elif truth.dtype.kind not in "biuf":
            inputs.warnings.append(f"ground truth '{truth_layer.name}' is not a label map: no Dice/HD95")
        else:
            inputs.truth = truth
    return inputs


def slice_index(world_point: Sequence[float], scale: Sequence[float], translate: Sequence[float], depth: int) -> int:
    """The Z index (display axis 0 of a volume layer) the viewer is at, clipped to the volume."""
    world_z = float(world_point[-3])
    z = int(round((world_z - float(translate[0])) / float(scale[0])))
    return int(np.clip(z, 0, depth - 1))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _stamp(path: str | None) -> tuple[str, float]:
    if not path:
        return "", 0.0
    resolved = Path(path).expanduser()
    try:
        return str(resolved.resolve()), resolved.stat().st_mtime
    except OSError:
        return str(resolved), 0.0


class ModelCache:
    """Loaded models by (checkpoint, flags file, device), newest kept; loads are thread-safe."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def key(self, model_path: str | None, flags_path: str | None, device: str) -> tuple:
        return (_stamp(model_path), _stamp(flags_path), device)

    def cached(self, model_path: str | None, flags_path: str | None, device: str):
        with self._lock:
            return self._items.get(self.key(model_path, flags_path, device))

    def get(self, model_path: str | None, flags_path: str | None, device: str):
        from .inference import Segmenter

        key = self.key(model_path, flags_path, device)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            flags = None
            if flags_path:
                from .cli import read_flags_file

                flags = read_flags_file(Path(flags_path).expanduser())
            path = Path(model_path).expanduser() if model_path else None
            try:
                segmenter = Segmenter.load(path, device=device, reference_flags=flags)
            except DiffSegError:
                if path is not None and flags is None and _is_reference_state_dict(path):
                    raise DiffSegError(REFERENCE_HINT.format(path=path)) from None
                raise
            self.loads += 1
            self._items[key] = segmenter
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return segmenter

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def forget_batching(self) -> None:
        """The loaded models forget their batching choices (the stored ones: batching.forget_batching)."""
        with self._lock:
            for segmenter in self._items.values():
                segmenter.forget_batching()


MODEL_CACHE = ModelCache()

# The widget's words for a reference checkpoint chosen without its flags: the core's message
# speaks to the command line (--num_channels ...), the widget has a "flags JSON" field.
REFERENCE_HINT = (
    "{path}: a checkpoint of the reference code holds no model configuration; choose its model "
    "flags in the 'flags JSON' field (a JSON file of the flags it was trained with, e.g. "
    '{{"num_channels": 128, "num_res_blocks": 2, "attention_resolutions": "16", "learn_sigma": true}})'
)


def _is_reference_state_dict(path: Path) -> bool:
    """A bare state dict of the improved-diffusion UNet (what the reference code saves)."""
    from .checkpoint import is_ours, read_checkpoint

    try:
        payload = read_checkpoint(path)
    except DiffSegError:
        return False
    return not is_ours(payload) and isinstance(payload, dict) and "input_blocks.0.0.weight" in payload


def demo_model_available() -> bool:
    from .checkpoint import DEMO_MODEL

    return DEMO_MODEL.is_file()


# ---------------------------------------------------------------------------------------------
# The job that runs in the worker thread
# ---------------------------------------------------------------------------------------------


@dataclass
class RunRequest:
    inputs: Inputs
    z: int | None  # the core slice index for "current slice" on a volume; None = everything
    model_path: str | None
    flags_path: str | None
    device: str
    num_ensemble: int
    respacing: str | None
    sampler: str | None
    seed: int
    keep_members: bool  # show the members as a layer
    spacing: tuple[float, ...] = ()  # voxel size, core order (for HD95)
    precision: str = "auto"  # inference.PRECISIONS
    keep_samples: bool = True  # keep the members in the result (what a later Refine starts from)
    # A refine (one slice): the known pixels (core order, the slice's (X, Y)) and, when the slice
    # has members from an earlier run, those members (N, X, Y) to start from half-way.
    known_mask: np.ndarray | None = None
    known_values: np.ndarray | None = None
    init: np.ndarray | None = None
    marks: np.ndarray | None = None  # the scribbles (1 tumour, 2 not tumour), for a model that reads them
    note: str = ""  # what the refine holds fixed, for the closing message

    @property
    def is_refine(self) -> bool:
        return self.known_mask is not None


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

    def add(self, z: int, result: dict) -> None:
        self.probability[int(z)] = np.array(result["probability"], np.float32)
        self.variance[int(z)] = np.array(result["variance"], np.float32)

    @property
    def finished(self) -> list[int]:
        return sorted(self.probability)


def run_job(request: RunRequest, cache: ModelCache = MODEL_CACHE, partial: Partial | None = None) -> Generator:
    """Load (or reuse) the model, sample, evaluate: yields inference.Progress, returns RunOutcome.

    ``partial`` (volume runs) collects each slice as it finishes, for a cancelled run."""
    from .inference import _brain_slices

    start = time.monotonic()
    segmenter = cache.get(request.model_path, request.flags_path, request.device)
    images = prepare_images(request.inputs, request.z)
    source = None
    if request.z is not None and segmenter.loaded.inputs != InputSpec():
        # a model that reads neighbouring slices or volume statistics takes them from the volume
        source = (prepare_images(request.inputs, None), request.z)
    # A bad step spec fails here (num_steps), before any work.
    if request.init is not None:
        respacing, chain_steps, start_step = refine_chain(segmenter, request.respacing)
    else:
        respacing = segmenter.defaults["timestep_respacing"] if request.respacing is None else request.respacing
        chain_steps, start_step = segmenter.num_steps(respacing), None
    slices: set[int] = set()
    todo = None
    if partial is not None and images.ndim == 4:
        todo = _brain_slices(images)  # what run() would choose; known up front for "7/16 slices"
        partial.total = len(todo)
        partial.num_ensemble = request.num_ensemble
    generator = segmenter.run(
        images,
        num_ensemble=request.num_ensemble,
        respacing=respacing,
        sampler=request.sampler,
        seed=request.seed,
        keep_samples=request.keep_samples,
        preview_interval=PREVIEW_INTERVAL,
        precision=request.precision,
        slices=todo,
        sink=partial.add if todo is not None else None,
        known_mask=request.known_mask,
        known_values=request.known_values,
        init=request.init,
        start_step=start_step,
        marks=request.marks,
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
    metrics = None
    if request.inputs.truth is not None:
        truth = ld.to_core(request.inputs.truth)
        if request.z is not None:
            truth = truth[..., request.z]
            metrics = evaluate(segmentation.mask, truth, request.spacing[:2])
        else:
            metrics = evaluate(segmentation.mask, truth, request.spacing, done if truth.ndim == 3 else None)
    return RunOutcome(segmentation, request.z, done, metrics, time.monotonic() - start, str(segmenter.device),
                      start_step, chain_steps)


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
        members = f"{request.num_ensemble} chains" if request else "the chains"
        where = request.device if request else "the device"
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


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class ResultState:
    """Ensemble statistics of one case in core order, kept for re-thresholding and review."""

    case: str
    spatial_shape: tuple[int, ...]
    probability: np.ndarray
    variance: np.ndarray
    threshold: float = 0.5
    members: np.ndarray | None = None  # (N, X, Y[, Z]) or (N, X, Y, 1) for one slice of a volume
    members_z: int | None = None  # the slice the members belong to when they cover one slice
    slices: list[int] = field(default_factory=list)  # sampled slices (volume), [0] for 2D
    num_ensemble: int = 0
    summary: str = ""
    last_z: int | None = None  # the slice of the last run; None: it covered the whole input
    partial: tuple[int, int] | None = None  # (finished, total) slices when the last run was cancelled
    # Per slice (0 for a 2D input): the members of the last run of that slice, (N, X, Y), which a
    # Refine starts from, and the "next mark" hint of its variance.
    slice_members: dict[int, np.ndarray] = field(default_factory=dict)
    hints: dict[int, "Hint"] = field(default_factory=dict)

    @classmethod
    def empty(cls, case: str, spatial_shape: Sequence[int], threshold: float = 0.5) -> "ResultState":
        shape = tuple(int(n) for n in spatial_shape)
        return cls(case, shape, np.zeros(shape, np.float32), np.zeros(shape, np.float32), threshold)

    @property
    def is_volume(self) -> bool:
        return len(self.spatial_shape) == 3

    def mask(self, threshold: float | None = None) -> np.ndarray:
        t = self.threshold if threshold is None else threshold
        return (self.probability > t).astype(np.uint8)

    def merge(self, outcome: RunOutcome) -> None:
        """Put a run's result in: the whole case, or one slice of a volume (others are kept)."""
        seg = outcome.segmentation
        self.num_ensemble = seg.num_ensemble
        if outcome.z is None:
            self.probability = np.asarray(seg.probability, np.float32)
            self.variance = np.asarray(seg.variance, np.float32)
            self.members = None if seg.samples is None else np.asarray(seg.samples, np.float32)
            self.members_z = None
            self.slices = list(outcome.slices)
            self.slice_members.clear()
            self.hints.clear()
            if self.members is not None:
                if self.is_volume:  # views, not copies
                    self.slice_members.update({z: self.members[..., z] for z in self.slices})
                else:
                    self.slice_members[0] = self.members
        else:
            z = outcome.z
            self.probability[..., z] = seg.probability
            self.variance[..., z] = seg.variance
            self.members = None if seg.samples is None else np.asarray(seg.samples, np.float32)[..., None]
            self.members_z = z
            self.slices = sorted(set(self.slices) | {z})
            if self.members is not None:
                self.slice_members[z] = self.members[..., 0]
            else:
                self.slice_members.pop(z, None)  # older members no longer match this slice's result
        self.update_hints(self.slices if outcome.z is None else [outcome.z])
        self.last_z = outcome.z
        self.partial = None

    def merge_partial(self, partial: Partial) -> None:
        """Put in the finished slices of a cancelled volume run (the other slices are kept)."""
        for z in partial.finished:
            self.probability[..., z] = partial.probability[z]
            self.variance[..., z] = partial.variance[z]
            self.slice_members.pop(z, None)  # the cancelled run's members were not kept
        self.num_ensemble = partial.num_ensemble
        self.members = None  # the members of unfinished batches were never complete
        self.members_z = None
        self.slices = sorted(set(self.slices) | set(partial.finished))
        self.update_hints(partial.finished)
        self.last_z = None
        self.partial = (len(partial.finished), partial.total)

    def variance_slice(self, z: int | None) -> np.ndarray:
        """The (X, Y) variance of slice z (the whole map of a 2D input)."""
        return self.variance[..., z] if self.is_volume else self.variance

    def members_for(self, z: int | None) -> np.ndarray | None:
        """The (N, X, Y) members of the last run of slice z (None for a 2D input), if kept."""
        return self.slice_members.get(0 if z is None else int(z))

    def update_hints(self, zs: Iterable[int]) -> None:
        """Recompute the "next mark" hint of these slices from their variance."""
        for z in zs:
            key = int(z) if self.is_volume else 0
            hint = next_mark(ld.to_display(self.variance_slice(key if self.is_volume else None)))
            if hint is None:
                self.hints.pop(key, None)
            else:
                self.hints[key] = hint

    def ranked_slices(self) -> list[tuple[int, float]]:
        return rank_slices(self.variance, self.slices) if self.is_volume else []


def rank_slices(variance: np.ndarray, slices: Iterable[int] | None = None) -> list[tuple[int, float]]:
    """(z, mean variance of the slice) for the given slices of a (X, Y, Z) map, most uncertain first."""
    variance = np.asarray(variance)
    zs = range(variance.shape[-1]) if slices is None else slices
    means = [(int(z), float(variance[..., z].mean())) for z in zs]
    return sorted(means, key=lambda item: (-item[1], item[0]))


def evaluate(mask: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None,
             slices: Sequence[int] | None = None) -> dict | None:
    """Dice and HD95 (mm) of a mask against a label map (label > 0 is tumour): of a slice, or of
    a volume's sampled ``slices`` (last axis; default all). None when the metrics module is
    unavailable.

    Slices without tumour in the truth are left out of Dice and HD95 and counted apart: on
    them an empty proposal scores a perfect 1.0 (issue 24: "Dice 1.000" over 12 such slices
    read as a result) and any false positive a 0, whatever the tumour slices show. The
    result holds ``slices``, ``tumour_slices``, ``empty_slices``, ``empty_marked`` (of those,
    the ones the proposal marks) and ``empty_voxels`` (what it marks there); ``dice`` and
    ``hd95`` are NaN when no slice has tumour."""
    try:
        from .metrics import dice, hd95
    except ImportError:
        return None
    pred = np.asarray(mask) > 0
    truth = np.asarray(truth) > 0
    volume = pred.ndim == 3
    if not volume:  # one slice: a stack of one
        pred, truth = pred[..., None], truth[..., None]
    elif slices is not None:
        pred, truth = pred[..., list(slices)], truth[..., list(slices)]
    has = truth.any(axis=(0, 1))
    marked = pred[..., ~has].any(axis=(0, 1))
    out = {"volume": volume, "slices": int(has.size), "tumour_slices": int(has.sum()),
           "empty_slices": int((~has).sum()), "empty_marked": int(marked.sum()),
           "empty_voxels": int(pred[..., ~has].sum()), "dice": float("nan"), "hd95": float("nan")}
    if has.any():
        pred, truth = (pred[..., has], truth[..., has]) if volume else (pred[..., 0], truth[..., 0])
        spacing = tuple(spacing) if spacing else None
        if spacing is not None and len(spacing) != pred.ndim:
            spacing = None
        out.update(dice=float(dice(pred, truth)), hd95=float(hd95(pred, truth, spacing)))
    return out


def format_metrics(metrics: dict | None, threshold: float | None = None) -> str:
    """One or two lines for the review panel: what the figures cover, and what was left out."""
    if metrics is None:
        return "Dice/HD95: metrics module not available"
    at = "" if threshold is None else f" at threshold {threshold:.2f}"
    hd = metrics.get("hd95", float("nan"))
    figures = f"Dice {metrics['dice']:.3f}   HD95 {f'{hd:.1f} mm' if np.isfinite(hd) else 'n/a (empty proposal)'}"
    if "tumour_slices" not in metrics:  # an older dict: figures only
        return figures + at
    total, tumour, empty = metrics["slices"], metrics["tumour_slices"], metrics["empty_slices"]
    marked, voxels = metrics["empty_marked"], metrics["empty_voxels"]
    if not metrics.get("volume", True):
        if tumour:
            return figures + at
        return (f"no tumour in the truth on this slice: no Dice/HD95; the proposal{at} marks {voxels} pixel{'s' if voxels != 1 else ''}"
                if voxels else f"no tumour in the truth on this slice, none proposed{at}: no Dice/HD95")
    false_positives = (f"{marked} of them with false positives, {voxels} voxel{'s' if voxels != 1 else ''}"
                       if marked else "none with false positives")
    if not tumour:
        return f"no tumour in the truth on the {total} sampled slices: no Dice/HD95{at} ({false_positives})"
    text = f"{figures}{at}, on the {tumour} of {total} sampled slices with tumour in the truth"
    if empty:
        text += f"; the other {empty} are left out ({false_positives})"
    return text


# ---------------------------------------------------------------------------------------------
# Accepting a proposal into the user's segmentation
# ---------------------------------------------------------------------------------------------


def mark_painted(painted: np.ndarray, atoms) -> None:
    """Record the voxels of a napari Labels paint event (its ``value``: the history atoms of
    one edit) in the boolean array ``painted`` (the layer's shape).

    An atom is either (indices, old values, new values) or, for brush/fill/polygon edits in
    recent napari, a record with ``slice_key`` (bounding box) and ``mask`` (None = all of it).
    """
    for atom in atoms or ():
        slice_key = getattr(atom, "slice_key", None)
        if slice_key is not None:
            mask = getattr(atom, "mask", None)
            if mask is None:
                painted[tuple(slice_key)] = True
            else:
                painted[tuple(slice_key)] |= np.asarray(mask, bool)
        else:
            indices = atom[0]
            painted[tuple(indices)] = True


class HandEdits:
    """What the user did by hand in a case's segmentation layer (display order).

    A voxel is the user's while a paint stroke has reached it and it still differs from what the
    accepts wrote there. napari's undo writes the old values back without a paint event, so an
    undone stroke hands its voxels back to the next Accept, and an undone Accept leaves nothing
    marked as painted.
    """

    def __init__(self, initial: np.ndarray):
        self.written = np.array(initial, copy=True)  # the layer as the accepts left it, strokes aside
        self.touched = np.zeros(self.written.shape, bool)  # voxels a paint stroke reached
        # per slice of display axis 0 (one flag for a 2D slice): accepted into at least once
        self.accepted = np.zeros(self.written.shape[0] if self.written.ndim == 3 else 1, bool)

    def mark(self, atoms) -> None:
        mark_painted(self.touched, atoms)

    def edited(self, segmentation: np.ndarray) -> np.ndarray:
        return self.touched & (np.asarray(segmentation) != self.written)

    def holds_work(self, segmentation: np.ndarray, z: int | None) -> bool:
        """Whether the slice (None: the 2D slice) was accepted into or edited by hand."""
        where = slice(None) if z is None else z
        edited = self.touched[where] & (np.asarray(segmentation)[where] != self.written[where])
        return bool(self.accepted[0 if z is None else z] or edited.any())

    def commit(self, segmentation: np.ndarray, proposal: np.ndarray,
               zs: Sequence[int] | None = None) -> tuple[tuple[np.ndarray, ...], np.ndarray, int]:
        """What accepting ``proposal`` into ``segmentation`` changes, recorded as written.

        Only slices ``zs`` (display axis 0) are touched, all of it when None. The user's voxels
        are left alone. Returns (indices, new values, number of the user's voxels kept that the
        proposal would have changed): indices and values go to ``Labels.data_setitem`` so the
        accept is one step of napari's undo history.
        """
        segmentation, proposal = np.asarray(segmentation), np.asarray(proposal)
        region = np.zeros(segmentation.shape, bool)
        region[slice(None) if zs is None else list(zs)] = True
        edited = self.edited(segmentation)
        differs = region & (segmentation != proposal)
        kept = int(np.count_nonzero(differs & edited))
        indices = np.nonzero(differs & ~edited)
        ours = region & ~edited
        self.written[ours] = proposal[ours]
        self.touched[ours] = False
        self.accepted[slice(None) if zs is None or self.written.ndim != 3 else list(zs)] = True
        return indices, proposal[indices], kept


# ---------------------------------------------------------------------------------------------
# Refine: the user's marks as known pixels, and where to mark next
# ---------------------------------------------------------------------------------------------

SCRIBBLE_TUMOUR, SCRIBBLE_BACKGROUND = TUMOUR, NOT_TUMOUR  # label values of the "<case> scribbles" layer
SCRIBBLE_NAMES = {SCRIBBLE_TUMOUR: "tumour", SCRIBBLE_BACKGROUND: "not tumour"}


REFINE_MIN_STEPS = 10


def refine_respacing(preset_steps: int) -> str | None:
    """The chain a refine runs on when the user chose no step count: the model's preset, but at
    least 10 steps. A refine starts half-way down its chain; on the demo model's 5-step preset
    that leaves 3 steps (from t = 500) to follow the new marks, and refining lost to painting by
    hand (benchmarks/README.md); half of 10 steps did not. None keeps the preset."""
    return None if preset_steps >= REFINE_MIN_STEPS else str(REFINE_MIN_STEPS)


def refine_start_step(chain_steps: int) -> int:
    """The respaced step a refine starts at: about half the chain (SDEdit-style), so that the
    members' shape survives the noise but the model has room to follow the new marks. A
    10-step chain starts at step 4 and runs 5 steps."""
    return max(0, (int(chain_steps) + 1) // 2 - 1)


def refine_chain(segmenter, respacing: str | None = None) -> tuple[str, int, int]:
    """A refine from members: its respacing (the user's step count, else the model's preset but
    at least REFINE_MIN_STEPS), that chain's length and the step it starts at. The widget's
    Refine and the simulated clinician (benchmarks/bench_interactive.py) both take it from here."""
    chosen = segmenter.defaults["timestep_respacing"] if respacing is None else respacing
    if respacing is None:
        chosen = refine_respacing(segmenter.num_steps(chosen)) or chosen
    steps = segmenter.num_steps(chosen)
    return chosen, steps, refine_start_step(steps)


@dataclass
class KnownPixels:
    """Pixels of one slice whose mask value the user gave (display order, (rows, cols))."""

    mask: np.ndarray  # bool
    values: np.ndarray  # float32, 0 or 1 where mask
    tumour: int = 0  # scribbled pixels of each kind
    background: int = 0
    from_segmentation: int = 0  # pixels outside the region taken from the segmentation below
    outside_source: str = "accepted"  # what that segmentation is: "accepted" or "proposal" pixels
    ignored_labels: tuple[int, ...] = ()  # scribble labels other than 1 and 2 (not used)
    marks: np.ndarray | None = None  # uint8: the scribbles of labels 1 and 2, 0 elsewhere

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.mask))

    def summary(self) -> str:
        parts = []
        if self.tumour or self.background:
            parts.append(f"{self.tumour} tumour and {self.background} not-tumour scribbled pixels")
        if self.from_segmentation:
            parts.append(f"{self.from_segmentation} {self.outside_source} pixels outside the region")
        return " and ".join(parts) or "no known pixels"


def known_pixels(scribbles: np.ndarray, segmentation: np.ndarray | None = None,
                 region: np.ndarray | None = None, source: str = "accepted") -> KnownPixels:
    """The known pixels of a refine, from 2D arrays of one slice (the same shape).

    scribbles: 1 = tumour (known 1), 2 = not tumour (known 0), anything else unmarked.
    segmentation, region: where a region is drawn, the accepted segmentation (label > 0 is
    tumour) is known everywhere outside it, so the refine redoes only the region; without a
    region (None or empty) only the scribbles are known. Scribbles win over the segmentation.
    source: what the segmentation is, for the summary ("accepted", or "proposal" where the
    caller holds the current proposal because nothing was accepted on the slice).
    """
    scribbles = np.asarray(scribbles)
    known = np.zeros(scribbles.shape, bool)
    values = np.zeros(scribbles.shape, np.float32)
    from_segmentation = 0
    if region is not None and np.any(region):
        outside = ~np.asarray(region, bool)
        seg = np.zeros(scribbles.shape, bool) if segmentation is None else np.asarray(segmentation) > 0
        known |= outside
        values[outside] = seg[outside]
    tumour = scribbles == SCRIBBLE_TUMOUR
    background = scribbles == SCRIBBLE_BACKGROUND
    if region is not None and np.any(region):
        from_segmentation = int(np.count_nonzero(known & ~tumour & ~background))
    known |= tumour | background
    values[tumour] = 1.0
    values[background] = 0.0
    other = np.unique(scribbles[(scribbles != 0) & ~tumour & ~background])
    marks = np.where(tumour | background, scribbles, 0).astype(np.uint8)
    return KnownPixels(known, values, int(tumour.sum()), int(background.sum()), from_segmentation, source,
                       tuple(int(v) for v in other), marks)


@dataclass
class Hint:
    """The most uncertain connected region of a slice (display order, (rows, cols))."""

    bbox: tuple[int, int, int, int]  # row0, col0, row1, col1, inclusive
    score: float  # summed variance over the region
    pixels: int
    mask: np.ndarray  # bool, the region

    def rectangle(self, pad: float = 1.0) -> np.ndarray:
        """Corners of a rectangle around it in data coordinates (pixel centres at integers)."""
        r0, c0, r1, c1 = self.bbox
        top, left, bottom, right = r0 - 0.5 - pad, c0 - 0.5 - pad, r1 + 0.5 + pad, c1 + 0.5 + pad
        return np.array([[top, left], [top, right], [bottom, right], [bottom, left]], float)


HINT_FLOOR = 0.02  # smoothed variance below this is no disagreement worth a look
HINT_RELATIVE = 0.5  # regions are where the smoothed variance reaches half its peak
HINT_SIGMA = 1.5  # pixels


def next_mark(variance: np.ndarray, floor: float = HINT_FLOOR, relative: float = HINT_RELATIVE,
              sigma: float = HINT_SIGMA) -> Hint | None:
    """Where a mark would help most: the connected region of high ensemble variance with the
    largest summed variance, or None when the members agree everywhere.

    The map is smoothed first, so that a whole lump the members disagree on outranks the
    one-pixel rim every tumour boundary has (members that differ by a pixel); regions are where
    the smoothed variance reaches ``relative`` of its peak (at least ``floor``), 8-connected,
    and ranked by the raw variance they hold.
    """
    from scipy import ndimage

    variance = np.nan_to_num(np.asarray(variance, np.float64))
    if variance.ndim != 2 or variance.size == 0:
        raise ValueError(f"next_mark needs a 2D variance map, got shape {variance.shape}")
    smooth = ndimage.gaussian_filter(variance, sigma) if sigma > 0 else variance
    peak = float(smooth.max())
    if peak < floor:
        return None
    labels, count = ndimage.label(smooth >= max(floor, relative * peak), structure=np.ones((3, 3), bool))
    scores = ndimage.sum_labels(variance, labels, index=np.arange(1, count + 1))
    best = int(np.argmax(scores)) + 1
    region = labels == best
    rows, cols = ndimage.find_objects(region.astype(np.int8))[0]
    return Hint((rows.start, cols.start, rows.stop - 1, cols.stop - 1), float(scores[best - 1]),
                int(region.sum()), region)
