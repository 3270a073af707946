"""Which layers are a run's inputs, and whether they can be: layer names matched to modalities
and cases, the checks of the chosen layers, and the slice the viewer is at or goes to (no Qt;
napari's layer classes are imported where a layer's type is asked).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import MODALITIES
from .. import _layerdata as ld
from ..data import classify_file
from ..errors import DiffSegError

RESULT_TAG = "diffseg"  # our result layers carry it in their names; never picked as inputs


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
    spacing: tuple[float, ...] = ()  # voxel size, core order (for HD95)


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
    ndim = arrays[0].ndim
    inputs = Inputs(arrays, ndim, arrays[0].shape, case, reference, spacing=_spacing(reference, ndim))
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


def _spacing(reference, spatial_ndim: int) -> tuple[float, ...]:
    """The voxel size in core order: the source file's, else the layer's scale (display order)."""
    meta = getattr(reference, "metadata", None) or {}
    if ld.VOXEL_SIZE in meta and len(meta[ld.VOXEL_SIZE]) == spatial_ndim:
        return tuple(meta[ld.VOXEL_SIZE])
    return tuple(float(s) for s in reversed(tuple(reference.scale)[-spatial_ndim:]))


def slice_index(world_point: Sequence[float], scale: Sequence[float], translate: Sequence[float], depth: int) -> int:
    """The Z index (display axis 0 of a volume layer) the viewer is at, clipped to the volume."""
    world_z = float(world_point[-3])
    z = int(round((world_z - float(translate[0])) / float(scale[0])))
    return int(np.clip(z, 0, depth - 1))


def go_to_slice(viewer, reference, z: int) -> None:
    """Move the viewer to core slice z (display axis 0) of the reference layer's volume."""
    if reference is None or reference.ndim < 3:
        return
    world = float(reference.translate[0]) + z * float(reference.scale[0])
    axis = viewer.dims.ndim - 3
    if axis >= 0:
        viewer.dims.set_point(axis, world)
