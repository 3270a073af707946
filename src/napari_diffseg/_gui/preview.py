"""The live preview of a run: the ensemble mean as it denoises, in a layer of its own that goes
when the run ends (napari, no Qt)."""

from __future__ import annotations

import numpy as np

from .. import _layerdata as ld
from .inputs import go_to_slice
from .result_layers import ResultLayers
from .style import PROPOSAL_RGBA, fading_colormap


class Preview:
    def __init__(self, layers: ResultLayers):
        self._layers = layers
        self._layer = None
        self._request = None
        self._last_batch = -1
        self.updates = 0  # redraws of the current/last run

    @property
    def viewer(self):
        return self._layers.viewer

    def start(self, request) -> None:
        """An empty preview layer where the request's result will be, under the user's marks."""
        self.remove()
        self._request, self._last_batch, self.updates = request, -1, 0
        inputs = request.inputs
        reference = inputs.reference
        scale, translate = list(reference.scale), list(reference.translate)
        shape = inputs.display_shape
        if request.z is not None:  # one slice of a volume: a one-slice layer placed at z
            translate[0] += request.z * scale[0]
            shape = (1, *shape[1:])
        layers = self.viewer.layers
        active = layers.selection.active  # kept: the user may go on painting meanwhile
        self._layer = self.viewer.add_image(
            np.zeros(shape, np.float32),
            name=ld.result_name(inputs.case, "preview (sampling…)"),
            scale=scale,
            translate=translate,
            colormap=fading_colormap("diffseg preview", PROPOSAL_RGBA[:3]),
            blending="translucent",
            contrast_limits=(0.0, 1.0),
            axis_labels=ld.axis_labels(len(shape)),
            metadata={ld.KIND: "preview", ld.CASE: inputs.case},
        )
        for kind in ("region", "scribbles", "hint"):  # the user's marks and the hint stay on top of it
            mark = self._layers.find(kind, inputs.case)
            if mark is not None:
                layers.move(layers.index(mark), len(layers))
        if active is not None:
            layers.selection.active = active

    def update(self, progress) -> None:
        """Draw a progress report's preview; a volume run follows the batch being sampled."""
        layer = self._layer
        if layer is None or layer not in self.viewer.layers:
            return
        request = self._request
        preview = progress.preview
        if request.inputs.spatial_ndim == 2:
            layer.data[...] = preview[0].T
        elif request.z is not None:
            layer.data[0] = preview[0].T
        else:
            for index, z in enumerate(progress.slices):
                layer.data[z] = preview[index].T
            if progress.batch != self._last_batch and progress.slices:
                self._last_batch = progress.batch
                go_to_slice(self.viewer, request.inputs.reference, progress.slices[len(progress.slices) // 2])
        layer.refresh()
        self.updates += 1

    def remove(self) -> None:
        layer, self._layer = self._layer, None
        self._layers.remove(layer)
