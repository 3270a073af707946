"""The one atomic writer and the one writable-folder check (files.py), and how the command line
words a core error about a setting."""

import json
import os

import pytest

from napari_diffseg import cli, files
from napari_diffseg.errors import DiffSegError


def test_atomic_write_leaves_no_temp_file_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "report.json"
    files.write_json_atomically(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def fail(handle):
        handle.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_json_writer_makes_the_folder_and_follows_the_umask(tmp_path):
    umask = os.umask(0o027)
    try:
        files.write_json_atomically(tmp_path / "new" / "settings.json", [1])
    finally:
        os.umask(umask)
    assert (tmp_path / "new" / "settings.json").stat().st_mode & 0o777 == 0o640


def test_an_unwritable_folder_is_a_user_error_and_an_os_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DiffSegError, match="a-file/out: cannot write there") as info:
        files.check_writable_folder(blocker / "out", setting="out_dir")
    assert cli.error_text(info.value).startswith("--out_dir: ")
    folder = files.check_writable_folder(tmp_path / "made" / "here")
    assert folder.is_dir() and not list(folder.iterdir())  # the probe is gone
    # Settings treat a failed write as a nicety lost: they catch OSError.
    with pytest.raises(OSError):
        files.atomic_write(blocker / "x.json", lambda handle: None)


def test_core_errors_name_settings_and_the_command_line_names_flags():
    assert cli.error_text(DiffSegError("device cuda: no CUDA GPU is available here", setting="device")) == \
        "--device cuda: no CUDA GPU is available here"
    assert cli.error_text(DiffSegError("noise schedule 'x' is unknown", setting="noise_schedule")) == \
        "--noise_schedule: noise schedule 'x' is unknown"
    assert cli.error_text(DiffSegError("x.pt: the weights do not fit", setting="model_flags")).startswith(
        "--flags_json or the model flags (--num_channels")
    assert cli.error_text(DiffSegError("a.nii: not found")) == "a.nii: not found"
