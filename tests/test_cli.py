"""diffseg-train and diffseg-sample as a user runs them: subprocesses on the CPU.

Tiny UNet flags and a few steps keep every run to seconds; the test that reproduces the
reference's result within tolerance runs 30 steps of the reference's small model (seconds).
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_diffseg import checkpoint
from napari_diffseg.diffusion import DiffusionConfig
from napari_diffseg.geometry import Geometry
from napari_diffseg.options import SamplingOptions
from napari_diffseg.unet import UNet, UNetConfig


def cli_env(**extra: str) -> dict:
    """The environment of a CLI subprocess, read when it starts: it carries the test's private
    config folder and batching (tests/conftest.py), never the user's."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", **extra}


TINY_FLAGS = ["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
              "--attention_resolutions", "", "--learn_sigma", "True", "--num_heads", "1",
              "--crop_border", "0", "--resize_to", "32"]
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
            num_heads=1, learn_sigma=True)
MODALITIES = ("t1", "t1ce", "t2", "flair")


def run_cli(tool: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"napari_diffseg.{tool}", *map(str, args)], env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def train_args(data_dir, out_dir, *extra) -> list[str]:
    return [str(a) for a in ("--data_dir", data_dir, "--out_dir", out_dir, *TINY_FLAGS, "--batch_size", "2",
                             "--device", "cpu", "--no_progress", *extra)]


def assert_ok(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"


def assert_user_error(proc: subprocess.CompletedProcess, *words: str):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = UNet(UNetConfig(**TINY))
    with torch.no_grad():
        model.out[2].weight.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    checkpoint.atomic_save(checkpoint.make_payload(UNetConfig(**TINY), DiffusionConfig(), Geometry(),
                                                   {"model": model.state_dict()}), path)
    return path


def write_case(folder: Path, shape=(32, 32), skip=(), seed=0, with_seg=False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for modality in MODALITIES:
        if modality not in skip:
            write_nifti(folder / f"case_{modality}.nii.gz", rng.random(shape).astype(np.float32) + 0.01)
    if with_seg:
        seg = np.zeros(shape, np.uint8)
        seg[10:20, 12:22] = 2
        write_nifti(folder / "case_seg.nii.gz", seg)
    return folder


def write_nifti(path: Path, array: np.ndarray):
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 1.0, 1.0])), str(path))


def sample_args(model, data_dir, out_dir, *extra):
    return ["--model_path", model, "--data_dir", data_dir, "--out_dir", out_dir, "--timestep_respacing", "3",
            "--num_ensemble", "1", "--device", "cpu", "--no_progress", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- train, then sample ---------------------------------------------------------------------

def test_train_then_sample_end_to_end(seed_data_dir, tmp_path):
    from napari_diffseg import sample, train

    out = tmp_path / "run"
    assert train.main(train_args(seed_data_dir / "training", out, "--max_steps", "20", "--save_interval", "10",
                                 "--log_interval", "5", "--threads", "2")) == 0
    assert (out / "model.pt").is_file() and (out / "checkpoint.pt").is_file()
    rows = (out / "progress.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + 4
    assert checkpoint.read_checkpoint(out / "model.pt")["step"] == 20

    results = tmp_path / "results"
    assert sample.main([str(a) for a in (
        "--data_dir", seed_data_dir / "testing", "--timestep_respacing", "10", "--num_ensemble", "3",
        "--model_path", out / "model.pt", "--out_dir", results, "--device", "cpu", "--no_progress")]) == 0
    cases = sorted(p.name for p in (seed_data_dir / "testing").iterdir() if p.is_dir())
    assert cases and sorted(p.name for p in results.iterdir() if p.is_dir()) == cases
    for name in cases:
        source = next((seed_data_dir / "testing" / name).glob("*_t1_*.nii.gz"))
        affine = nib.load(str(source)).affine
        written = {k: nib.load(str(results / name / f"{k}.nii.gz")) for k in ("mask", "probability", "variance")}
        for image in written.values():
            assert image.shape == (240, 240)
            np.testing.assert_allclose(image.affine, affine)
        mask = np.asanyarray(written["mask"].dataobj)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        prob = np.asanyarray(written["probability"].dataobj)
        var = np.asanyarray(written["variance"].dataobj)
        assert prob.dtype == np.float32 and var.dtype == np.float32
        assert np.isfinite(prob).all() and np.isfinite(var).all()
        assert (var >= 0).all() and prob.min() >= -1 and prob.max() <= 1
        assert not (results / name / "metrics.json").exists()  # no ground truth in testing

    first = sorted(p for p in (seed_data_dir / "training").iterdir() if p.is_dir())[0]
    labelled = tmp_path / "labelled"
    assert sample.main([str(a) for a in (
        "--data_dir", first, "--timestep_respacing", "3", "--num_ensemble", "2",
        "--model_path", out / "model.pt", "--out_dir", labelled, "--device", "cpu", "--no_progress")]) == 0
    import json

    metrics = json.loads((labelled / first.name / "metrics.json").read_text())
    assert {"dice", "hd95"} <= set(metrics)
    assert 0.0 <= metrics["dice"] <= 1.0


def test_train_on_brats_volumes(brats18_dir, tmp_path):
    case = sorted(p for p in brats18_dir.iterdir() if p.is_dir())[0]
    data = tmp_path / "data"
    data.mkdir()
    (data / case.name).symlink_to(case, target_is_directory=True)
    out = tmp_path / "run"
    proc = run_cli("train", *train_args(data, out, "--max_steps", "2", "--save_interval", "2"))
    assert_ok(proc)
    loaded = checkpoint.load_model(out / "model.pt")
    assert loaded.geometry == Geometry(resize_to=32)
    assert checkpoint.read_checkpoint(out / "model.pt")["step"] == 2


def test_torchrun_two_cpu_processes(seed_data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "napari_diffseg.train",
           *map(str, train_args(seed_data_dir / "training", out, "--max_steps", "4", "--save_interval", "2",
                                "--threads", "1", "--click_fraction", "0.5"))]
    proc = subprocess.run(cmd, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    assert "2 process(es)" in proc.stderr
    payload = checkpoint.read_checkpoint(out / "checkpoint.pt")
    assert payload["step"] == 4
    assert checkpoint.read_checkpoint(out / "model.pt")["step"] == 4
    # Simulated marks draw a different number of slices on each rank: no rank waits on another.
    assert checkpoint.load_model(out / "model.pt").unet_config.hint_channels == 2


# -- interruption -----------------------------------------------------------------------------

def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    proc.kill()
    raise AssertionError("timed out waiting for training progress")


def _checkpoint_step(path: Path) -> int:
    try:
        return int(checkpoint.read_checkpoint(path)["step"])
    except Exception:  # not written yet
        return -1


def _popen_train(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "napari_diffseg.train", *map(str, args)], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume(seed_data_dir, tmp_path):
    rng = random.Random(1234)
    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"
    proc = _popen_train(*train_args(seed_data_dir / "training", out, "--max_steps", "200", "--save_interval", "1",
                                    "--log_interval", "1", "--threads", "1"))
    try:
        target = rng.randint(2, 4)
        _wait_for(lambda: _checkpoint_step(ckpt) >= target, proc)
        time.sleep(rng.uniform(0.0, 0.5))  # kill at a random moment, maybe in the middle of a save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)
    k = int(payload["step"])
    assert 0 < k < 200

    proc = run_cli("train", *train_args(seed_data_dir / "training", out, "--resume", ckpt, "--max_steps", k + 3,
                                        "--save_interval", "100", "--threads", "2"))
    assert_ok(proc)
    assert f"resumed from {ckpt} at step {k}" in proc.stderr
    assert checkpoint.read_checkpoint(ckpt)["step"] == k + 3
    assert checkpoint.read_checkpoint(out / "model.pt")["step"] == k + 3


def test_sigterm_saves_and_exits_cleanly(seed_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = _popen_train(*train_args(seed_data_dir / "training", out, "--max_steps", "100000",
                                    "--save_interval", "100000", "--log_interval", "1", "--threads", "1"))
    csv_path = out / "progress.csv"

    def logged_step() -> int:
        rows = csv_path.read_text().strip().splitlines() if csv_path.exists() else []
        return int(rows[-1].split(",")[0]) if len(rows) > 1 else 0

    try:
        seen = _wait_for(lambda: logged_step() >= 2, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    step = checkpoint.read_checkpoint(out / "checkpoint.pt")["step"]
    assert step >= seen  # only the stop save can have written a step > 0 with this save interval
    assert checkpoint.read_checkpoint(out / "model.pt")["step"] == step


# -- errors a user can cause --------------------------------------------------------------------

def test_synthetic_case_is_accepted(tiny_ckpt, tmp_path):
    """The baseline for the bad-input cases below: the same files, unbroken, work."""
    case = write_case(tmp_path / "case")
    proc = run_cli("sample", *sample_args(tiny_ckpt, case, tmp_path / "out"))
    assert_ok(proc)
    assert nib.load(str(tmp_path / "out" / "case" / "mask.nii.gz")).shape == (32, 32)


def test_volume_results_stream_through_disk_and_match_memory(tiny_ckpt, tmp_path, monkeypatch):
    """diffseg-sample keeps a volume's results in memmaps beside the outputs (removed after),
    and writes exactly what an in-memory run gives."""
    from napari_diffseg import data, sample
    from napari_diffseg.inference import Segmenter, run_to_end

    case = write_case(tmp_path / "case", shape=(32, 32, 5), with_seg=True)
    allocated = []
    original = sample.disk_arrays

    def spying(folder):
        allocated.append(folder)
        return original(folder)

    monkeypatch.setattr(sample, "disk_arrays", spying)
    out = tmp_path / "out"
    args = sample_args(tiny_ckpt, case, out, "--num_ensemble", "2", "--save_samples")
    assert sample.main([str(a) for a in args]) == 0
    assert allocated == [out / ".case.partial"] and not allocated[0].exists()
    memory = run_to_end(Segmenter.load(tiny_ckpt, device="cpu").run(
        data.load_case(data.find_case_files(case)).images, SamplingOptions(num_ensemble=2, respacing="3", seed=0)))
    written = {name: nib.load(str(out / "case" / f"{name}.nii.gz")).get_fdata() for name in
               ("mask", "probability", "variance", "samples")}
    np.testing.assert_array_equal(written["mask"], memory.mask)
    np.testing.assert_allclose(written["probability"], memory.probability, atol=1e-6)
    np.testing.assert_allclose(written["variance"], memory.variance, atol=1e-6)
    np.testing.assert_allclose(written["samples"], np.moveaxis(memory.samples, 0, -1), atol=1e-6)
    assert (out / "case" / "metrics.json").is_file()


def _break_case(kind: str, folder: Path) -> Path:
    case = write_case(folder)
    if kind == "missing":
        (case / "case_t2.nii.gz").unlink()
    elif kind == "duplicate":
        shutil.copy(case / "case_t1.nii.gz", case / "other_t1.nii.gz")
    elif kind == "shape":
        write_nifti(case / "case_t2.nii.gz", np.ones((32, 30), np.float32))
    elif kind in ("nan", "inf"):
        array = np.ones((32, 32), np.float32)
        array[3, 4] = np.nan if kind == "nan" else np.inf
        write_nifti(case / "case_flair.nii.gz", array)
    elif kind == "4d":
        write_nifti(case / "case_t1.nii.gz", np.ones((32, 32, 2, 2), np.float32))
    elif kind == "zeros":
        write_nifti(case / "case_t1ce.nii.gz", np.zeros((32, 32), np.float32))
    elif kind == "corrupt":
        (case / "case_t2.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))
    return case


BAD_INPUTS = {
    "missing": ["t2"],
    "duplicate": ["t1"],
    "shape": ["case_t2"],
    "nan": ["case_flair"],
    "inf": ["case_flair"],
    "4d": ["case_t1"],
    "zeros": ["case_t1ce"],
    "corrupt": ["case_t2"],
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_sample_bad_input_is_one_line_error(kind, tiny_ckpt, tmp_path):
    case = _break_case(kind, tmp_path / "case")
    proc = run_cli("sample", *sample_args(tiny_ckpt, case, tmp_path / "out"))
    assert_user_error(proc, *BAD_INPUTS[kind])


def test_train_bad_input_is_one_line_error(tmp_path):
    case = _break_case("missing", tmp_path / "data" / "case")
    proc = run_cli("train", *train_args(case.parent, tmp_path / "out", "--max_steps", "1"))
    assert_user_error(proc, "t2")


def test_checkpoint_that_does_not_fit_the_flags(reference_dir, tmp_path):
    case = write_case(tmp_path / "case")
    proc = run_cli("sample", "--model_path", reference_dir / "savedmodel000300.pt", "--flags_json",
                   reference_dir / "flags.json", "--num_channels", "64", "--data_dir", case,
                   "--out_dir", tmp_path / "out", "--timestep_respacing", "3", "--num_ensemble", "1",
                   "--device", "cpu", "--no_progress")
    assert_user_error(proc, "savedmodel000300.pt", "flags")


class _RunsCode:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


class _Tally(collections.Counter):
    pass


@pytest.mark.parametrize("payload", ["reduce", "custom_class"])
def test_checkpoint_with_pickled_code_is_refused(payload, tmp_path):
    case = write_case(tmp_path / "case")
    marker = tmp_path / "code-ran"
    bad = tmp_path / "bad.pt"
    if payload == "reduce":
        torch.save({"weights": _RunsCode(marker), "x": torch.zeros(2)}, bad)
    else:
        torch.save(_Tally(a=1), bad)
    proc = run_cli("sample", *sample_args(bad, case, tmp_path / "out"))
    assert_user_error(proc, "bad.pt", "refused")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "binary", "classifier", "flags_json"])
def test_bad_checkpoint_is_one_line_error(kind, tiny_ckpt, tmp_path):
    """README: a wrong --model_path is one line naming the file, exit 2, no traceback."""
    from support import BAD_KINDS, write_bad_checkpoint

    case = write_case(tmp_path / "case")
    bad = write_bad_checkpoint(kind, tmp_path, tiny_ckpt)
    proc = run_cli("sample", *sample_args(bad, case, tmp_path / "out"))
    assert_user_error(proc, str(bad), *BAD_KINDS[kind])


def test_reference_checkpoint_without_flags_points_to_the_flags_json(reference_dir, tmp_path):
    """Without flags the CLI tries the reference's defaults, which do not fit this small model."""
    case = write_case(tmp_path / "case")
    proc = run_cli("sample", *sample_args(reference_dir / "savedmodel000300.pt", case, tmp_path / "out"))
    assert_user_error(proc, "savedmodel000300.pt", "do not fit", "--flags_json", "--num_channels")


def test_unwritable_out_dir(tiny_ckpt, tmp_path):
    case = write_case(tmp_path / "case")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    assert_user_error(run_cli("sample", *sample_args(tiny_ckpt, case, blocker)), "not-a-folder")
    assert_user_error(run_cli("train", *train_args(tmp_path, blocker, "--max_steps", "1")), "not-a-folder")


def test_num_ensemble_zero(tiny_ckpt, tmp_path):
    case = write_case(tmp_path / "case")
    proc = run_cli("sample", *sample_args(tiny_ckpt, case, tmp_path / "out"), "--num_ensemble", "0")
    assert_user_error(proc, "num_ensemble")


# -- the reference checkpoint -----------------------------------------------------------------

def test_reference_checkpoint_through_the_cli(reference_dir, seed_data_dir, tmp_path):
    case = seed_data_dir / "testing" / "000246"
    out = tmp_path / "out"
    proc = run_cli("sample", "--model_path", reference_dir / "savedmodel000300.pt", "--flags_json",
                   reference_dir / "flags.json", "--data_dir", case, "--timestep_respacing", "5",
                   "--num_ensemble", "1", "--out_dir", out, "--device", "cpu", "--no_progress")
    assert_ok(proc)
    for name in ("mask", "probability", "variance"):
        image = nib.load(str(out / "000246" / f"{name}.nii.gz"))
        assert image.shape == (240, 240)
        assert not np.any(np.asanyarray(image.dataobj)[:8])  # the reference never sees the border


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def test_reference_acceptance_dice(reference_dir, seed_data_dir, tmp_path):
    """The reference's result, reproduced within tolerance: 30 respaced steps, 4 members, against
    the reference's own 1000-step samples of the same slice. Dice 0.60-0.67 over seeds 0-2 (0.549
    at 25 steps for seed 0, too close to call); the issue's 100-step check (0.633, a minute on an
    idle CPU) is ``benchmarks/bench_reference.py``."""
    out = tmp_path / "out"
    proc = run_cli("sample", "--model_path", reference_dir / "savedmodel000300.pt", "--flags_json",
                   reference_dir / "flags.json", "--data_dir", seed_data_dir / "testing" / "000246",
                   "--timestep_respacing", "30", "--num_ensemble", "4", "--out_dir", out, "--device", "cpu",
                   "--no_progress", "--seed", "0")
    assert_ok(proc)
    reference = torch.load(reference_dir / "sample_reference.pt", map_location="cpu", weights_only=True)
    assert "000246" in reference["slice"]
    ref_mask = ((reference["samples"][0] + reference["samples"][1]) / 2 > 0.5)[0, 0].numpy()
    ours = np.asanyarray(nib.load(str(out / "000246" / "mask.nii.gz")).dataobj)[8:-8, 8:-8]
    assert ours.shape == ref_mask.shape == (224, 224)
    dice = _dice(ours, ref_mask)
    print(f"acceptance Dice vs reference: {dice:.3f}")
    assert dice >= 0.55, dice


def test_slices_restrict_a_volume_in_sample_and_eval(tiny_ckpt, tmp_path):
    """--slices START:STOP: diffseg-sample segments only that slab (the rest is written as
    background), and diffseg-eval scores only that slab."""
    from napari_diffseg import data, evaluate, sample
    from napari_diffseg.inference import Segmenter, run_to_end

    case = write_case(tmp_path / "case", shape=(32, 32, 6), with_seg=True)
    out = tmp_path / "out"
    assert sample.main([str(a) for a in sample_args(tiny_ckpt, case, out, "--num_ensemble", "2",
                                                    "--slices", "2:4")]) == 0
    probability = nib.load(str(out / "case" / "probability.nii.gz")).get_fdata()
    full = run_to_end(Segmenter.load(tiny_ckpt, device="cpu").run(
        data.load_case(data.find_case_files(case)).images, SamplingOptions(num_ensemble=2, respacing="3", seed=0)))
    assert probability.shape == (32, 32, 6)
    assert not probability[..., [0, 1, 4, 5]].any()
    # Each slice's chains are seeded by the slice, so the slab equals the same slices of a full run
    # (to rounding: the two runs may put different numbers of chains through each network call).
    np.testing.assert_allclose(probability[..., 2:4], full.probability[..., 2:4], atol=5e-4)

    report_dir = tmp_path / "eval"
    assert evaluate.main(["--model_path", str(tiny_ckpt), "--data_dir", str(case), "--out_dir", str(report_dir),
                          "--timestep_respacing", "3", "--num_ensemble", "1", "--ensemble_sizes", "1",
                          "--device", "cpu", "--slices", "1:3"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["settings"]["slices"] == "1:3"
    with pytest.raises(SystemExit):
        sample.build_parser().parse_args(["--slices", "40"])


def test_slice_range_parses_python_slices():
    from napari_diffseg.cli import slice_range

    assert slice_range("40:90") == slice(40, 90)
    assert slice_range(":12") == slice(None, 12)
    assert slice_range("3:") == slice(3, None)
    assert list(range(10)[slice_range("-3:")]) == [7, 8, 9]


def test_slabs_that_pick_nothing_are_refused_and_metrics_cover_the_slab(tiny_ckpt, tmp_path, capsys):
    """--slices that pick no slice (reversed, past the end) are a user error in both tools, not
    an all-background mask scored 0; metrics.json scores the slab that was segmented, says which,
    and a re-run does not leave an earlier run's samples beside its own results."""
    from napari_diffseg import evaluate, sample

    case = write_case(tmp_path / "case", shape=(32, 32, 6), with_seg=True)
    out = tmp_path / "out"
    for slab in ("5:2", "40:50"):
        assert sample.main([str(a) for a in sample_args(tiny_ckpt, case, out, "--slices", slab)]) == 2
        assert "slices 0 to 5" in capsys.readouterr().err
        assert evaluate.main(["--model_path", str(tiny_ckpt), "--data_dir", str(case), "--out_dir",
                              str(tmp_path / f"eval{slab[0]}"), "--timestep_respacing", "3", "--ensemble_sizes", "1",
                              "--num_ensemble", "1", "--device", "cpu", "--slices", slab]) == 2
        assert "slices 0 to 5" in capsys.readouterr().err
    assert not (out / "case").exists()

    assert sample.main([str(a) for a in sample_args(tiny_ckpt, case, out, "--slices", "2:4", "--save_samples",
                                                    "--timestep_respacing", "10")]) == 0
    metrics = json.loads((out / "case" / "metrics.json").read_text())
    mask = nib.load(str(out / "case" / "mask.nii.gz")).get_fdata() > 0
    truth = nib.load(str(case / "case_seg.nii.gz")).get_fdata() > 0
    assert metrics["slices"] == "2:4"
    assert metrics["dice"] == pytest.approx(_dice(mask[..., 2:4], truth[..., 2:4]))
    assert (out / "case" / "samples.nii.gz").is_file()
    assert sample.main([str(a) for a in sample_args(tiny_ckpt, case, out, "--slices", "2:4")]) == 0
    assert not (out / "case" / "samples.nii.gz").exists()


def test_metrics_json_writes_an_undefined_distance_as_null(tmp_path):
    from napari_diffseg import sample

    path = tmp_path / "metrics.json"
    sample._write_json(path, {"dice": 0.0, "hd95": float("nan")})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == \
        {"dice": 0.0, "hd95": None}


@pytest.mark.parametrize("device, words", [("cuda:5", ("cuda:5", "no cuda gpu")), ("cuda:abc", ("cuda:n",))])
def test_a_device_with_a_bad_index_is_one_line(device, words, tiny_ckpt, tmp_path, capsys):
    from napari_diffseg import sample

    case = write_case(tmp_path / "case")
    args = sample_args(tiny_ckpt, case, tmp_path / "out")
    args[args.index("--device") + 1] = device
    assert sample.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.lower()
    assert "traceback" not in err and all(w in err for w in words), err


def test_bad_training_and_eval_numbers_are_one_line(tiny_ckpt, tmp_path, capsys):
    from napari_diffseg import evaluate, train

    data_dir = tmp_path / "data"
    write_case(data_dir / "case", with_seg=True)
    cases = [("--lr", "-1", "--lr -1"), ("--threads", "-1", "--threads -1"), ("--max_steps", "-1", "--max_steps -1"),
             ("--resize_to", "7", "multiple of 2"), ("--crop_border", "200", "200-pixel border crop")]
    for flag, value, words in cases:
        args = train_args(data_dir, tmp_path / "out", "--max_steps", "1", flag, value)  # the last one counts
        assert train.main([str(a) for a in args]) == 2, flag
        assert words in capsys.readouterr().err
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "checkpoint.pt").write_bytes(b"an earlier run")
    assert train.main([str(a) for a in train_args(data_dir, earlier, "--max_steps", "1")]) == 2
    assert "--resume" in capsys.readouterr().err and (earlier / "checkpoint.pt").read_bytes() == b"an earlier run"
    assert evaluate.main(["--model_path", str(tiny_ckpt), "--data_dir", str(data_dir), "--out_dir",
                          str(tmp_path / "eval"), "--radius", "-1"]) == 2
    assert "--radius" in capsys.readouterr().err


def test_results_are_readable_like_any_new_file(tiny_ckpt, tmp_path):
    """Checkpoints and reports go through a private temp file: renamed into place they carry the
    permissions of a newly created file (the umask's), not the temp file's owner-only 0600."""
    from napari_diffseg import evaluate

    umask = os.umask(0o022)
    try:
        path = tmp_path / "copy.pt"
        checkpoint.atomic_save(torch.load(tiny_ckpt, weights_only=True), path)
        evaluate._write_text(tmp_path / "report.md", "report")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644


def test_sigterm_stops_a_command_like_ctrl_c():
    """A kill or a scheduler's timeout takes the Ctrl-C path (temporary files cleaned up, exit
    130), and the previous handler is back afterwards."""
    from napari_diffseg.cli import guarded

    before = signal.getsignal(signal.SIGTERM)

    @guarded
    def main(argv=None):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    assert main() == 130
    assert signal.getsignal(signal.SIGTERM) is before
