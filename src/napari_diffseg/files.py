"""Writing files so that a reader never sees half of one, and checking a folder takes them
(no torch, no nibabel: the widget's settings use it too)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import DiffSegError


class UnwritableFolder(DiffSegError, OSError):
    """A folder that takes no file: a user error to report, and still an OSError to callers
    for whom a failed write is only a nicety lost (the widget's settings, the batching cache)."""


def _cannot_write(folder: Path, exc: OSError, setting: str | None = None) -> UnwritableFolder:
    return UnwritableFolder(f"{folder}: cannot write there ({exc.strerror or exc}); choose a writable folder",
                            setting=setting)


def atomic_write(path: str | os.PathLike, writer, mode: str = "w") -> None:
    """Write a file through ``writer(handle)`` into a temp file beside ``path``, then rename it
    over ``path``: a reader never sees a half-written file, and an error leaves none.

    The file gets the permissions any newly created file gets under the umask (mkstemp's own
    are 0600, owner only). A folder that cannot take the temp file is an UnwritableFolder.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path.parent, exc) from None
    try:
        with os.fdopen(fd, mode) as handle:
            writer(handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomically(path: Path, data) -> None:
    """``data`` as indented JSON at ``path`` (its folder made first), written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: json.dump(data, handle, indent=1))


def check_writable_folder(folder: str | os.PathLike, setting: str | None = None) -> Path:
    """Make ``folder`` (and its parents) and check that a file can be written in it, before any
    long work whose results would go there; a DiffSegError naming the folder (and the
    ``setting`` that chose it) otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _cannot_write(folder, exc, setting) from None
    return folder
