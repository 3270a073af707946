"""The "Diffusion segmentation" dock widget (napari glue; the logic lives in ``_session``).

Layout, top to bottom: input layer pickers (t1, t1ce, t2, flair, optional ground truth); the
model (bundled demo model or a checkpoint, plus a flags JSON for the reference's checkpoints);
sampling settings (ensemble size, steps, sampler, device, precision, seed, scope, keep members);
Run and Cancel with a progress bar; and the review tools (Accept, probability threshold,
ensemble member, Dice/HD95 against the ground truth, slices ranked by uncertainty). The form is
made of magicgui widgets: the layer pickers are typed as napari Image/Labels layers, so they
follow the layer list by themselves (napari calls ``reset_choices`` on layer changes).

Results: a Run writes only the proposal layers (``<case> diffseg proposal`` and
``<case> diffseg uncertainty``, optionally ``members``); Accept copies the proposal of the current
slice (all sampled slices after a whole-volume run) into ``<case> segmentation``, the user's
editable Labels layer. Runs and the threshold never write there, and Accept leaves voxels the
user painted there alone (``_session.HandEdits``; an undone stroke is no longer the user's).

Refine resamples the current slice with known pixels: the user's scribbles (``<case> scribbles``,
1 = tumour, 2 = not tumour) and, where a region is drawn in the Shapes layer
``<case> refine region``, the accepted segmentation outside that region (the proposal on a
slice with nothing accepted or painted). It starts from the
slice's members of the last run noised to half the chain (a full run when there are none) and
updates the proposal like a Run; it never writes into the segmentation either. After every
result, ``<case> next mark`` outlines the slice's most uncertain region (``_session.next_mark``).

Sampling runs in a napari ``thread_worker`` generator (``_session.run_job``): every denoising
step is yielded to the main thread, which advances the progress bars and, at most ten times a
second, redraws the preview layer. Layers are only ever touched here, on the main thread.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    Slider,
    SpinBox,
    create_widget,
)
from qtpy.QtCore import QEvent, QSize, Qt, QThreadPool, QTimer
from qtpy.QtWidgets import (
    QBoxLayout, QComboBox, QFrame, QGroupBox, QListWidget, QListWidgetItem, QScrollArea, QVBoxLayout,
    QWidget,
)

from .. import MODALITIES
from .. import _layerdata as ld
from ..refine import SCRIBBLE_BACKGROUND, SCRIBBLE_NAMES, SCRIBBLE_TUMOUR, known_pixels
from .figures import evaluate, format_metrics
from .inputs import LayerInfo, check_inputs, layer_kind, match_layers, slice_index
from .job import Partial, RunRequest, error_message, guarded_job, is_out_of_memory
from .models import MODEL_CACHE, demo_model_available
from .results import HandEdits, ResultState
from .settings import load_settings, save_settings
from ..errors import DiffSegError

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

MAX_ENSEMBLE = 20
# From this width on (a bottom or top dock, a wide floating window) the groups sit in three
# columns side by side; more than the three columns need at their narrowest.
WIDE_LAYOUT_MIN_WIDTH = 960
MAX_MEMBERS_BYTES = 1_000_000_000  # larger member stacks are not kept (the core allocates them too)
STEP_PRESETS = [  # (label, respacing); None = the checkpoint's default
    ("model default", None),
    ("10 steps", "10"),
    ("25 steps", "25"),
    ("50 steps", "50"),
    ("100 steps", "100"),
    ("250 steps", "250"),
    ("all steps (no respacing)", ""),
]
SAMPLERS = [("model default", ""), ("DDPM", "ddpm"), ("DDIM", "ddim")]
SCOPES = [("current slice", "slice"), ("whole volume", "volume")]
ACCEPT_KEY = "Shift-C"  # "commit"; free in napari's default shortcuts for every layer type
REFINE_KEY = "Shift-R"  # free too (R alone is the Shapes rectangle tool)

# Colours. napari's default label colours for the BraTS labels 1, 2, 4 are brown, light blue and
# purple; the proposal is yellow and the accepted segmentation green, so neither is mistaken for
# a ground-truth label (which is drawn as an outline besides).
PROPOSAL_RGBA = (1.0, 0.85, 0.0, 1.0)
SEGMENTATION_RGBA = (0.2, 0.95, 0.35, 1.0)
OTHER_LABEL_RGBA = (1.0, 0.3, 1.0, 1.0)  # labels other than 1 painted into the segmentation
# Scribbles: red "tumour" and blue "not tumour", unlike every other colour on the canvas (the
# inferno heatmap has no blue; the BraTS truth is an outline); other labels grey (ignored).
SCRIBBLE_RGBA = {SCRIBBLE_TUMOUR: (1.0, 0.12, 0.12, 1.0), SCRIBBLE_BACKGROUND: (0.2, 0.5, 1.0, 1.0)}
SCRIBBLE_HEX = {label: "#%02x%02x%02x" % tuple(int(255 * c) for c in rgba[:3]) for label, rgba in SCRIBBLE_RGBA.items()}
REGION_RGBA = (1.0, 0.45, 1.0, 1.0)  # magenta outline, faint fill
HINT_RGBA = (1.0, 1.0, 1.0, 1.0)  # white: stands out on the heatmap and the yellow proposal
# The variance of the mean of {0, 1} members is p(1 - p) <= 1/4: a fixed scale, comparable between runs.
UNCERTAINTY_LIMITS = (0.0, 0.25)
RESULT_KINDS = ("proposal", "uncertainty", "members", "preview", "segmentation", "scribbles", "region", "hint")


def _notify(message: str, severity: str = "info") -> None:
    from napari.utils.notifications import show_error, show_info, show_warning

    {"error": show_error, "warning": show_warning}.get(severity, show_info)(message)


def _label_colormap(rgba):
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: OTHER_LABEL_RGBA, 0: (0, 0, 0, 0), 1: rgba})


def _fading_colormap(name: str, rgb, alpha: float = 0.9):
    """One colour whose opacity grows with the value: 0 is fully transparent (anatomy shows)."""
    from napari.utils.colormaps import Colormap

    return Colormap([[*rgb, 0.0], [*rgb, alpha]], name=name)


def _uncertainty_colormap():
    """inferno's colours with an opacity ramp: certain pixels leave the anatomy visible."""
    from napari.utils.colormaps import Colormap

    colors = [[0.0, 0.0, 0.0, 0.0], [0.34, 0.06, 0.43, 0.3], [0.73, 0.21, 0.33, 0.5],
              [0.98, 0.55, 0.04, 0.65], [0.99, 1.0, 0.64, 0.8]]
    return Colormap(colors, controls=[0.0, 0.04, 0.4, 0.75, 1.0], name="diffseg uncertainty")


def _scribble_colormap():
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: (0.6, 0.6, 0.6, 1.0), 0: (0, 0, 0, 0), **SCRIBBLE_RGBA})


# Our workers that may still be running. Qt's thread pool outlives Python's objects: a worker
# still inside a step (or an HD95) when the interpreter shuts down emits into deleted signals,
# and PyQt aborts the process (issue 24: napari closed a second after Cancel). At exit they are
# stopped and waited for.
_LIVE_WORKERS: set = set()
EXIT_WAIT_S = 120  # at most this long for the step in progress at exit (a paper-config step on a CPU: seconds)


def _track(worker) -> None:
    _LIVE_WORKERS.add(worker)
    worker.finished.connect(lambda w=worker: _LIVE_WORKERS.discard(w))


@atexit.register
def _await_workers_at_exit() -> None:
    running = [worker for worker in _LIVE_WORKERS if worker.is_running]
    if not running:
        return
    log.info("napari-diffseg: waiting for %d worker(s) to finish their step before exit", len(running))
    for worker in running:
        worker.quit()
    QThreadPool.globalInstance().waitForDone(EXIT_WAIT_S * 1000)


def _release(links: dict) -> None:
    """Stop our workers and cut their signals from the widget (it, or its viewer, is going away);
    the threads end by themselves at their next step (and are waited for at exit)."""
    for worker in links.pop("workers", ()):
        worker.quit()
    for _worker, signal, slot in links.pop("slots", ()):
        try:
            signal.disconnect(slot)
        except (TypeError, RuntimeError):  # already cut, or the signals object is gone
            pass


def _on_destroyed(links: dict, viewer) -> None:
    _release(links)
    for key in (ACCEPT_KEY, REFINE_KEY):
        try:
            viewer.bind_key(key, None, overwrite=True)
        except Exception:  # the viewer may be gone already
            pass


class DiffSegWidget(QWidget):
    """Dock widget: sample a diffusion ensemble for the chosen modalities, review and accept it."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        # Docked through the Plugins menu this is the viewer; through add_plugin_dock_widget (and
        # `napari -w`) napari passes a PublicOnlyProxy of it, whose layers are proxies too. The
        # code works with both: layer types are checked with isinstance, our own layers are found
        # by their metadata, and the pickers list the real layers of the viewer they sit in.
        self.viewer = napari_viewer
        self.cache = MODEL_CACHE
        self.settings = load_settings()
        self.worker = None
        # The running workers and our slots on their signals, cut when the widget or the viewer
        # goes away (a plain dict: the destroyed signal cannot reach the widget any more).
        self._links: dict = {}
        self._watched = None  # the top-level window whose closing stops the workers
        self.closed = False
        self._request: RunRequest | None = None
        self._partial: Partial | None = None
        self._pbar = None
        self._preview_layer = None
        self._last_batch = -1
        self.results: dict[str, ResultState] = {}
        self.current_case: str | None = None
        self._result_reference = None  # the t1 layer of the shown result (scale, translate, metadata)
        self._edits: dict[str, HandEdits] = {}  # per case: the user's own voxels in the segmentation
        self._accepting = False
        self.preview_updates = 0
        self.progress_steps = 0  # progress reports of the current/last run (one per denoising step)
        self.messages: list[tuple[str, str]] = []
        self.metrics: dict | None = None
        self._metrics_worker = None
        self._truth_for_metrics: tuple = (None, ())
        self._metrics_generation = 0
        self._loading_settings = True
        self.persist_settings = True  # False: changes are not written to the settings file

        self._build()
        self._apply_settings()
        self._loading_settings = False
        self.reset_choices()
        self.autofill()
        self._bind_keys()
        # Deferred, so that a caller configuring the widget right away (the demo) is not warned.
        QTimer.singleShot(0, self._warn_if_no_model)
        self.destroyed.connect(lambda *_, links=self._links, v=self.viewer: _on_destroyed(links, v))

    # -----------------------------------------------------------------------------------------
    # Building the interface
    # -----------------------------------------------------------------------------------------

    def _build(self) -> None:
        from napari.layers import Image, Labels

        from ..inference import available_devices, available_precisions

        # Three columns of groups: stacked in a narrow (left/right) dock, side by side in a wide
        # one (bottom/top, or a wide floating window), where a single column would leave the
        # canvas a strip (resizeEvent switches the direction).
        # The groups scroll: one column is about 1000 px tall, more than a laptop screen, and
        # without a scroll area napari would grow its window past the screen to fit it.
        self._content = QWidget()
        self._root = QBoxLayout(QBoxLayout.Direction.TopToBottom, self._content)
        self._root.setContentsMargins(4, 4, 4, 4)
        self._scroll = QScrollArea()
        self._scroll.setWidgetResizable(True)
        self._scroll.setFrameShape(QFrame.Shape.NoFrame)
        self._scroll.setWidget(self._content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self._scroll)
        self._columns = []
        for _ in range(3):
            column = QWidget()
            column_layout = QVBoxLayout(column)
            column_layout.setContentsMargins(0, 0, 0, 0)
            self._root.addWidget(column)
            self._columns.append(column_layout)
        inputs_column, run_column, review_column = self._columns
        layout = inputs_column

        self.layer_pickers = {
            m: create_widget(annotation=Image, label=m, options={
                "nullable": True, "tooltip": f"the {m} image (filled automatically from layer names)"})
            for m in MODALITIES
        }
        self.truth_picker = create_widget(annotation=Labels, label="ground truth", options={
            "nullable": True, "tooltip": "optional ground truth: Dice and HD95 of the result are shown below"})
        self.inputs = Container(widgets=[*self.layer_pickers.values(), self.truth_picker])
        layout.addWidget(self._group("Input layers", self.inputs.native))

        self.model_path = FileEdit(mode="r", filter="Checkpoints (*.pt *.pth *.ckpt)", nullable=True,
                                   label="checkpoint",
                                   tooltip="a checkpoint (.pt) of napari-diffseg or of the reference code; "
                                           "empty = the bundled demo model")
        self.model_path.line_edit.native.setPlaceholderText("bundled demo model")
        self.flags_path = FileEdit(mode="r", filter="JSON (*.json)", nullable=True, label="flags JSON",
                                   tooltip="the model flags (JSON) of a reference-code checkpoint "
                                           "(savedmodelNNNNNN.pt), e.g. {\"num_channels\": 128, ...}")
        self.flags_path.line_edit.native.setPlaceholderText("only for the reference code's checkpoints")
        self.model_status = Label(label="")
        self.model_status.native.setWordWrap(True)
        self.model_box = Container(widgets=[self.model_path, self.flags_path, self.model_status])
        layout.addWidget(self._group("Model", self.model_box.native))
        layout = run_column

        self.ensemble = Slider(min=1, max=MAX_ENSEMBLE, value=5, label="ensemble size",
                               tooltip="number of chains: their mean is the mask, their variance the uncertainty")
        self.steps = ComboBox(choices=[label for label, _ in STEP_PRESETS], label="steps",
                              tooltip="denoising steps (timestep respacing); type e.g. 75 or ddim50 for others")
        self.steps.native.setEditable(True)  # presets, or any respacing spec typed in
        self.steps.native.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.sampler = ComboBox(choices=SAMPLERS, label="sampler")
        self.device = ComboBox(choices=available_devices(), label="device")
        self.precision = ComboBox(choices=available_precisions(), label="precision",
                                  tooltip="auto: fp16 on a CUDA GPU, bf16 on a CPU that computes it natively "
                                          "(about 1.7x faster), else fp32; fp16 needs CUDA")
        self.seed = SpinBox(min=0, max=2**31 - 1, label="seed", tooltip="the same seed gives the same ensemble")
        self.scope = ComboBox(choices=SCOPES, label="scope",
                              tooltip="for a 3D volume: only the slice shown, or every slice with brain")
        self.keep_members = CheckBox(text="add the ensemble members as a layer")
        # Chains per network call: timed, stored as a hint (see batching.py); shown and re-timed here.
        self.batching_label = Label(value=self._batching_text())
        self.batching_label.native.setWordWrap(True)
        self.batching_label.native.setMinimumWidth(80)  # wraps rather than widening the column
        self.batching_button = PushButton(
            text="Re-time", tooltip="forget the stored batching choices (chains per network call): the next run "
                                    "times 1, N, 2N ... chains per call again. Worth it after a run that was slow "
                                    "while another program took the CPU")
        batching_row = Container(widgets=[self.batching_label, self.batching_button], layout="horizontal",
                                 labels=False, label="batching")
        batching_row.margins = (0, 0, 0, 0)
        self.sampling = Container(widgets=[self.ensemble, self.steps, self.sampler, self.device, self.precision,
                                           self.seed, self.scope, self.keep_members, batching_row])
        layout.addWidget(self._group("Sampling", self.sampling.native))

        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False,
                                        tooltip="stop at the next step; finished slices of a volume are kept")
        self.progress_bar = ProgressBar(min=0, max=1, value=0, label="")
        self.progress_bar.native.setFormat("step %v / %m")
        self.status = Label(value="ready")
        self.status.native.setWordWrap(True)
        # Room for a wrapped message: a crowded dock would otherwise squeeze it to one cut line.
        self.status.native.setMinimumHeight(3 * self.status.native.fontMetrics().lineSpacing())
        run_row = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        run_row.margins = (0, 0, 0, 0)
        self.run_box = Container(widgets=[run_row, self.progress_bar, self.status], labels=False)
        layout.addWidget(self.run_box.native)
        layout = review_column

        tumour, background = SCRIBBLE_HEX[SCRIBBLE_TUMOUR], SCRIBBLE_HEX[SCRIBBLE_BACKGROUND]
        self.scribble_legend = Label(value=(
            f"<span style='color:{tumour}'>&#9632;</span> 1 = {SCRIBBLE_NAMES[SCRIBBLE_TUMOUR]} &nbsp; "
            f"<span style='color:{background}'>&#9632;</span> 2 = {SCRIBBLE_NAMES[SCRIBBLE_BACKGROUND]}"))
        self.scribble_legend.native.setTextFormat(Qt.TextFormat.RichText)
        legend_tip = (f"scribble labels: 1 (red) = {SCRIBBLE_NAMES[SCRIBBLE_TUMOUR]}, "
                      f"2 (blue) = {SCRIBBLE_NAMES[SCRIBBLE_BACKGROUND]}")
        self.scribble_legend.tooltip = legend_tip
        self.scribble_button = PushButton(
            text="Scribble", tooltip=f"make or select '<case> scribbles' and paint with label 1; {legend_tip}")
        self.region_button = PushButton(
            text="Region", tooltip="make or select '<case> refine region' and draw a rectangle (or any shape): "
                                   "Refine redoes the accepted segmentation inside it and keeps it outside; "
                                   "without a region only the scribbles are fixed")
        self.refine_button = PushButton(
            text=f"Refine slice ({REFINE_KEY})",
            tooltip="resample the current slice so that the scribbles (and the accepted segmentation outside "
                    "the region) hold exactly; starts from the slice's ensemble noised to half the chain "
                    "(about half a Run), or runs the whole chain when the slice has no ensemble yet. "
                    "Changes the proposal, never the segmentation")
        marks_row = Container(widgets=[self.scribble_button, self.region_button], layout="horizontal", labels=False)
        marks_row.margins = (0, 0, 0, 0)
        self.refine_box = Container(widgets=[self.scribble_legend, marks_row, self.refine_button], labels=False)
        layout.addWidget(self._group("Refine with scribbles", self.refine_box.native))

        self.accept_button = PushButton(
            text=f"Accept proposal ({ACCEPT_KEY})",
            tooltip="copy the proposal of the current slice (every sampled slice after a whole-volume run) "
                    "into '<case> segmentation'; voxels you painted there are kept")
        self.threshold = FloatSlider(min=0.01, max=0.99, step=0.01, value=0.5, label="threshold",
                                     tooltip="proposal = ensemble mean above this; changes the proposal "
                                             "without sampling again (never the segmentation)")
        self.member = ComboBox(choices=[("mean", 0)], label="ensemble member",
                               tooltip="flip through the individual ensemble members (shown in the members layer)")
        self.metrics_label = Label(value="")
        self.metrics_label.native.setWordWrap(True)
        self.metrics_label.native.setMinimumHeight(2 * self.metrics_label.native.fontMetrics().lineSpacing())
        self.ranking_label = Label(value="most uncertain slices")
        self.review = Container(widgets=[self.accept_button, self.threshold, self.member, self.metrics_label,
                                         self.ranking_label])
        self.ranking = QListWidget()
        self.ranking.setToolTip("sampled slices, most uncertain (mean variance) first; click to go there")
        self.ranking.setMaximumHeight(140)
        review = self._group("Review", self.review.native)
        review.layout().addWidget(self.ranking)
        layout.addWidget(review)
        for column in self._columns:  # side by side, each column's groups sit at the top
            column.addStretch(1)
        self._root.addStretch(1)
        self._set_review_enabled(None)

        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.batching_button.changed.connect(self.reset_batching)
        self.scribble_button.changed.connect(self.scribble)
        self.region_button.changed.connect(self.draw_region)
        self.refine_button.changed.connect(self.refine)
        self.accept_button.changed.connect(self.accept)
        self.layer_pickers["t1"].changed.connect(self._update_scope_enabled)
        self.threshold.changed.connect(self._on_threshold)
        self.member.changed.connect(self._on_member)
        self.ranking.itemClicked.connect(self._on_ranking_clicked)
        self.ranking.currentItemChanged.connect(lambda item, _prev: self._on_ranking_clicked(item))
        for edit in (self.model_path, self.flags_path):
            edit.changed.connect(self._update_model_status)
        for control in (self.ensemble, self.sampler, self.device, self.precision, self.seed, self.scope,
                        self.keep_members, self.model_path, self.flags_path):
            control.changed.connect(self._save_settings)
        self.steps.native.currentTextChanged.connect(self._save_settings)
        self._metrics_timer = QTimer(self)
        self._metrics_timer.setSingleShot(True)
        self._metrics_timer.setInterval(250)
        self._metrics_timer.timeout.connect(self._recompute_metrics)

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().resizeEvent(event)
        wide = event.size().width() >= WIDE_LAYOUT_MIN_WIDTH
        direction = QBoxLayout.Direction.LeftToRight if wide else QBoxLayout.Direction.TopToBottom
        if self._root.direction() != direction:
            self._root.setDirection(direction)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        # Never narrower than the groups with the scroll bar beside them: a dock then scrolls up
        # and down only. napari's style sheet widens the groups once docked, so asked each time.
        hint = super().minimumSizeHint()
        width = (self._content.minimumSizeHint().width() + self._scroll.verticalScrollBar().sizeHint().width()
                 + 2 * self._scroll.frameWidth())
        return QSize(max(hint.width(), width), hint.height())

    @property
    def is_wide_layout(self) -> bool:
        return self._root.direction() == QBoxLayout.Direction.LeftToRight

    @staticmethod
    def _group(title: str, inner: QWidget) -> QGroupBox:
        box = QGroupBox(title)
        box_layout = QVBoxLayout(box)
        box_layout.setContentsMargins(2, 2, 2, 2)
        box_layout.addWidget(inner)
        return box

    def _set_review_enabled(self, volume: bool | None) -> None:
        """None: no result yet, the review tools are disabled; the ranking is for volumes only."""
        for widget in (self.accept_button, self.threshold, self.member, self.metrics_label):
            widget.enabled = volume is not None
        self.ranking.setVisible(bool(volume))
        self.ranking_label.visible = bool(volume)

    # -----------------------------------------------------------------------------------------
    # Settings
    # -----------------------------------------------------------------------------------------

    def _apply_settings(self) -> None:
        s = self.settings
        self.model_path.value = s["model_path"] or None
        self.flags_path.value = s["flags_path"] or None
        self.ensemble.value = int(np.clip(s["num_ensemble"], 1, MAX_ENSEMBLE))
        box = self.steps.native
        index = box.findText(s["steps"]) if s["steps"] else 0
        if index >= 0:
            box.setCurrentIndex(index)
        else:
            box.setEditText(s["steps"])
        self.sampler.value = s["sampler"] if s["sampler"] in [value for _, value in SAMPLERS] else ""
        if s["device"] in self.device.choices:
            self.device.value = s["device"]
        if s["precision"] in self.precision.choices:
            self.precision.value = s["precision"]
        self.seed.value = int(np.clip(s["seed"], 0, 2**31 - 1))
        self.scope.value = s["scope"] if s["scope"] in ("slice", "volume") else "slice"
        self.keep_members.value = bool(s["keep_members"])
        self.threshold.value = round(float(np.clip(s["threshold"], 0.01, 0.99)), 2)

    def configure(self, persist: bool = True, **values) -> None:
        """Set controls by settings key (model_path, num_ensemble, steps, sampler, device,
        precision, seed, scope, keep_members, threshold); with persist=False the settings file
        is left alone."""
        unknown = set(values) - set(self.settings)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        self._loading_settings = True
        try:
            self.settings = {**self.current_settings(), **values}
            self._apply_settings()
        finally:
            self._loading_settings = False
        self._update_model_status()
        if persist and self.persist_settings:
            save_settings(self.settings)

    @staticmethod
    def _path_text(edit: FileEdit) -> str:
        return edit.line_edit.value.strip()

    def current_settings(self) -> dict:
        return {
            "model_path": self._path_text(self.model_path),
            "flags_path": self._path_text(self.flags_path),
            "num_ensemble": int(self.ensemble.value),
            "steps": self.steps.native.currentText().strip(),
            "sampler": self.sampler.value,
            "device": self.device.value,
            "precision": self.precision.value,
            "seed": int(self.seed.value),
            "scope": self.scope.value,
            "keep_members": bool(self.keep_members.value),
            "threshold": round(float(self.threshold.value), 2),
        }

    def _save_settings(self, *_) -> None:
        if not self._loading_settings:
            self.settings = self.current_settings()
            if self.persist_settings:
                save_settings(self.settings)

    def respacing(self) -> str | None:
        """The respacing spec of the steps box: None = the model's default."""
        text = self.steps.native.currentText().strip()
        for label, value in STEP_PRESETS:
            if text == label:
                return value
        if text.lower().endswith("steps"):
            text = text[: -len("steps")].strip()
        return text or None

    def set_steps(self, text: str) -> None:
        """Choose a preset by its label or type a respacing spec ("75", "ddim50")."""
        self.steps.native.setCurrentText(text)

    # -----------------------------------------------------------------------------------------
    # Layers
    # -----------------------------------------------------------------------------------------

    def reset_choices(self, event=None) -> None:
        """Re-list the layers in the pickers (napari calls this on every layer-list change of the
        viewer the widget is docked in); a new layer may fill an empty picker by its name."""
        try:
            self.inputs.reset_choices()
            self._update_scope_enabled()
            if getattr(event, "type", "") == "inserted":
                self.autofill()
        except RuntimeError:  # the widget is being deleted
            pass

    def _is_ours(self, layer) -> bool:
        return (getattr(layer, "metadata", None) or {}).get(ld.KIND) in RESULT_KINDS

    def autofill(self) -> None:
        """Fill the empty pickers by layer name (t1, Brats18_x_flair, ... ground truth)."""
        candidates = [layer for layer in self.viewer.layers if not self._is_ours(layer)]
        infos = [LayerInfo(layer.name, layer_kind(layer), (layer.metadata or {}).get(ld.CASE, ""))
                 for layer in candidates]
        picked, truth = match_layers(infos)
        for key, picker in [*self.layer_pickers.items(), ("seg", self.truth_picker)]:
            suggestion = truth if key == "seg" else picked.get(key)
            if picker.value is None and suggestion:
                self._choose(picker, suggestion)
        self._update_scope_enabled()

    @staticmethod
    def _choose(picker, name: str | None) -> None:
        if name is None:
            picker.value = None
            return
        for choice in picker.choices:
            if choice is not None and choice.name == name:
                picker.value = choice
                return
        raise ValueError(f"no layer named {name!r} can be chosen for {picker.label}")

    def set_layer(self, modality: str, name: str | None) -> None:
        """Choose a layer (by name) for t1/t1ce/t2/flair or "ground truth"; None clears it."""
        picker = self.truth_picker if modality in ("seg", ld.GROUND_TRUTH) else self.layer_pickers[modality]
        picker.reset_choices()
        self._choose(picker, name)

    def chosen_layers(self) -> dict:
        return {m: picker.value for m, picker in self.layer_pickers.items()}

    def chosen_names(self) -> dict:
        """The chosen layers' names (None where empty), ground truth under "seg"."""
        pickers = [*self.layer_pickers.items(), ("seg", self.truth_picker)]
        return {key: (picker.value.name if picker.value is not None else None) for key, picker in pickers}

    def _update_scope_enabled(self, *_) -> None:
        t1 = self.layer_pickers["t1"].value
        self.scope.enabled = t1 is None or getattr(t1, "ndim", 3) >= 3

    def _our_layer(self, kind: str, case: str | None):
        """Our layer of that kind for the case (found by metadata: names may change, and a user's
        layer of the same name is never touched)."""
        for layer in self.viewer.layers:
            meta = getattr(layer, "metadata", None) or {}
            if meta.get(ld.KIND) == kind and meta.get(ld.CASE, "") == (case or ""):
                return layer
        return None

    # -----------------------------------------------------------------------------------------
    # Model
    # -----------------------------------------------------------------------------------------

    def _warn_if_no_model(self) -> None:
        try:
            self._update_model_status(warn=True)
        except RuntimeError:  # deleted before the event loop ran
            pass

    def _update_model_status(self, *_, warn: bool = False) -> None:
        path = self._path_text(self.model_path)
        if path:
            text = f"checkpoint: {path}"
            name = path.replace("\\", "/").rsplit("/", 1)[-1].lower()
            if "savedmodel" in name and not self._path_text(self.flags_path):
                text += ("\nthis looks like a checkpoint of the reference code: choose its model flags "
                         "in the 'flags JSON' field")
            self.model_status.value = text
        elif demo_model_available():
            self.model_status.value = "the bundled demo model (BraTS 2018, 2D slices)"
        else:
            text = ("no bundled demo model in this installation: choose a checkpoint file (.pt) "
                    "in the 'checkpoint' field")
            self.model_status.value = text
            if warn:
                self.notify(f"napari-diffseg: {text}", "warning")

    # -----------------------------------------------------------------------------------------
    # Running
    # -----------------------------------------------------------------------------------------

    def notify(self, message: str, severity: str = "info") -> None:
        self.messages.append((severity, message))
        self.status.value = message
        _notify(message, severity)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _build_request(self, current_slice: bool = False):
        inputs = check_inputs(self.chosen_layers(), self.truth_picker.value)
        reference = inputs.reference
        z = None
        if inputs.spatial_ndim == 3 and (current_slice or self.scope.value == "slice"):
            z = slice_index(self.viewer.dims.point, reference.scale, reference.translate, inputs.display_shape[0])
        meta = reference.metadata or {}
        if ld.VOXEL_SIZE in meta and len(meta[ld.VOXEL_SIZE]) == inputs.spatial_ndim:
            spacing = tuple(meta[ld.VOXEL_SIZE])
        else:
            spacing = tuple(float(s) for s in reversed(tuple(reference.scale)[-inputs.spatial_ndim:]))
        keep_members = bool(self.keep_members.value)
        ensemble = int(self.ensemble.value)
        voxels = int(np.prod(inputs.display_shape if z is None else inputs.display_shape[1:]))
        members_bytes = 4 * voxels * ensemble
        # The members are kept (for Refine) even when not shown, unless they would be huge.
        keep_samples = members_bytes <= MAX_MEMBERS_BYTES
        if not keep_samples:
            inputs.warnings.append(
                f"the {ensemble} ensemble members of the whole volume would take "
                f"{members_bytes / 1e9:.1f} GB: not kept this time (segment the current slice to see "
                "them; Refine then runs whole chains)"
            )
            keep_members = False
        return RunRequest(
            inputs=inputs,
            z=z,
            model_path=self._path_text(self.model_path) or None,
            flags_path=self._path_text(self.flags_path) or None,
            device=self.device.value,
            num_ensemble=ensemble,
            respacing=self.respacing(),
            sampler=self.sampler.value or None,
            seed=int(self.seed.value),
            keep_members=keep_members,
            spacing=spacing,
            precision=self.precision.value,
            keep_samples=keep_samples,
        )

    def run(self, *_) -> None:
        """Check the inputs and start sampling in a worker thread (no-op while one runs)."""
        if self.running:
            return
        try:
            request = self._build_request()
        except DiffSegError as exc:
            self.notify(str(exc), "error")
            return
        if request.model_path is None and not demo_model_available():
            self.notify("no model: the bundled demo model is not installed; choose a checkpoint file (.pt) "
                        "in the 'checkpoint' field", "error")
            return
        for warning in request.inputs.warnings:
            self.notify(warning, "warning")
        self._save_settings()
        self._start(request)

    def _start(self, request: RunRequest) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import cancelable_progress

        self._request = request
        self._partial = Partial() if request.z is None and request.inputs.spatial_ndim == 3 else None
        self.preview_updates = 0
        self.progress_steps = 0
        self._last_batch = -1
        self._make_preview_layer(request)
        self._pbar = cancelable_progress(total=0, desc="diffseg: loading the model")
        self.progress_bar.native.setRange(0, 0)  # busy until the first step
        self.status.value = "loading the model…"
        worker = create_worker(guarded_job, request, self.cache, self._partial, _ignore_errors=True)
        self._connect(worker, yielded=self._on_progress, returned=self._on_returned, errored=self._on_errored,
                      aborted=self._on_aborted, finished=self._on_finished)
        self.worker = worker
        self.run_button.enabled = False
        self.refine_button.enabled = False
        self.batching_button.enabled = False
        self.cancel_button.enabled = True
        worker.start()

    def _connect(self, worker, **slots) -> None:
        """Connect our slots to a worker's signals, remembered so that closing can cut them."""
        self._watch_window()
        _track(worker)
        for name, slot in slots.items():
            signal = getattr(worker, name)
            signal.connect(slot)
            self._links.setdefault("slots", []).append((worker, signal, slot))
        self._links.setdefault("workers", []).append(worker)

    def _forget(self, worker) -> None:
        """A worker has ended: drop its links."""
        self._links["workers"] = [w for w in self._links.get("workers", []) if w is not worker]
        self._links["slots"] = [link for link in self._links.get("slots", []) if link[0] is not worker]

    def _watch_window(self) -> None:
        """Watch the top-level window this widget sits in (napari's main window once docked):
        when it closes, the workers are stopped (see :meth:`eventFilter`)."""
        window = self.window()
        watched = self._watched() if self._watched is not None else None
        if window is self or window is watched:
            return
        if watched is not None:
            try:
                watched.removeEventFilter(self)
            except RuntimeError:  # deleted meanwhile
                pass
        window.installEventFilter(self)
        self._watched = weakref.ref(window)  # weak: the closed window must not outlive napari's hold on it

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        # A close napari did not get from the window system has no dialog that could cancel it
        # (viewer.close(), File > Close Window); the user's click on the window's X may still be
        # cancelled in a dialog, and is acted on when the window is then deleted.
        if self._watched is not None and watched is self._watched() and not self.closed and (
                (event.type() == QEvent.Type.Close and not event.spontaneous())
                or event.type() == QEvent.Type.DeferredDelete):
            self.shutdown()
        return False

    def shutdown(self) -> None:
        """Stop the running sampling and metrics and cut their signals: the viewer (or this widget)
        is going away. The threads end at their next step; nothing reaches the layers any more."""
        self.closed = True
        _release(self._links)
        self.worker = None
        self._metrics_worker = None
        self._metrics_timer.stop()
        pbar, self._pbar = self._pbar, None
        if pbar is not None:
            try:
                pbar.close()
            except Exception:  # napari's progress may be torn down already
                pass

    @staticmethod
    def _batching_text(choice: str | None = None) -> str:
        """The batching line: the last run's choice, else how the next run will choose."""
        if choice:
            return choice
        from ..batching import BATCHING_ENV, parse_batching

        try:
            fixed = parse_batching(None)
        except DiffSegError as exc:
            return str(exc)
        if fixed != "auto":
            return f"{fixed} chains per call (${BATCHING_ENV})"
        return "auto: timed at the first run, then re-checked"

    def reset_batching(self, *_) -> None:
        """Forget the stored batching choices (the file and the loaded models' memory)."""
        if self.running:
            return
        from ..batching import batching_file, forget_batching

        try:
            forget_batching()
        except DiffSegError as exc:
            self.notify(str(exc), "error")
            return
        self.cache.forget_batching()
        self.batching_label.value = self._batching_text()
        self.notify(f"batching choices forgotten ({batching_file()}): the next run times 1, N, 2N ... chains "
                    "per call again")

    def cancel(self, *_) -> None:
        """Stop at the next denoising step; the finished slices of a volume are kept."""
        if self.worker is not None:
            self.status.value = "cancelling…"
            self.worker.quit()

    def _on_progress(self, progress) -> None:
        if self.worker is None or self.worker.abort_requested:
            return
        self.progress_steps += 1
        total = progress.total * progress.batches
        done = progress.batch * progress.total + progress.step
        self.progress_bar.native.setRange(0, total)
        self.progress_bar.native.setValue(done)
        where = ""
        if progress.slices_total > 1:
            from ..inference import format_eta  # torch is loaded by now: a run is under way

            slices = f"slices {progress.slices_done + len(progress.slices)}/{progress.slices_total}"
            left = format_eta(progress.eta)
            where = f", {slices}" + (f", {left}" if left else "")
        doing = "refining" if self._request is not None and self._request.is_refine else "sampling"
        self.status.value = f"{doing}: step {progress.step}/{progress.total}{where}" + (
            f"; {progress.batching}" if progress.batching else "")
        if progress.batching and self.batching_label.value != progress.batching:
            self.batching_label.value = progress.batching
        pbar = self._pbar  # napari's progress may process events: the run can end meanwhile
        if pbar is not None:
            if pbar.total != total:
                pbar.total = total
            pbar.set_description(f"diffseg: step {progress.step}/{progress.total}{where}")
            pbar.update(done - pbar.n)
            if pbar.is_canceled:  # Cancel pressed in napari's activity panel
                self.cancel()
                return
        if progress.preview is not None and self.worker is not None:
            self._update_preview(progress)

    # -- the live preview ---------------------------------------------------------------------

    def _make_preview_layer(self, request: RunRequest) -> None:
        self._remove_preview()
        inputs = request.inputs
        reference = inputs.reference
        scale, translate = list(reference.scale), list(reference.translate)
        shape = inputs.display_shape
        if request.z is not None:  # one slice of a volume: a one-slice layer placed at z
            translate[0] += request.z * scale[0]
            shape = (1, *shape[1:])
        active = self.viewer.layers.selection.active  # kept: the user may go on painting meanwhile
        self._preview_layer = self.viewer.add_image(
            np.zeros(shape, np.float32),
            name=ld.result_name(inputs.case, "preview (sampling…)"),
            scale=scale,
            translate=translate,
            colormap=_fading_colormap("diffseg preview", PROPOSAL_RGBA[:3]),
            blending="translucent",
            contrast_limits=(0.0, 1.0),
            axis_labels=ld.axis_labels(len(shape)),
            metadata={ld.KIND: "preview", ld.CASE: inputs.case},
        )
        for kind in ("region", "scribbles", "hint"):  # the user's marks and the hint stay on top of it
            mark = self._our_layer(kind, inputs.case)
            if mark is not None:
                self.viewer.layers.move(self.viewer.layers.index(mark), len(self.viewer.layers))
        if active is not None:
            self.viewer.layers.selection.active = active

    def _update_preview(self, progress) -> None:
        layer = self._preview_layer
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
            if progress.batch != self._last_batch and progress.slices:  # follow the batch being sampled
                self._last_batch = progress.batch
                self.go_to_slice(progress.slices[len(progress.slices) // 2], request.inputs.reference)
        layer.refresh()
        self.preview_updates += 1

    def _remove_preview(self) -> None:
        layer, self._preview_layer = self._preview_layer, None
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    # -- the end of a run ---------------------------------------------------------------------

    def _on_returned(self, outcome) -> None:
        self._remove_preview()
        request = self._request
        try:
            self._show_result(request, outcome)
        except Exception as exc:  # a bug here must not leave the widget stuck
            log.exception("showing the result failed")
            self.notify(error_message(exc, request), "error")
            return
        seg = outcome.segmentation
        scope = "" if outcome.z is None else f" (slice {outcome.z})"
        if request.is_refine:
            start = ("from the kept members, " if outcome.start_step is not None
                     else "whole chains (no members kept for this slice), ")
            self.notify(
                f"diffseg: refined{scope or ' the slice'} {start}{seg.num_ensemble} chains x {seg.steps} of "
                f"{outcome.chain_steps} {seg.sampler.upper()} steps, {request.note} held, in "
                f"{outcome.seconds:.1f} s; Accept ({ACCEPT_KEY}) to take it into the segmentation"
            )
            return
        batching = ""
        if "batching" in seg.settings:
            from ..batching import describe_batching

            batching = describe_batching(seg.settings["chains_per_call"], seg.settings["batching"],
                                         seg.settings.get("batching_settled", True))
        if batching:
            self.batching_label.value = batching
        self.notify(
            f"diffseg: {seg.num_ensemble} chains x {seg.steps} {seg.sampler.upper()} steps{scope} "
            f"in {outcome.seconds:.1f} s on {outcome.device}" + (f"; {batching}" if batching else "")
        )

    def _on_errored(self, exc: BaseException) -> None:
        self._remove_preview()
        exc = getattr(exc, "original", exc)
        if is_out_of_memory(exc):
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:
                pass
        elif not isinstance(exc, DiffSegError):
            log.error("segmentation failed", exc_info=(type(exc), exc, exc.__traceback__))
        self.notify(error_message(exc, self._request), "error")

    def _on_aborted(self) -> None:
        self._remove_preview()
        partial, request = self._partial, self._request
        if request is not None and request.is_refine:
            self.notify("diffseg: refine cancelled; the proposal and the uncertainty are unchanged")
            return
        if partial is None or not partial.finished:
            self.notify("diffseg: sampling cancelled; no slice had finished, no result layers were made")
            return
        try:
            self._show_partial(request, partial)
        except Exception as exc:  # a bug here must not leave the widget stuck
            log.exception("showing the partial result failed")
            self.notify(error_message(exc, request), "error")
            return
        self.notify(f"diffseg: sampling cancelled; the {len(partial.finished)} of {partial.total} slices "
                    "that had finished are shown as a partial proposal")

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self.worker is not None:
            self._forget(self.worker)
        self.worker = None
        self.run_button.enabled = True
        self.refine_button.enabled = True
        self.batching_button.enabled = True
        self.cancel_button.enabled = False
        if self.progress_bar.native.maximum() == 0:
            self.progress_bar.native.setRange(0, 1)

    # -----------------------------------------------------------------------------------------
    # Results
    # -----------------------------------------------------------------------------------------

    def _state_for(self, request: RunRequest, whole: bool) -> ResultState:
        """The case's result state, fresh when the input changed shape (or a run covers it all)."""
        inputs = request.inputs
        core_shape = tuple(reversed(inputs.display_shape))
        state = self.results.get(inputs.case)
        if state is None or state.spatial_shape != core_shape or whole:
            state = ResultState.empty(inputs.case, core_shape, float(self.threshold.value))
        state.threshold = float(self.threshold.value)
        return state

    def _show_result(self, request: RunRequest, outcome) -> None:
        state = self._state_for(request, whole=outcome.z is None)
        state.merge(outcome)
        # The job's figures cover what it sampled at its own threshold: they are the result on
        # screen only for a whole run shown at that threshold.
        same = outcome.z is None and abs(state.threshold - outcome.segmentation.threshold) < 1e-6
        self._present(request, state, keep_members=request.keep_members, metrics=outcome.metrics if same else None)

    def _show_partial(self, request: RunRequest, partial: Partial) -> None:
        state = self._state_for(request, whole=False)
        state.merge_partial(partial)
        self._present(request, state, keep_members=False, metrics=None)

    def _present(self, request: RunRequest, state: ResultState, keep_members: bool, metrics) -> None:
        inputs = request.inputs
        active = self.viewer.layers.selection.active
        self.results[inputs.case] = state
        self.current_case = inputs.case
        self._result_reference = inputs.reference
        self._truth_for_metrics = (inputs.truth, request.spacing)
        truth_layer = self.truth_picker.value
        if inputs.truth is not None and truth_layer is not None and not truth_layer.contour:
            # Outlined, so that the filled proposal drawn with it can be told apart.
            truth_layer.contour = 1
            truth_layer.opacity = max(truth_layer.opacity, 0.9)
        self._update_result_layers(state, inputs.reference, keep_members=keep_members)
        self._ensure_segmentation_layer(state, inputs.reference)
        self._update_hint_layer(state, inputs.reference)
        if active is not None and active in self.viewer.layers and (active.metadata or {}).get(ld.KIND) in (
                "scribbles", "region"):
            self.viewer.layers.selection.active = active  # the user goes on marking where they were
        self._set_review_enabled(state.is_volume)
        shown = state.num_ensemble if self._our_layer("members", state.case) is not None else 0
        with self.member.changed.blocked():
            self.member.choices = [("mean", 0)] + [(f"member {i}", i) for i in range(1, shown + 1)]
            self.member.value = 0
        self._fill_ranking(state)
        self._metrics_generation += 1  # a figure still on its way belongs to the result replaced
        if inputs.truth is not None:
            if metrics is not None:
                self.metrics = metrics
                self.metrics_label.value = format_metrics(metrics, state.threshold)
            else:
                self._recompute_metrics()
        else:
            self.metrics = None
            self.metrics_label.value = "choose a ground truth layer to see Dice and HD95"

    def _put_layer(self, kind: str, name: str, layer_type: str, data: np.ndarray, reference, leading: int = 0,
                   z: int | None = None, **style) -> object:
        """Create or update our result layer of that kind (data, geometry, name; style on creation)."""
        scale = (1.0,) * leading + tuple(reference.scale)
        translate = [0.0] * leading + list(reference.translate)
        metadata = ld.derived_metadata(reference.metadata, kind, self.current_case)
        if z is not None:  # a one-slice stack of a volume: move it to slice z, and its affine too
            translate[leading] += z * scale[leading]
            if ld.has_geometry(metadata):
                shift = np.eye(4)
                shift[2, 3] = z
                metadata[ld.AFFINE] = metadata[ld.AFFINE] @ shift
                metadata[ld.SPATIAL_SHAPE] = (*metadata[ld.SPATIAL_SHAPE][:2], 1)
        if leading:
            metadata["leading_axes"] = leading
        style.setdefault("axis_labels", ld.axis_labels(len(reference.scale), leading))
        layer = self._our_layer(kind, self.current_case)
        if layer is not None and layer.data.shape == data.shape and layer.ndim == data.ndim:
            layer.data = data
            layer.scale = scale
            layer.translate = translate
            layer.metadata = metadata
            layer.name = name
            return layer
        if layer is not None:
            self.viewer.layers.remove(layer)
        add = self.viewer.add_labels if layer_type == "labels" else self.viewer.add_image
        return add(data, name=name, scale=scale, translate=translate, metadata=metadata, **style)

    def _proposal_name(self, state: ResultState) -> str:
        if state.partial is not None:
            done, total = state.partial
            return ld.result_name(state.case, f"proposal (partial: {done}/{total} slices)")
        return ld.result_name(state.case, "proposal")

    def _update_result_layers(self, state: ResultState, reference, keep_members: bool = True) -> None:
        case = state.case
        # The heatmap first, so that the proposal is drawn over it.
        variance = np.ascontiguousarray(ld.to_display(state.variance))
        uncertainty = self._put_layer("uncertainty", ld.result_name(case, "uncertainty"), "image", variance,
                                      reference, colormap=_uncertainty_colormap(), blending="translucent",
                                      contrast_limits=UNCERTAINTY_LIMITS)
        uncertainty.colorbar.visible = True  # its legend: 0 .. 0.25 (ensemble variance)
        mask = np.ascontiguousarray(ld.to_display(state.mask()))
        self._put_layer("proposal", self._proposal_name(state), "labels", mask, reference, opacity=0.6,
                        colormap=_label_colormap(PROPOSAL_RGBA))
        spatial_ndim = len(state.spatial_shape)
        if state.members is not None and keep_members:
            members = np.ascontiguousarray(ld.to_display(state.members, spatial_ndim))
            axes = ("member", "z", "y", "x")[-(spatial_ndim + 1):] if spatial_ndim == 3 else ("member", "y", "x")
            self._put_layer("members", ld.result_name(case, "members"), "image", members, reference, leading=1,
                            z=state.members_z, colormap=_fading_colormap("diffseg members", PROPOSAL_RGBA[:3]),
                            blending="translucent", contrast_limits=(0.0, 1.0), visible=False, axis_labels=axes)
        else:
            old = self._our_layer("members", case)
            if old is not None:
                self.viewer.layers.remove(old)

    # -- the user's segmentation ----------------------------------------------------------------

    def _ensure_segmentation_layer(self, state: ResultState, reference):
        """``<case> segmentation``: made (empty) with the case's first result, then only Accept and
        the user change it."""
        shape = tuple(reversed(state.spatial_shape))
        layer = self._our_layer("segmentation", state.case)
        if layer is not None and tuple(layer.data.shape) == shape:
            return layer
        metadata = ld.derived_metadata(reference.metadata, "segmentation", state.case)
        layer = self.viewer.add_labels(np.zeros(shape, np.uint8), name=ld.segmentation_name(state.case),
                                       scale=tuple(reference.scale), translate=tuple(reference.translate),
                                       axis_labels=ld.axis_labels(len(shape)), metadata=metadata, opacity=0.7,
                                       colormap=_label_colormap(SEGMENTATION_RGBA))
        self._edits[state.case] = HandEdits(layer.data)
        layer.events.paint.connect(lambda event, case=state.case: self._on_painted(case, event))
        return layer

    def _on_painted(self, case: str, event) -> None:
        edits = self._edits.get(case)
        if edits is None or self._accepting:
            return
        edits.mark(getattr(event, "value", None))

    def accept(self, *_) -> None:
        """Copy the proposal into the segmentation layer: the current slice after a slice run,
        every sampled slice after a volume run. Voxels painted by hand there are kept."""
        state = self.results.get(self.current_case or "")
        if state is None:
            self.notify("nothing to accept yet: press Run first", "warning")
            return
        reference = self._result_reference
        layer = self._ensure_segmentation_layer(state, reference)
        edits = self._edits.get(state.case)
        if edits is None or edits.written.shape != layer.data.shape:
            edits = self._edits[state.case] = HandEdits(layer.data)
        proposal = ld.to_display(state.mask()).astype(layer.data.dtype)
        if not state.is_volume:
            zs, where = None, "the slice"
        elif state.last_z is None:
            zs = state.slices
            where = f"{len(zs)} sampled slices"
        else:
            z = slice_index(self.viewer.dims.point, reference.scale, reference.translate, layer.data.shape[0])
            if z not in state.slices:
                self.notify(f"slice {z} has no proposal yet: run it first (or go to a sampled slice)", "warning")
                return
            zs, where = [z], f"slice {z}"
        indices, values, kept = edits.commit(layer.data, proposal, zs)
        self._accepting = True
        try:
            layer.data_setitem(indices, values)  # one step of napari's undo (Ctrl-Z in the layer)
        finally:
            self._accepting = False
        kept_text = f"; {kept} voxels you painted were kept" if kept else ""
        self.notify(f"accepted the proposal of {where} into '{layer.name}'{kept_text}")
        self.viewer.layers.selection.active = layer

    def _bind_keys(self) -> None:
        ref = weakref.ref(self)

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

    # -- refine ---------------------------------------------------------------------------------

    def _checked_inputs(self):
        """The chosen inputs, or None after an error notification."""
        try:
            return check_inputs(self.chosen_layers())
        except DiffSegError as exc:
            self.notify(str(exc), "error")
            return None

    def _mark_layer_kwargs(self, inputs, kind: str) -> dict:
        """Geometry of a layer on the source grid (voxel indices = the images')."""
        reference = inputs.reference
        return {"scale": tuple(reference.scale), "translate": tuple(reference.translate),
                "axis_labels": ld.axis_labels(inputs.spatial_ndim),
                "metadata": ld.derived_metadata(reference.metadata, kind, inputs.case)}

    def _checked_mark_layer(self, kind: str, inputs):
        """Our scribbles/region layer of the case, checked against the images' grid (DiffSegError)."""
        layer = self._our_layer(kind, inputs.case)
        if layer is None:
            return None
        if kind == "scribbles":
            shape = tuple(np.shape(layer.data))
            if shape != tuple(inputs.display_shape):
                raise DiffSegError(
                    f"layer '{layer.name}' has shape {'x'.join(map(str, shape))} but the images are "
                    f"{'x'.join(map(str, inputs.display_shape))}: delete it and press Scribble for a new one"
                )
        elif layer.ndim != inputs.spatial_ndim:
            raise DiffSegError(
                f"layer '{layer.name}' is {layer.ndim}D but the images are {inputs.spatial_ndim}D: "
                "delete it and press Region for a new one"
            )
        return layer

    def _inputs_and_mark_layer(self, kind: str):
        """(inputs, the existing mark layer or None), or None after telling the user what is wrong."""
        inputs = self._checked_inputs()
        if inputs is None:
            return None
        try:
            return inputs, self._checked_mark_layer(kind, inputs)
        except DiffSegError as exc:
            self.notify(str(exc), "error")
            return None

    def scribble(self, *_) -> None:
        """Make (or select) '<case> scribbles' on the images' grid and paint with label 1 (tumour)."""
        found = self._inputs_and_mark_layer("scribbles")
        if found is None:
            return
        inputs, layer = found
        if layer is None:
            names = {0: "", **SCRIBBLE_NAMES}
            layer = self.viewer.add_labels(
                np.zeros(inputs.display_shape, np.uint8), name=ld.layer_name(inputs.case, "scribbles", True),
                opacity=0.9, colormap=_scribble_colormap(),
                # Hovering a mark shows its meaning in the status bar ("mark: tumour").
                features={"index": list(names), "mark": list(names.values())},
                **self._mark_layer_kwargs(inputs, "scribbles"))
            layer.brush_size = max(3, min(inputs.display_shape[-2:]) // 40)
        layer.visible = True
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        layer.selected_label = SCRIBBLE_TUMOUR
        self.status.value = (f"paint in '{layer.name}': label 1 = tumour, 2 = not tumour (0 erases); "
                             f"then Refine ({REFINE_KEY})")

    def draw_region(self, *_) -> None:
        """Make (or select) '<case> refine region' and switch to drawing rectangles."""
        found = self._inputs_and_mark_layer("region")
        if found is None:
            return
        inputs, layer = found
        if layer is None:
            layer = self.viewer.add_shapes(
                None, ndim=inputs.spatial_ndim, name=ld.layer_name(inputs.case, "refine region", True),
                edge_color=[REGION_RGBA], face_color=[(*REGION_RGBA[:3], 0.12)],
                edge_width=max(1.0, min(inputs.display_shape[-2:]) / 160),
                **self._mark_layer_kwargs(inputs, "region"))
            layer.current_edge_color = REGION_RGBA
            layer.current_face_color = (*REGION_RGBA[:3], 0.12)
        layer.visible = True
        self.viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"
        self.status.value = (f"draw the region to redo in '{layer.name}' (rectangle; other shapes from the layer "
                             "controls); outside it the accepted segmentation is kept")

    def _region_mask(self, layer, inputs, z: int | None) -> np.ndarray | None:
        """The region drawn on the slice (display order), or None when there is none."""
        if layer is None or layer.nshapes == 0:
            return None
        masks = np.asarray(layer.to_masks(tuple(inputs.display_shape)), bool)
        region = masks.any(axis=0)
        if z is not None:
            region = region[z]
        return region if region.any() else None

    def _outside_region(self, inputs, segmentation, z: int | None) -> tuple[np.ndarray | None, str]:
        """What a region refine holds outside the region on the slice (display order): the
        segmentation where the slice was accepted into or painted by hand, else the proposal the
        user sees (a Region drawn before any Accept must not wipe it), else nothing (background)."""
        edits = self._edits.get(inputs.case)
        if segmentation is not None and edits is not None and edits.written.shape == segmentation.data.shape \
                and edits.holds_work(segmentation.data, z):
            return np.asarray(segmentation.data if z is None else segmentation.data[z]), "accepted"
        state = self.results.get(inputs.case)
        if state is not None and state.spatial_shape == tuple(reversed(inputs.display_shape)) \
                and (z is None or z in state.slices):
            proposal = ld.to_display(state.mask())
            return np.asarray(proposal if z is None else proposal[z]), "proposal"
        return None, "accepted"

    def _build_refine_request(self) -> RunRequest | None:
        """The request of a refine of the current slice (DiffSegError for bad layers), or None
        (with a warning) when nothing is marked."""
        request = self._build_request(current_slice=True)
        inputs = request.inputs
        z = request.z
        scribbles = self._checked_mark_layer("scribbles", inputs)
        region_layer = self._checked_mark_layer("region", inputs)
        segmentation = self._our_layer("segmentation", inputs.case)
        if segmentation is not None and tuple(segmentation.data.shape) != tuple(inputs.display_shape):
            raise DiffSegError(
                f"layer '{segmentation.name}' has shape {'x'.join(map(str, segmentation.data.shape))} but the "
                f"images are {'x'.join(map(str, inputs.display_shape))}; rename or delete it, then refine again"
            )

        def on_slice(layer):
            data = np.asarray(layer.data if z is None else layer.data[z])
            return data

        marks = np.zeros(inputs.display_shape[-2:], np.uint8) if scribbles is None else on_slice(scribbles)
        region = self._region_mask(region_layer, inputs, z)
        outside, source = self._outside_region(inputs, segmentation, z) if region is not None else (None, "accepted")
        known = known_pixels(marks, outside, region, source)
        where = "this slice" if z is None else f"slice {z}"
        if known.count == 0:
            name = ld.layer_name(inputs.case, "scribbles", True)
            self.notify(f"nothing to refine {where} with: paint tumour (1) or not-tumour (2) scribbles in '{name}' "
                        "(the Scribble button), or draw a region (the Region button)", "warning")
            return None
        if known.ignored_labels:
            inputs.warnings.append(f"scribble labels {', '.join(map(str, known.ignored_labels))} mean nothing "
                                   "(1 = tumour, 2 = not tumour): ignored")
        request.known_mask = np.ascontiguousarray(ld.to_core(known.mask))
        request.known_values = np.ascontiguousarray(ld.to_core(known.values))
        request.marks = np.ascontiguousarray(ld.to_core(known.marks))
        request.note = known.summary()
        state = self.results.get(inputs.case)
        if state is not None and state.spatial_shape == tuple(reversed(inputs.display_shape)):
            members = state.members_for(z)
            if members is not None:
                request.init = np.array(members, np.float32)
                request.num_ensemble = int(members.shape[0])  # the members' count, whatever the slider says
        request.keep_samples = True  # one slice: small, and the next refine starts from them
        return request

    def refine(self, *_) -> None:
        """Resample the current slice with the scribbles (and the accepted segmentation outside
        the region) as known pixels; the proposal and uncertainty update as after a Run."""
        if self.running:
            return
        try:
            request = self._build_refine_request()
        except DiffSegError as exc:
            self.notify(str(exc), "error")
            return
        if request is None:
            return
        if request.model_path is None and not demo_model_available():
            self.notify("no model: the bundled demo model is not installed; choose a checkpoint file (.pt) "
                        "in the 'checkpoint' field", "error")
            return
        for warning in request.inputs.warnings:
            self.notify(warning, "warning")
        self._start(request)

    def _update_hint_layer(self, state: ResultState, reference) -> None:
        """'<case> next mark': a rectangle around each sampled slice's most uncertain region."""
        spatial_ndim = len(state.spatial_shape)
        rectangles = []
        for z, hint in sorted(state.hints.items()):
            corners = hint.rectangle()
            if spatial_ndim == 3:
                corners = np.column_stack([np.full(len(corners), float(z)), corners])
            rectangles.append(corners)
        layer = self._our_layer("hint", state.case)
        if layer is not None and layer.ndim != spatial_ndim:
            self.viewer.layers.remove(layer)
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

    # -- review ---------------------------------------------------------------------------------

    def _fill_ranking(self, state: ResultState) -> None:
        self.ranking.blockSignals(True)
        self.ranking.clear()
        for z, value in state.ranked_slices():
            item = QListWidgetItem(f"slice {z}: mean variance {value:.4f}")
            item.setData(Qt.ItemDataRole.UserRole, z)
            self.ranking.addItem(item)
        self.ranking.blockSignals(False)

    def go_to_slice(self, z: int, reference=None) -> None:
        """Move the viewer to core slice z (display axis 0) of the reference layer's volume."""
        reference = reference or self._result_reference
        if reference is None or reference.ndim < 3:
            return
        world = float(reference.translate[0]) + z * float(reference.scale[0])
        axis = self.viewer.dims.ndim - 3
        if axis >= 0:
            self.viewer.dims.set_point(axis, world)

    def _on_ranking_clicked(self, item) -> None:
        if item is not None:
            self.go_to_slice(int(item.data(Qt.ItemDataRole.UserRole)))

    def _on_threshold(self, value: float) -> None:
        state = self.results.get(self.current_case or "")
        if state is not None:
            state.threshold = float(value)
            layer = self._our_layer("proposal", state.case)
            if layer is not None:
                layer.data = np.ascontiguousarray(ld.to_display(state.mask()))
            if self._truth_for_metrics[0] is not None:
                self._metrics_generation += 1  # a figure on its way is of the old threshold
                self.metrics = None
                self.metrics_label.value = "Dice/HD95: …"
                self._metrics_timer.start()
        self._save_settings()

    def _recompute_metrics(self) -> None:
        """Dice and HD95 of the current proposal in a worker (HD95 can take a moment on a volume)."""
        state = self.results.get(self.current_case or "")
        truth, spacing = self._truth_for_metrics
        if state is None or truth is None:
            return
        from napari.qt.threading import create_worker

        core_truth = ld.to_core(truth)
        slices = state.slices if state.is_volume else None
        worker = create_worker(evaluate, state.mask(), core_truth, spacing, slices, _ignore_errors=True)
        self._metrics_generation += 1
        generation = self._metrics_generation
        label = self.metrics_label
        # Until the worker answers, the figures on show would be those of another result.
        self.metrics = None
        where = f"the {len(slices)} sampled slices" if slices else "the slice"
        label.value = f"Dice/HD95 of {where}: computing…"

        def show(text: str, metrics=None) -> None:
            if generation != self._metrics_generation or self.closed:
                return  # a newer threshold or result has taken over
            try:
                label.value = text
            except RuntimeError:  # the widget was closed meanwhile
                return
            self.metrics = metrics

        def ended(worker=worker) -> None:
            if self._metrics_worker is worker:
                self._metrics_worker = None
            self._forget(worker)

        self._connect(worker, returned=lambda metrics, t=state.threshold: show(format_metrics(metrics, t), metrics),
                      errored=lambda exc: show(f"Dice/HD95 failed: {exc}"), finished=ended)
        self._metrics_worker = worker
        worker.start()

    def _on_member(self, value: int) -> None:
        state = self.results.get(self.current_case or "")
        if state is None:
            return
        layer = self._our_layer("members", state.case)
        if layer is None:
            return
        layer.visible = value > 0
        if value > 0 and self.viewer.dims.ndim == layer.ndim:
            self.viewer.dims.set_current_step(0, value - 1)
        if value > 0:
            self.viewer.layers.selection.active = layer
