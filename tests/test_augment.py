"""Training-time augmentation (``augment.py``, ``diffseg-train --augment_intensity /
--augment_spatial / --augment_strong``): what each family changes and what it must leave alone."""

import numpy as np
import pytest
import torch

from napari_diffseg import augment, checkpoint, synthetic, train

from support import TINY_FLAGS


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


# -- --augment_strong ---------------------------------------------------------------------------
EVERY_STEP = tuple((step, 1.0) for step, _ in augment.STRONG_INTENSITY)  # each transform on every slice


def _all_on(images, masks, rng, strong=True):
    return augment.augment_batch(images, masks, rng, flip=True, intensity=True, spatial=True, strong=strong)


def test_strong_off_leaves_the_other_augmentations_and_the_generator_as_they_were():
    images, masks, _ = _batch()
    rng = np.random.default_rng(5)
    out_images, out_masks = _all_on(images, masks, rng, strong=False)
    ref = np.random.default_rng(5)  # the three families by hand, as before --augment_strong
    ref_images, ref_masks = augment.flip_left_right(images, masks, ref)
    ref_images, ref_masks = augment.rotate_and_zoom(ref_images, ref_masks, ref)
    ref_images = augment.jitter_intensity(ref_images, ref)
    assert torch.equal(out_images, ref_images) and torch.equal(out_masks, ref_masks)
    assert rng.bit_generator.state == ref.bit_generator.state  # not one extra draw
    rng = np.random.default_rng(5)
    same, same_masks = augment.augment_batch(images, masks, rng, strong=False)
    assert same is images and same_masks is masks
    assert rng.bit_generator.state == np.random.default_rng(5).bit_generator.state


def test_strong_is_drawn_from_the_generator_alone():
    images, masks, _ = _batch(n=16)
    first = _all_on(images, masks, np.random.default_rng(7))
    again = _all_on(images, masks, np.random.default_rng(7))
    other = _all_on(images, masks, np.random.default_rng(8))
    without = _all_on(images, masks, np.random.default_rng(7), strong=False)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], without[0])  # it did something


def test_elastic_deformation_moves_images_and_mask_together_and_keeps_the_mask_binary():
    size = 128  # the training size: shifts of a few pixels
    images, masks, _ = _batch(n=4, size=size)
    masks.zero_()
    masks[:, :, 34:94, 40:90] = 1
    images[:, 3] = masks[:, 0] * 0.9  # FLAIR bright exactly on the tumour
    warped, warped_masks = augment.elastic_deform(images, masks, np.random.default_rng(0), probability=1.0)
    assert set(torch.unique(warped_masks).tolist()) <= {0.0, 1.0}
    for i in range(images.shape[0]):
        moved = warped_masks[i, 0] != masks[i, 0]
        assert int(moved.sum()) > 50  # the field moved the tumour's edge
        area, new_area = float(masks[i].sum()), float(warped_masks[i].sum())
        assert 0.85 * area < new_area < 1.15 * area  # modest: a few pixels along a 60 x 50 square
        bright = warped[i, 3] > 0.45
        # where the mask changed, the image changed with it (a mask left behind would agree nowhere)
        assert float((bright[moved] == warped_masks[i, 0].bool()[moved]).float().mean()) > 0.9
        assert float((bright == warped_masks[i, 0].bool()).float().mean()) > 0.99
    # all channels share the field: identical channels stay identical
    same = images[:, :1].repeat(1, 4, 1, 1)
    warped_same, _ = augment.elastic_deform(same, masks, np.random.default_rng(0), probability=1.0)
    assert torch.equal(warped_same, warped[:, :1].repeat(1, 4, 1, 1))
    untouched = augment.elastic_deform(images, masks, np.random.default_rng(0), probability=0.0)
    assert untouched[0] is images and untouched[1] is masks


def test_strong_intensity_stays_inside_each_offsets_brain_and_within_0_1():
    images, _, brain = _batch(n=6)
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    smaller = ((yy - 24) ** 2 + (xx - 24) ** 2) < 12 ** 2  # the neighbouring slice's brain is smaller
    x = torch.cat([images, images * smaller], 1)  # C = 8: two slice offsets
    x[:, 3] = torch.where(x[:, 3] > 0, 0.95, 0.0)  # near 1: brightness, contrast and noise overshoot
    inside = augment.brain_mask(x)
    assert torch.equal(inside[:, 0], brain.expand(6, -1, -1)) and torch.equal(inside[:, 7], smaller.expand(6, -1, -1))
    for step, _ in augment.STRONG_INTENSITY:
        out = step(x, inside, np.random.default_rng(1))
        assert bool((out[:, :4][..., ~brain] == 0).all()), step.__name__
        assert bool((out[:, 4:][..., ~smaller] == 0).all()), step.__name__  # its own offset's outline
        assert float((out - x)[..., brain].abs().max()) > 0.01, step.__name__  # it changed the brain
    out = augment.strong_intensity(x, np.random.default_rng(1), steps=EVERY_STEP)
    assert bool((out[:, :4][..., ~brain] == 0).all()) and bool((out[:, 4:][..., ~smaller] == 0).all())
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert float(out.max()) == 1.0  # clipped, not rescaled
    # through the whole batch augmentation, every family on
    images, masks, _ = _batch(n=32)
    out, out_masks = _all_on(images, masks, np.random.default_rng(2))
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert set(torch.unique(out_masks).tolist()) <= {0.0, 1.0}


def test_strong_draws_are_per_modality_and_shared_across_slice_offsets():
    images, masks, _ = _batch(n=16)
    copies = images.repeat(1, 3, 1, 1)  # C = 12: three identical slice offsets
    warped, _ = augment.elastic_deform(copies, masks, np.random.default_rng(3), probability=1.0)
    every = augment.strong_intensity(warped, np.random.default_rng(3), steps=EVERY_STEP)
    default, _ = _all_on(copies, masks, np.random.default_rng(3))
    for out in (warped, every, default):
        for offset in (1, 2):
            assert torch.allclose(out[:, 4 * offset: 4 * offset + 4], out[:, :4], atol=1e-6)
    assert float((every - warped).abs().max()) > 0.05
    # and each modality has its own draw in every transform: four identical modalities come out different
    same = images[:, :1].repeat(1, 4, 1, 1)
    for step, _ in augment.STRONG_INTENSITY:
        out = step(same, augment.brain_mask(same), np.random.default_rng(3))
        for m in (1, 2, 3):
            assert float((out[:, m] - out[:, 0]).abs().max()) > 0.01, step.__name__


def test_augment_strong_is_parsed_and_reaches_the_batches(tmp_path_factory):
    parse = train.build_parser().parse_args
    assert parse(["--data_dir", "d", "--augment_strong"]).augment_strong is True
    assert parse(["--data_dir", "d"]).augment_strong is False
    cases = tmp_path_factory.mktemp("phantoms")
    synthetic.write_phantoms(cases, n=2, seed=5, size=64)
    args = parse(["--data_dir", str(cases), "--out_dir", str(tmp_path_factory.mktemp("strong")), "--max_steps", "1",
                  "--augment_strong", *TINY_FLAGS])
    trainer = train.Trainer(args)
    data = trainer.train_set
    images, masks = trainer._batch(data, np.random.default_rng(4), 8)
    rng = np.random.default_rng(4)
    idx = torch.from_numpy(data.draw(rng, 8))
    expected = augment.augment_batch(data.images[idx].float(), data.masks[idx].float(), rng, strong=True)
    assert torch.equal(images, expected[0]) and torch.equal(masks, expected[1])
    assert not torch.equal(images, data.images[idx].float())
