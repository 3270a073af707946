"""The widget's form: the input layers, the model and the sampling settings (magicgui controls),
and ``SettingsForm``, which shows a ``Settings`` in the controls of the same names and reads
them back, so that a new setting needs no converter of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    Slider,
    SpinBox,
    create_widget,
)
from qtpy.QtWidgets import QComboBox

from .. import MODALITIES
from .. import _layerdata as ld
from ..errors import DiffSegError
from . import models, tooltips
from .inputs import LayerInfo, layer_kind, match_layers
from .result_layers import is_ours
from .settings import STEP_PRESETS, Settings

MAX_ENSEMBLE = 20
SAMPLERS = [("model default", ""), ("DDPM", "ddpm"), ("DDIM", "ddim")]
SCOPES = [("current slice", "slice"), ("whole volume", "volume")]


# ---------------------------------------------------------------------------------------------
# Settings <-> controls
# ---------------------------------------------------------------------------------------------


@dataclass
class TextControl:
    """A control whose setting is its text (a file box: "" = none; the editable steps box)."""

    read: Callable[[], str]
    write: Callable[[str], None]
    changed: object  # a signal: .connect(callback)

    @property
    def value(self) -> str:
        return self.read()

    @value.setter
    def value(self, text: str) -> None:
        self.write(text)


def _show_value(control, value) -> None:
    """Put a setting into its control: a choice only when offered, a number within its range
    (a settings file may hold a device this machine lacks, or a value out of range)."""
    if isinstance(control, TextControl):
        control.value = value
    elif hasattr(control, "choices"):
        if value in control.choices:
            control.value = value
    else:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and hasattr(control, "min"):
            value = min(max(value, control.min), control.max)
        control.value = value


class SettingsForm:
    """The controls that show the settings, one per ``Settings`` field, by its name."""

    def __init__(self, controls: dict):
        names = [f.name for f in fields(Settings)]
        missing = sorted(set(names) - set(controls))
        if missing:
            raise ValueError(f"no control shows the settings {', '.join(missing)}")
        self.controls = {name: controls[name] for name in names}
        self._showing = False

    def show(self, settings: Settings) -> None:
        self._showing = True
        try:
            for name, control in self.controls.items():
                _show_value(control, getattr(settings, name))
        finally:
            self._showing = False

    def read(self) -> Settings:
        return Settings.from_dict({name: control.value for name, control in self.controls.items()})

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the user changes a setting (not while ``show`` fills them)."""
        def changed(*_):
            if not self._showing:
                callback()

        for control in self.controls.values():
            control.changed.connect(changed)


# ---------------------------------------------------------------------------------------------
# The groups
# ---------------------------------------------------------------------------------------------


class InputPickers:
    """The "Input layers" group: an Image layer per modality and an optional ground truth. Typed
    as napari layers, the pickers follow the layer list by themselves (napari calls the dock
    widget's ``reset_choices`` on layer changes); empty ones are filled from layer names."""

    def __init__(self, viewer):
        from napari.layers import Image, Labels

        self.viewer = viewer
        self.layer_pickers = {
            m: create_widget(annotation=Image, label=m, options={"nullable": True, "tooltip": tooltips.modality(m)})
            for m in MODALITIES
        }
        self.truth_picker = create_widget(annotation=Labels, label="ground truth",
                                          options={"nullable": True, "tooltip": tooltips.TRUTH})
        self.box = Container(widgets=[*self.layer_pickers.values(), self.truth_picker])

    def _pickers(self) -> list:
        return [*self.layer_pickers.items(), ("seg", self.truth_picker)]

    def autofill(self) -> None:
        """Fill the empty pickers by layer name (t1, Brats18_x_flair, ... ground truth)."""
        infos = [LayerInfo(layer.name, layer_kind(layer), (layer.metadata or {}).get(ld.CASE, ""))
                 for layer in self.viewer.layers if not is_ours(layer)]
        picked, truth = match_layers(infos)
        for key, picker in self._pickers():
            suggestion = truth if key == "seg" else picked.get(key)
            if picker.value is None and suggestion:
                self._choose(picker, suggestion)

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
        return {key: (picker.value.name if picker.value is not None else None) for key, picker in self._pickers()}


def _path_text(edit: FileEdit) -> str:
    return edit.line_edit.value.strip()


def _path_control(edit: FileEdit) -> TextControl:
    return TextControl(lambda: _path_text(edit), lambda text: setattr(edit, "value", text or None), edit.changed)


BUNDLED_CHOICES = [("whole tumour", "wt"), ("tumour parts", "brats")]  # short: the status line names the parts


class ModelBox:
    """The "Model" group: a checkpoint (empty: the bundled model chosen below it, where more than
    one is installed), the flags JSON a reference-code checkpoint needs, and a line on what will
    be loaded."""

    def __init__(self, notify: Callable[[str, str], None]):
        from ..checkpoint import installed_bundled_models

        self._notify = notify
        self.model_path = FileEdit(mode="r", filter="Checkpoints (*.pt *.pth *.ckpt)", nullable=True,
                                   label="checkpoint", tooltip=tooltips.CHECKPOINT)
        self.model_path.line_edit.native.setPlaceholderText("bundled model")
        installed = installed_bundled_models()
        self.bundled = ComboBox(choices=[c for c in BUNDLED_CHOICES if c[1] in installed] or BUNDLED_CHOICES[:1],
                                label="bundled model", tooltip=tooltips.BUNDLED)
        self.bundled.visible = len(installed) > 1  # a choice only where there is one
        # Its longest choice must not set the Model column's width: the three columns of a bottom
        # dock have to fit layout.WIDE_LAYOUT_MIN_WIDTH (the open list shows every choice in full).
        self.bundled.native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.bundled.native.setMinimumContentsLength(12)
        self.flags_path = FileEdit(mode="r", filter="JSON (*.json)", nullable=True, label="flags JSON",
                                   tooltip=tooltips.FLAGS)
        self.flags_path.line_edit.native.setPlaceholderText("only for the reference code's checkpoints")
        self.model_status = Label(label="")
        self.model_status.native.setWordWrap(True)
        self.box = Container(widgets=[self.model_path, self.bundled, self.flags_path, self.model_status])
        for edit in (self.model_path, self.bundled, self.flags_path):
            edit.changed.connect(self.update_status)

    def controls(self) -> dict:
        return {"model_path": _path_control(self.model_path), "bundled_model": self.bundled,
                "flags_path": _path_control(self.flags_path)}

    def update_status(self, *_, warn: bool = False) -> None:
        from ..checkpoint import BUNDLED_TITLES

        path = _path_text(self.model_path)
        self.bundled.enabled = not path  # a chosen checkpoint runs instead
        if path:
            text = f"checkpoint: {path}"
            name = path.replace("\\", "/").rsplit("/", 1)[-1].lower()
            if "savedmodel" in name and not _path_text(self.flags_path):
                text += ("\nthis looks like a checkpoint of the reference code: choose its model flags "
                         "in the 'flags JSON' field")
            self.model_status.value = text
        elif models.demo_model_available(self.bundled.value):
            title = BUNDLED_TITLES[self.bundled.value]
            self.model_status.value = f"the bundled model of {title} (BraTS 2018, 2D slices)"
        else:
            text = ("no bundled demo model in this installation: choose a checkpoint file (.pt) "
                    "in the 'checkpoint' field")
            self.model_status.value = text
            if warn:
                self._notify(f"napari-diffseg: {text}", "warning")


def batching_text() -> str:
    """How the next run will choose its chains per network call."""
    from ..options import BATCHING_ENV, parse_batching

    try:
        fixed = parse_batching(None)
    except DiffSegError as exc:
        return str(exc)
    if fixed != "auto":
        return f"{fixed} chains per call (${BATCHING_ENV})"
    return "auto: timed at the first run, then re-checked"


class SamplingControls:
    """The "Sampling" group: how many chains of how many steps, with which sampler, where and how
    precisely, which seed, over what, and the batching (chains per network call: timed, stored
    as a hint, see batching.py) with a button to time it again."""

    def __init__(self):
        from ..inference import available_devices, available_precisions

        self.ensemble = Slider(min=1, max=MAX_ENSEMBLE, value=5, label="ensemble size", tooltip=tooltips.ENSEMBLE)
        self.steps = ComboBox(choices=[label for label, _ in STEP_PRESETS], label="steps", tooltip=tooltips.STEPS)
        self.steps.native.setEditable(True)  # presets, or any respacing spec typed in
        self.steps.native.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.sampler = ComboBox(choices=SAMPLERS, label="sampler")
        self.eta = FloatSpinBox(min=0.0, max=1.0, step=0.1, value=0.0, label="DDIM eta", tooltip=tooltips.ETA)
        self.device = ComboBox(choices=available_devices(), label="device")
        self.precision = ComboBox(choices=available_precisions(), label="precision", tooltip=tooltips.PRECISION)
        self.seed = SpinBox(min=0, max=2**31 - 1, label="seed", tooltip=tooltips.SEED)
        self.scope = ComboBox(choices=SCOPES, label="scope", tooltip=tooltips.SCOPE)
        self.keep_members = CheckBox(text="add the ensemble members as a layer")
        self.batching_label = Label(value=batching_text())
        self.batching_label.native.setWordWrap(True)
        self.batching_label.native.setMinimumWidth(80)  # wraps rather than widening the column
        self.batching_button = PushButton(text="Re-time", tooltip=tooltips.RE_TIME)
        batching_row = Container(widgets=[self.batching_label, self.batching_button], layout="horizontal",
                                 labels=False, label="batching")
        batching_row.margins = (0, 0, 0, 0)
        self.box = Container(widgets=[self.ensemble, self.steps, self.sampler, self.eta, self.device,
                                      self.precision, self.seed, self.scope, self.keep_members, batching_row])
        self.sampler.changed.connect(self._update_eta_enabled)
        self._update_eta_enabled()

    def controls(self) -> dict:
        steps = TextControl(lambda: self.steps.native.currentText().strip(), self._show_steps,
                            self.steps.native.currentTextChanged)
        return {"num_ensemble": self.ensemble, "steps": steps, "sampler": self.sampler, "eta": self.eta,
                "device": self.device, "precision": self.precision, "seed": self.seed, "scope": self.scope,
                "keep_members": self.keep_members}

    def _update_eta_enabled(self, *_) -> None:
        self.eta.enabled = self.sampler.value == "ddim"

    def _show_steps(self, text: str) -> None:
        box = self.steps.native
        index = box.findText(text) if text else 0
        if index >= 0:
            box.setCurrentIndex(index)
        else:
            box.setEditText(text)

    def set_steps(self, text: str) -> None:
        """Choose a preset by its label or type a respacing spec ("75", "ddim50")."""
        self.steps.native.setCurrentText(text)

    def show_batching(self, text: str | None = None) -> None:
        """The batching line: a run's choice, else how the next run will choose."""
        text = text or batching_text()
        if self.batching_label.value != text:
            self.batching_label.value = text
