"""diffseg-eval: scoring on hand-made arrays, and the command end to end on a tiny model."""

import json
import math

import numpy as np
import pytest

from napari_diffseg import evaluate, synthetic


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from napari_diffseg import checkpoint
    from napari_diffseg.diffusion import DiffusionConfig
    from napari_diffseg.geometry import Geometry
    from napari_diffseg.unet import UNet, UNetConfig

    torch.manual_seed(0)
    cfg = UNetConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                     attention_resolutions="", learn_sigma=True)
    model = UNet(cfg)
    with torch.no_grad():
        model.out[2].weight.normal_(0, 0.05)  # zero-initialised: make the output depend on the input
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    checkpoint.atomic_save(checkpoint.make_payload(cfg, DiffusionConfig(), Geometry(resize_to=32),
                                                   {"model": model.state_dict()}), path)
    return path


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    synthetic.write_phantoms(root, n=2, seed=3, size=64)
    return root


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _in_unit(value) -> bool:
    return value is None or 0.0 <= value <= 1.0


def test_score_case_known_dice():
    truth = np.zeros((8, 8, 4), bool)
    truth[2:6, 2:6, 1:3] = True  # 32 voxels
    perfect = truth.astype(np.float32)
    shifted = np.zeros_like(perfect)
    shifted[2:6, 4:8, 1:3] = 1  # 32 voxels, 16 overlapping: Dice 0.5
    members = np.stack([perfect, perfect, shifted])  # mean > 0.5 exactly on the truth
    scores = evaluate.score_case(members, truth, spacing=(1, 1, 1))
    assert scores["dice_ensemble"] == pytest.approx(1.0)
    assert scores["dice_single"] == pytest.approx([1.0, 1.0, 0.5])
    assert scores["dice_single_mean"] == pytest.approx(2.5 / 3)
    assert scores["hd95"] == pytest.approx(0.0)
    # The only voxels with variance are where the shifted member disagrees; the ensemble mask
    # is right everywhere, so there is no error to detect.
    assert math.isnan(scores["auroc_variance_error"])
    assert scores["num_members"] == 3 and scores["tumour_slices"] == 2

    sizes = evaluate.dice_by_ensemble_size(np.stack([shifted, perfect, perfect]), truth, [1, 2, 3, 9])
    assert sizes == pytest.approx({1: 0.5, 2: 2 * 16 / (16 + 32), 3: 1.0})  # k=2: only the overlap exceeds 0.5


def test_score_case_variance_flags_errors():
    truth = np.zeros((10, 10), bool)
    truth[3:7, 3:7] = True
    wrong = truth.copy()
    wrong[3:7, 7] = True  # a column of false positives where the members disagree
    members = np.stack([wrong, wrong, truth]).astype(np.float32)
    scores = evaluate.score_case(members, truth)
    assert scores["dice_ensemble"] == pytest.approx(2 * 16 / (16 + 20))
    assert scores["auroc_variance_error"] == pytest.approx(1.0)
    assert scores["auroc_variance_error_all"] == pytest.approx(1.0)
    assert math.isnan(scores["slice_variance_dice_pearson"])  # a 2D case has one slice


def test_score_case_deterministic_single_member():
    truth = np.zeros((6, 6, 3), bool)
    truth[1:4, 1:4, 1] = True
    scores = evaluate.score_case(truth.astype(np.float32)[None] * 0.9, truth, spacing=(1, 1, 2))
    assert scores["dice_ensemble"] == scores["dice_single_mean"] == pytest.approx(1.0)
    assert math.isnan(scores["auroc_variance_error"]) and math.isnan(scores["auroc_variance_error_all"])
    assert math.isnan(scores["slice_variance_dice_pearson"])
    empty = evaluate.score_case(np.zeros((1, 6, 6, 3), np.float32), truth)
    assert empty["dice_ensemble"] == 0.0 and math.isnan(empty["hd95"])


def test_tumour_slices_margin():
    truth = np.zeros((4, 4, 12), bool)
    truth[1, 1, 5] = True
    truth[1, 1, 10] = True
    assert evaluate.tumour_slices(truth) == [3, 4, 5, 6, 7, 8, 9, 10, 11]


def test_cli_end_to_end(tiny_model, phantoms, tmp_path, capsys):
    out = tmp_path / "eval"
    code = evaluate.main(["--model_path", str(tiny_model), "--data_dir", str(phantoms), "--out_dir", str(out),
                          "--timestep_respacing", "3", "--num_ensemble", "2", "--ensemble_sizes", "1,2",
                          "--sweep", "--sweep_steps", "2,3", "--sweep_ensemble", "2", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in ("report.json", "report.md", "dice_vs_ensemble.png", "dice_vs_steps.png",
                 "panel_phantom_0000.png", "panel_phantom_0001.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp"))
    final = _last_json(captured.out)
    for key in ("dice_ensemble", "dice_single_mean", "hd95", "auroc_variance_error", "auroc_variance_error_all"):
        assert key in final
    assert _in_unit(final["dice_ensemble"]) and _in_unit(final["dice_single_mean"])
    assert final["hd95"] is None or final["hd95"] >= 0
    assert _in_unit(final["auroc_variance_error"]) and _in_unit(final["auroc_variance_error_all"])
    assert final["cases"] == 2
    assert set(final["dice_vs_steps"]) == {"2", "3"}

    report = json.loads((out / "report.json").read_text())
    assert [c["case"] for c in report["cases"]] == ["phantom_0000", "phantom_0001"]
    assert report["settings"]["steps"] == 3 and report["settings"]["members_sampled"] == 2
    assert set(report["dice_vs_ensemble_size"]) == {"1", "2"}
    assert report["dice_vs_ensemble_size"]["2"] == pytest.approx(final["dice_ensemble"])
    assert [s["steps"] for s in report["sweep"]] == [2, 3]
    assert report["model"] == str(tiny_model)
    markdown = (out / "report.md").read_text()
    assert "phantom_0001" in markdown and "**mean**" in markdown


def test_cli_skips_unlabelled(tiny_model, tmp_path, capsys):
    root = tmp_path / "data"
    synthetic.write_phantoms(root, n=2, seed=3, size=64)
    (root / "phantom_0001" / "phantom_0001_seg.nii.gz").unlink()
    out = tmp_path / "eval"
    code = evaluate.main(["--model_path", str(tiny_model), "--data_dir", str(root), "--out_dir", str(out),
                          "--timestep_respacing", "2", "--num_ensemble", "1", "--ensemble_sizes", "1",
                          "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "phantom_0001: skipped" in captured.err
    final = _last_json(captured.out)
    assert final["cases"] == 1 and final["auroc_variance_error"] is None  # one member: no variance
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_unlabelled"] == ["phantom_0001"]


def test_cli_no_labelled_cases_exits_2(tmp_path, capsys):
    root = tmp_path / "data"
    synthetic.write_phantoms(root, n=1, seed=3, size=64)
    (root / "phantom_0000" / "phantom_0000_seg.nii.gz").unlink()
    code = evaluate.main(["--data_dir", str(root), "--out_dir", str(tmp_path / "eval")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().splitlines()[-1].startswith("error: ")
    assert "ground-truth" in captured.err
    assert not (tmp_path / "eval").exists()


def test_empty_tumour_slices_counts_missed_lesion_sections():
    from napari_diffseg.evaluate import empty_tumour_slices

    truth = np.zeros((8, 8, 4), bool)
    truth[2:5, 2:5, 1:4] = True
    mask = np.zeros_like(truth)
    mask[2:5, 2:5, 2] = True
    mask[0, 0, 0] = True  # a false positive on a slice without tumour does not count
    assert empty_tumour_slices(mask, truth) == 2  # slices 1 and 3
    assert empty_tumour_slices(mask[..., 1], truth[..., 1]) == 1
    assert empty_tumour_slices(mask[..., 2], truth[..., 2]) == 0
    assert empty_tumour_slices(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 0


def test_reference_flags_merge_as_in_diffseg_sample(tiny_model, phantoms, tmp_path, capsys):
    """A reference checkpoint's model flags: the reference's defaults, then the flags JSON, then
    the model flags given on the command line, in diffseg-eval as in diffseg-sample."""
    import torch

    from napari_diffseg import checkpoint, cli, sample

    bare = tmp_path / "savedmodel000010.pt"
    torch.save(checkpoint.read_checkpoint(tiny_model)["weights"]["model"], bare)
    flags = tmp_path / "flags.json"  # without num_channels: the reference's 128 would not fit
    flags.write_text(json.dumps({"channel_mult": "1,2", "num_res_blocks": 1, "attention_resolutions": "",
                                 "use_scale_shift_norm": False, "learn_sigma": True}))
    given = ["--model_path", str(bare), "--flags_json", str(flags), "--num_channels", "32", "--data_dir",
             str(phantoms), "--timestep_respacing", "2"]
    merged = cli.reference_flags_from_args(evaluate.build_parser().parse_args([*given, "--out_dir", "x"]))
    assert merged == cli.reference_flags_from_args(sample.build_parser().parse_args(given))
    assert merged["num_channels"] == 32 and merged["num_heads"] == checkpoint.MODEL_FLAG_DEFAULTS["num_heads"]

    common = ["--data_dir", str(phantoms), "--timestep_respacing", "2", "--num_ensemble", "1", "--ensemble_sizes",
              "1", "--max_cases", "1", "--device", "cpu", "--model_path", str(bare), "--flags_json", str(flags)]
    assert evaluate.main([*common, "--out_dir", str(tmp_path / "eval"), "--num_channels", "32"]) == 0
    assert evaluate.main([*common, "--out_dir", str(tmp_path / "eval2")]) == 2
    assert "do not fit" in capsys.readouterr().err
