"""The "Refine with scribbles" group: the scribble and region layers, and the request of a
Refine of the current slice.

Refine resamples the slice with known pixels: the user's scribbles (``<case> scribbles``,
1 = tumour, 2 = not tumour) and, where a region is drawn in the Shapes layer
``<case> refine region``, the accepted segmentation outside that region (the proposal on a slice
with nothing accepted or painted). It starts from the slice's members of the last run noised to
half the chain (a full run when there are none) and updates the proposal like a Run; it never
writes into the segmentation. With a region model's result (WT, TC, ET) the scribbles are
whole-tumour marks and the rest is held per region (``refine.region_known_pixels``); marks for
the parts do not exist yet, and the user is told so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from magicgui.widgets import Container, Label, PushButton
from qtpy.QtCore import Qt

from .. import _layerdata as ld
from ..errors import DiffSegError
from ..refine import SCRIBBLE_BACKGROUND, SCRIBBLE_NAMES, SCRIBBLE_TUMOUR, known_pixels, region_known_pixels
from . import tooltips
from .inputs import Inputs, check_inputs
from .job import RunRequest
from .keys import REFINE_KEY
from .result_layers import ResultLayers
from .results import CaseResults
from .style import REGION_RGBA, SCRIBBLE_HEX, scribble_colormap


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


class RefineTools:
    """The scribble legend, Scribble and Region (which make or select the mark layers), and the
    Refine button (the widget starts what ``request`` builds)."""

    def __init__(self, layers: ResultLayers, cases: CaseResults, chosen_layers: Callable[[], dict],
                 notify: Callable[[str, str], None], say: Callable[[str], None]):
        self._layers, self._cases = layers, cases
        self._chosen_layers, self._notify, self._say = chosen_layers, notify, say
        tumour, background = SCRIBBLE_HEX[SCRIBBLE_TUMOUR], SCRIBBLE_HEX[SCRIBBLE_BACKGROUND]
        self.scribble_legend = Label(value=(
            f"<span style='color:{tumour}'>&#9632;</span> 1 = {SCRIBBLE_NAMES[SCRIBBLE_TUMOUR]} &nbsp; "
            f"<span style='color:{background}'>&#9632;</span> 2 = {SCRIBBLE_NAMES[SCRIBBLE_BACKGROUND]}"))
        self.scribble_legend.native.setTextFormat(Qt.TextFormat.RichText)
        self.scribble_legend.tooltip = tooltips.SCRIBBLE_LEGEND
        self.scribble_button = PushButton(text="Scribble", tooltip=tooltips.SCRIBBLE)
        self.region_button = PushButton(text="Region", tooltip=tooltips.REGION)
        self.refine_button = PushButton(text=f"Refine slice ({REFINE_KEY})", tooltip=tooltips.REFINE)
        marks_row = Container(widgets=[self.scribble_button, self.region_button], layout="horizontal", labels=False)
        marks_row.margins = (0, 0, 0, 0)
        self.box = Container(widgets=[self.scribble_legend, marks_row, self.refine_button], labels=False)
        self.scribble_button.changed.connect(self.scribble)
        self.region_button.changed.connect(self.draw_region)

    @property
    def viewer(self):
        return self._layers.viewer

    # -- the mark layers ----------------------------------------------------------------------

    def scribble(self, *_) -> None:
        """Make (or select) '<case> scribbles' on the images' grid and paint with label 1 (tumour)."""
        layer = self._select_mark_layer("scribbles", self._new_scribbles)
        if layer is None:
            return
        layer.mode = "paint"
        layer.selected_label = SCRIBBLE_TUMOUR
        self._say(f"paint in '{layer.name}': label 1 = tumour, 2 = not tumour (0 erases); then Refine ({REFINE_KEY})")

    def draw_region(self, *_) -> None:
        """Make (or select) '<case> refine region' and switch to drawing rectangles."""
        layer = self._select_mark_layer("region", self._new_region)
        if layer is None:
            return
        layer.mode = "add_rectangle"
        self._say(f"draw the region to redo in '{layer.name}' (rectangle; other shapes from the layer controls); "
                  "outside it the accepted segmentation is kept")

    def _select_mark_layer(self, kind: str, make: Callable[[Inputs], object]):
        """Our mark layer of the case (made by ``make`` where there is none), shown and selected;
        None after telling the user what is wrong."""
        try:
            inputs = check_inputs(self._chosen_layers())
            layer = self._checked_mark_layer(kind, inputs)
        except DiffSegError as exc:
            self._notify(str(exc), "error")
            return None
        if layer is None:
            layer = make(inputs)
        layer.visible = True
        self.viewer.layers.selection.active = layer
        return layer

    def _new_scribbles(self, inputs: Inputs):
        names = {0: "", **SCRIBBLE_NAMES}
        layer = self.viewer.add_labels(
            np.zeros(inputs.display_shape, np.uint8), name=ld.layer_name(inputs.case, "scribbles", True),
            opacity=0.9, colormap=scribble_colormap(),
            # Hovering a mark shows its meaning in the status bar ("mark: tumour").
            features={"index": list(names), "mark": list(names.values())},
            **self._mark_layer_kwargs(inputs, "scribbles"))
        layer.brush_size = max(3, min(inputs.display_shape[-2:]) // 40)
        return layer

    def _new_region(self, inputs: Inputs):
        layer = self.viewer.add_shapes(
            None, ndim=inputs.spatial_ndim, name=ld.layer_name(inputs.case, "refine region", True),
            edge_color=[REGION_RGBA], face_color=[(*REGION_RGBA[:3], 0.12)],
            edge_width=max(1.0, min(inputs.display_shape[-2:]) / 160),
            **self._mark_layer_kwargs(inputs, "region"))
        layer.current_edge_color = REGION_RGBA
        layer.current_face_color = (*REGION_RGBA[:3], 0.12)
        return layer

    @staticmethod
    def _mark_layer_kwargs(inputs: Inputs, kind: str) -> dict:
        """Geometry of a layer on the source grid (voxel indices = the images')."""
        reference = inputs.reference
        return {"scale": tuple(reference.scale), "translate": tuple(reference.translate),
                "axis_labels": ld.axis_labels(inputs.spatial_ndim),
                "metadata": ld.derived_metadata(reference.metadata, kind, inputs.case)}

    def _checked_mark_layer(self, kind: str, inputs: Inputs):
        """Our scribbles/region layer of the case, checked against the images' grid (DiffSegError)."""
        layer = self._layers.find(kind, inputs.case)
        if layer is None:
            return None
        if kind == "scribbles":
            shape = tuple(np.shape(layer.data))
            if shape != tuple(inputs.display_shape):
                raise DiffSegError(
                    f"layer '{layer.name}' has shape {_shape_text(shape)} but the images are "
                    f"{_shape_text(inputs.display_shape)}: delete it and press Scribble for a new one"
                )
        elif layer.ndim != inputs.spatial_ndim:
            raise DiffSegError(
                f"layer '{layer.name}' is {layer.ndim}D but the images are {inputs.spatial_ndim}D: "
                "delete it and press Region for a new one"
            )
        return layer

    # -- the request --------------------------------------------------------------------------

    def _region_mask(self, layer, inputs: Inputs, z: int | None) -> np.ndarray | None:
        """The region drawn on the slice (display order), or None when there is none."""
        if layer is None or layer.nshapes == 0:
            return None
        masks = np.asarray(layer.to_masks(tuple(inputs.display_shape)), bool)
        region = masks.any(axis=0)
        if z is not None:
            region = region[z]
        return region if region.any() else None

    def _outside_region(self, inputs: Inputs, segmentation, z: int | None) -> tuple[np.ndarray | None, str]:
        """What a region refine holds outside the region on the slice (display order): the
        segmentation where the slice was accepted into or painted by hand, else the proposal the
        user sees (a Region drawn before any Accept must not wipe it), else nothing (background)."""
        case = self._cases.get(inputs.case)
        edits = None if case is None else case.edits
        if segmentation is not None and edits is not None and edits.written.shape == segmentation.data.shape \
                and edits.holds_work(segmentation.data, z):
            return np.asarray(segmentation.data if z is None else segmentation.data[z]), "accepted"
        if case is not None and case.result_fits(inputs.display_shape) and (z is None or z in case.result.slices):
            proposal = ld.to_display(case.result.mask())
            return np.asarray(proposal if z is None else proposal[z]), "proposal"
        return None, "accepted"

    def request(self, base: RunRequest) -> RunRequest | None:
        """The request of a refine of the current slice, from that of a Run of it (DiffSegError for
        bad layers), or None (with a warning) when nothing is marked."""
        inputs, z = base.inputs, base.z
        shown = self._cases.get(inputs.case)
        # The result on screen tells the model's regions (a region model's: WT, TC, ET).
        multi_region = shown is not None and shown.result.multi_region
        scribbles = self._checked_mark_layer("scribbles", inputs)
        region_layer = self._checked_mark_layer("region", inputs)
        segmentation = self._layers.find("segmentation", inputs.case)
        if segmentation is not None and tuple(segmentation.data.shape) != tuple(inputs.display_shape):
            raise DiffSegError(
                f"layer '{segmentation.name}' has shape {_shape_text(segmentation.data.shape)} but the "
                f"images are {_shape_text(inputs.display_shape)}; rename or delete it, then refine again"
            )
        if scribbles is None:
            marks = np.zeros(inputs.display_shape[-2:], np.uint8)
        else:
            marks = np.asarray(scribbles.data if z is None else scribbles.data[z])
        region = self._region_mask(region_layer, inputs, z)
        outside, source = self._outside_region(inputs, segmentation, z) if region is not None else (None, "accepted")
        if multi_region:  # the scribbles as whole-tumour marks, the rest per region (refine.region_known_pixels)
            known = region_known_pixels(marks, outside, region, source, regions="brats")
        else:
            known = known_pixels(marks, outside, region, source)
        if known.count == 0:
            where = "this slice" if z is None else f"slice {z}"
            name = ld.layer_name(inputs.case, "scribbles", True)
            self._notify(f"nothing to refine {where} with: paint tumour (1) or not-tumour (2) scribbles in "
                         f"'{name}' (the Scribble button), or draw a region (the Region button)", "warning")
            return None
        if known.ignored_labels:
            inputs.warnings.append(f"scribble labels {', '.join(map(str, known.ignored_labels))} mean nothing "
                                   "(1 = tumour, 2 = not tumour): ignored")
        if multi_region:
            self._notify("with a region model the scribbles act on the whole tumour (1 = tumour, 2 = not tumour: "
                         "no tumour and no part there); marks for the parts (core, enhancing) are not supported "
                         "yet", "info")
        request = replace(base, known_mask=np.ascontiguousarray(ld.to_core(known.mask, 2)),
                          known_values=np.ascontiguousarray(ld.to_core(known.values, 2)),
                          marks=np.ascontiguousarray(ld.to_core(known.marks)), note=known.summary(),
                          keep_samples=True)  # one slice: small, and the next refine starts from them
        case = self._cases.get(inputs.case)
        members = case.result.members_for(z) if case is not None and case.result_fits(inputs.display_shape) else None
        if members is not None:
            request.init = np.array(members, np.float32)
            # the members' count, whatever the slider says
            request.settings = request.settings.updated(num_ensemble=int(members.shape[0]))
        return request
