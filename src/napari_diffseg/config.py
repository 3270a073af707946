"""Where napari-diffseg keeps what it learns between runs (no Qt, no torch; written with
:func:`napari_diffseg.files.write_json_atomically`).

The folder is ``$NAPARI_DIFFSEG_CONFIG_DIR`` when that variable is set (every test sets it), else
``%APPDATA%/napari-diffseg`` on Windows, ``~/Library/Application Support/napari-diffseg`` on
macOS, and ``$XDG_CONFIG_HOME/napari-diffseg`` (default ``~/.config/napari-diffseg``) elsewhere.
It holds the widget's ``settings.json`` and the batching choices, ``batching.json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_VAR = "NAPARI_DIFFSEG_CONFIG_DIR"


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
