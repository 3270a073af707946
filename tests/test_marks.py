"""A model that reads the user's marks (issue: scribbles steer the diffusion sampler): where
simulated marks go, the mark channels of the network, training them with --click_fraction from
an earlier model (--init_from), and marks at sampling."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_diffseg import checkpoint, clicks, train
from napari_diffseg.errors import DiffSegError
from napari_diffseg.inference import Segmenter, run_to_end
from napari_diffseg.options import Guidance, SamplingOptions

from support import TINY_FLAGS, tiny_model


def _square_truth() -> np.ndarray:
    truth = np.zeros((40, 40), bool)
    truth[5:25, 5:25] = True
    return truth


def test_a_simulated_user_marks_the_largest_error_and_agrees_with_the_truth():
    truth = _square_truth()
    estimate = truth.copy()
    estimate[5:25, 5:15] = False  # a 20x10 miss
    estimate[30:33, 30:33] = True  # a small false positive
    only = clicks.simulate_marks(estimate, truth, np.random.default_rng(0), radii=(2.0,), most_extra=0)
    assert set(np.unique(only)) == {0, clicks.TUMOUR} and (only == clicks.TUMOUR).sum() == 13  # one disk
    ys, xs = np.nonzero(only)
    assert truth[ys, xs].all() and not estimate[ys, xs].any()  # inside the miss, at its centre
    assert abs(ys.mean() - 14.5) <= 1 and abs(xs.mean() - 9.5) <= 1

    for seed in range(20):  # earlier marks: each blob's centre agrees with the truth
        marks = clicks.simulate_marks(truth, truth, np.random.default_rng(seed), radii=(1.0,), most_extra=2)
        for label, inside in ((clicks.TUMOUR, True), (clicks.NOT_TUMOUR, False)):
            blobs, count = ndimage.label(marks == label)
            for centre in ndimage.center_of_mass(marks == label, blobs, range(1, count + 1)):
                y, x = np.round(centre).astype(int)
                assert truth[y, x] == inside
                if not inside:  # near the tumour, where its border is in question
                    assert ndimage.distance_transform_edt(~truth)[y, x] <= 10
    a = clicks.simulate_marks(estimate, truth, np.random.default_rng(3))
    assert np.array_equal(a, clicks.simulate_marks(estimate, truth, np.random.default_rng(3)))  # seeded
    hints = clicks.marks_to_hints(np.stack([only, np.full_like(only, clicks.NOT_TUMOUR)]))
    assert hints.shape == (2, 2, 40, 40) and hints.dtype == np.float32
    assert np.array_equal(hints[0, 0], only == clicks.TUMOUR) and not hints[0, 1].any() and hints[1, 1].all()


def _hinted_model(seed: int = 0):
    model = tiny_model(seed, hint_channels=2, norm_groups=8)
    with torch.no_grad():  # trained weights would read the marks; random ones stand in
        model.input_blocks[0][0].weight[:, -2:].normal_(0.0, 0.5)
    return model


def test_mark_channels_join_the_condition_and_change_the_output():
    model = _hinted_model()
    assert model.input_blocks[0][0].weight.shape[1] == 7  # images, noisy mask, two mark channels
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 4, 32, 32, generator=gen)
    hints = (torch.rand(2, 2, 32, 32, generator=gen) > 0.9).float()
    x_t = torch.randn(6, 1, 32, 32, generator=gen)
    t = torch.full((6,), 7)
    x = torch.cat([images.repeat_interleave(3, 0), x_t], 1)
    with torch.no_grad():
        full = model(x, t, hints=hints.repeat_interleave(3, 0))
        shared = model.forward_conditioned(x_t, t, model.encode_condition(images, hints))
        unmarked = model.forward_conditioned(x_t, t, model.encode_condition(images))
        zeros = model(x, t, hints=torch.zeros(6, 2, 32, 32))
    assert torch.allclose(full, shared, atol=1e-5)  # the chains share the slice's marks
    assert torch.allclose(unmarked, zeros, atol=1e-5)  # no marks are zeros
    assert not torch.allclose(full, zeros, atol=1e-3)


def test_marks_are_trained_from_an_earlier_model_stored_and_read_at_sampling(phantom_dir, tmp_path):  # noqa: F811
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    assert train.main(["--data_dir", str(phantom_dir), "--out_dir", str(plain), "--max_steps", "2",
                       "--predict_xstart", "True", "--sample_respacing", "4", *TINY_FLAGS]) == 0
    # lr 0: the weights stay those of the earlier model, so the two must sample alike.
    assert train.main(["--data_dir", str(phantom_dir), "--out_dir", str(marked), "--max_steps", "1",
                       "--predict_xstart", "True", "--sample_respacing", "4", "--click_fraction", "1",
                       "--init_from", str(plain / "model.pt"), *TINY_FLAGS, "--lr", "0"]) == 0
    before, after = checkpoint.load_model(plain / "model.pt"), checkpoint.load_model(marked / "model.pt")
    assert before.unet_config.hint_channels == 0 and after.unet_config.hint_channels == 2
    stem = after.model.input_blocks[0][0].weight
    assert stem.shape[1] == 7 and not stem[:, -2:].any()  # new channels start at zero
    assert torch.equal(stem[:, :5], before.model.input_blocks[0][0].weight)

    images = np.random.default_rng(0).random((4, 40, 40)).astype(np.float32)
    marks = np.zeros((40, 40), np.uint8)
    marks[10:14, 10:14], marks[30:33, 5:8] = clicks.TUMOUR, clicks.NOT_TUMOUR
    ran = {name: run_to_end(Segmenter(loaded, device="cpu").run(images, SamplingOptions(num_ensemble=2, seed=1),
                                                                Guidance(marks=given)))
           for name, loaded, given in (("before", before, None), ("after", after, marks),
                                       ("before_marked", before, marks))}
    assert np.array_equal(ran["before"].samples, ran["after"].samples)
    assert np.array_equal(ran["before"].samples, ran["before_marked"].samples)  # a model without channels ignores them

    with torch.no_grad():  # once the channels carry weight, the marks change the members
        after.model.input_blocks[0][0].weight[:, -2:].normal_(0.0, 0.5)
    segmenter = Segmenter(after, device="cpu")
    read = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2, seed=1), Guidance(marks=marks)))
    assert not np.array_equal(read.samples, ran["after"].samples)
    unmarked = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2, seed=1)))
    assert np.array_equal(unmarked.samples, run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2, seed=1),
                                                                     Guidance(marks=np.zeros_like(marks)))).samples)
    with pytest.raises(DiffSegError, match="marks must have the image's shape"):
        run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2), Guidance(marks=marks[:20])))

    # Flags that do not match the earlier model, and the baseline, are refused in one line.
    assert train.main(["--data_dir", str(phantom_dir), "--out_dir", str(tmp_path / "x"), "--max_steps", "1",
                       "--init_from", str(plain / "model.pt"), *TINY_FLAGS, "--num_channels", "16"]) == 2
    assert train.main(["--data_dir", str(phantom_dir), "--out_dir", str(tmp_path / "y"), "--max_steps", "1",
                       "--click_fraction", "0.5", "--objective", "segmentation", *TINY_FLAGS]) == 2


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_click_fraction_is_the_share_of_slices_with_marks(phantom_dir, tmp_path, share):  # noqa: F811
    args = train.build_parser().parse_args(["--data_dir", str(phantom_dir), "--out_dir", str(tmp_path),
                                            "--predict_xstart", "True", "--click_fraction", str(share),
                                            *TINY_FLAGS, "--batch_size", "64"])
    trainer = train.Trainer(args)
    if share == 0.0:
        assert trainer.unet_config.hint_channels == 0
        return
    images, masks = trainer._batch(trainer.train_set, np.random.default_rng(0), 64)
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0))
    x_t = trainer.diffusion.q_sample(masks, t, torch.randn(masks.shape))
    hints = trainer._simulated_marks(torch.cat([images, x_t], 1), t, x_t, masks, None,
                                     torch.Generator().manual_seed(1))
    marked = hints.flatten(1).any(1).float().mean().item()
    # Every chosen slice gets a mark unless its estimate is perfect and the draw adds none.
    assert hints.shape == (64, 2, 32, 32) and abs(marked - share) < 0.2
    if share == 1.0:
        assert marked > 0.9
