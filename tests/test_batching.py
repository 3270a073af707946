"""How many chains go through the network together (issue 14): a timed probe picks it, and the
choice changes the speed only: the chains' noise never depends on it, and their values agree to
the rounding of the arithmetic."""

import itertools
import json

import numpy as np
import pytest
import torch

from napari_diffseg import batching as inference_batching
from napari_diffseg import inference
from napari_diffseg.errors import DiffSegError
from napari_diffseg.geometry import Geometry
from napari_diffseg.batching import batch_candidates
from napari_diffseg.inference import Segmenter, format_eta, run_to_end
from napari_diffseg.options import SamplingOptions

from support import final_members, random_images, save_tiny_checkpoint, table_timer, tiny_model
from napari_diffseg.diffusion import Diffusion, DiffusionConfig


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return tiny_model(2)


@pytest.mark.parametrize("chains_per_call", [1, 2, 3, 4])
def test_members_do_not_depend_on_chains_per_call(model, chains_per_call):
    """Two slices of two chains, split into network calls every way: same members (fp32, to
    rounding), including splits that cut through a slice's chains."""
    diffusion = Diffusion.from_config(DiffusionConfig(), "5")
    images = random_images(2, seed=4)
    whole = final_members(model, diffusion, images, 2, seed=11, slice_keys=[3, 8])
    split = final_members(model, diffusion, images, 2, seed=11, slice_keys=[3, 8], chains_per_call=chains_per_call)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)
    other = final_members(model, diffusion, images, 2, seed=12, slice_keys=[3, 8], chains_per_call=chains_per_call)
    assert not torch.allclose(other, whole)  # the seed still decides


def test_self_conditioned_members_do_not_depend_on_chains_per_call():
    model = tiny_model(3, self_condition=True)
    diffusion = Diffusion.from_config(DiffusionConfig(), "4")
    images = random_images(1, seed=5)
    whole = final_members(model, diffusion, images, 3, seed=2)
    for chains in (1, 2):
        torch.testing.assert_close(final_members(model, diffusion, images, 3, seed=2, chains_per_call=chains), whole,
                                   rtol=1e-4, atol=1e-5)


def test_batch_candidates():
    assert batch_candidates(5, 1, 32) == [1, 5]  # one slice: chain by chain, or its 5 chains at once
    assert batch_candidates(5, 130, 32) == [1, 5, 10, 20, 30]  # whole slices only, up to the cap
    assert batch_candidates(5, 3, 64) == [1, 5, 10, 15]
    assert batch_candidates(5, 130, 2) == [1, 5]  # a cap below one slice still allows one slice
    assert batch_candidates(1, 1, 32) == [1]


@pytest.fixture()
def segmenter_path(tmp_path):
    return save_tiny_checkpoint(tmp_path / "tiny.pt", Geometry())


def test_auto_batching_probes_once_and_keeps_the_results(segmenter_path, monkeypatch, fake_timer):
    fake_timer.update({1: 0.010, 2: 0.015, 4: 0.020, 6: 0.030})  # the clock's verdict varies with the load
    volume = np.random.default_rng(6).random((4, 16, 16, 3)).astype(np.float32)
    auto = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    assert auto.batching == "auto"
    calls = []
    real = inference.probe_batching

    def counted(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "probe_batching", counted)
    first = run_to_end(auto.run(volume, SamplingOptions(num_ensemble=2, respacing="3", seed=4)))
    again = run_to_end(auto.run(volume, SamplingOptions(num_ensemble=2, respacing="3", seed=4)))
    assert calls == [[1, 2, 4, 6]]  # probed at the first run only: cached for this size and precision
    chosen = auto.probe_report["chosen"]
    assert first.settings["chains_per_call"] == chosen and first.settings["slices_per_batch"] == max(1, chosen // 2)
    assert set(auto.probe_report["ms_per_chain"]) <= {1, 2, 4, 6} and auto.probe_report["probe_s"] >= 0
    np.testing.assert_array_equal(again.probability, first.probability)
    for fixed in (1, 2, 6):
        other = run_to_end(Segmenter.load(segmenter_path, device="cpu", batching=fixed).run(
            volume, SamplingOptions(num_ensemble=2, respacing="3", seed=4)))
        assert other.settings["chains_per_call"] == fixed
        np.testing.assert_allclose(other.probability, first.probability, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(other.variance, first.variance, rtol=1e-3, atol=1e-5)


def _probe(measure, sizes=(1, 5, 10)):
    return inference.probe_batching(tiny_model(0), torch.device("cpu"), list(sizes), (16, 16), "fp32",
                                    measure=measure)


def test_the_larger_batch_wins_unless_a_smaller_is_clearly_cheaper():
    for per_call, expected in (({1: 1.0, 5: 7.0, 10: 20.0}, 1),  # the paper config on a 2-core CPU
                               ({1: 1.0, 5: 2.0, 10: 3.0}, 10),
                               ({1: 1.0, 5: 3.0, 10: 9.0}, 5),  # 10 is 50 % dearer per chain than 5
                               ({1: 1.0, 5: 4.0, 10: 8.5}, 10)):  # 6 % dearer per chain: the larger wins
        chosen, report = _probe(table_timer(per_call))
        assert chosen == expected and report["settled"], report
        assert report["ms_per_chain"][1] == 1000.0 and report["rounds"] == 2
    # Slow calls (>= 0.2 s) are timed once after a warm-up, then again in a second round (in
    # reverse order); a size twice DEAR x dearer than the best is not timed a third time.
    calls = []
    chosen, report = _probe(table_timer({1: 1.0, 5: 9.0, 10: 30.0}, calls))
    assert chosen == 1 and report["settled"] and report["capped"]
    assert calls == [1, 1, 5, 5, 5, 1]  # 5 cost 1.8x per chain: 10 is never tried
    calls.clear()
    _probe(table_timer({1: 0.01, 5: 0.05, 10: 0.1}, calls))
    assert calls[:4] == [1, 1, 1, 1]  # cheap calls: a warm-up, then the best of three


def test_a_spike_under_load_neither_stops_the_probe_nor_decides():
    """Issue 24: one slow timing of 5 chains (another job took the CPU) made the old probe stop
    and store "1 chain per call". Now the spiked size is timed again, and growth resumes."""
    chosen, report = _probe(table_timer({1: 1.0, 5: 2.0, 10: 3.0}, spikes={5: [9.0]}))
    assert chosen == 10 and report["settled"], report
    assert report["ms_per_chain"] == {1: 1000.0, 5: 400.0, 10: 300.0}


def test_timings_that_keep_disagreeing_are_not_settled():
    """A load that grows call after call: no size is ever timed twice alike, so the choice (here
    biased to the sizes timed first) serves one run and is not stored."""
    load = itertools.count(2, 1)
    chosen, report = _probe(lambda batch: batch * 0.5 * next(load))
    assert not report["settled"] and report["rounds"] == inference_batching.ROUNDS


def test_an_unsettled_probe_serves_the_run_but_is_not_stored(segmenter_path, monkeypatch):
    rng = np.random.default_rng(1)
    monkeypatch.setattr(inference_batching, "_call_timer", lambda *args, **kwargs: (
        lambda batch: 0.5 * batch * (1 + 2 * rng.random())))
    volume = np.random.default_rng(3).random((4, 16, 16, 3)).astype(np.float32)
    segmenter = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    result = run_to_end(segmenter.run(volume, SamplingOptions(num_ensemble=2, respacing="2")))
    assert result.settings["batching"] == "probed" and not segmenter.probe_report["settled"]
    assert not inference.batching_file().exists()


def test_a_wrong_stored_choice_is_dropped_when_the_new_probe_cannot_settle(segmenter_path, monkeypatch):
    """Under load the probe timed again may not settle: the run goes on with it, and the stored
    choice its pace showed wrong is removed, so that the next run probes afresh (before, the
    poisoned entry outlived every loaded re-probe)."""
    rng = np.random.default_rng(1)
    monkeypatch.setattr(inference_batching, "_call_timer", lambda *args, **kwargs: (
        lambda batch: 0.01 * batch ** 0.3 * (1 + 2 * rng.random())))  # 10 clearly cheaper per chain, noisily
    volume = np.random.default_rng(6).random((4, 16, 16, 12)).astype(np.float32)
    segmenter = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    _poison(segmenter, _net_size(segmenter), timings={1: 1000.0, 5: 3000.0})
    result = run_to_end(segmenter.run(volume, SamplingOptions(num_ensemble=5, respacing="3", seed=2)))
    assert segmenter.probes == 1 and not segmenter.probe_report["settled"]
    assert result.settings["chains_per_call"] > 1
    key = segmenter._stored_key((*_net_size(segmenter), segmenter.precision))
    assert inference_batching.stored_batching(key) is None


def _poison(segmenter, net_size, chains=1, timings=None, pace=None):
    """What a probe run under load left in the file: 1 chain per call, larger sizes "dear"."""
    timings = timings or {1: 40.0, 5: 90.0}
    entry = inference_batching.BatchingChoice(chains, "stored", timings, capped=True, pace_ms=pace or {})
    inference_batching.store_batching(segmenter._stored_key((*net_size, segmenter.precision)), entry)


def _net_size(segmenter, height=16, width=16):
    return segmenter.loaded.geometry.network_size(height, width, segmenter.loaded.unet_config.size_multiple)


def test_a_stale_stored_choice_is_corrected_within_one_volume(segmenter_path, fake_timer):
    """Issue 24: a stored choice of 1 chain per call, where 10 is faster now. The volume's first
    batches run at 1 and are timed; far faster than the stored pace, the probe runs again (10)
    and the rest of the volume goes at 10, or larger where the volume's own pace says so; the
    file then holds that choice."""
    volume = np.random.default_rng(6).random((4, 16, 16, 12)).astype(np.float32)
    segmenter = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    _poison(segmenter, _net_size(segmenter), timings={1: 1000.0, 5: 3000.0})  # timed while the CPU was busy
    fake_timer.update({1: 0.010, 5: 0.030, 10: 0.040, 20: 0.100, 40: 0.300, 60: 0.500})  # 10: 4 ms a chain
    progress = []
    result = run_to_end(segmenter.run(volume, SamplingOptions(num_ensemble=5, respacing="3", seed=2)), progress.append)
    chains = [p.chains for p in progress]
    assert chains[0] == 1 and 1 not in chains[3 * 3:], chains  # at most three one-slice batches at 1
    assert chains[chains.index(10) - 1] == 1 and min(chains[chains.index(10):]) >= 10, chains
    assert "10 chains per call (re-timed" in progress[chains.index(10)].batching
    final = result.settings["chains_per_call"]
    assert final >= 10 and result.settings["batching"] in ("re-probed", "tuned")
    entry = inference_batching.stored_batching(segmenter._stored_key((*_net_size(segmenter), "fp32")))
    assert entry.chains == final and final in entry.pace_ms  # the new choice, and the pace it ran at
    # The change of batching changed the speed only.
    fixed = run_to_end(Segmenter.load(segmenter_path, device="cpu", batching=10).run(
        volume, SamplingOptions(num_ensemble=5, respacing="3", seed=2)))
    np.testing.assert_allclose(result.probability, fixed.probability, rtol=1e-4, atol=1e-5)


def _tuner(choice, sizes=(1, 5, 10, 20, 30), fresh=False, reprobed=None):
    recorded = []
    tuner = inference_batching.PaceTuner(choice, list(sizes), fresh, reprobe=lambda: reprobed,
                                         record=lambda c: recorded.append((c.chains, dict(c.pace_ms))))
    return tuner, recorded


def _feed(tuner, ms_per_chain_step: dict, batches: int, steps: int = 2, slices_per_chain=5) -> list[int]:
    """Run ``batches`` batches whose steps take the table's pace at the tuner's size."""
    sizes = []
    for i in range(batches):
        chains = tuner.chains
        sizes.append(chains)
        for _ in range(steps):
            tuner.step(ms_per_chain_step[chains] * max(chains, slices_per_chain) / 1000, max(chains, slices_per_chain))
        tuner.batch_done(last=i == batches - 1)
    return sizes


def test_the_volume_tries_larger_batches_and_keeps_them_unless_clearly_slower():
    """The pace on the volume itself decides, whatever the probe said: chain by chain the demo
    model's sampling steps cost twice what the probe's bare calls did."""
    choice = inference_batching.BatchingChoice(1, "stored", {1: 50.0, 5: 60.0}, capped=True)
    tuner, recorded = _tuner(choice)
    pace = {1: 90.0, 5: 40.0, 10: 34.0, 20: 36.0, 30: 45.0}  # 20 within 10 % of 10: the larger wins
    sizes = _feed(tuner, pace, 20)
    # 1 is measured (3 warm steps: 2 batches), then 5, 10, 20, 30 tried; 30 is clearly slower.
    assert sizes[:2] == [1, 1] and sizes[-1] == 20 and 30 in sizes, sizes
    assert choice.chains == 20 and choice.source == "tuned" and tuner.describe().startswith("20 chains")
    assert recorded[-1][0] == 20 and recorded[-1][1] == pytest.approx(pace)
    assert tuner.phase is None and sizes[sizes.index(30) + 2:] == [20] * (len(sizes) - sizes.index(30) - 2)


def test_a_pace_far_from_the_stored_one_times_again():
    choice = inference_batching.BatchingChoice(10, "stored", {1: 60.0, 10: 30.0}, pace_ms={10: 30.0})
    fresh = inference_batching.BatchingChoice(30, "re-probed", {1: 20.0, 10: 12.0, 30: 10.0})
    tuner, _ = _tuner(choice, reprobed=fresh)
    sizes = _feed(tuner, {10: 10.0, 30: 9.0}, 6)  # three times faster than stored: the machine changed
    assert sizes[:2] == [10, 10] and sizes[2:] == [30] * 4 and tuner.choice is fresh
    # Close to the stored pace: no probe, only the try of the next size.
    choice = inference_batching.BatchingChoice(10, "stored", {1: 60.0, 10: 30.0}, pace_ms={10: 30.0})
    tuner, _ = _tuner(choice, reprobed=None)
    assert _feed(tuner, {10: 33.0, 20: 50.0}, 6) == [10, 10, 20, 20, 10, 10]


def test_a_poisoned_choice_is_corrected_with_real_timings(segmenter_path):
    """The same with the clock: on the tiny model one chain per call is several times dearer per
    chain than 12, whatever the load. Which step corrects it depends on the clock: the re-probe
    at the start, or (when a busy CPU makes that probe agree with the stored timings) the
    tuner during the run."""
    volume = np.random.default_rng(6).random((4, 16, 16, 8)).astype(np.float32)
    segmenter = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    _poison(segmenter, _net_size(segmenter), timings={1: 500.0, 3: 2000.0})
    result = run_to_end(segmenter.run(volume, SamplingOptions(num_ensemble=3, respacing="3", seed=2)))
    assert result.settings["batching"] in ("re-probed", "tuned") and result.settings["chains_per_call"] > 1


def test_one_entry_per_model_size_and_precision(segmenter_path, fake_timer):
    """A slice run (1 or N chains) and a volume run (up to 2N, ...) share one entry; entries
    of the older format (a bare number per candidate list) are dropped."""
    fake_timer.update({1: 0.010, 2: 0.015, 4: 0.020, 6: 0.030})  # timings that agree: the choice is stored
    inference.batching_file().parent.mkdir(parents=True, exist_ok=True)
    inference.batching_file().write_text(json.dumps({"old|1,2": 1, "old|1,2,4": 4}))
    volume = np.random.default_rng(8).random((4, 16, 16, 3)).astype(np.float32)
    segmenter = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    run_to_end(segmenter.run(volume, SamplingOptions(num_ensemble=2, respacing="2", seed=1)))  # probes 1, 2, 4, 6
    later = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    one = run_to_end(later.run(volume[..., 1], SamplingOptions(num_ensemble=2, respacing="2", seed=1)))
    assert later.probes == 0 and one.settings["batching"] == "stored" and one.settings["chains_per_call"] in (1, 2)
    table = json.loads(inference.batching_file().read_text())
    assert list(table) == [segmenter._stored_key((*_net_size(segmenter), "fp32"))]
    assert inference_batching.forget_batching() and not inference.batching_file().exists()
    assert not inference_batching.forget_batching()


def test_needs_recheck():
    choice = inference_batching.BatchingChoice(10, "stored", {1: 50.0, 10: 20.0})
    assert not inference_batching.needs_recheck(choice, 20.0)
    assert not inference_batching.needs_recheck(choice, 40.0)  # a sampling step costs more than a bare call
    assert inference_batching.needs_recheck(choice, 10.0)  # the machine got much faster
    assert inference_batching.needs_recheck(choice, 80.0)
    choice.pace_ms[10] = 30.0  # once a volume ran at this size, its pace is the measure
    assert not inference_batching.needs_recheck(choice, 40.0) and inference_batching.needs_recheck(choice, 50.0)


def test_the_choice_is_kept_on_disk_for_later_runs(segmenter_path, monkeypatch, fake_timer):
    """A later run (a new process: a new Segmenter) takes the stored choice without probing, so
    the same seed gives the same bits run after run on this machine. (Timings from a table: on
    a busy machine real ones may disagree, and a choice from disagreeing timings is not stored.)"""
    fake_timer.update({1: 0.010, 2: 0.015, 4: 0.020})  # 4 chains a call: both slices in one batch
    volume = np.random.default_rng(8).random((4, 16, 16, 2)).astype(np.float32)
    first = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    a = run_to_end(first.run(volume, SamplingOptions(num_ensemble=2, respacing="2", seed=1)))
    stored = inference.batching_file()
    entries = list(json.loads(stored.read_text()).values())
    assert stored.is_file() and [e["chains"] for e in entries] == [first.probe_report["chosen"]]

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again")

    real = inference.probe_batching
    monkeypatch.setattr(inference, "probe_batching", no_probe)
    later = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    b = run_to_end(later.run(volume, SamplingOptions(num_ensemble=2, respacing="2", seed=1)))
    assert later.probe_report["chosen"] == first.probe_report["chosen"] and "from" in later.probe_report
    np.testing.assert_array_equal(b.probability, a.probability)
    # A broken file costs a probe, not a failure.
    monkeypatch.setattr(inference, "probe_batching", real)
    stored.write_text("not json")
    assert run_to_end(Segmenter.load(segmenter_path, device="cpu", batching="auto").run(
        volume, SamplingOptions(num_ensemble=2, respacing="2")))
    assert isinstance(json.loads(stored.read_text()), dict)


@pytest.mark.parametrize("bad", ["0", "-2", "many"])
def test_bad_batching_is_a_clear_error(segmenter_path, bad, monkeypatch):
    with pytest.raises(DiffSegError, match="batching"):
        Segmenter.load(segmenter_path, device="cpu", batching=bad)
    monkeypatch.setenv("NAPARI_DIFFSEG_BATCHING", bad)
    with pytest.raises(DiffSegError, match="NAPARI_DIFFSEG_BATCHING"):
        Segmenter.load(segmenter_path, device="cpu")


def test_the_default_batching_comes_from_the_environment(segmenter_path, monkeypatch):
    assert Segmenter.load(segmenter_path, device="cpu").batching == 8  # tests/conftest.py sets it
    monkeypatch.delenv("NAPARI_DIFFSEG_BATCHING")
    assert Segmenter.load(segmenter_path, device="cpu").batching == "auto"
    assert Segmenter.load(segmenter_path, device="cpu", batching="3").batching == 3


def test_volume_progress_counts_slices_and_time_left(segmenter_path):
    volume = np.random.default_rng(7).random((4, 16, 16, 5)).astype(np.float32)
    segmenter = Segmenter.load(segmenter_path, device="cpu", batching=2)  # one slice of 2 chains a batch
    progress = []
    run_to_end(segmenter.run(volume, SamplingOptions(num_ensemble=2, respacing="2", seed=0)), progress.append)
    assert [p.slices_done for p in progress] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert {p.slices_total for p in progress} == {5}
    assert all(p.elapsed > 0 for p in progress)
    assert progress[-1].eta == pytest.approx(0.0)
    assert all(p.eta is not None and p.eta >= 0 for p in progress)


def test_format_eta():
    assert format_eta(None) == ""
    assert format_eta(0.2) == "~1 s left"
    assert format_eta(42.4) == "~42 s left"
    assert format_eta(150) == "~2.5 min left"
