"""Where napari-diffseg keeps what it learns between runs, and how it writes it (no Qt, no torch).

The folder is ``$NAPARI_DIFFSEG_CONFIG_DIR`` when that variable is set (every test sets it), else
``%APPDATA%/napari-diffseg`` on Windows, ``~/Library/Application Support/napari-diffseg`` on
macOS, and ``$XDG_CONFIG_HOME/napari-diffseg`` (default ``~/.config/napari-diffseg``) elsewhere.
It holds the widget's ``settings.json`` and the batching choices, ``batching.json``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
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


def write_json_atomically(path: Path, data) -> None:
    """A temp file beside ``path``, then a rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
