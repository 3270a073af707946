"""Behaviour kept bit for bit across the codebase split (issue 25).

Two seeded runs of the bundled model were recorded before the first move:

* ``diffseg-sample`` of two slices of a shared BraTS volume (mask, probability, variance), as a
  user runs it, in a subprocess;
* the widget's Run on the bundled sample slice, then scribbles where that result is most wrong
  and Refine (the proposal's probability and variance after each).

Both run in fp32, one thread and a fixed batching, so that nothing but the code decides the
bits. The same CPU model and torch version must give identical arrays; another CPU (other
vector kernels) is held to float tolerance instead, and says so.

Record again only on purpose (a change of behaviour that is wanted):
``DIFFSEG_RECORD=1 .venv/bin/python -m pytest tests/test_behaviour_record.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from napari_diffseg import batching

RECORD = Path(__file__).parent / "data" / "behaviour_record.npz"
RECORDING = os.environ.get("DIFFSEG_RECORD") == "1"
CASE = "Brats18_2013_2_1"
SLICES = "70:72"
MEMBERS = 3
RUN_TIMEOUT_MS = 300_000


def _machine() -> dict:
    return {"cpu": batching.cpu_name(), "torch": torch.__version__}


def _check(name: str, arrays: dict[str, np.ndarray]) -> None:
    """Compare with the record (or write it, when recording): bit for bit on the recording's
    CPU model and torch, else to float tolerance."""
    arrays = {f"{name}/{key}": np.ascontiguousarray(value) for key, value in arrays.items()}
    if RECORDING:
        kept = dict(np.load(RECORD)) if RECORD.exists() else {}
        kept = {k: v for k, v in kept.items() if not k.startswith(f"{name}/") and k != "machine"}
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        tmp = RECORD.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **kept, **arrays, machine=np.array(json.dumps(_machine())))
        os.replace(tmp, RECORD)
        return
    assert RECORD.exists(), f"{RECORD} is missing: record it (see this module's docstring)"
    record = np.load(RECORD)
    same_machine = json.loads(str(record["machine"])) == _machine()
    for key, value in arrays.items():
        expected = record[key]
        assert value.shape == expected.shape and value.dtype == expected.dtype, key
        if same_machine:
            assert np.array_equal(value, expected), f"{key}: differs from the record ({np.abs(value - expected).max()})"
        else:  # another CPU's kernels round differently: close, not identical
            np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-4, err_msg=key)


def test_sample_cli_is_unchanged(brats18_dir, tmp_path):
    """``diffseg-sample`` of two brain slices of a shared case, seed 0, bundled model."""
    import nibabel as nib

    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "napari_diffseg.sample", "--data_dir", str(brats18_dir / CASE), "--out_dir", str(out),
         "--slices", SLICES, "--num_ensemble", str(MEMBERS), "--precision", "fp32", "--batching", str(MEMBERS),
         "--seed", "0", "--device", "cpu", "--no_progress", "--cleanup", "0"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = out / CASE
    start, stop = map(int, SLICES.split(":"))
    arrays = {}
    for name in ("mask", "probability", "variance"):
        files = sorted(folder.glob(f"{name}.nii*"))
        assert files, f"no {name} in {sorted(p.name for p in folder.iterdir())}"
        data = np.asanyarray(nib.load(files[0]).dataobj)
        arrays[name] = data[..., start:stop]
        assert not data[..., :start].any() and not data[..., stop:].any()  # only the slices asked for
    assert arrays["mask"].any()  # the slices hold tumour: a record of empty masks would prove little
    _check("sample", arrays)


def test_widget_run_and_refine_are_unchanged(make_napari_viewer, qtbot, one_torch_thread, monkeypatch):
    """The bundled sample slice in the widget: Run (seed 0), then the demo's simulated scribbles
    and Refine."""
    from napari_diffseg import _layerdata as ld
    from napari_diffseg._sample_data import brats_slice
    from napari_diffseg._gui.widget import DiffSegWidget
    from napari_diffseg.demo import simulated_scribbles

    monkeypatch.setenv("NAPARI_DIFFSEG_BATCHING", str(MEMBERS))
    viewer = make_napari_viewer()
    for data, kwargs, kind in brats_slice():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = DiffSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Diffusion segmentation")
    widget.configure(persist=False, model_path="", num_ensemble=MEMBERS, precision="fp32", device="cpu", seed=0,
                     keep_members=False)

    def run(action) -> dict:
        action()
        qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)
        assert not [m for s, m in widget.messages if s == "error"], widget.messages
        state = widget.cases.current.result
        return {"probability": np.asarray(state.probability), "variance": np.asarray(state.variance)}

    first = run(widget.run)
    widget.refine_tools.scribble()
    scribbles = widget.layers.find("scribbles", widget.cases.current_name)
    marks = simulated_scribbles(widget.pickers.truth_picker.value.data, ld.to_display(first["probability"]))
    assert (marks == 1).any() or (marks == 2).any()
    scribbles.data = marks
    refined = run(widget.refine)
    assert not np.array_equal(refined["probability"], first["probability"])
    _check("widget_run", first)
    _check("widget_refine", refined)
