"""Training-time augmentation (``augment.py``, ``diffseg-train --augment_intensity /
--augment_spatial``): what each family changes and what it must leave alone."""

import numpy as np
import pytest
import torch

from napari_diffseg import augment, checkpoint, synthetic, train

from test_recipe import TINY_FLAGS


def _batch(n: int = 6, size: int = 48, seed: int = 0):
    """Slices with a brain disk (background exactly 0) and a square tumour inside it."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    brain = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    images = torch.rand(n, 4, size, size, generator=gen) * 0.8 + 0.1
    images = images * brain
    masks = torch.zeros(n, 1, size, size)
    masks[:, :, size // 2 - 6: size // 2 + 6, size // 2 - 4: size // 2 + 8] = 1
    return images, masks, brain


def test_nothing_on_leaves_the_batch_and_the_generator_untouched():
    images, masks, _ = _batch()
    rng = np.random.default_rng(3)
    out_images, out_masks = augment.augment_batch(images, masks, rng)
    assert torch.equal(out_images, images) and torch.equal(out_masks, masks)
    assert rng.random() == np.random.default_rng(3).random()  # no draw was spent


def test_flip_is_the_earlier_training_flip():
    images, masks, _ = _batch()
    flipped, flipped_masks = augment.augment_batch(images, masks, np.random.default_rng(1), flip=True)
    chosen = np.random.default_rng(1).random(images.shape[0]) < 0.5
    assert 0 < chosen.sum() < len(chosen)
    for i, mirrored in enumerate(chosen):
        expected = images[i].flip(-2) if mirrored else images[i]
        assert torch.equal(flipped[i], expected)
        assert torch.equal(flipped_masks[i], masks[i].flip(-2) if mirrored else masks[i])


def test_intensity_changes_each_modality_on_its_own_and_keeps_background_and_range():
    images, masks, brain = _batch()
    jittered = augment.jitter_intensity(images, np.random.default_rng(0))
    assert jittered.shape == images.shape
    assert float(jittered.min()) >= 0 and float(jittered.max()) <= 1
    assert bool((jittered[..., ~brain] == 0).all())  # the background and the brain outline stay
    inside = jittered[..., brain].mean(-1) / images[..., brain].mean(-1)  # (n, 4) brightness ratios
    assert float((inside - 1).abs().max()) > 0.05  # something changed
    assert len({round(float(r), 4) for r in inside.flatten()}) == inside.numel()  # own draw per slice and modality
    # the order of brightness within a modality is kept: gamma and gain are monotone
    a, b = images[0, 0][brain], jittered[0, 0][brain]
    order = torch.argsort(a)
    assert bool((b[order][1:] >= b[order][:-1] - 1e-6).all())


def test_a_zero_rotation_and_zoom_is_the_identity():
    images, masks, _ = _batch()
    warped, warped_masks = augment.rotate_and_zoom(images, masks, np.random.default_rng(0), max_degrees=0,
                                                   zoom_range=(1.0, 1.0))
    assert torch.allclose(warped, images, atol=1e-5)
    assert torch.equal(warped_masks, masks)


def test_rotation_and_zoom_move_images_and_mask_together_and_keep_the_mask_binary():
    images, masks, _ = _batch()
    images[:, 3] = masks[:, 0] * 0.9  # FLAIR bright exactly on the tumour
    warped, warped_masks = augment.rotate_and_zoom(images, masks, np.random.default_rng(2))
    assert set(torch.unique(warped_masks).tolist()) <= {0.0, 1.0}
    assert not torch.equal(warped_masks, masks)
    for i in range(images.shape[0]):
        area, new_area = float(masks[i].sum()), float(warped_masks[i].sum())
        assert 0.75 * area < new_area < 1.3 * area  # zoom within 0.9-1.1: area within 0.81-1.21
        bright = warped[i, 3] > 0.45
        # the bright FLAIR region is still where the warped mask is, up to the edge pixels
        agreement = float((bright == warped_masks[i, 0].bool()).float().mean())
        assert agreement > 0.98


def test_augmentation_flags_are_stored_and_leave_the_validation_loss_alone(tmp_path_factory):
    cases = tmp_path_factory.mktemp("phantoms")
    synthetic.write_phantoms(cases, n=3, seed=5, size=64)

    def trainer(out, *extra):
        args = train.build_parser().parse_args(["--data_dir", str(cases), "--val_dir", str(cases),
                                                "--out_dir", str(out), "--max_steps", "2", "--augment",
                                                *extra, *TINY_FLAGS])
        return train.Trainer(args)

    plain = trainer(tmp_path_factory.mktemp("plain"))
    augmented = trainer(tmp_path_factory.mktemp("aug"), "--augment_intensity", "--augment_spatial")
    # the same initial weights: the validation loss reads the held-out slices unaugmented
    assert augmented.validation_loss(8) == pytest.approx(plain.validation_loss(8), rel=1e-6)
    a_images, _ = plain._batch(plain.train_set, np.random.default_rng(4), 4)
    b_images, _ = augmented._batch(augmented.train_set, np.random.default_rng(4), 4)
    assert not torch.equal(a_images, b_images)  # the same slices, augmented
    assert augmented.run() == 0
    args = checkpoint.read_checkpoint(augmented.out_dir / "model.pt")["train_args"]
    assert args["augment_intensity"] is True and args["augment_spatial"] is True


def test_rotation_on_a_non_square_slice_keeps_shapes_undistorted():
    """A disk stays round (no shear) when the slice is twice as wide as high."""
    h, w = 40, 80
    yy, xx = torch.meshgrid(torch.arange(h) - h / 2 + 0.5, torch.arange(w) - w / 2 + 0.5, indexing="ij")
    disk = ((yy ** 2 + xx ** 2) < 12 ** 2).float()[None, None].repeat(4, 1, 1, 1)
    _, warped = augment.rotate_and_zoom(disk, disk, np.random.default_rng(5), zoom_range=(1.0, 1.0))
    for i in range(4):
        ys, xs = torch.nonzero(warped[i, 0], as_tuple=True)
        spread = np.linalg.eigvalsh(np.cov(np.stack([ys.numpy(), xs.numpy()]).astype(float)))
        assert spread[1] / spread[0] < 1.05  # round; a sheared disk is an ellipse (1.4-1.6 here)
        assert abs(len(ys) - float(disk[i].sum())) < 0.05 * float(disk[i].sum())
