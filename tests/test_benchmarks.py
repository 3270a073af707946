"""The benchmark scripts run (--quick: tiny networks, one or two steps) and report sane numbers,
and the reference-style loop they time against agrees with our faithful sampler.

No timing is asserted: the figures depend on the machine. What is checked is the structure
of the results, that the numbers are positive and finite, and that the modes compared
produce the same thing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common as common  # noqa: E402
import bench_interactive  # noqa: E402
import bench_reference  # noqa: E402
import bench_regions  # noqa: E402
import bench_sampler  # noqa: E402
import bench_train  # noqa: E402

from napari_diffseg.diffusion import Diffusion, DiffusionConfig  # noqa: E402
from napari_diffseg.ensemble import sample_ensemble  # noqa: E402
from napari_diffseg.options import SamplingOptions  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    # The scripts set torch's thread count for the whole process; put it back for other tests.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_sampler_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "sampler.json"
    results = bench_sampler.main(["--quick", "--steps", "1", "--warmup", "1", "--widget_runs", "1",
                                  "--json", str(out)])
    printed = capsys.readouterr().out
    assert _last_json_line(printed) == json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert "extrapolated from 1 timed steps" in printed
    assert results["benchmark"] == "sampler" and results["quick"] is True

    for name in ("paper", "demo"):
        config = results["configs"][name]
        modes = config["modes"]
        assert {"a", "b", "c_fp32", "c"} <= set(modes)
        preset_steps = modes["c"]["steps"]
        for key in ("ref_b1", "ref_b5"):  # the reference's forward at batch 1 and 5, no loop around it
            ref = modes.pop(key)
            assert ref["status"] == "ok" and ref["batch"] == int(key[5:]) and _positive(ref["s_per_call"])
            # one ensemble step = 5 calls at batch 1, one call at batch 5
            assert ref["ms_per_step"] == pytest.approx(1000 * ref["s_per_call"] * (5 // ref["batch"]))
            assert ref["steps"] == 1000
        for key, mode in modes.items():
            assert mode["status"] == "ok", (name, key, mode)
            assert _positive(mode["ms_per_step"]) and _positive(mode["s_per_ensemble"]), (name, key)
            assert mode["extrapolated_from"] == mode["timed_steps"] == 1
            assert mode["peak_mem_mib"] is None or mode["peak_mem_mib"] >= 0
            # s/ensemble is ms/step scaled to the chain length
            assert mode["s_per_ensemble"] == pytest.approx(mode["ms_per_step"] * mode["steps"] / 1000)
        assert modes["a"]["steps"] == modes["b"]["steps"] == 1000
        assert modes["c"]["steps"] == modes["c_fp32"]["steps"] == preset_steps < 1000
        assert modes["a"]["batch"] == 1
        for key in ("b", "c"):  # chains per call as the product's probe picks them, timings kept
            assert modes[key]["batch"] in (1, 5) and modes[key]["batch"] == modes[key]["probe"]["chosen"]
            assert set(modes[key]["probe"]["ms_per_chain"]) <= {1, 5}
        assert not modes["a"]["channels_last"] and modes["b"]["channels_last"]
        # Every mode ends with the same thing: 5 chains of one mask at the network's size.
        shapes = {tuple(m["sample_shape"]) for m in modes.values()}
        assert shapes == {(5, 1, *config["network_input"])}
        assert set(config["ratios"]) >= {"b/a", "c/a", "c_fp32/a"}
        assert all(_positive(r) for r in config["ratios"].values())
        assert config["a_vs_b_max_abs_diff"] < 1e-4
        floor = config["convolutions"]  # the convolutions alone: fp32 both layouts, the fast precision
        settings = {(r["precision"], r["channels_last"], r["batch"]) for r in floor["rows"]}
        assert {("fp32", False, 1), ("fp32", False, 5), ("fp32", True, 1), ("fp32", True, 5)} <= settings
        assert all(_positive(r["s_per_chain_forward"]) for r in floor["rows"])
        assert floor["a_s_per_chain_forward"] == pytest.approx(modes["a"]["ms_per_step"] / 1000 / 5)
        best_fp32 = min(r["s_per_chain_forward"] for r in floor["rows"] if r["precision"] == "fp32")
        assert floor["ceiling_vs_a"]["fp32"] == pytest.approx(floor["a_s_per_chain_forward"] / best_fp32)
    assert "convolutions alone" in printed

    volume = results["volume"]  # the whole-volume row: a 3-slice phantom volume in --quick
    assert volume["status"] == "ok" and volume["brain_slices"] == 3 and volume["shape"][-1] == 3
    assert _positive(volume["seconds"]) and 0 <= volume["dice"] <= 1
    assert volume["steps"] == results["configs"]["demo"]["modes"]["c"]["steps"]
    assert volume["probe"]["chosen"] in (1, 5, 10, 15) and volume["chains_per_call"] in (1, 5, 10, 15)
    # the probe's choice, unless the volume's own first steps (a busy CPU) tuned it further
    assert volume["chains_per_call"] == volume["probe"]["chosen"] or volume["batching"] == "tuned"
    assert volume["slices_per_batch"] == max(1, volume["chains_per_call"] // 5)
    assert "whole volume" in printed and "batching probe" in printed

    widget = results["widget"]
    run = widget["runs"][0]
    assert run["load_s"] >= 0 and _positive(run["first_frame_s"]) and _positive(run["ensemble_s"])
    assert run["load_s"] <= run["first_frame_s"] <= run["ensemble_s"]
    assert run["num_ensemble"] == 5 and run["steps"] == results["configs"]["demo"]["modes"]["c"]["steps"]
    assert run["result_shape"] == widget["input"] and run["previews"] >= 1
    assert widget["median_ensemble_s"] == run["ensemble_s"]  # one run: its own median


def test_sampler_benchmark_mode_selection():
    """--modes runs only the keys named; --reference_steps times (a) on its own count, and then
    (a) and (b) are not compared state for state."""
    results = bench_sampler.main(["--quick", "--configs", "paper", "--modes", "a,b", "--steps", "1",
                                  "--reference_steps", "2", "--warmup", "0", "--widget_runs", "0",
                                  "--volume", "none"])
    config = results["configs"]["paper"]
    assert set(config["modes"]) == {"a", "b"}
    assert config["modes"]["a"]["timed_steps"] == 2 and config["modes"]["b"]["timed_steps"] == 1
    assert set(config["ratios"]) == {"b/a"} and "a_vs_b_max_abs_diff" not in config
    assert config["convolutions"] is None  # "floor" not asked for
    assert results["widget"] is None and results["volume"] is None and results["reference_timed_steps"] == 2


def test_train_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "train.json"
    results = bench_train.main(["--quick", "--iters", "1", "--warmup", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert _last_json_line(printed) == json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["benchmark"] == "train" and results["batch"] == 2
    for name in ("demo", "paper"):
        config = results["configs"][name]
        assert set(config["modes"]) == {"plain", "ours"}
        for key, mode in config["modes"].items():
            assert mode["status"] == "ok", (name, key, mode)
            assert _positive(mode["it_per_s"]) and _positive(mode["s_per_it"]), (name, key)
            assert mode["it_per_s"] * mode["s_per_it"] == pytest.approx(1.0)
            assert math.isfinite(mode["loss"]) and mode["loss"] > 0
        assert config["modes"]["plain"]["precision"] == "fp32"
        assert config["modes"]["ours"]["precision"] in ("bf16", "fp16", "fp32")
        assert _positive(config["ratio_ours_over_plain"])


# -- (a) reference-style loop == (b) our faithful sampler ------------------------------------------

N = 3
SIZE = (16, 16)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model = common.random_model(common.TINY_FLAGS, seed=3)
    images = torch.rand((1, 4, *SIZE), generator=torch.Generator().manual_seed(5))
    return model, images


def _faithful(model, diffusion, images, steps, seed):
    """Our sampler as the faithful mode runs it (fp32, channels-last), stopped after ``steps``."""
    model = model.to(memory_format=torch.channels_last)
    try:
        last = None
        for count, step in enumerate(sample_ensemble(model, diffusion, images, SamplingOptions(N, seed=seed)), start=1):
            last = step
            if count == steps:
                break
        return last.x
    finally:
        model.to(memory_format=torch.contiguous_format)


@pytest.mark.parametrize("respacing, steps", [("", 4), ("5", 5)], ids=["first 4 of 1000 steps", "whole 5-step chain"])
def test_reference_style_loop_matches_faithful_sampler(tiny, respacing, steps):
    model, images = tiny
    diffusion = Diffusion.from_config(DiffusionConfig(), respacing)
    seed = 11
    noise = bench_sampler.EnsembleNoise(seed, 0, N, SIZE, steps, diffusion.num_timesteps, images.device)
    ours = _faithful(model, diffusion, images, steps, seed)
    reference_style = bench_sampler.reference_style_ensemble(model, diffusion, images, N, steps=steps, noise=noise)
    assert reference_style.shape == ours.shape == (N, 1, *SIZE)
    torch.testing.assert_close(reference_style, ours, atol=1e-5, rtol=1e-5)
    if steps == diffusion.num_timesteps:  # ended at t = 0: the sample is the clipped x0 estimate
        assert reference_style.abs().max() <= 1.0

    # Not vacuous: other noise gives other chains.
    other = bench_sampler.EnsembleNoise(seed + 1, 0, N, SIZE, steps, diffusion.num_timesteps, images.device)
    moved = bench_sampler.reference_style_ensemble(model, diffusion, images, N, steps=steps, noise=other)
    assert (moved - ours).abs().max() > 1e-3


def test_compile_failure_is_reported_not_raised(tiny, monkeypatch):
    model, images = tiny

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(bench_sampler.torch, "compile", broken)
    cfg = bench_sampler.Config("tiny", model, DiffusionConfig(), images,
                               {"timestep_respacing": "4", "sampler": "ddpm", "clip_range": [0.0, 1.0]}, "tiny")
    result = bench_sampler.time_compiled(cfg, torch.device("cpu"), N, 1, 1, "(c) fast", "4", "ddpm", "fp32",
                                         (0.0, 1.0))
    assert result["status"].startswith("failed: RuntimeError: no compiler here")
    assert "_body" not in vars(model)  # the model is left as it was


def test_interactive_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "interactive.json"
    assert bench_interactive.main(["--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert _last_json_line(printed)["summary"] == results["summary"]
    for mode in ("refine", "by_hand"):
        row = results["summary"][mode]
        assert 0 <= row["dice_0"] <= 1 and 0 <= row["noc85"] <= 3
    assert _positive(results["summary"]["refine"]["seconds_per_round"])
    assert results["summary"]["by_hand"]["seconds_per_round"] is None
    assert all(len(s["refine"]["dice"]) == 4 for s in results["slices"])  # round 0 + 3 rounds


def test_next_click_marks_the_centre_of_the_largest_error():
    import numpy as np

    from napari_diffseg import clicks

    truth = np.zeros((40, 40), bool)
    truth[5:25, 5:25] = True
    mask = truth.copy()
    mask[5:25, 5:15] = False  # a 20x10 miss
    mask[30:34, 30:34] = True  # a small false positive
    disk, value = clicks.next_click(mask, truth, radius=2)
    assert value == 1 and disk.sum() == 13  # a radius-2 disk
    ys, xs = np.nonzero(disk)
    assert truth[ys, xs].all() and not mask[ys, xs].any()  # inside the missed region
    assert abs(ys.mean() - 14.5) <= 1 and abs(xs.mean() - 9.5) <= 1  # its centre
    assert clicks.next_click(truth, truth, 2) is None
    assert bench_interactive.rounds_to([0.5, 0.86, 0.91], 0.85, 10) == 1
    assert bench_interactive.rounds_to([0.5, 0.6], 0.9, 10) == 10


def test_region_box_surrounds_the_largest_error():
    import numpy as np

    from napari_diffseg import clicks

    truth = np.zeros((40, 40), bool)
    truth[5:25, 5:25] = True
    mask = truth.copy()
    mask[5:25, 5:15] = False
    region, value = clicks.largest_error(mask, truth)
    assert value == 1 and region.sum() == 200
    box = bench_interactive.region_box(region, 3)
    assert box[2:28, 2:18].all() and box.sum() == 26 * 16  # rows 5-24, cols 5-14, grown by 3
    assert bench_interactive.region_box(region, 30).all()  # clipped at the slice's edges


def test_interactive_region_refines_inside_the_box_only():
    """With --region_margin each refine gets the current mask outside the box around the error,
    and the scribbles inside it, as known pixels; without it only the scribbles."""
    import argparse
    import types

    import numpy as np

    truth = np.zeros((40, 40), bool)
    truth[5:25, 5:25] = True
    start = truth.copy()
    start[5:25, 5:15] = False  # a 20x10 miss
    calls = []

    class Stub:
        def run(self, images, options, guidance=None, **kwargs):
            known_mask = None if guidance is None else guidance.known_mask
            known_values = None if guidance is None else guidance.known_values
            calls.append((None if known_mask is None else np.array(known_mask),
                          None if known_values is None else np.array(known_values)))
            result = types.SimpleNamespace(mask=start.astype(np.uint8), samples=np.zeros((2, 40, 40), np.float32))
            yield from ()
            return result

    for margin in (2, None):
        calls.clear()
        args = argparse.Namespace(ensemble=2, seed=0, max_rounds=1, radius=2, start_step=1, region_margin=margin,
                                  refine_respacing=None, resample=1)
        bench_interactive.simulate(Stub(), np.zeros((4, 40, 40), np.float32), truth, args)
        known, values = calls[1]  # calls[0] is the run that gives round 0
        box = np.zeros_like(truth)
        box[3:27, 3:17] = True
        disk_pixels = int((known & box).sum())
        assert disk_pixels == 13 and values[known & box].min() == 1  # the tumour scribble
        if margin is None:
            assert known.sum() == 13
        else:
            assert known[~box].all()  # everything outside the box is kept ...
            np.testing.assert_array_equal(values[~box], start[~box])  # ... as the current mask


def test_conv_gflop_counts_multiply_adds_of_every_layer():
    """2 x C_in x C_out x k x k x output pixels per convolution, strides and groups included."""
    plain = torch.nn.Conv2d(4, 8, 3, padding=1)
    strided = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
    grouped = torch.nn.Conv2d(8, 8, 1, groups=2)
    layers = [(plain, (1, 4, 16, 16)), (strided, (1, 8, 16, 16)), (grouped, (1, 8, 16, 16))]
    expected = 2 * 4 * 8 * 9 * 16 * 16 + 2 * 8 * 8 * 9 * 8 * 8 + 2 * 8 * 8 * 16 * 16 // 2
    assert bench_sampler.conv_gflop(layers) == pytest.approx(expected / 1e9)


def test_reference_benchmark_quick(reference_dir, capsys):
    """bench_reference.py (the 100-step acceptance check moved out of the tests) runs."""
    out = bench_reference.main(["--quick", "--seeds", "0,1"])
    assert [row["seed"] for row in out["rows"]] == [0, 1]
    assert all(0 <= row["dice"] <= 1 and _positive(row["seconds"]) for row in out["rows"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == "2"


def test_regions_benchmark_quick(capsys):
    assert bench_regions.main(["--quick", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["slice_s"]) == {"whole_tumour", "regions"}
    assert result["slice_ratio"] > 0 and result["volume_ratio"] > 0
    assert all(s > 0 for s in result["volume_s"].values())


def test_a_volume_run_on_a_stored_batching_choice_prints(capsys):
    """A stored choice's report carries its timings but no probe time (nothing was timed)."""
    volume = {"status": "ok", "volume": "case", "shape": [8, 8, 4], "brain_slices": 4, "num_ensemble": 5, "steps": 2,
              "sampler": "ddpm", "precision": "bf16", "chains_per_call": 30, "slices_per_batch": 6, "seconds": 60.0,
              "s_per_slice": 0.5, "load_s": 0.1,
              "probe": {"chosen": 30, "from": "batching.json", "ms_per_chain": {5: 10.0, 30: 8.0}}}
    bench_sampler.print_volume(volume)
    assert "30 chains per call, the choice an earlier probe stored in batching.json" in capsys.readouterr().out
