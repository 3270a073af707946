"""Bad checkpoint files: each kind is a one-line DiffSegError naming the file and what to give.

The files are made here from a tiny real checkpoint (no shared data needed); the CLI side of
the same kinds is in test_cli.py (test_bad_checkpoint_is_one_line_error).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_diffseg import checkpoint, cli
from napari_diffseg.diffusion import DiffusionConfig
from napari_diffseg.errors import DiffSegError
from napari_diffseg.geometry import Geometry
from napari_diffseg.unet import UNetConfig

from support import BAD_KINDS, TINY, tiny_state, write_bad_checkpoint

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "model.pt"
    checkpoint.atomic_save(checkpoint.make_payload(UNetConfig(**TINY), DiffusionConfig(), Geometry(),
                                                   {"model": tiny_state()}), path)
    return path


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_bad_checkpoint_is_one_clear_line(kind, good_checkpoint, tmp_path):
    path = write_bad_checkpoint(kind, tmp_path, good_checkpoint)
    with pytest.raises(DiffSegError) as info:
        checkpoint.load_model(path)
    message = str(info.value)
    assert "\n" not in message, message  # the widget shows it as one notification line
    assert message.startswith(f"{path}:"), message
    for word in BAD_KINDS[kind]:
        assert word.lower() in message.lower(), message
    # Flags cannot help a file that is not this model: the message must not ask for them.
    if kind not in ("ours_without_weights",):
        assert "--num_channels" not in message, message


def test_bad_kinds_fail_the_same_way_with_reference_flags(good_checkpoint, tmp_path):
    """Model flags given (a reference run) change nothing for a file that is not this UNet."""
    for kind in ("classifier", "image_unet", "text"):
        path = write_bad_checkpoint(kind, tmp_path, good_checkpoint)
        with pytest.raises(DiffSegError, match=BAD_KINDS[kind][0]):
            checkpoint.load_model(path, reference_flags=dict(TINY))


def test_good_checkpoint_and_bare_state_dict_still_load(good_checkpoint, tmp_path):
    assert checkpoint.load_model(good_checkpoint).unet_config.num_channels == 32
    bare = tmp_path / "savedmodel000010.pt"
    torch.save(tiny_state(), bare)
    # Without flags: one line in the core's words, pointing to the flags JSON (the widget's only
    # way); the command line names its own flags for the setting.
    with pytest.raises(DiffSegError) as info:
        checkpoint.load_model(bare)
    message = str(info.value)
    assert "\n" not in message and "flags JSON" in message and "num_channels" in message and "--" not in message
    assert "--flags_json" in cli.error_text(info.value) and "--num_channels" in cli.error_text(info.value)
    loaded = checkpoint.load_model(bare, reference_flags=dict(TINY))
    assert loaded.is_reference and loaded.unet_config.in_channels == 5


def test_folder_and_missing_file(tmp_path):
    with pytest.raises(DiffSegError, match="is a folder"):
        checkpoint.load_model(tmp_path)
    with pytest.raises(DiffSegError, match="not found"):
        checkpoint.load_model(tmp_path / "nowhere.pt")


def test_many_text_files_never_reach_the_unpickler(tmp_path):
    """Text of any content is told apart before torch.load, which fails on it unpredictably."""
    rng = np.random.default_rng(1)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789 ()[]{}.,:;'\"=+-_\n\t"))
    for index in range(20):
        path = tmp_path / f"t{index}.pt"
        path.write_text("".join(rng.choice(alphabet, size=int(rng.integers(1, 3000)))))
        with pytest.raises(DiffSegError, match="text file"):
            checkpoint.read_checkpoint(path)


def test_the_exporter_keeps_the_runs_stored_choices_and_sets_the_preset(tmp_path):
    """scripts/export_demo_model.py: EMA weights only, the preset given, the training run's own
    sampling choices (the clean-up size learned by cross-validation) kept, the case count cited."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    state = tiny_state()
    ema = {k: v + 1 for k, v in state.items()}
    trained = tmp_path / "model.pt"
    checkpoint.atomic_save(checkpoint.make_payload(
        UNetConfig(**TINY), DiffusionConfig(), Geometry(), {"model": state, "ema": ema}, step=7,
        sampling={"timestep_respacing": "10", "cleanup_min_voxels": 5000}, train_args={"lr": 1e-3}), trained)
    out = tmp_path / "bundled.pt"
    subprocess.run([sys.executable, str(root / "scripts" / "export_demo_model.py"), str(trained), "--respacing", "2",
                    "--cases", "16", "--out", str(out)], check=True, capture_output=True)
    payload = checkpoint.read_checkpoint(out)
    assert set(payload["weights"]) == {"model"}
    name = next(iter(ema))
    assert torch.equal(payload["weights"]["model"][name], ema[name])
    assert payload["sampling"]["timestep_respacing"] == "2" and payload["sampling"]["cleanup_min_voxels"] == 5000
    assert payload["citation"].startswith("Trained on 16 BraTS 2018 training cases")
    assert "train_args" not in payload
