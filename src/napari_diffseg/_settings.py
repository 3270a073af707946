"""The widget's settings, kept between sessions in a small JSON file (no Qt).

Location: ``$NAPARI_DIFFSEG_CONFIG_DIR/settings.json`` when that variable is set (tests use
it), else ``%APPDATA%/napari-diffseg`` on Windows, ``~/Library/Application Support/napari-diffseg``
on macOS, and ``$XDG_CONFIG_HOME/napari-diffseg`` (default ``~/.config/napari-diffseg``) elsewhere.
A missing, unreadable or malformed file gives the defaults; a value of the wrong type is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ENV_VAR = "NAPARI_DIFFSEG_CONFIG_DIR"
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


def config_dir() -> Path:
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override)
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "napari-diffseg"


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


def write_json_atomically(path: Path, data) -> None:
    """A temp file beside ``path``, then a rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)


def save_settings(values: dict) -> None:
    """Write the known keys atomically; failures are logged, never raised (settings are a nicety)."""
    path = settings_path()
    data = {key: values.get(key, default) for key, default in DEFAULTS.items()}
    try:
        write_json_atomically(path, data)
    except OSError as exc:
        log.warning("could not save settings to %s (%s)", path, exc)
