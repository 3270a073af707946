"""The widget's settings, kept between sessions in a small JSON file (no Qt).

Location: ``settings.json`` in :func:`napari_diffseg.config.config_dir` (``$NAPARI_DIFFSEG_CONFIG_DIR``
when set, else the platform's configuration folder, e.g. ``~/.config/napari-diffseg``).
A missing, unreadable or malformed file gives the defaults; a value of the wrong type is ignored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import config_dir
from ..files import write_json_atomically

log = logging.getLogger(__name__)

FILE_NAME = "settings.json"

DEFAULTS: dict = {
    "model_path": "",  # "" = the bundled demo model
    "flags_path": "",  # model flags JSON for a reference checkpoint
    "num_ensemble": 5,
    "steps": "",  # "" = the model's default respacing; else a respacing spec ("50", "ddim25")
    "sampler": "",  # "" = the model's default; "ddpm" or "ddim"
    "device": "auto",
    "precision": "auto",  # fp16 on CUDA, bf16 on a CPU with native bf16, else fp32
    "seed": 0,
    "scope": "slice",  # "slice" or "volume"
    "keep_members": True,
    "threshold": 0.5,
}


def settings_path() -> Path:
    return config_dir() / FILE_NAME


def load_settings() -> dict:
    values = dict(DEFAULTS)
    path = settings_path()
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return values
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable settings file %s (%s)", path, exc)
        return values
    if not isinstance(stored, dict):
        return values
    for key, default in DEFAULTS.items():
        value = stored.get(key)
        if value is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if ok:
            values[key] = type(default)(value)
    return values



def save_settings(values: dict) -> None:
    """Write the known keys atomically; failures are logged, never raised (settings are a nicety)."""
    path = settings_path()
    data = {key: values.get(key, default) for key, default in DEFAULTS.items()}
    try:
        write_json_atomically(path, data)
    except OSError as exc:
        log.warning("could not save settings to %s (%s)", path, exc)
