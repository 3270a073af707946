"""The deterministic U-Net baseline (diffseg-train --objective segmentation) end to end:
its loss, its checkpoint, one-pass inference and scoring by the same diffseg-eval code."""

import json

import numpy as np
import pytest
import torch

from napari_diffseg import checkpoint, evaluate, synthetic, train
from napari_diffseg.inference import Segmenter, run_to_end
from napari_diffseg.options import SamplingOptions

TINY_FLAGS = ["--num_channels", "32", "--channel_mult", "1,2", "--num_res_blocks", "1", "--attention_resolutions", "",
              "--crop_border", "0", "--resize_to", "32", "--batch_size", "4", "--lr", "2e-3", "--ema_rate", "0.9",
              "--no_progress", "--log_interval", "10", "--device", "cpu", "--seed", "0"]


def test_segmentation_losses():
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, :, 2:6, 2:6] = 1
    right = train.segmentation_losses((masks * 2 - 1) * 20, masks)
    wrong = train.segmentation_losses((1 - masks * 2) * 20, masks)
    assert right["loss"].shape == (2,)
    assert float(right["loss"].max()) < 1e-3  # confident and right, tumour or empty slice
    assert float(wrong["bce"].min()) > 5 and float(wrong["dice_loss"].min()) > 0.9
    assert torch.allclose(wrong["loss"], wrong["bce"] + wrong["dice_loss"])


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    synthetic.write_phantoms(root, n=3, seed=5, size=64)
    return root


@pytest.fixture(scope="module")
def baseline_run(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    code = train.main(["--data_dir", str(phantom_dir), "--out_dir", str(out), "--max_steps", "40",
                       "--objective", "segmentation", *TINY_FLAGS])
    assert code == 0
    return out


def test_training_learns_and_records_the_objective(baseline_run):
    rows = (baseline_run / "progress.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["step", "loss", "bce", "dice_loss"]
    losses = [float(r.split(",")[1]) for r in rows[1:]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    payload = checkpoint.read_checkpoint(baseline_run / "model.pt")
    assert payload["objective"] == "segmentation"
    loaded = checkpoint.load_model(baseline_run / "model.pt")
    assert loaded.objective == "segmentation" and loaded.unet_config.out_channels == 1
    assert loaded.sampling["num_ensemble"] == 1


def test_resume_with_another_objective_is_refused(baseline_run, phantom_dir, tmp_path, capsys):
    code = train.main(["--data_dir", str(phantom_dir), "--out_dir", str(tmp_path), "--max_steps", "41",
                       "--resume", str(baseline_run), *TINY_FLAGS])
    assert code == 2
    assert "--objective segmentation" in capsys.readouterr().err


def test_one_pass_inference(baseline_run, phantom_dir):
    from napari_diffseg import data

    case = data.load_case(data.find_cases(phantom_dir)[0])
    segmenter = Segmenter.load(baseline_run / "model.pt", device="cpu")
    steps = []
    result = run_to_end(segmenter.run(case.images, SamplingOptions(num_ensemble=5, seed=0)), steps.append)
    assert len(steps) == 1 and steps[0].preview is not None
    assert result.num_ensemble == 1 and result.samples.shape == (1, *case.images.shape[1:])
    assert result.probability.shape == case.images.shape[1:]
    np.testing.assert_allclose(result.variance, result.probability * (1 - result.probability), atol=1e-6)
    assert 0 <= result.probability.min() and result.probability.max() <= 1
    # deterministic: the seed changes nothing
    again = run_to_end(segmenter.run(case.images, SamplingOptions(seed=123)))
    np.testing.assert_array_equal(again.probability, result.probability)


def test_eval_scores_the_baseline_with_its_own_uncertainty(baseline_run, phantom_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = evaluate.main(["--model_path", str(baseline_run / "model.pt"), "--data_dir", str(phantom_dir),
                          "--out_dir", str(out), "--device", "cpu", "--sweep"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    final = json.loads(captured.out.strip().splitlines()[-1])
    assert final["dice_vs_ensemble_size"] == {"1": pytest.approx(final["dice_ensemble"])}
    assert final["dice_single_mean"] == pytest.approx(final["dice_ensemble"])
    assert final["auroc_variance_error"] is not None  # ranked by p(1 - p)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["steps"] == 1 and report["settings"]["members_sampled"] == 1
    assert report["sweep"] == []  # nothing to sweep for one pass
    assert "deterministic" in report["settings"]["sampler"]


def test_score_case_uses_a_given_uncertainty():
    truth = np.zeros((8, 8), bool)
    truth[2:6, 2:6] = True
    probability = truth.astype(np.float32) * 0.9
    probability[2, 2] = 0.4  # one wrong pixel, and the map says it is the uncertain one
    uncertainty = probability * (1 - probability)
    scores = evaluate.score_case(probability[None], truth, uncertainty=uncertainty)
    assert scores["auroc_variance_error"] == pytest.approx(1.0)
