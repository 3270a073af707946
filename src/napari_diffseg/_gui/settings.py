"""The widget's settings: one dataclass, kept between sessions in a small JSON file (no Qt).

Location: ``settings.json`` in :func:`napari_diffseg.config.config_dir` (``$NAPARI_DIFFSEG_CONFIG_DIR``
when set, else the platform's configuration folder, e.g. ``~/.config/napari-diffseg``).
A missing, unreadable or malformed file gives the defaults; a value of the wrong type, or a key
this version does not know, is ignored, and a key the file lacks (a file of an older version)
keeps its default.

Each field is shown by the form's control of the same name (``form.SettingsForm``); the fields
marked ``run_option`` reach ``Segmenter.run`` under their own name, so a new sampling option is
a field here and a control in the form.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..config import config_dir
from ..files import write_json_atomically

log = logging.getLogger(__name__)

FILE_NAME = "settings.json"
RUN_OPTION = "run_option"  # field metadata: a SamplingOptions field of the same name

STEP_PRESETS = [  # (label, respacing); None = the checkpoint's default
    ("model default", None),
    ("10 steps", "10"),
    ("25 steps", "25"),
    ("50 steps", "50"),
    ("100 steps", "100"),
    ("250 steps", "250"),
    ("all steps (no respacing)", ""),
]


def _run_option(default):
    return field(default=default, metadata={RUN_OPTION: True})


@dataclass(frozen=True)
class Settings:
    model_path: str = ""  # "" = the bundled model that bundled_model names
    bundled_model: str = "wt"  # "wt" the whole-tumour model, "brats" the region model (checkpoint.BUNDLED_MODELS)
    flags_path: str = ""  # model flags JSON for a reference checkpoint
    num_ensemble: int = _run_option(5)
    steps: str = ""  # "" = the model's default respacing; a preset label or a respacing spec ("50", "ddim25")
    sampler: str = _run_option("")  # "" = the model's default; "ddpm" or "ddim"
    eta: float = _run_option(0.0)  # DDIM's noise: 0 deterministic, 1 as much as DDPM's
    device: str = "auto"
    precision: str = _run_option("auto")  # fp16 on CUDA, bf16 on a CPU with native bf16, else fp32
    seed: int = _run_option(0)
    scope: str = "slice"  # "slice" or "volume"
    keep_members: bool = True
    threshold: float = 0.5
    cleanup: bool = True  # 3D clean-up of whole-volume results, at the size the model stores

    @classmethod
    def from_dict(cls, values: dict) -> Settings:
        """The known keys of ``values`` whose value has the field's type; defaults elsewhere."""
        defaults = cls()
        kept = {}
        for f in fields(cls):
            default, value = getattr(defaults, f.name), values.get(f.name)
            if value is None:
                continue
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, (int, float)):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, type(default))
            if ok:
                kept[f.name] = type(default)(value)
        return cls(**kept)

    def to_dict(self) -> dict:
        return asdict(self)

    def updated(self, **values) -> Settings:
        unknown = set(values) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **values)

    def run_options(self) -> dict:
        """The SamplingOptions fields that the settings give as they are."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get(RUN_OPTION)}

    @property
    def respacing(self) -> str | None:
        """The respacing spec of the steps text: None = the model's default."""
        text = self.steps.strip()
        for label, value in STEP_PRESETS:
            if text == label:
                return value
        if text.lower().endswith("steps"):
            text = text[: -len("steps")].strip()
        return text or None


def settings_path() -> Path:
    return config_dir() / FILE_NAME


def load_settings() -> Settings:
    path = settings_path()
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return Settings()
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable settings file %s (%s)", path, exc)
        return Settings()
    return Settings.from_dict(stored) if isinstance(stored, dict) else Settings()


def save_settings(settings: Settings) -> None:
    """Write them atomically; failures are logged, never raised (settings are a nicety)."""
    path = settings_path()
    try:
        write_json_atomically(path, settings.to_dict())
    except OSError as exc:
        log.warning("could not save settings to %s (%s)", path, exc)
