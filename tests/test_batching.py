"""How many chains go through the network together (issue 14): a timed probe picks it, and the
choice changes the speed only: the chains' noise never depends on it, and their values agree to
the rounding of the arithmetic."""

import json

import numpy as np
import pytest
import torch

from napari_diffseg import inference
from napari_diffseg.errors import DiffSegError
from napari_diffseg.geometry import Geometry
from napari_diffseg.inference import Segmenter, batch_candidates, format_eta, run_to_end

from test_core import _final, _images, save_tiny_checkpoint, tiny_model
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
    images = _images(2, seed=4)
    whole = _final(model, diffusion, images, 2, seed=11, slice_keys=[3, 8])
    split = _final(model, diffusion, images, 2, seed=11, slice_keys=[3, 8], chains_per_call=chains_per_call)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)
    other = _final(model, diffusion, images, 2, seed=12, slice_keys=[3, 8], chains_per_call=chains_per_call)
    assert not torch.allclose(other, whole)  # the seed still decides


def test_self_conditioned_members_do_not_depend_on_chains_per_call():
    model = tiny_model(3, self_condition=True)
    diffusion = Diffusion.from_config(DiffusionConfig(), "4")
    images = _images(1, seed=5)
    whole = _final(model, diffusion, images, 3, seed=2)
    for chains in (1, 2):
        torch.testing.assert_close(_final(model, diffusion, images, 3, seed=2, chains_per_call=chains), whole,
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


def test_auto_batching_probes_once_and_keeps_the_results(segmenter_path, monkeypatch):
    volume = np.random.default_rng(6).random((4, 16, 16, 3)).astype(np.float32)
    auto = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    assert auto.batching == "auto"
    calls = []
    real = inference.probe_batching

    def counted(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "probe_batching", counted)
    first = run_to_end(auto.run(volume, num_ensemble=2, respacing="3", seed=4))
    again = run_to_end(auto.run(volume, num_ensemble=2, respacing="3", seed=4))
    assert calls == [[1, 2, 4, 6]]  # probed at the first run only: cached for this size and precision
    chosen = auto.probe_report["chosen"]
    assert first.settings["chains_per_call"] == chosen and first.settings["slices_per_batch"] == max(1, chosen // 2)
    assert set(auto.probe_report["ms_per_chain"]) <= {1, 2, 4, 6} and auto.probe_report["probe_s"] > 0
    np.testing.assert_array_equal(again.probability, first.probability)
    for fixed in (1, 2, 6):
        other = run_to_end(Segmenter.load(segmenter_path, device="cpu", batching=fixed).run(
            volume, num_ensemble=2, respacing="3", seed=4))
        assert other.settings["chains_per_call"] == fixed
        np.testing.assert_allclose(other.probability, first.probability, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(other.variance, first.variance, rtol=1e-3, atol=1e-5)


def test_probe_picks_the_cheapest_per_chain():
    """Seconds per call that grow faster than the batch (the paper config on a 2-core CPU)
    make the probe go chain by chain; cheap batches make it batch."""
    model = tiny_model(0)
    for per_call, expected in (({1: 1.0, 5: 7.0, 10: 20.0}, 1), ({1: 1.0, 5: 2.0, 10: 3.0}, 10),
                               ({1: 1.0, 5: 3.0, 10: 9.0}, 5)):
        calls = []

        def measure(batch):
            calls.append(batch)
            return per_call[batch]

        chosen, report = inference.probe_batching(model, torch.device("cpu"), [1, 5, 10], (16, 16), "fp32",
                                                  measure=measure)
        assert chosen == expected, report
        assert report["ms_per_chain"][1] == 1000.0
    # Past the best by more than 15 % per chain, larger batches are not tried.
    assert calls == [1, 1, 5, 5, 10, 10]  # slow calls (>= 0.2 s) are timed once after a warm-up
    calls.clear()
    inference.probe_batching(model, torch.device("cpu"), [1, 5, 10], (16, 16), "fp32",
                             measure=lambda b: calls.append(b) or {1: 1.0, 5: 9.0, 10: 1.0}[b])
    assert calls == [1, 1, 5, 5]


def test_the_choice_is_kept_on_disk_for_later_runs(segmenter_path, monkeypatch):
    """A later run (a new process: a new Segmenter) takes the stored choice without probing, so
    the same seed gives the same bits run after run on this machine."""
    volume = np.random.default_rng(8).random((4, 16, 16, 2)).astype(np.float32)
    first = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    a = run_to_end(first.run(volume, num_ensemble=2, respacing="2", seed=1))
    stored = inference.batching_file()
    assert stored.is_file() and list(json.loads(stored.read_text()).values()) == [first.probe_report["chosen"]]

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again")

    real = inference.probe_batching
    monkeypatch.setattr(inference, "probe_batching", no_probe)
    later = Segmenter.load(segmenter_path, device="cpu", batching="auto")
    b = run_to_end(later.run(volume, num_ensemble=2, respacing="2", seed=1))
    assert later.probe_report["chosen"] == first.probe_report["chosen"] and "from" in later.probe_report
    np.testing.assert_array_equal(b.probability, a.probability)
    # A broken file costs a probe, not a failure.
    monkeypatch.setattr(inference, "probe_batching", real)
    stored.write_text("not json")
    assert run_to_end(Segmenter.load(segmenter_path, device="cpu", batching="auto").run(
        volume, num_ensemble=2, respacing="2"))
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
    run_to_end(segmenter.run(volume, num_ensemble=2, respacing="2", seed=0), progress.append)
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
