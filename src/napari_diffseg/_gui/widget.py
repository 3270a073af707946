"""The "Diffusion segmentation" dock widget: its parts laid out, and wired to each other.

Columns, top to bottom (side by side in a wide dock, see ``layout``): the input layers and the
model (``form``); the sampling settings (``form``) and the Run panel (``run``); refine with
scribbles (``refine_tools``) and the review (``review``). What each part shows of the settings
is kept in one ``settings.Settings`` (``form.SettingsForm``); the results of the cases in
``results.CaseResults``; our layers are found and drawn by ``result_layers.ResultLayers``.

A Run writes only the proposal layers (``<case> diffseg proposal`` and ``<case> diffseg
uncertainty``, optionally ``members``); Accept copies the proposal into ``<case> segmentation``;
Refine resamples the current slice with the user's scribbles held; after every result,
``<case> next mark`` outlines the slice's most uncertain region (``refine.next_mark``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QWidget

from .. import _layerdata as ld
from ..errors import DiffSegError
from ..regions import region_names
from . import models
from .form import InputPickers, ModelBox, SamplingControls, SettingsForm
from .inputs import check_inputs, slice_index
from .job import Partial, RunOutcome, RunRequest, plan_run
from .keys import ACCEPT_KEY, REFINE_KEY
from .layout import ColumnsWidget
from .preview import Preview
from .refine_tools import RefineTools
from .result_layers import ResultLayers
from .results import CaseResults, ResultState
from .review import ReviewPanel
from .run import RunController
from .settings import Settings, load_settings, save_settings
from .workers import WorkerLinks, release

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)


def _notify(message: str, severity: str = "info") -> None:
    from napari.utils.notifications import show_error, show_info, show_warning

    {"error": show_error, "warning": show_warning}.get(severity, show_info)(message)


def _on_destroyed(links: dict, viewer) -> None:
    release(links)
    for key in (ACCEPT_KEY, REFINE_KEY):
        try:
            viewer.bind_key(key, None, overwrite=True)
        except Exception:  # the viewer may be gone already
            pass


class DiffSegWidget(ColumnsWidget):
    """Dock widget: sample a diffusion ensemble for the chosen modalities, review and accept it."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        # Docked through the Plugins menu this is the viewer; through add_plugin_dock_widget (and
        # `napari -w`) napari passes a PublicOnlyProxy of it, whose layers are proxies too. The
        # code works with both: layer types are checked with isinstance, our own layers are found
        # by their metadata, and the pickers list the real layers of the viewer they sit in.
        self.viewer = napari_viewer
        self.messages: list[tuple[str, str]] = []
        self.persist_settings = True  # False: changes are not written to the settings file
        self.settings: Settings = load_settings()
        self.cases = CaseResults()
        self.layers = ResultLayers(napari_viewer)
        self.workers = WorkerLinks(self, on_close=self.shutdown)

        self.pickers = InputPickers(napari_viewer)
        self.model = ModelBox(self.notify)
        self.sampling = SamplingControls()
        self.runner = RunController(self.workers, Preview(self.layers), notify=self.notify,
                                    show_result=self._show_result, show_partial=self._show_partial,
                                    show_batching=self.sampling.show_batching, on_busy=self._set_busy)
        self.refine_tools = RefineTools(self.layers, self.cases, self.pickers.chosen_layers, self.notify, self._say)
        self.review = ReviewPanel(self, self.layers, self.cases, self.workers, self.notify)
        self.form = SettingsForm({**self.model.controls(), **self.sampling.controls(),
                                  "threshold": self.review.threshold, "cleanup": self.review.cleanup})
        self._lay_out()
        self._wire()
        self.form.show(self.settings)
        self.reset_choices()
        self.pickers.autofill()
        self._update_scope_enabled()
        self._bind_keys()
        # Deferred, so that a caller configuring the widget right away (the demo) is not warned.
        QTimer.singleShot(0, self._warn_if_no_model)
        self.destroyed.connect(lambda *_, links=self.workers.links, v=self.viewer: _on_destroyed(links, v))

    def _lay_out(self) -> None:
        inputs_column, run_column, review_column = range(3)
        self.add_group(inputs_column, "Input layers", self.pickers.box.native)
        self.add_group(inputs_column, "Model", self.model.box.native)
        self.add_group(run_column, "Sampling", self.sampling.box.native)
        self.columns[run_column].addWidget(self.runner.box.native)
        self.add_group(review_column, "Refine with scribbles", self.refine_tools.box.native)
        self.add_group(review_column, "Review", self.review.box.native, self.review.ranking)
        self.finish_columns()

    def _wire(self) -> None:
        self.runner.run_button.changed.connect(self.run)
        self.refine_tools.refine_button.changed.connect(self.refine)
        self.sampling.batching_button.changed.connect(self.runner.reset_batching)
        self.pickers.layer_pickers["t1"].changed.connect(self._update_scope_enabled)
        self.form.on_change(self._save_settings)

    def _bind_keys(self) -> None:
        ref = weakref.ref(self)  # the viewer's keymap must not keep a closed widget alive

        def accept_key(_viewer):
            widget = ref()
            if widget is not None:
                widget.accept()

        def refine_key(_viewer):
            widget = ref()
            if widget is not None:
                widget.refine()

        accept_key.__doc__ = "napari-diffseg: accept the proposal into the segmentation layer"
        refine_key.__doc__ = "napari-diffseg: refine the current slice with the scribbles"
        self.viewer.bind_key(ACCEPT_KEY, accept_key, overwrite=True)
        self.viewer.bind_key(REFINE_KEY, refine_key, overwrite=True)

    # -- settings -----------------------------------------------------------------------------

    def configure(self, persist: bool = True, **values) -> None:
        """Set controls by ``Settings`` field name; with persist=False the settings file is left alone."""
        self.settings = self.current_settings().updated(**values)
        self.form.show(self.settings)
        self.model.update_status()
        if persist and self.persist_settings:
            save_settings(self.settings)

    def current_settings(self) -> Settings:
        return self.form.read()

    def _save_settings(self) -> None:
        self.settings = self.current_settings()
        if self.persist_settings:
            save_settings(self.settings)

    # -- layers and messages ------------------------------------------------------------------

    def reset_choices(self, event=None) -> None:
        """Re-list the layers in the pickers (napari calls this on every layer-list change of the
        viewer the widget is docked in); a new layer may fill an empty picker by its name."""
        try:
            self.pickers.box.reset_choices()
            if getattr(event, "type", "") == "inserted":
                self.pickers.autofill()
            self._update_scope_enabled()
        except RuntimeError:  # the widget is being deleted
            pass

    def _update_scope_enabled(self, *_) -> None:
        t1 = self.pickers.layer_pickers["t1"].value
        self.sampling.scope.enabled = t1 is None or getattr(t1, "ndim", 3) >= 3

    def _warn_if_no_model(self) -> None:
        try:
            self.model.update_status(warn=True)
        except RuntimeError:  # deleted before the event loop ran
            pass

    def notify(self, message: str, severity: str = "info") -> None:
        self.messages.append((severity, message))
        self._say(message)
        _notify(message, severity)

    def _say(self, text: str) -> None:
        self.runner.status.value = text

    # -- the actions (buttons and keys) -------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.runner.running

    @property
    def closed(self) -> bool:
        return self.workers.closed

    def build_request(self, current_slice: bool = False) -> RunRequest:
        """The request of a Run from the chosen layers and the form (DiffSegError for bad inputs)."""
        inputs = check_inputs(self.pickers.chosen_layers(), self.pickers.truth_picker.value)
        settings = self.current_settings()
        z = None
        if inputs.spatial_ndim == 3 and (current_slice or settings.scope == "slice"):
            reference = inputs.reference
            z = slice_index(self.viewer.dims.point, reference.scale, reference.translate, inputs.display_shape[0])
        return plan_run(inputs, settings, z)

    def run(self, *_) -> None:
        """Check the inputs and start sampling in a worker thread (no-op while one runs)."""
        self._launch(self.build_request)

    def refine(self, *_) -> None:
        """Resample the current slice with the scribbles (and the accepted segmentation outside
        the region) as known pixels; the proposal and uncertainty update as after a Run."""
        self._launch(lambda: self.refine_tools.request(self.build_request(current_slice=True)))

    def _launch(self, build: Callable[[], RunRequest | None]) -> None:
        if self.running:
            return
        try:
            request = build()
        except DiffSegError as exc:
            self.notify(str(exc), "error")
            return
        if request is None:
            return
        if not request.settings.model_path and not models.demo_model_available(request.settings.bundled_model):
            self.notify("no model: the bundled demo model is not installed; choose a checkpoint file (.pt) "
                        "in the 'checkpoint' field", "error")
            return
        for warning in request.inputs.warnings:
            self.notify(warning, "warning")
        self._save_settings()
        self.runner.start(request)

    def accept(self, *_) -> None:
        self.review.accept()

    def cancel(self, *_) -> None:
        self.runner.cancel()

    def _set_busy(self, running: bool) -> None:
        self.refine_tools.refine_button.enabled = not running
        self.sampling.batching_button.enabled = not running

    def shutdown(self) -> None:
        """Stop the running sampling and metrics and cut their signals: the viewer (or this widget)
        is going away. The threads end at their next step; nothing reaches the layers any more."""
        self.workers.release()
        self.runner.stop()
        self.review.stop()

    # -- a run's result on screen -------------------------------------------------------------

    def _show_result(self, request: RunRequest, outcome: RunOutcome) -> None:
        inputs = request.inputs
        state = self.cases.state_for(inputs.case, inputs.display_shape, float(self.review.threshold.value),
                                     whole=outcome.z is None, regions=region_names(outcome.segmentation.regions))
        state.merge(outcome)
        state.stored_cleanup = outcome.cleanup_voxels
        state.cleanup_voxels = outcome.cleanup_voxels if self.review.cleanup.value else 0
        # The job's figures cover what it sampled at its own threshold (cleaned up or not): they
        # are the result on screen only for a whole run shown that way.
        same = (outcome.z is None and state.thresholded_at(outcome.segmentation.threshold)
                and outcome.cleaned == state.cleans_up)
        self._present(request, state, keep_members=request.keep_members, metrics=outcome.metrics if same else None)

    def _show_partial(self, request: RunRequest, partial: Partial) -> None:
        inputs = request.inputs
        state = self.cases.state_for(inputs.case, inputs.display_shape, float(self.review.threshold.value),
                                     whole=False, regions=partial.regions)
        state.merge_partial(partial)
        self._present(request, state, keep_members=False, metrics=None)

    def _present(self, request: RunRequest, state: ResultState, keep_members: bool, metrics: dict | None) -> None:
        inputs = request.inputs
        active = self.viewer.layers.selection.active
        case = self.cases.show(inputs, state)
        truth_layer = self.pickers.truth_picker.value
        if inputs.truth is not None and truth_layer is not None and not truth_layer.contour:
            # Outlined, so that the filled proposal drawn with it can be told apart.
            truth_layer.contour = 1
            truth_layer.opacity = max(truth_layer.opacity, 0.9)
        self.layers.show(state, inputs.reference, keep_members=keep_members)
        self.review.segmentation_layer(case)
        self.layers.show_hints(state, inputs.reference)
        if active is not None and active in self.viewer.layers and (active.metadata or {}).get(ld.KIND) in (
                "scribbles", "region"):
            self.viewer.layers.selection.active = active  # the user goes on marking where they were
        self.review.show(case, metrics)
