"""The training recipe's options (issue: a diffusion model that segments as well as a U-Net):
tumour oversampling, the learning-rate schedule across a resume, x0 prediction and the x0
loss. Each is stored in the checkpoint and honoured at sampling where sampling needs it."""

import csv
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_diffseg import checkpoint, train
from napari_diffseg.diffusion import Diffusion, DiffusionConfig
from napari_diffseg.inference import Segmenter, run_to_end
from napari_diffseg.options import SamplingOptions

from support import TINY_FLAGS

def _lr_column(out_dir) -> list[float]:
    with open(out_dir / "progress.csv", newline="") as handle:
        return [float(row["lr"]) for row in csv.DictReader(handle)]


# -- tumour oversampling --------------------------------------------------------------------

def _slice_set(n: int = 40, tumour_every: int = 5) -> train.SliceSet:
    masks = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    masks[::tumour_every, :, 1, 1] = 1
    return train.SliceSet(torch.zeros(n, 4, 4, 4, dtype=torch.float16), masks, [str(i) for i in range(n)])


@pytest.mark.parametrize("share", [0.3, 0.7, 1.0])
def test_tumour_fraction_is_the_share_of_drawn_batches(share):
    dataset = _slice_set()  # 8 of 40 slices (20 %) hold tumour
    rng = np.random.default_rng(0)
    draws = np.concatenate([dataset.draw(rng, 16, share) for _ in range(400)])
    tumour = np.isin(draws, dataset.tumour_indices)
    # Drawn on purpose: share; drawn uniformly (the rest): 20 % of them hold tumour by chance.
    expected = share + (1 - share) * 0.2
    assert abs(tumour.mean() - expected) < 0.015
    if share == 1.0:
        assert tumour.all()


def test_tumour_fraction_zero_keeps_uniform_draws_and_a_fraction_without_tumour_is_refused():
    dataset = _slice_set()
    assert np.array_equal(dataset.draw(np.random.default_rng(3), 64, 0.0),
                          np.random.default_rng(3).integers(0, len(dataset), size=64))
    empty = train.SliceSet(torch.zeros(4, 4, 4, 4), torch.zeros(4, 1, 4, 4, dtype=torch.uint8), list("abcd"))
    with pytest.raises(train.DiffSegError, match="no training slice holds tumour"):
        empty.draw(np.random.default_rng(0), 4, 0.5)


def test_tumour_fraction_reaches_training_batches(phantom_dir, tmp_path):
    args = train.build_parser().parse_args(["--data_dir", str(phantom_dir), "--out_dir", str(tmp_path),
                                            "--max_steps", "1", "--tumour_fraction", "1.0", "--batch_size", "8",
                                            *TINY_FLAGS])
    trainer = train.Trainer(args)
    rng = np.random.default_rng(1)
    _, masks = trainer._batch(trainer.train_set, rng, 8, args.tumour_fraction)
    assert bool((masks.flatten(1).amax(1) > 0).all())


# -- learning-rate schedule ------------------------------------------------------------------

def test_lr_factor_warmup_then_cosine_to_zero():
    assert train.lr_factor("constant", 0, 0, 0.9) == 1.0
    assert train.lr_factor("constant", 4, 10, 0.0) == pytest.approx(0.5)
    assert train.lr_factor("cosine", 100, 10, 0.0) == pytest.approx(1.0)
    assert train.lr_factor("cosine", 100, 10, 0.5) == pytest.approx(0.5)
    assert train.lr_factor("cosine", 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert train.lr_factor("cosine", 100, 0, 2.0) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at zero


def test_cosine_schedule_continues_across_a_resume(phantom_dir, tmp_path):
    flags = ["--data_dir", str(phantom_dir), "--lr_schedule", "cosine", "--warmup_steps", "2", *TINY_FLAGS]
    whole = tmp_path / "whole"
    assert train.main([*flags, "--out_dir", str(whole), "--max_steps", "8"]) == 0

    # The same run, stopped after 4 steps (as SIGTERM would) and resumed.
    split = tmp_path / "split"
    first = train.Trainer(train.build_parser().parse_args([*flags, "--out_dir", str(split), "--max_steps", "8"]))
    for _ in range(4):
        first.train_step()
    first.save()
    assert train.main([*flags, "--out_dir", str(split), "--max_steps", "8", "--resume", str(split)]) == 0

    expected = [2e-3 * train.lr_factor("cosine", s, 2, s / 8) for s in range(8)]
    assert _lr_column(whole) == pytest.approx(expected, rel=1e-6)
    assert _lr_column(split) == pytest.approx(expected[4:], rel=1e-6)  # the resumed part starts at step 4
    assert expected[-1] < 0.05 * 2e-3 and max(expected) == pytest.approx(2e-3 * train.lr_factor("cosine", 1, 2, 1 / 8))


def test_wall_time_budget_is_counted_over_resumes(phantom_dir, tmp_path):
    flags = ["--data_dir", str(phantom_dir), "--out_dir", str(tmp_path), "--lr_schedule", "cosine",
             "--max_minutes", "10", *TINY_FLAGS]
    first = train.Trainer(train.build_parser().parse_args(flags))
    first.train_step()
    first.elapsed_before = 300.0  # as if five minutes had been trained before
    first.save()
    saved = checkpoint.read_checkpoint(tmp_path / "checkpoint.pt")["elapsed_s"]
    assert 300.0 <= saved < 400.0
    resumed = train.Trainer(train.build_parser().parse_args([*flags, "--resume", str(tmp_path)]))
    assert resumed.elapsed_before == saved
    progress = resumed.progress()
    assert saved / 600 <= progress < 0.7  # half the 10-minute budget, plus this machine's loading time
    assert resumed.current_lr() == pytest.approx(2e-3 * train.lr_factor("cosine", 1, 0, progress), rel=0.02)


def test_cosine_without_an_end_is_a_clear_error(phantom_dir, tmp_path, capsys):
    code = train.main(["--data_dir", str(phantom_dir), "--out_dir", str(tmp_path), "--lr_schedule", "cosine",
                       *TINY_FLAGS])
    assert code == 2
    assert "--max_steps or --max_minutes" in capsys.readouterr().err


# -- x0 prediction and the x0 loss ---------------------------------------------------------------

def test_predict_xstart_reads_the_output_as_x0_in_sampling_and_loss():
    eps_model = Diffusion.from_config(DiffusionConfig(learn_sigma=False), "10")
    x0_model = Diffusion.from_config(DiffusionConfig(learn_sigma=False, predict_xstart=True), "10")
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 1, 8, 8, generator=gen)
    output = torch.rand(2, 1, 8, 8, generator=gen) * 1.4 - 0.2
    out = x0_model.p_mean_variance(output, x_t, 5, clip=True, clip_range=(0.0, 1.0))
    assert torch.equal(out["pred_x0"], output.clamp(0, 1))
    assert not torch.allclose(eps_model.p_mean_variance(output, x_t, 5, clip=False)["pred_x0"], output)

    mask = (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).float()
    noise = torch.randn(2, 1, 8, 8, generator=gen)
    t = torch.tensor([3, 7])
    x0_loss = x0_model.training_losses(output, mask, x_t, t, noise)["mse"]
    eps_loss = eps_model.training_losses(output, mask, x_t, t, noise)["mse"]
    assert torch.allclose(x0_loss, ((output - mask) ** 2).mean(dim=(1, 2, 3)))
    assert torch.allclose(eps_loss, ((output - noise) ** 2).mean(dim=(1, 2, 3)))


def test_x0_dice_bce_is_zero_for_a_committed_right_mask_and_large_for_a_wrong_one():
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 2:6, 2:6] = 1
    right = train.x0_dice_bce(mask * 1.2 - 0.1, mask)  # past 0 and 1 on the right side
    wrong = train.x0_dice_bce(1 - mask, mask)
    assert right.shape == (2,) and float(right.max()) < 0.01
    assert float(wrong.min()) > 1.0


@pytest.fixture(scope="module")
def x0_run(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("x0run")
    code = train.main(["--data_dir", str(phantom_dir), "--out_dir", str(out), "--max_steps", "6",
                       "--predict_xstart", "True", "--x0_loss_weight", "0.5", "--tumour_fraction", "0.7",
                       "--grad_clip", "1.0", "--lr_schedule", "cosine", "--warmup_steps", "2",
                       "--sample_respacing", "5", *TINY_FLAGS])
    assert code == 0
    return out


def test_recipe_flags_are_stored_and_x0_loss_is_logged(x0_run):
    payload = checkpoint.read_checkpoint(x0_run / "model.pt")
    assert payload["diffusion_config"]["predict_xstart"] is True
    args = payload["train_args"]
    assert (args["tumour_fraction"], args["x0_loss_weight"], args["grad_clip"], args["lr_schedule"]) == (
        0.7, 0.5, 1.0, "cosine")
    with open(x0_run / "progress.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    for row in rows:
        assert float(row["x0_loss"]) > 0
        # loss = mse + vb + 0.5 * x0_loss, each the batch mean
        assert float(row["loss"]) == pytest.approx(float(row["mse"]) + float(row["vb"]) + 0.5 * float(row["x0_loss"]),
                                                   rel=1e-4)



class FakeWriter:
    """TensorBoard's SummaryWriter as the trainer uses it."""

    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.closed = False

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def close(self):
        self.closed = True


def test_every_loss_term_reaches_tensorboard(phantom_dir, tmp_path, monkeypatch):
    """The x0 loss goes to TensorBoard beside the others (rows were once cut to three columns by
    position, which dropped it), with the same values as progress.csv."""
    writer = FakeWriter()
    monkeypatch.setattr(train.Trainer, "_tensorboard", lambda self: writer)
    assert train.main(["--data_dir", str(phantom_dir), "--out_dir", str(tmp_path), "--max_steps", "2",
                       "--x0_loss_weight", "0.5", *TINY_FLAGS]) == 0
    assert set(writer.scalars) == {"train/loss", "train/mse", "train/vb", "train/x0_loss"} and writer.closed
    with open(tmp_path / "progress.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [step for step, _ in writer.scalars["train/x0_loss"]] == [1, 2]
    assert [value for _, value in writer.scalars["train/x0_loss"]] == pytest.approx([float(r["x0_loss"]) for r in rows])

def test_x0_model_is_sampled_as_x0_without_extra_flags(x0_run):
    loaded = checkpoint.load_model(x0_run / "model.pt")
    assert loaded.diffusion_config.predict_xstart
    segmenter = Segmenter(loaded, device="cpu")
    images = np.random.default_rng(0).random((4, 40, 40)).astype(np.float32)
    result = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2, seed=1)))
    assert result.steps == 5  # the stored respacing
    # An x0 model's members end at its clipped x0 estimate, inside the mask range.
    assert result.samples.min() >= -1e-6 and result.samples.max() <= 1 + 1e-6

    # Reading the same weights as an epsilon model gives other members: the flag is honoured.
    loaded.diffusion_config = DiffusionConfig(**{**loaded.diffusion_config.to_dict(), "predict_xstart": False})
    other = run_to_end(Segmenter(loaded, device="cpu").run(images, SamplingOptions(num_ensemble=2, seed=1)))
    assert not np.allclose(other.samples, result.samples)


def test_old_checkpoints_default_to_epsilon_prediction():
    config = DiffusionConfig.from_flags({"diffusion_steps": 1000, "learn_sigma": True})
    assert config.predict_xstart is False
    assert Diffusion.from_config(config).predict_xstart is False


# -- self-conditioning -------------------------------------------------------------------------

def _self_conditioned_model(seed: int = 0):
    from support import TINY, tiny_model

    model = tiny_model(seed, self_condition=True, norm_groups=8)
    with torch.no_grad():  # make the x0 channel matter
        model.input_blocks[0][0].weight[:, -1].normal_(0.0, 0.5)
    return model.eval(), TINY


def test_self_conditioned_forward_paths_agree_and_use_the_estimate():
    model, _ = _self_conditioned_model()
    assert model.input_blocks[0][0].weight.shape[1] == 6  # images, noisy mask, x0 estimate
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 4, 32, 32, generator=gen)
    x_t = torch.randn(6, 1, 32, 32, generator=gen)
    x0_prev = torch.rand(6, 1, 32, 32, generator=gen)
    t = torch.full((6,), 7)
    with torch.no_grad():
        full = model(torch.cat([images.repeat_interleave(3, 0), x_t], 1), t, x0_prev)
        shared = model.forward_conditioned(x_t, t, model.encode_condition(images), x0_prev)
        without = model.forward_conditioned(x_t, t, model.encode_condition(images))
        zeros = model(torch.cat([images.repeat_interleave(3, 0), x_t], 1), t, torch.zeros_like(x0_prev))
    assert torch.allclose(full, shared, atol=1e-5)
    assert torch.allclose(without, zeros, atol=1e-5)  # None stands for the zeros of the first step
    assert not torch.allclose(full, zeros, atol=1e-3)


def test_self_conditioning_gives_the_same_chains_batched_as_one_by_one():
    from napari_diffseg.ensemble import sample_ensemble

    model, _ = _self_conditioned_model(1)
    diffusion = Diffusion.from_config(DiffusionConfig(predict_xstart=True), "ddim10")
    images = torch.rand(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    start = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    condition = model.encode_condition(images)
    seen = []

    def denoise(x, t, x0_prev=None):
        seen.append(x0_prev is None)
        return model.forward_conditioned(x, t, condition.expand(1, -1, -1, -1), x0_prev)

    with torch.no_grad():
        batched = list(Diffusion.sample(diffusion, lambda x, t, p=None: model.forward_conditioned(x, t, condition, p),
                                        start, sampler="ddim", clip_range=(0.0, 1.0), self_condition=True))[-1].x
        single = torch.cat([list(diffusion.sample(denoise, start[i : i + 1], sampler="ddim", clip_range=(0.0, 1.0),
                                                  self_condition=True))[-1].x for i in range(4)])
    assert seen[0] and not any(seen[1:10])  # zeros at the first step, the estimate after
    assert torch.allclose(batched, single, atol=1e-5)
    # The ensemble path runs the same maths: a seeded run is reproducible and uses the channel.
    a = list(sample_ensemble(model, diffusion, images, SamplingOptions(3, seed=5), clip_range=(0.0, 1.0)))[-1].x
    b = list(sample_ensemble(model, diffusion, images, SamplingOptions(3, seed=5), clip_range=(0.0, 1.0)))[-1].x
    assert torch.equal(a, b)


def test_self_condition_flag_is_stored_and_sampled(phantom_dir, tmp_path):
    assert train.main(["--data_dir", str(phantom_dir), "--out_dir", str(tmp_path), "--max_steps", "3",
                       "--self_condition", "--predict_xstart", "True", "--sample_respacing", "4", *TINY_FLAGS]) == 0
    loaded = checkpoint.load_model(tmp_path / "model.pt")
    assert loaded.unet_config.self_condition and loaded.model.input_blocks[0][0].weight.shape[1] == 6
    images = np.random.default_rng(0).random((4, 40, 40)).astype(np.float32)
    result = run_to_end(Segmenter(loaded, device="cpu").run(images, SamplingOptions(num_ensemble=2, seed=1)))
    assert result.steps == 4 and np.isfinite(result.probability).all()
    # The deterministic baseline has no chain to condition on.
    assert train.main(["--data_dir", str(phantom_dir), "--out_dir", str(tmp_path / "b"), "--max_steps", "1",
                       "--self_condition", "--objective", "segmentation", *TINY_FLAGS]) == 2


# -- the learned variance's range ---------------------------------------------------------------

def test_clamped_variance_stays_between_its_bounds_and_the_reference_default_extrapolates():
    diffusion = Diffusion.from_config(DiffusionConfig(), "10")
    x_t = torch.zeros(1, 1, 4, 4)
    output = torch.zeros(1, 2, 4, 4)
    output[:, 1] = 25.0  # a drifted v, as a briefly trained x0 model showed at some pixels
    t = 3
    low = diffusion.arrays["posterior_log_variance_clipped"][t]
    high = diffusion.arrays["log_betas"][t]
    free = diffusion.p_mean_variance(output, x_t, t)["log_variance"]
    clamped = diffusion.p_mean_variance(output, x_t, t, clamp_variance=True)["log_variance"]
    assert float(free.max()) > high + 1.0  # far past beta_t
    assert torch.allclose(clamped, torch.full_like(clamped, float(high)))
    output[:, 1] = -0.5  # inside the range: unchanged
    inside = diffusion.p_mean_variance(output, x_t, t, clamp_variance=True)["log_variance"]
    assert torch.allclose(inside, diffusion.p_mean_variance(output, x_t, t)["log_variance"])
    assert low < float(inside.mean()) < high


def test_models_trained_here_clamp_the_variance_and_reference_ones_do_not(x0_run):
    assert checkpoint.load_model(x0_run / "model.pt").sampling["clamp_variance"] is True
    assert checkpoint.DEFAULT_SAMPLING["clamp_variance"] is False


def _last_value(args: list[str], flag: str) -> str:
    """The value of the last ``flag`` in a command line: the one diffseg-train keeps."""
    return args[len(args) - args[::-1].index(flag)]


def test_the_bundled_models_script_trains_every_case_in_two_step_budgeted_runs(tmp_path):
    """scripts/train_bundled.sh: train_demo.sh on every case (no validation split), the kept
    levers, 3,500 steps and then the marks run's 1,500 from the first run's model; with
    REGIONS=brats the region model's one run of 5,000 steps."""
    root = Path(__file__).resolve().parents[1]
    brats = tmp_path / "brats"
    for i in range(3):
        (brats / f"Brats18_case_{i}").mkdir(parents=True)
    calls = tmp_path / "calls"
    fake = tmp_path / "fake_python"  # stands for diffseg-train: one line of arguments per run
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    env = {**os.environ, "BRATS_DIR": str(brats), "OUT": str(tmp_path / "final"), "PY": str(fake)}
    subprocess.run(["bash", str(root / "scripts" / "train_bundled.sh")], env=env, check=True, capture_output=True)
    first, marks = [line.split() for line in calls.read_text().splitlines()]
    assert "--val_dir" not in first and len(list((tmp_path / "final" / "split" / "train").iterdir())) == 3
    for run, steps in ((first, "3500"), (marks, "1500")):
        assert _last_value(run, "--max_steps") == steps
        assert run[run.index("--input_norm") + 1] == "zscore" and "--augment_strong" in run
        assert run[run.index("--cleanup_min_voxels") + 1] == "5000"
    assert "--click_fraction" not in first
    assert marks[marks.index("--init_from") + 1] == str(tmp_path / "final" / "model.pt")
    assert marks[marks.index("--click_fraction") + 1] == "0.5"
    assert first[first.index("--regions") + 1] == "wt"

    # The region model: one run of the whole budget, no marks run (it has no mark channels).
    calls.unlink()
    env = {**env, "REGIONS": "brats", "OUT": str(tmp_path / "regions")}
    subprocess.run(["bash", str(root / "scripts" / "train_bundled.sh")], env=env, check=True, capture_output=True)
    (only,) = [line.split() for line in calls.read_text().splitlines()]
    assert only[only.index("--regions") + 1] == "brats" and only[only.index("--out_dir") + 1] == env["OUT"]
    assert _last_value(only, "--max_steps") == "5000"
    assert only[only.index("--input_norm") + 1] == "zscore" and "--click_fraction" not in only
