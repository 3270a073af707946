"""The "Diffusion segmentation" dock widget (napari glue; the logic lives in ``_session``).

Layout, top to bottom: input layer pickers (t1, t1ce, t2, flair, optional ground truth); the
model (bundled demo model or a checkpoint, plus a flags JSON for the reference's checkpoints);
sampling settings (ensemble size, steps, sampler, device, seed, scope, keep members); Run and
Cancel with a progress bar; and the review tools (probability threshold, ensemble member,
Dice/HD95 against the ground truth, slices ranked by uncertainty).

Sampling runs in a napari ``thread_worker`` generator (``_session.run_job``): every denoising
step is yielded to the main thread, which advances the progress bars and, at most ten times a
second, redraws the preview layer. Layers are only ever touched here, on the main thread.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from . import MODALITIES
from . import _layerdata as ld
from ._session import (
    MODEL_CACHE,
    LayerInfo,
    ResultState,
    RunRequest,
    check_inputs,
    demo_model_available,
    error_message,
    evaluate,
    format_metrics,
    guarded_job,
    is_out_of_memory,
    match_layers,
    slice_index,
)
from ._settings import load_settings, save_settings
from .errors import DiffSegError

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

NONE = "—"
MAX_ENSEMBLE = 20
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


def _notify(message: str, severity: str = "info") -> None:
    from napari.utils.notifications import show_error, show_info, show_warning

    {"error": show_error, "warning": show_warning}.get(severity, show_info)(message)


def _quit_worker(holder: dict, *_):
    worker = holder.get("worker")
    if worker is not None:
        worker.quit()


class DiffSegWidget(QWidget):
    """Dock widget: sample a diffusion ensemble for the chosen modalities and review it."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.cache = MODEL_CACHE
        self.settings = load_settings()
        self.worker = None
        self._worker_holder: dict = {}  # lets the destroyed signal stop a running worker
        self._request: RunRequest | None = None
        self._pbar = None
        self._preview_layer = None
        self._last_batch = -1
        self.results: dict[str, ResultState] = {}
        self.current_case: str | None = None
        self._result_reference = None  # the t1 layer of the shown result (scale, translate, metadata)
        self.preview_updates = 0
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
        self._connect_viewer()
        self.refresh_layers(autofill=True)
        # Deferred, so that a caller configuring the widget right away (the demo) is not warned.
        QTimer.singleShot(0, self._warn_if_no_model)
        self.destroyed.connect(lambda *_, holder=self._worker_holder: _quit_worker(holder))

    # -----------------------------------------------------------------------------------------
    # Building the interface
    # -----------------------------------------------------------------------------------------

    def _build(self) -> None:
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)

        inputs = QGroupBox("Input layers")
        form = QFormLayout(inputs)
        self.layer_boxes: dict[str, QComboBox] = {}
        for modality in MODALITIES:
            box = QComboBox()
            box.setToolTip(f"the {modality} image (filled automatically from layer names)")
            box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            self.layer_boxes[modality] = box
            form.addRow(modality, box)
        self.truth_box = QComboBox()
        self.truth_box.setToolTip("optional ground truth: Dice and HD95 of the result are shown below")
        self.truth_box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        form.addRow("ground truth", self.truth_box)
        layout.addWidget(inputs)

        model = QGroupBox("Model")
        form = QFormLayout(model)
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("bundled demo model")
        self.model_path.setToolTip("a checkpoint (.pt) of napari-diffseg or of the reference code; empty = demo model")
        form.addRow("checkpoint", self._with_browse(self.model_path, self._browse_model))
        self.flags_path = QLineEdit()
        self.flags_path.setPlaceholderText("only for the reference's checkpoints")
        self.flags_path.setToolTip("model flags JSON of a reference checkpoint (savedmodelNNNNNN.pt)")
        form.addRow("flags JSON", self._with_browse(self.flags_path, self._browse_flags))
        self.model_status = QLabel()
        self.model_status.setWordWrap(True)
        form.addRow(self.model_status)
        layout.addWidget(model)

        sampling = QGroupBox("Sampling")
        form = QFormLayout(sampling)
        self.ensemble = QSlider(Qt.Orientation.Horizontal)
        self.ensemble.setRange(1, MAX_ENSEMBLE)
        self.ensemble.setValue(5)
        self.ensemble.setToolTip("number of chains: their mean is the mask, their variance the uncertainty")
        self.ensemble_label = QLabel("5")
        self.ensemble_label.setMinimumWidth(24)
        row = QHBoxLayout()
        row.addWidget(self.ensemble)
        row.addWidget(self.ensemble_label)
        form.addRow("ensemble size", row)
        self.steps = QComboBox()
        self.steps.setEditable(True)
        for label, _ in STEP_PRESETS:
            self.steps.addItem(label)
        self.steps.setToolTip("denoising steps (timestep respacing); type e.g. 75 or ddim50 for others")
        form.addRow("steps", self.steps)
        self.sampler = QComboBox()
        for label, _ in SAMPLERS:
            self.sampler.addItem(label)
        form.addRow("sampler", self.sampler)
        self.device = QComboBox()
        from .inference import available_devices, available_precisions

        self.device.addItems(available_devices())
        form.addRow("device", self.device)
        self.precision = QComboBox()
        self.precision.addItems(available_precisions())
        self.precision.setToolTip("auto: fp16 on a CUDA GPU, bf16 on a CPU that computes it natively (about "
                                  "1.7x faster), else fp32; fp16 needs CUDA")
        form.addRow("precision", self.precision)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setToolTip("the same seed gives the same ensemble")
        form.addRow("seed", self.seed)
        self.scope = QComboBox()
        for label, _ in SCOPES:
            self.scope.addItem(label)
        self.scope.setToolTip("for a 3D volume: only the slice shown, or every slice with brain")
        form.addRow("scope", self.scope)
        self.keep_members = QCheckBox("add the ensemble members as a layer")
        form.addRow(self.keep_members)
        layout.addWidget(sampling)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("step %v / %m")
        layout.addWidget(self.progress_bar)
        self.status = QLabel("ready")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)

        review = QGroupBox("Review")
        form = QFormLayout(review)
        self.threshold = QSlider(Qt.Orientation.Horizontal)
        self.threshold.setRange(1, 99)
        self.threshold.setValue(50)
        self.threshold.setToolTip("mask = ensemble mean above this; changes the mask without sampling again")
        self.threshold_label = QLabel("0.50")
        row = QHBoxLayout()
        row.addWidget(self.threshold)
        row.addWidget(self.threshold_label)
        form.addRow("threshold", row)
        self.member = QSpinBox()
        self.member.setRange(0, 0)
        self.member.setSpecialValueText("mean")
        self.member.setToolTip("flip through the individual ensemble members (shown in the members layer)")
        form.addRow("ensemble member", self.member)
        self.metrics_label = QLabel("")
        self.metrics_label.setWordWrap(True)
        form.addRow(self.metrics_label)
        self.ranking = QListWidget()
        self.ranking.setToolTip("sampled slices, most uncertain (mean variance) first; click to go there")
        self.ranking.setMaximumHeight(140)
        self.ranking_label = QLabel("most uncertain slices")
        form.addRow(self.ranking_label)
        form.addRow(self.ranking)
        layout.addWidget(review)
        layout.addStretch(1)
        self._set_review_visible(False)

        self.ensemble.valueChanged.connect(lambda v: self.ensemble_label.setText(str(v)))
        self.layer_boxes["t1"].currentTextChanged.connect(self._update_scope_enabled)
        self.threshold.valueChanged.connect(self._on_threshold)
        self.member.valueChanged.connect(self._on_member)
        self.ranking.itemClicked.connect(self._on_ranking_clicked)
        self.ranking.currentItemChanged.connect(lambda item, _prev: self._on_ranking_clicked(item))
        self.model_path.editingFinished.connect(self._update_model_status)
        self.flags_path.editingFinished.connect(self._update_model_status)
        for signal in (self.ensemble.valueChanged, self.steps.currentTextChanged, self.sampler.currentIndexChanged,
                       self.device.currentIndexChanged, self.precision.currentIndexChanged, self.seed.valueChanged,
                       self.scope.currentIndexChanged, self.keep_members.toggled, self.model_path.editingFinished, self.flags_path.editingFinished):
            signal.connect(self._save_settings)
        self._metrics_timer = QTimer(self)
        self._metrics_timer.setSingleShot(True)
        self._metrics_timer.setInterval(250)
        self._metrics_timer.timeout.connect(self._recompute_metrics)

    def _with_browse(self, edit: QLineEdit, handler) -> QWidget:
        holder = QWidget()
        row = QHBoxLayout(holder)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(edit)
        button = QToolButton()
        button.setText("…")
        button.clicked.connect(handler)
        row.addWidget(button)
        return holder

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a checkpoint", self.model_path.text(),
                                              "Checkpoints (*.pt *.pth *.ckpt);;All files (*)")
        if path:
            self.model_path.setText(path)
            self._update_model_status()
            self._save_settings()

    def _browse_flags(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose the model flags", self.flags_path.text(),
                                              "JSON (*.json);;All files (*)")
        if path:
            self.flags_path.setText(path)
            self._update_model_status()
            self._save_settings()

    def _set_review_visible(self, volume: bool | None) -> None:
        """None hides the review tools (no result yet); the ranking is for volumes only."""
        for widget in (self.threshold, self.threshold_label, self.member, self.metrics_label):
            widget.setEnabled(volume is not None)
        self.ranking.setVisible(bool(volume))
        self.ranking_label.setVisible(bool(volume))

    # -----------------------------------------------------------------------------------------
    # Settings
    # -----------------------------------------------------------------------------------------

    def _apply_settings(self) -> None:
        s = self.settings
        self.model_path.setText(s["model_path"])
        self.flags_path.setText(s["flags_path"])
        self.ensemble.setValue(int(np.clip(s["num_ensemble"], 1, MAX_ENSEMBLE)))
        index = self.steps.findText(s["steps"]) if s["steps"] else 0
        if index >= 0:
            self.steps.setCurrentIndex(index)
        else:
            self.steps.setEditText(s["steps"])
        self.sampler.setCurrentIndex(next((i for i, (_, v) in enumerate(SAMPLERS) if v == s["sampler"]), 0))
        device = self.device.findText(s["device"])
        self.device.setCurrentIndex(max(0, device))
        self.precision.setCurrentIndex(max(0, self.precision.findText(s["precision"])))
        self.seed.setValue(int(s["seed"]))
        self.scope.setCurrentIndex(next((i for i, (_, v) in enumerate(SCOPES) if v == s["scope"]), 0))
        self.keep_members.setChecked(bool(s["keep_members"]))
        self.threshold.setValue(int(round(np.clip(s["threshold"], 0.01, 0.99) * 100)))

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

    def current_settings(self) -> dict:
        return {
            "model_path": self.model_path.text().strip(),
            "flags_path": self.flags_path.text().strip(),
            "num_ensemble": self.ensemble.value(),
            "steps": self.steps.currentText().strip(),
            "sampler": SAMPLERS[self.sampler.currentIndex()][1],
            "device": self.device.currentText(),
            "precision": self.precision.currentText(),
            "seed": self.seed.value(),
            "scope": SCOPES[self.scope.currentIndex()][1],
            "keep_members": self.keep_members.isChecked(),
            "threshold": self.threshold.value() / 100,
        }

    def _save_settings(self, *_) -> None:
        if not self._loading_settings:
            self.settings = self.current_settings()
            if self.persist_settings:
                save_settings(self.settings)

    def respacing(self) -> str | None:
        """The respacing spec of the steps box: None = the model's default."""
        text = self.steps.currentText().strip()
        for label, value in STEP_PRESETS:
            if text == label:
                return value
        if text.lower().endswith("steps"):
            text = text[: -len("steps")].strip()
        return text or None

    # -----------------------------------------------------------------------------------------
    # Layers
    # -----------------------------------------------------------------------------------------

    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        for name in ("inserted", "removed", "reordered", "renamed"):
            emitter = getattr(events, name, None)
            if emitter is not None:
                emitter.connect(self._on_layers_changed)

    def _on_layers_changed(self, event=None) -> None:
        try:
            self.refresh_layers(autofill=getattr(event, "type", "") == "inserted")
        except RuntimeError:  # the widget is being deleted
            pass

    def _layer(self, name: str):
        if not name or name == NONE:
            return None
        try:
            return self.viewer.layers[name]
        except (KeyError, ValueError):
            return None

    def refresh_layers(self, autofill: bool = False) -> None:
        """Re-list the layers in the pickers, keep the choices, fill empty pickers by name."""
        names = [layer.name for layer in self.viewer.layers]
        infos = [LayerInfo(layer.name, type(layer).__name__.lower(), (layer.metadata or {}).get(ld.CASE, ""))
                 for layer in self.viewer.layers]
        picked, truth = match_layers(infos) if autofill else ({}, None)
        boxes = [(m, self.layer_boxes[m]) for m in MODALITIES] + [("seg", self.truth_box)]
        for key, box in boxes:
            current = box.currentText()
            box.blockSignals(True)
            box.clear()
            box.addItem(NONE)
            box.addItems(names)
            suggestion = truth if key == "seg" else picked.get(key)
            if current in names:
                box.setCurrentText(current)
            elif suggestion:
                box.setCurrentText(suggestion)
            else:
                box.setCurrentIndex(0)
            box.blockSignals(False)
        self._update_scope_enabled()

    def _update_scope_enabled(self, *_) -> None:
        t1 = self._layer(self.layer_boxes["t1"].currentText())
        self.scope.setEnabled(t1 is None or getattr(t1, "ndim", 3) >= 3)

    def set_layer(self, modality: str, name: str | None) -> None:
        """Choose a layer (by name) for t1/t1ce/t2/flair or "ground truth"; None clears it."""
        box = self.truth_box if modality in ("seg", ld.GROUND_TRUTH) else self.layer_boxes[modality]
        box.setCurrentText(name or NONE)

    def chosen_layers(self) -> dict:
        return {m: self._layer(self.layer_boxes[m].currentText()) for m in MODALITIES}

    # -----------------------------------------------------------------------------------------
    # Model
    # -----------------------------------------------------------------------------------------

    def _warn_if_no_model(self) -> None:
        try:
            self._update_model_status(warn=True)
        except RuntimeError:  # deleted before the event loop ran
            pass

    def _update_model_status(self, warn: bool = False) -> None:
        path = self.model_path.text().strip()
        if path:
            self.model_status.setText(f"checkpoint: {path}")
        elif demo_model_available():
            self.model_status.setText("the bundled demo model (BraTS 2018, 2D slices)")
        else:
            text = ("no bundled demo model in this installation: choose a checkpoint file (.pt) "
                    "with the … button next to 'checkpoint'")
            self.model_status.setText(text)
            if warn:
                self.notify(f"napari-diffseg: {text}", "warning")

    # -----------------------------------------------------------------------------------------
    # Running
    # -----------------------------------------------------------------------------------------

    def notify(self, message: str, severity: str = "info") -> None:
        self.messages.append((severity, message))
        self.status.setText(message)
        _notify(message, severity)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _build_request(self):
        inputs = check_inputs(self.chosen_layers(), self._layer(self.truth_box.currentText()))
        reference = inputs.reference
        z = None
        if inputs.spatial_ndim == 3 and SCOPES[self.scope.currentIndex()][1] == "slice":
            z = slice_index(self.viewer.dims.point, reference.scale, reference.translate, inputs.display_shape[0])
        meta = reference.metadata or {}
        if ld.VOXEL_SIZE in meta and len(meta[ld.VOXEL_SIZE]) == inputs.spatial_ndim:
            spacing = tuple(meta[ld.VOXEL_SIZE])
        else:
            spacing = tuple(float(s) for s in reversed(tuple(reference.scale)[-inputs.spatial_ndim:]))
        sampler = SAMPLERS[self.sampler.currentIndex()][1] or None
        keep_members = self.keep_members.isChecked()
        voxels = int(np.prod(inputs.display_shape if z is None else inputs.display_shape[1:]))
        members_bytes = 4 * voxels * self.ensemble.value()
        if keep_members and members_bytes > MAX_MEMBERS_BYTES:
            keep_members = False
            inputs.warnings.append(
                f"the {self.ensemble.value()} ensemble members of the whole volume would take "
                f"{members_bytes / 1e9:.1f} GB: not kept this time (segment the current slice to see them)"
            )
        return RunRequest(
            inputs=inputs,
            z=z,
            model_path=self.model_path.text().strip() or None,
            flags_path=self.flags_path.text().strip() or None,
            device=self.device.currentText(),
            num_ensemble=self.ensemble.value(),
            respacing=self.respacing(),
            sampler=sampler,
            seed=self.seed.value(),
            keep_members=keep_members,
            spacing=spacing,
            precision=self.precision.currentText(),
        )

    def run(self) -> None:
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
                        "with the … button next to 'checkpoint'", "error")
            return
        for warning in request.inputs.warnings:
            self.notify(warning, "warning")
        self._save_settings()
        self._start(request)

    def _start(self, request: RunRequest) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import cancelable_progress

        self._request = request
        self.preview_updates = 0
        self._last_batch = -1
        self._make_preview_layer(request)
        self._pbar = cancelable_progress(total=0, desc="diffseg: loading the model")
        self.progress_bar.setRange(0, 0)
        self.status.setText("loading the model…")
        worker = create_worker(guarded_job, request, self.cache, _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._worker_holder["worker"] = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        worker.start()

    def cancel(self) -> None:
        """Stop at the next denoising step; no result layers are made."""
        if self.worker is not None:
            self.status.setText("cancelling…")
            self.worker.quit()

    def _on_progress(self, progress) -> None:
        if self.worker is None or self.worker.abort_requested:
            return
        total = progress.total * progress.batches
        done = progress.batch * progress.total + progress.step
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(done)
        where = f", slices batch {progress.batch + 1}/{progress.batches}" if progress.batches > 1 else ""
        text = f"sampling: step {progress.step}/{progress.total}{where}"
        self.status.setText(text)
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
        layer = self.viewer.add_image(
            np.zeros(shape, np.float32),
            name=ld.result_name(inputs.case, "preview (sampling…)"),
            scale=scale,
            translate=translate,
            colormap="magma",
            blending="additive",
            contrast_limits=(0.0, 1.0),
            opacity=0.8,
            metadata={ld.KIND: "preview"},
        )
        self._preview_layer = layer

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
        self.notify(
            f"diffseg: {seg.num_ensemble} chains x {seg.steps} {seg.sampler.upper()} steps{scope} "
            f"in {outcome.seconds:.1f} s on {outcome.device}"
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
        self.notify("diffseg: sampling cancelled; no result layers were made")

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.worker = None
        self._worker_holder.pop("worker", None)
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.progress_bar.maximum() == 0:
            self.progress_bar.setRange(0, 1)

    # -----------------------------------------------------------------------------------------
    # Results
    # -----------------------------------------------------------------------------------------

    def _show_result(self, request: RunRequest, outcome) -> None:
        inputs = request.inputs
        core_shape = tuple(reversed(inputs.display_shape))
        state = self.results.get(inputs.case)
        if state is None or state.spatial_shape != core_shape or outcome.z is None:
            state = ResultState.empty(inputs.case, core_shape, self.threshold.value() / 100)
        state.threshold = self.threshold.value() / 100
        state.merge(outcome)
        self.results[inputs.case] = state
        self.current_case = inputs.case
        self._result_reference = inputs.reference
        self._truth_for_metrics = (inputs.truth, request.spacing)
        self._update_result_layers(state, inputs.reference, keep_members=request.keep_members)
        self._set_review_visible(state.is_volume)
        self.member.blockSignals(True)
        self.member.setRange(0, state.num_ensemble if state.members is not None else 0)
        self.member.setValue(0)
        self.member.blockSignals(False)
        self._fill_ranking(state)
        self._metrics_generation += 1
        if inputs.truth is not None:
            if outcome.z is None:
                self.metrics = outcome.metrics
                self.metrics_label.setText(format_metrics(outcome.metrics))
            else:
                self._recompute_metrics()
        else:
            self.metrics = None
            self.metrics_label.setText("choose a ground truth layer to see Dice and HD95")

    def _result_layer(self, name: str, kind: str, layer_type: str):
        """Our existing result layer of that name, or None (a user's layer of the same name is kept)."""
        layer = self._layer(name)
        if layer is None:
            return None
        ours = (layer.metadata or {}).get(ld.KIND) == kind and type(layer).__name__.lower() == layer_type
        return layer if ours else None

    def _put_layer(self, name: str, kind: str, layer_type: str, data: np.ndarray, reference, leading: int = 0,
                   z: int | None = None, **style) -> object:
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
        layer = self._result_layer(name, kind, layer_type)
        if layer is not None and layer.data.shape == data.shape:
            layer.data = data
            layer.scale = scale
            layer.translate = translate
            layer.metadata = metadata
            for key, value in style.items():
                if key not in ("visible",):
                    setattr(layer, key, value)
            return layer
        if layer is not None:
            self.viewer.layers.remove(layer)
        add = self.viewer.add_labels if layer_type == "labels" else self.viewer.add_image
        return add(data, name=name, scale=scale, translate=translate, metadata=metadata, **style)

    def _update_result_layers(self, state: ResultState, reference, keep_members: bool = True) -> None:
        case = state.case
        mask = np.ascontiguousarray(ld.to_display(state.mask()))
        self._put_layer(ld.result_name(case, "mask"), "mask", "labels", mask, reference, opacity=0.5)
        variance = np.ascontiguousarray(ld.to_display(state.variance))
        top = float(variance.max())
        self._put_layer(ld.result_name(case, "uncertainty"), "uncertainty", "image", variance, reference,
                        colormap="inferno", blending="additive", contrast_limits=(0.0, top if top > 0 else 1e-6))
        members_name = ld.result_name(case, "members")
        if state.members is not None and keep_members:
            members = np.ascontiguousarray(ld.to_display(state.members, len(state.spatial_shape)))
            self._put_layer(members_name, "members", "image", members, reference, leading=1, z=state.members_z,
                            colormap="gray", contrast_limits=(0.0, 1.0), visible=False)
        else:
            old = self._result_layer(members_name, "members", "image")
            if old is not None:
                self.viewer.layers.remove(old)

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

    def _on_threshold(self, value: int) -> None:
        threshold = value / 100
        self.threshold_label.setText(f"{threshold:.2f}")
        state = self.results.get(self.current_case or "")
        if state is not None:
            state.threshold = threshold
            layer = self._result_layer(ld.result_name(state.case, "mask"), "mask", "labels")
            if layer is not None:
                layer.data = np.ascontiguousarray(ld.to_display(state.mask()))
            if self._truth_for_metrics[0] is not None:
                self.metrics_label.setText("Dice/HD95: …")
                self._metrics_timer.start()
        self._save_settings()

    def _recompute_metrics(self) -> None:
        """Dice and HD95 of the current mask in a worker (HD95 can take a moment on a volume)."""
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

        def show(text: str, metrics=None) -> None:
            if generation != self._metrics_generation:
                return  # a newer threshold or run has taken over
            try:
                label.setText(text)
            except RuntimeError:  # the widget was closed meanwhile
                return
            self.metrics = metrics

        def done(metrics, threshold=state.threshold):
            where = f" (at threshold {threshold:.2f}" + (f", {len(slices)} slices)" if slices else ")")
            show(format_metrics(metrics, where), metrics)

        worker.returned.connect(done)
        worker.errored.connect(lambda exc: show(f"Dice/HD95 failed: {exc}"))
        worker.finished.connect(lambda: setattr(self, "_metrics_worker", None))
        self._metrics_worker = worker
        worker.start()

    def _on_member(self, value: int) -> None:
        state = self.results.get(self.current_case or "")
        if state is None:
            return
        layer = self._result_layer(ld.result_name(state.case, "members"), "members", "image")
        if layer is None:
            return
        layer.visible = value > 0
        if value > 0 and self.viewer.dims.ndim == layer.ndim:
            self.viewer.dims.set_current_step(0, value - 1)
        if value > 0:
            self.viewer.layers.selection.active = layer

