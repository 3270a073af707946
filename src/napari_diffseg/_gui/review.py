"""The "Review" group: Accept, the probability threshold, the ensemble members, Dice/HD95
against the ground truth, and the slices ranked by uncertainty.

Accept copies the proposal of the current slice (all sampled slices after a whole-volume run)
into ``<case> segmentation``, the user's editable Labels layer, as one step of napari's undo;
voxels the user painted there are left alone (``results.HandEdits``; an undone stroke is no
longer the user's). Runs and the threshold never write there.
"""

from __future__ import annotations

from collections.abc import Callable

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    Label,
    PushButton,
)
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QListWidget, QListWidgetItem

from .. import _layerdata as ld
from . import tooltips
from .figures import evaluate_result, format_metrics
from .inputs import go_to_slice, slice_index
from .keys import ACCEPT_KEY
from .result_layers import ResultLayers
from .results import CaseResult, CaseResults, HandEdits, ResultState
from .style import brats_legend
from .workers import WorkerLinks

METRICS_DELAY_MS = 250  # a threshold dragged across the slider is evaluated once it rests
REGION_CHOICES = [("WT: whole tumour", "wt"), ("TC: tumour core", "tc"), ("ET: enhancing tumour", "et")]


class ReviewPanel:
    def __init__(self, parent, layers: ResultLayers, cases: CaseResults, workers: WorkerLinks,
                 notify: Callable[[str, str], None]):
        self._layers, self._cases, self._workers, self._notify = layers, cases, workers, notify
        self.metrics: dict | None = None  # the figures on show, None while they are computed
        self.metrics_worker = None
        self._generation = 0  # of the figures: one on its way for an older result or threshold is dropped
        self._accepting = False

        self.accept_button = PushButton(text=f"Accept proposal ({ACCEPT_KEY})", tooltip=tooltips.ACCEPT)
        self.threshold = FloatSlider(min=0.01, max=0.99, step=0.01, value=0.5, label="threshold",
                                     tooltip=tooltips.THRESHOLD)
        self.cleanup = CheckBox(text="3D clean-up", tooltip=tooltips.CLEANUP)
        # A region model's: whose uncertainty is shown and whose threshold the slider sets.
        self.region = ComboBox(choices=REGION_CHOICES, label="region", tooltip=tooltips.REGION)
        self.legend = Label(value=brats_legend())
        self.legend.native.setWordWrap(True)
        self.member = ComboBox(choices=[("mean", 0)], label="ensemble member", tooltip=tooltips.MEMBER)
        self.metrics_label = Label(value="")
        self.metrics_label.native.setWordWrap(True)
        self.metrics_label.native.setMinimumHeight(2 * self.metrics_label.native.fontMetrics().lineSpacing())
        self.ranking_label = Label(value="most uncertain slices")
        self.box = Container(widgets=[self.accept_button, self.region, self.legend, self.threshold, self.cleanup,
                                      self.member, self.metrics_label,
                                      self.ranking_label])
        self.ranking = QListWidget()
        self.ranking.setToolTip(tooltips.RANKING)
        self.ranking.setMaximumHeight(140)
        self.timer = QTimer(parent)
        self.timer.setSingleShot(True)
        self.timer.setInterval(METRICS_DELAY_MS)

        self.accept_button.changed.connect(self.accept)
        self.threshold.changed.connect(self._on_threshold)
        self.cleanup.changed.connect(self._on_cleanup)
        self.region.changed.connect(self._on_region)
        self.member.changed.connect(self._on_member)
        self.ranking.itemClicked.connect(self.on_ranking_clicked)
        self.ranking.currentItemChanged.connect(lambda item, _prev: self.on_ranking_clicked(item))
        self.timer.timeout.connect(self.recompute_metrics)
        self.set_enabled(None)

    @property
    def viewer(self):
        return self._layers.viewer

    def set_enabled(self, volume: bool | None) -> None:
        """None: no result yet, the review tools are disabled; the ranking is for volumes only."""
        for widget in (self.accept_button, self.threshold, self.member, self.metrics_label):
            widget.enabled = volume is not None
        self._show_cleanup(None if volume is None else self._cases.current)
        self._show_region(None if volume is None else self._cases.current)
        self.ranking.setVisible(bool(volume))
        self.ranking_label.visible = bool(volume)

    def show(self, case: CaseResult, metrics: dict | None) -> None:
        """Review a result just shown; ``metrics``: its figures when the job's are of it."""
        state = case.result
        self.set_enabled(state.is_volume)
        shown = state.num_ensemble if self._layers.find("members", state.case) is not None else 0
        with self.member.changed.blocked():
            self.member.choices = [("mean", 0)] + [(f"member {i}", i) for i in range(1, shown + 1)]
            self.member.value = 0
        self._fill_ranking(state)
        self._generation += 1  # a figure still on its way belongs to the result replaced
        if case.truth is None:
            self.metrics = None
            self.metrics_label.value = "choose a ground truth layer to see Dice and HD95"
        elif metrics is not None:
            self.metrics = metrics
            self.metrics_label.value = format_metrics(metrics, None if state.multi_region else state.threshold)
        else:
            self.recompute_metrics()

    def stop(self) -> None:
        """The widget is going away (its workers are released): no figure is awaited any more."""
        self.metrics_worker = None
        self.timer.stop()

    # -- accept -------------------------------------------------------------------------------

    def segmentation_layer(self, case: CaseResult):
        """The case's segmentation layer; when made just now, the user's strokes in it are
        recorded from then on."""
        layer, made = self._layers.segmentation(case.result, case.reference)
        if made:
            case.edits = HandEdits(layer.data)
            layer.events.paint.connect(lambda event, name=case.name: self._on_painted(name, event))
        return layer

    def _on_painted(self, name: str, event) -> None:
        case = self._cases.get(name)
        if case is None or case.edits is None or self._accepting:
            return
        case.edits.mark(getattr(event, "value", None))

    def accept(self, *_) -> None:
        """Copy the proposal into the segmentation layer: the current slice after a slice run,
        every sampled slice after a volume run. Voxels painted by hand there are kept."""
        case = self._cases.current
        if case is None:
            self._notify("nothing to accept yet: press Run first", "warning")
            return
        state, reference = case.result, case.reference
        layer = self.segmentation_layer(case)
        if case.edits is None or case.edits.written.shape != layer.data.shape:
            case.edits = HandEdits(layer.data)
        proposal = ld.to_display(state.mask()).astype(layer.data.dtype)
        if not state.is_volume:
            zs, where = None, "the slice"
        elif state.last_z is None:
            zs = state.slices
            where = f"{len(zs)} sampled slices"
        else:
            z = slice_index(self.viewer.dims.point, reference.scale, reference.translate, layer.data.shape[0])
            if z not in state.slices:
                self._notify(f"slice {z} has no proposal yet: run it first (or go to a sampled slice)", "warning")
                return
            zs, where = [z], f"slice {z}"
        indices, values, kept = case.edits.commit(layer.data, proposal, zs)
        self._accepting = True
        try:
            layer.data_setitem(indices, values)  # one step of napari's undo (Ctrl-Z in the layer)
        finally:
            self._accepting = False
        kept_text = f"; {kept} voxels you painted were kept" if kept else ""
        self._notify(f"accepted the proposal of {where} into '{layer.name}'{kept_text}")
        self.viewer.layers.selection.active = layer

    # -- threshold, members, ranking ----------------------------------------------------------

    def _show_cleanup(self, case: CaseResult | None) -> None:
        """The clean-up box: what it would do to the result on screen, enabled where it acts."""
        state = None if case is None else case.result
        size = 0 if state is None else state.stored_cleanup
        acts = state is not None and size > 0 and state.is_volume and state.whole_volume
        # short labels: a long one widened the dock past napari's side area (the widget then scrolled)
        if size <= 0:
            self.cleanup.text = "3D clean-up (model stores no size)"
        else:
            self.cleanup.text = f"3D clean-up: < {size:,} voxels" if acts else "3D clean-up (volumes only)"
        self.cleanup.tooltip = tooltips.CLEANUP + (f"; this model's size: {size:,} voxels" if size > 0 else "")
        self.cleanup.enabled = acts

    def _show_region(self, case: CaseResult | None) -> None:
        """The region selector and the legend: shown for a region model's result only, at the
        region on show, with the slider at that region's threshold."""
        multi = case is not None and case.result.multi_region
        self.region.visible = self.legend.visible = multi
        if multi:
            state = case.result
            with self.region.changed.blocked(), self.threshold.changed.blocked():
                self.region.value = state.shown_region
                self.threshold.value = state.threshold_of(state.shown_region)

    def _on_region(self, region: str) -> None:
        case = self._cases.current
        if case is None or not case.result.multi_region:
            return
        state = case.result
        state.shown_region = region
        self._layers.show_uncertainty(state)
        with self.threshold.changed.blocked():
            self.threshold.value = state.threshold_of(region)

    def _on_cleanup(self, on: bool) -> None:
        case = self._cases.current
        if case is None:
            return
        case.result.cleanup_voxels = case.result.stored_cleanup if on else 0
        self._on_threshold(self.threshold.value)

    def _on_threshold(self, value: float) -> None:
        case = self._cases.current
        if case is None:
            return
        state = case.result
        if state.multi_region:  # the slider is the shown region's threshold
            state.region_thresholds[state.shown_region] = float(value)
        else:
            state.threshold = float(value)
        self._layers.show_proposal(state)
        if case.truth is not None:
            self._generation += 1  # a figure on its way is of the old threshold
            self.metrics = None
            self.metrics_label.value = "Dice/HD95: …"
            self.timer.start()

    def _on_member(self, value: int) -> None:
        case = self._cases.current
        layer = None if case is None else self._layers.find("members", case.name)
        if layer is None:
            return
        layer.visible = value > 0
        if value > 0 and self.viewer.dims.ndim == layer.ndim:
            self.viewer.dims.set_current_step(0, value - 1)
        if value > 0:
            self.viewer.layers.selection.active = layer

    def _fill_ranking(self, state: ResultState) -> None:
        self.ranking.blockSignals(True)
        self.ranking.clear()
        for z, value in state.ranked_slices():
            item = QListWidgetItem(f"slice {z}: mean variance {value:.4f}")
            item.setData(Qt.ItemDataRole.UserRole, z)
            self.ranking.addItem(item)
        self.ranking.blockSignals(False)

    def on_ranking_clicked(self, item) -> None:
        case = self._cases.current
        if item is not None and case is not None:
            go_to_slice(self.viewer, case.reference, int(item.data(Qt.ItemDataRole.UserRole)))

    # -- figures ------------------------------------------------------------------------------

    def recompute_metrics(self) -> None:
        """Dice and HD95 of the current proposal in a worker (HD95 can take a moment on a volume)."""
        case = self._cases.current
        if case is None or case.truth is None:
            return
        from napari.qt.threading import create_worker

        state = case.result
        slices = state.slices if state.is_volume else None
        worker = create_worker(evaluate_result, state.mask(), ld.to_core(case.truth), case.spacing, slices,
                               state.regions, _ignore_errors=True)
        self._generation += 1
        generation = self._generation
        label = self.metrics_label
        # Until the worker answers, the figures on show would be those of another result.
        self.metrics = None
        where = f"the {len(slices)} sampled slices" if slices else "the slice"
        label.value = f"Dice/HD95 of {where}: computing…"

        def show(text: str, metrics=None) -> None:
            if generation != self._generation or self._workers.closed:
                return  # a newer threshold or result has taken over
            try:
                label.value = text
            except RuntimeError:  # the widget was closed meanwhile
                return
            self.metrics = metrics

        def ended(worker=worker) -> None:
            if self.metrics_worker is worker:
                self.metrics_worker = None
            self._workers.forget(worker)

        at = None if state.multi_region else state.threshold  # a region model's thresholds are per region
        self._workers.connect(worker, returned=lambda metrics, t=at: show(format_metrics(metrics, t), metrics),
                              errored=lambda exc: show(f"Dice/HD95 failed: {exc}"), finished=ended)
        self.metrics_worker = worker
        worker.start()
