"""Our layers of a case in the viewer: the uncertainty heatmap, the proposal, the members, the
user's segmentation and the "next mark" hint.

Each layer is found by its metadata (kind and case), never by its name: names may change, and a
user's layer of the same name is never touched. What a layer holds and where it sits is worked
out by plain functions (``result_layer_tuples``, ``segmentation_layer_tuple``, ``hint_rectangles``:
napari's (data, keyword arguments, layer type) tuples), which need no viewer; ``ResultLayers``
puts them into one.
"""

from __future__ import annotations

import numpy as np

from .. import _layerdata as ld
from .results import ResultState
from .style import (
    HINT_RGBA,
    PROPOSAL_RGBA,
    SEGMENTATION_RGBA,
    UNCERTAINTY_LIMITS,
    brats_colormap,
    fading_colormap,
    label_colormap,
    uncertainty_colormap,
)

RESULT_KINDS = ("proposal", "uncertainty", "members", "preview", "segmentation", "scribbles", "region", "hint")
# Set again when a layer is updated in place; the rest of a tuple (its style) only on creation,
# so that what the user changed (opacity, colours, visibility) stays.
PLACEMENT = ("scale", "translate", "metadata", "name")


def is_ours(layer) -> bool:
    return (getattr(layer, "metadata", None) or {}).get(ld.KIND) in RESULT_KINDS


def find_layer(layers, kind: str, case: str | None):
    """Our layer of that kind for the case in a layer list, or None."""
    for layer in layers:
        meta = getattr(layer, "metadata", None) or {}
        if meta.get(ld.KIND) == kind and meta.get(ld.CASE, "") == (case or ""):
            return layer
    return None


def placement(kind: str, case: str, reference, leading: int = 0, z: int | None = None) -> dict:
    """Scale, translate and metadata of a result layer on the reference layer's grid; ``leading``
    axes in front (the members), ``z``: a one-slice stack of a volume, moved to slice z."""
    scale = (1.0,) * leading + tuple(reference.scale)
    translate = [0.0] * leading + list(reference.translate)
    metadata = ld.derived_metadata(reference.metadata, kind, case)
    if z is not None:  # the affine moves with it
        translate[leading] += z * scale[leading]
        if ld.has_geometry(metadata):
            shift = np.eye(4)
            shift[2, 3] = z
            metadata[ld.AFFINE] = metadata[ld.AFFINE] @ shift
            metadata[ld.SPATIAL_SHAPE] = (*metadata[ld.SPATIAL_SHAPE][:2], 1)
    if leading:
        metadata["leading_axes"] = leading
    return {"scale": scale, "translate": translate, "metadata": metadata,
            "axis_labels": ld.axis_labels(len(reference.scale), leading)}


def proposal_name(state: ResultState) -> str:
    if state.partial is not None:
        done, total = state.partial
        return ld.result_name(state.case, f"proposal (partial: {done}/{total} slices)")
    return ld.result_name(state.case, "proposal")


def uncertainty_name(state: ResultState) -> str:
    """``<case> diffseg uncertainty``; a region model's names the region it shows."""
    return ld.result_name(state.case, f"uncertainty {state.shown_region.upper()}" if state.multi_region
                          else "uncertainty")


def result_layer_tuples(state: ResultState, reference, keep_members: bool = True) -> list[tuple]:
    """The uncertainty heatmap (first, so that the proposal is drawn over it), the proposal and,
    when kept, the members, as (data, keyword arguments, layer type)."""
    case = state.case
    variance = np.ascontiguousarray(ld.to_display(state.variance_of(state.shown_region)))
    mask = np.ascontiguousarray(ld.to_display(state.mask()))
    tuples = [
        (variance, {"name": uncertainty_name(state), **placement("uncertainty", case, reference),
                    "colormap": uncertainty_colormap(), "blending": "translucent",
                    "contrast_limits": UNCERTAINTY_LIMITS}, "image"),
        (mask, {"name": proposal_name(state), **placement("proposal", case, reference), "opacity": 0.6,
                "colormap": brats_colormap() if state.multi_region else label_colormap(PROPOSAL_RGBA)}, "labels"),
    ]
    spatial_ndim = len(state.spatial_shape)
    if state.members is not None and keep_members:
        if state.multi_region:  # each member's label map
            data, layer_type = state.member_labels(), "labels"
            style = {"colormap": brats_colormap(), "opacity": 0.6}
        else:
            data, layer_type = state.members, "image"
            style = {"colormap": fading_colormap("diffseg members", PROPOSAL_RGBA[:3]), "blending": "translucent",
                     "contrast_limits": (0.0, 1.0)}
        axes = ("member", "z", "y", "x")[-(spatial_ndim + 1):] if spatial_ndim == 3 else ("member", "y", "x")
        tuples.append((np.ascontiguousarray(ld.to_display(data, spatial_ndim)),
                       {"name": ld.result_name(case, "members"),
                        **placement("members", case, reference, leading=1, z=state.members_z),
                        **style, "visible": False, "axis_labels": axes}, layer_type))
    return tuples


def segmentation_layer_tuple(state: ResultState, reference) -> tuple:
    """``<case> segmentation``, empty: the user's editable layer that only Accept writes into."""
    shape = tuple(reversed(state.spatial_shape))
    return (np.zeros(shape, np.uint8),
            {"name": ld.segmentation_name(state.case), "scale": tuple(reference.scale),
             "translate": tuple(reference.translate), "axis_labels": ld.axis_labels(len(shape)),
             "metadata": ld.derived_metadata(reference.metadata, "segmentation", state.case), "opacity": 0.7,
             "colormap": brats_colormap() if state.multi_region else label_colormap(SEGMENTATION_RGBA)}, "labels")


def hint_rectangles(state: ResultState) -> list[np.ndarray]:
    """A rectangle around each sampled slice's most uncertain region (data coordinates)."""
    rectangles = []
    for z, hint in sorted(state.hints.items()):
        corners = hint.rectangle()
        if len(state.spatial_shape) == 3:
            corners = np.column_stack([np.full(len(corners), float(z)), corners])
        rectangles.append(corners)
    return rectangles


class ResultLayers:
    """Our layers in one viewer: found, made or updated, and removed."""

    def __init__(self, viewer):
        self.viewer = viewer

    def find(self, kind: str, case: str | None):
        return find_layer(self.viewer.layers, kind, case)

    def remove(self, layer) -> None:
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    def put(self, kind: str, case: str, layer_tuple: tuple):
        """Update our layer of that kind in place when it has the data's shape (its placement and
        name too), else make it anew."""
        data, kwargs, layer_type = layer_tuple
        layer = self.find(kind, case)
        if (layer is not None and layer.data.shape == data.shape and layer.ndim == data.ndim
                and type(layer).__name__.lower() == layer_type):
            layer.data = data
            for key in PLACEMENT:
                setattr(layer, key, kwargs[key])
            return layer
        self.remove(layer)
        return getattr(self.viewer, f"add_{layer_type}")(data, **kwargs)

    def show(self, state: ResultState, reference, keep_members: bool = True) -> None:
        """The case's uncertainty, proposal and (when kept) members."""
        tuples = result_layer_tuples(state, reference, keep_members)
        kinds = ("uncertainty", "proposal", "members")[:len(tuples)]
        layers = [self.put(kind, state.case, layer_tuple) for kind, layer_tuple in zip(kinds, tuples)]
        layers[0].colorbar.visible = True  # the heatmap's legend: 0 .. 0.25 (ensemble variance)
        if "members" not in kinds:
            self.remove(self.find("members", state.case))

    def show_proposal(self, state: ResultState) -> None:
        """The proposal at the state's threshold (the threshold changed)."""
        layer = self.find("proposal", state.case)
        if layer is not None:
            layer.data = np.ascontiguousarray(ld.to_display(state.mask()))

    def show_uncertainty(self, state: ResultState) -> None:
        """The uncertainty of the region the state shows (the region selector changed)."""
        layer = self.find("uncertainty", state.case)
        if layer is not None:
            layer.data = np.ascontiguousarray(ld.to_display(state.variance_of(state.shown_region)))
            layer.name = uncertainty_name(state)

    def segmentation(self, state: ResultState, reference) -> tuple[object, bool]:
        """``<case> segmentation`` and whether it was made just now: made (empty) with the case's
        first result; then only Accept and the user change it."""
        layer = self.find("segmentation", state.case)
        if layer is not None and tuple(layer.data.shape) == tuple(reversed(state.spatial_shape)):
            if state.multi_region and 4 not in layer.colormap.color_dict:
                layer.colormap = brats_colormap()  # a region model's labels into a whole-tumour layer
            return layer, False
        data, kwargs, _ = segmentation_layer_tuple(state, reference)
        return self.viewer.add_labels(data, **kwargs), True

    def show_hints(self, state: ResultState, reference) -> None:
        """``<case> next mark``: a rectangle around each sampled slice's most uncertain region."""
        spatial_ndim = len(state.spatial_shape)
        rectangles = hint_rectangles(state)
        layer = self.find("hint", state.case)
        if layer is not None and layer.ndim != spatial_ndim:
            self.remove(layer)
            layer = None
        if layer is None and not rectangles:
            return
        display_shape = tuple(reversed(state.spatial_shape))
        width = max(1.0, min(display_shape[-2:]) / 120)
        style = {"edge_color": [HINT_RGBA], "face_color": [(0.0, 0.0, 0.0, 0.0)], "edge_width": width}
        if layer is None:
            metadata = ld.derived_metadata(reference.metadata, "hint", state.case)
            layer = self.viewer.add_shapes(
                None, ndim=spatial_ndim, name=ld.layer_name(state.case, "next mark", True),
                scale=tuple(reference.scale), translate=tuple(reference.translate),
                axis_labels=ld.axis_labels(spatial_ndim), metadata=metadata, opacity=1.0,
                text={"string": {"constant": "next mark"}, "color": HINT_RGBA, "anchor": "upper_left", "size": 9},
                **style)
            layer.mode = "pan_zoom"
        elif layer.nshapes:
            layer.selected_data = set(range(layer.nshapes))
            layer.remove_selected()
        if rectangles:
            layer.add_rectangles(rectangles, **style)
