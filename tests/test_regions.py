"""The tumour's parts (issue 26): label maps and nested regions, a region model (diffseg-train
--regions brats) trained, stored and sampled, and its per-region outputs and figures in
diffseg-sample and diffseg-eval. The whole-tumour path is held bit for bit by
test_behaviour_record.py; here only that its files and figures keep their names."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from support import TINY, TINY_FLAGS, save_tiny_checkpoint

from napari_diffseg import checkpoint, data, evaluate, sample, train
from napari_diffseg.augment import augment_batch
from napari_diffseg.errors import DiffSegError
from napari_diffseg.geometry import Geometry
from napari_diffseg.inference import Segmenter, run_to_end
from napari_diffseg.losses import segmentation_losses, x0_dice_bce
from napari_diffseg.metrics import dice
from napari_diffseg.options import Guidance, SamplingOptions
from napari_diffseg.regions import (
    BRATS_REGIONS,
    clean_labels,
    labels_from_probability,
    labels_to_regions,
    nest_regions,
    regions_to_labels,
)
from napari_diffseg.trainset import build_slice_set
from napari_diffseg.unet import UNet, UNetConfig

REGION_FILES = ["labels.nii.gz"] + [f"{kind}_{region}.nii.gz" for kind in ("probability", "variance")
                                    for region in BRATS_REGIONS]
BINARY_FILES = ["mask.nii.gz", "probability.nii.gz", "variance.nii.gz"]
RECIPE = ["--predict_xstart", "True", "--x0_loss_weight", "1", "--sample_respacing", "4"]


# -- label maps and regions ---------------------------------------------------------------------

def test_label_map_to_regions_and_back():
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(7, 9, 3))
    regions = labels_to_regions(labels)
    assert regions.shape == (3, 7, 9, 3) and regions.dtype == np.uint8
    np.testing.assert_array_equal(regions[0], np.isin(labels, (1, 2, 4)))  # WT
    np.testing.assert_array_equal(regions[1], np.isin(labels, (1, 4)))  # TC
    np.testing.assert_array_equal(regions[2], labels == 4)  # ET
    assert np.all(regions[1] <= regions[0]) and np.all(regions[2] <= regions[1])  # nested
    np.testing.assert_array_equal(regions_to_labels(regions), labels)
    np.testing.assert_array_equal(labels_to_regions(labels, "wt"), (labels > 0)[None])


def test_the_nesting_rule_drops_inner_regions_outside_outer_ones():
    """Every WT, TC, ET combination of one voxel -> its label: TC counts only inside WT, ET only
    inside TC (the rule in regions.py's docstring)."""
    expected = {  # (wt, tc, et): label
        (0, 0, 0): 0, (0, 0, 1): 0, (0, 1, 0): 0, (0, 1, 1): 0,  # nothing outside the whole tumour
        (1, 0, 0): 2, (1, 0, 1): 2,  # enhancing outside the core: oedema
        (1, 1, 0): 1, (1, 1, 1): 4,
    }
    combos = np.array(list(expected), np.uint8).T  # (3, 8)
    np.testing.assert_array_equal(regions_to_labels(combos), list(expected.values()))
    nested = nest_regions(combos.astype(bool))
    np.testing.assert_array_equal(labels_to_regions(regions_to_labels(combos)), nested)


def test_nesting_probabilities_commutes_with_the_threshold():
    rng = np.random.default_rng(1)
    probability = rng.random((3, 20, 20)).astype(np.float32)
    nested = nest_regions(probability)
    assert np.all(nested[1] <= nested[0]) and np.all(nested[2] <= nested[1])
    np.testing.assert_array_equal(nested > 0.5, nest_regions(probability > 0.5))
    np.testing.assert_array_equal(labels_from_probability(probability), regions_to_labels(probability > 0.5))


def test_labels_outside_brats_are_refused_and_an_empty_map_gives_empty_regions():
    with pytest.raises(DiffSegError, match="0, 1 .*2 .*4.*relabel"):
        labels_to_regions(np.array([0, 1, 3]))
    assert not labels_to_regions(np.zeros((4, 4), np.uint8)).any()
    with pytest.raises(DiffSegError, match="WT, TC, ET"):
        regions_to_labels(np.zeros((2, 4, 4)))


def test_whole_tumour_marks_become_known_pixels_per_region():
    """The rule of a refine with a region model (refine.region_known_pixels): a tumour mark holds
    WT = 1 and leaves the parts free; a not-tumour mark holds every region at 0; outside a drawn
    region the label map holds every region, a tumour mark there keeping the map's parts where
    the map is tumour too."""
    from napari_diffseg.refine import known_pixels, region_known_pixels

    scribbles = np.zeros((8, 10), np.uint8)
    scribbles[1, 1:4] = 1  # tumour, inside the region
    scribbles[2, 6] = 2  # not tumour, inside the region
    scribbles[6, 1] = 1  # tumour, outside the region, where the map says oedema
    scribbles[6, 8] = 1  # tumour, outside the region, where the map says nothing
    scribbles[7, 5] = 2  # not tumour, outside, where the map says enhancing
    labels = np.zeros((8, 10), np.uint8)
    labels[5:8, 0:7] = 2
    labels[6:8, 2:6] = 1
    labels[7, 4:6] = 4
    region = np.zeros((8, 10), bool)
    region[0:4, :] = True

    alone = region_known_pixels(scribbles)  # no region: the scribbles only
    assert alone.mask.shape == alone.values.shape == (3, 8, 10)
    tumour, background = scribbles == 1, scribbles == 2
    np.testing.assert_array_equal(alone.mask[0], tumour | background)
    np.testing.assert_array_equal(alone.mask[1], background)
    np.testing.assert_array_equal(alone.mask[2], background)
    np.testing.assert_array_equal(alone.values[0], tumour.astype(np.float32))
    assert not alone.values[1:].any()
    assert alone.count == known_pixels(scribbles).count == int((tumour | background).sum())

    known = region_known_pixels(scribbles, labels, region, "proposal")
    outside = ~region
    held = labels_to_regions(labels)
    for k in range(3):  # outside the region: the map's regions, but where a mark says otherwise
        rest = outside & ~tumour & ~background
        assert known.mask[k][rest].all()
        np.testing.assert_array_equal(known.values[k][rest], held[k][rest])
    assert known.mask[:, 6, 1].all() and list(known.values[:, 6, 1]) == [1, 0, 0]  # the map's oedema kept
    assert list(known.mask[:, 6, 8]) == [True, False, False] and known.values[0, 6, 8] == 1  # parts free
    assert known.mask[:, 7, 5].all() and not known.values[:, 7, 5].any()  # not tumour wins over enhancing
    assert list(known.mask[:, 1, 2]) == [True, False, False] and known.values[0, 1, 2] == 1  # inside: parts free
    assert known.mask[:, 2, 6].all() and not known.values[:, 2, 6].any()
    assert not known.mask[:, region & ~tumour & ~background].any()  # inside: only the marks
    # What the held values say is nested, so the label map keeps them.
    where = known.mask.all(axis=0)
    np.testing.assert_array_equal(nest_regions(known.values)[:, where], known.values[:, where])
    assert known.summary() == known_pixels(scribbles, labels, region, "proposal").summary()
    with pytest.raises(DiffSegError, match="BraTS labels"):
        region_known_pixels(scribbles, np.where(labels == 4, 3, labels), region)


def test_cleaning_a_label_map_removes_islands_with_their_core():
    labels = np.zeros((20, 20, 5), np.uint8)
    labels[2:10, 2:10, 1:4] = 2
    labels[4:8, 4:8, 2] = 4  # the large lesion's core
    labels[15:17, 15:17, 2] = 4  # an enhancing island of 4 voxels
    cleaned = clean_labels(labels, 10)
    assert not cleaned[14:18, 14:18].any()
    np.testing.assert_array_equal(cleaned[:12, :12], labels[:12, :12])


# -- the network, the losses and the training data ------------------------------------------

def test_a_region_network_has_a_mask_and_a_variance_channel_per_region():
    config = UNetConfig(**{**TINY, "in_channels": 7, "mask_channels": 3})
    assert config.cond_channels == 4 and config.out_channels == 6
    assert UNetConfig(**{**TINY, "in_channels": 7, "mask_channels": 3, "learn_sigma": False}).out_channels == 3
    torch.manual_seed(0)
    model = UNet(config).eval()
    with torch.no_grad():
        model.out[2].weight.normal_(0.0, 0.05)
    images, x_t = torch.rand(2, 4, 16, 16), torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        whole = model(torch.cat([images, x_t], 1), t)
        split = model.forward_conditioned(x_t, t, model.encode_condition(images))
    assert whole.shape == (2, 6, 16, 16)
    torch.testing.assert_close(whole, split, rtol=1e-4, atol=1e-5)
    # a whole-tumour model's configuration is written as before regions existed
    assert "mask_channels" not in UNetConfig(**TINY).to_dict()
    assert config.to_dict()["mask_channels"] == 3


def test_region_losses_are_the_mean_of_each_region_s_loss():
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(4, 3, 12, 12, generator=generator) > 0.6).float()
    estimate = torch.rand(4, 3, 12, 12, generator=generator)
    per_region = torch.stack([x0_dice_bce(estimate[:, c : c + 1], masks[:, c : c + 1]) for c in range(3)])
    torch.testing.assert_close(x0_dice_bce(estimate, masks), per_region.mean(0))
    logits = torch.randn(4, 3, 12, 12, generator=generator)
    whole = segmentation_losses(logits, masks)
    parts = [segmentation_losses(logits[:, c : c + 1], masks[:, c : c + 1]) for c in range(3)]
    for key in ("loss", "bce", "dice_loss"):
        torch.testing.assert_close(whole[key], torch.stack([p[key] for p in parts]).mean(0))


def _write_case(folder: Path, name: str, seed: int, shape=(40, 36, 6)) -> Path:
    """A BraTS-like case of small volumes: a lesion with oedema (2), core (1) and enhancing rim (4),
    images that show the parts, and an affine and header of its own (1.5 x 1.2 x 3 mm, shifted)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    cx, cy = rng.uniform(14, 22), rng.uniform(14, 22)
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + ((z - 2.5) * 2) ** 2)
    labels = np.zeros(shape, np.uint8)
    labels[r < 9] = 2
    labels[r < 6] = 4
    labels[r < 3.5] = 1
    brain = np.sqrt((x - 20) ** 2 + (y - 18) ** 2) < 17
    tissue = {"t1": {0: 0.5, 1: 0.3, 2: 0.45, 4: 0.4}, "t1ce": {0: 0.5, 1: 0.3, 2: 0.5, 4: 0.95},
              "t2": {0: 0.4, 1: 0.8, 2: 0.85, 4: 0.6}, "flair": {0: 0.35, 1: 0.6, 2: 0.9, 4: 0.7}}
    affine = np.diag([1.5, 1.2, 3.0, 1.0])
    affine[:3, 3] = [-30.0, 12.5, 4.0]
    folder = folder / name
    folder.mkdir(parents=True)
    for modality, table in tissue.items():
        image = np.vectorize(table.get)(labels).astype(np.float32) + rng.normal(0, 0.03, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(np.where(brain, image, 0).astype(np.float32), affine),
                 folder / f"{name}_{modality}.nii.gz")
    nib.save(nib.Nifti1Image(np.where(brain, labels, 0).astype(np.uint8), affine), folder / f"{name}_seg.nii.gz")
    return folder


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cases")
    for i in range(2):
        _write_case(root, f"Case_{i}", seed=i)
    return root


def test_the_training_set_holds_the_three_nested_regions(cases_dir):
    geometry = Geometry(resize_to=32)
    whole = build_slice_set(cases_dir, geometry, 2, log=lambda _: None)
    parts = build_slice_set(cases_dir, geometry, 2, log=lambda _: None, regions="brats")
    assert whole.masks.shape[1] == 1 and parts.masks.shape == (whole.masks.shape[0], 3, 32, 32)
    torch.testing.assert_close(parts.masks[:, :1], whole.masks)  # WT is the whole-tumour mask
    assert parts.masks[:, 2].any()  # the enhancing rim is there
    assert torch.all(parts.masks[:, 1] <= parts.masks[:, 0]) and torch.all(parts.masks[:, 2] <= parts.masks[:, 1])
    torch.testing.assert_close(parts.images, whole.images)


def test_spatial_augmentation_moves_every_region_alike():
    """Three copies of one mask stay copies (one warp for all channels); nested masks stay nested."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 4, 32, 32, generator=generator)
    disc = torch.zeros(32, 32)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disc[(yy - 14) ** 2 + (xx - 17) ** 2 < 64] = 1
    copies = disc.expand(16, 3, 32, 32).clone()
    _, warped = augment_batch(images, copies, np.random.default_rng(0), flip=True, spatial=True, strong=True)
    assert torch.equal(warped[:, 0], warped[:, 1]) and torch.equal(warped[:, 0], warped[:, 2])
    assert not torch.equal(warped[:, 0], copies[:, 0])
    nested = torch.stack([disc, disc * ((yy - 14) ** 2 + (xx - 17) ** 2 < 25), disc * ((yy - 14) ** 2 + (xx - 17) ** 2 < 9)])
    _, warped = augment_batch(images, nested.expand(16, 3, 32, 32).clone(), np.random.default_rng(1), flip=True,
                              spatial=True, strong=True)
    assert torch.all(warped[:, 1] <= warped[:, 0]) and torch.all(warped[:, 2] <= warped[:, 1])


# -- a region model, trained, stored and sampled ------------------------------------------------

@pytest.fixture(scope="module")
def region_model(cases_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("region_model")
    code = train.main(["--data_dir", str(cases_dir), "--out_dir", str(out), "--max_steps", "4", "--regions", "brats",
                       "--augment_spatial", *RECIPE, *TINY_FLAGS])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def region_baseline(cases_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("region_baseline")
    code = train.main(["--data_dir", str(cases_dir), "--out_dir", str(out), "--max_steps", "3", "--regions", "brats",
                       "--objective", "segmentation", *TINY_FLAGS])
    assert code == 0
    return out


def test_the_regions_are_stored_in_the_model_and_honoured_at_sampling(region_model):
    payload = checkpoint.read_checkpoint(region_model / "model.pt")
    assert payload["regions"] == "brats" and payload["train_args"]["regions"] == "brats"
    loaded = checkpoint.load_model(region_model / "model.pt")
    assert loaded.regions == "brats" and loaded.multi_region and loaded.region_names == ("wt", "tc", "et")
    assert loaded.unet_config.mask_channels == 3 and loaded.unet_config.out_channels == 6  # learned sigma per region
    rows = (region_model / "progress.csv").read_text().splitlines()
    assert "x0_loss" in rows[0] and len(rows) == 5
    images = np.random.default_rng(0).random((4, 30, 26, 3)).astype(np.float32)
    segmenter = Segmenter(loaded, device="cpu")
    result = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=3, seed=0), preview_interval=0))
    assert result.regions == "brats"
    assert result.probability.shape == result.variance.shape == result.mask.shape == (3, 30, 26, 3)
    assert result.samples.shape == (3, 3, 30, 26, 3) and result.labels.shape == (30, 26, 3)
    np.testing.assert_array_equal(result.labels, labels_from_probability(result.probability))
    np.testing.assert_array_equal(result.mask, labels_to_regions(result.labels))
    np.testing.assert_allclose(result.probability, result.samples.mean(0), atol=1e-6)
    lone = run_to_end(segmenter.run(images[..., 1], SamplingOptions(num_ensemble=3, seed=0)))
    assert lone.labels.shape == (30, 26) and lone.probability.shape == (3, 30, 26)


@pytest.mark.parametrize("which", ["region_model", "region_baseline"])
def test_a_region_models_parts_are_empty_outside_the_scan(which, request):
    segmenter = Segmenter.load(request.getfixturevalue(which) / "model.pt", device="cpu")
    images = np.random.default_rng(0).random((4, 30, 26)).astype(np.float32)
    images[:, :, :5] = 0  # every modality 0: outside the scanned head
    result = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=3, seed=0)))
    for array in (result.probability, result.variance, result.samples[:, 0], result.samples[:, 2]):
        assert not np.any(array[..., :5])
    assert not np.any(result.labels[:, :5]) and np.any(result.probability[..., 5:])


def test_a_region_model_takes_known_pixels_per_region_and_keeps_its_regions_on_resume(region_model, cases_dir,
                                                                                      tmp_path, capsys):
    segmenter = Segmenter.load(region_model / "model.pt", device="cpu")
    images = np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)
    known = np.zeros((16, 16), bool)
    known[3, 3] = True
    with pytest.raises(DiffSegError, match="region axis"):  # one mask for three regions: which?
        run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2), Guidance(known, known.astype(np.float32))))
    per_region = np.stack([known, known, np.zeros_like(known)])  # WT and TC held at 1, ET free
    result = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=2),
                                      Guidance(per_region, per_region.astype(np.float32))))
    assert (result.samples[:, :2, 3, 3] == 1).all() and result.labels[3, 3] in (1, 4)
    code = train.main(["--data_dir", str(cases_dir), "--out_dir", str(tmp_path), "--max_steps", "5",
                       "--resume", str(region_model), *RECIPE, *TINY_FLAGS])
    assert code == 2 and "--regions brats" in capsys.readouterr().err


def test_bad_region_flags_are_refused(cases_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.build_parser().parse_args(["--data_dir", str(cases_dir), "--regions", "foo"])
    assert exit_info.value.code == 2 and "invalid choice: 'foo'" in capsys.readouterr().err
    code = train.main(["--data_dir", str(cases_dir), "--out_dir", str(tmp_path), "--max_steps", "1", "--regions",
                       "brats", "--click_fraction", "0.5", *TINY_FLAGS])
    assert code == 2 and "--click_fraction is for whole-tumour models" in capsys.readouterr().err


def test_checkpoints_without_regions_load_as_whole_tumour(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "old.pt", Geometry())
    assert "regions" not in checkpoint.read_checkpoint(path)
    loaded = checkpoint.load_model(path)
    assert loaded.regions == "wt" and not loaded.multi_region
    payload = checkpoint.read_checkpoint(path)
    torch.save({**payload, "regions": "brats"}, tmp_path / "wrong.pt")  # one mask channel, three regions
    with pytest.raises(DiffSegError, match="do not match its network's 1 mask channel"):
        checkpoint.load_model(tmp_path / "wrong.pt")
    torch.save({**payload, "regions": "lobes"}, tmp_path / "unknown.pt")
    with pytest.raises(DiffSegError, match="unknown regions 'lobes'"):
        checkpoint.load_model(tmp_path / "unknown.pt")


def test_the_region_baseline_gives_three_sigmoid_outputs(region_baseline):
    loaded = checkpoint.load_model(region_baseline / "model.pt")
    assert loaded.deterministic and loaded.regions == "brats" and loaded.unet_config.out_channels == 3
    rows = (region_baseline / "progress.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,bce,dice_loss")
    images = np.random.default_rng(0).random((4, 20, 20, 2)).astype(np.float32)
    result = run_to_end(Segmenter(loaded, device="cpu").run(images, SamplingOptions()))
    assert result.num_ensemble == 1 and result.probability.shape == (3, 20, 20, 2)
    assert 0 < result.probability.min() and result.probability.max() < 1
    np.testing.assert_allclose(result.variance, result.probability * (1 - result.probability), atol=1e-6)


# -- the command lines ---------------------------------------------------------------------------

def _check_region_outputs(folder: Path, source: Path, case: str) -> dict:
    t1 = nib.load(source / case / f"{case}_t1.nii.gz")
    truth = nib.load(source / case / f"{case}_seg.nii.gz")
    for name in REGION_FILES:
        image = nib.load(folder / name)
        assert image.shape == t1.shape, name
        np.testing.assert_array_equal(image.affine, t1.affine)
        assert image.header.get_zooms() == t1.header.get_zooms()
        assert image.header["qform_code"] == t1.header["qform_code"]
        assert image.header["sform_code"] == t1.header["sform_code"]
    labels = nib.load(folder / "labels.nii.gz")
    assert labels.get_data_dtype() == np.uint8
    values = np.asarray(labels.dataobj)
    assert set(np.unique(values)) <= {0, 1, 2, 4}
    probability = np.stack([nib.load(folder / f"probability_{r}.nii.gz").get_fdata() for r in BRATS_REGIONS])
    np.testing.assert_array_equal(values, labels_from_probability(probability.astype(np.float32)))
    for name in BINARY_FILES:
        assert not (folder / name).exists(), name
    assert truth.shape == t1.shape
    metrics = json.loads((folder / "metrics.json").read_text())
    for region in BRATS_REGIONS:
        for figure in ("dice", "hd95", "qubrats", "auroc"):
            assert f"{figure}_{region}" in metrics
        assert 0.0 <= metrics[f"dice_{region}"] <= 1.0
    return metrics


def test_sample_writes_a_label_map_and_maps_per_region(region_model, cases_dir, tmp_path):
    out = tmp_path / "out"
    case = "Case_0"
    (out / case).mkdir(parents=True)
    for name in BINARY_FILES:  # an earlier whole-tumour run's files in the same folder
        (out / case / name).write_bytes(b"old")
    code = sample.main(["--data_dir", str(cases_dir), "--out_dir", str(out), "--model_path",
                        str(region_model / "model.pt"), "--num_ensemble", "3", "--device", "cpu", "--no_progress",
                        "--save_samples"])
    assert code == 0
    metrics = _check_region_outputs(out / case, cases_dir, case)
    assert metrics["num_ensemble"] == 3 and metrics["regions"] == ["wt", "tc", "et"]
    assert metrics["qubrats_wt"] is not None and 0 <= metrics["qubrats_wt"] <= 1
    for region in BRATS_REGIONS:
        members = nib.load(out / case / f"samples_{region}.nii.gz")
        assert members.shape == (*nib.load(cases_dir / case / f"{case}_t1.nii.gz").shape, 3)
    # the figures are those of the written label map against the truth's regions
    truth = labels_to_regions(np.asarray(nib.load(cases_dir / case / f"{case}_seg.nii.gz").dataobj))
    written = labels_to_regions(np.asarray(nib.load(out / case / "labels.nii.gz").dataobj))
    for index, region in enumerate(BRATS_REGIONS):
        assert metrics[f"dice_{region}"] == pytest.approx(dice(written[index], truth[index]))


def test_sample_with_the_region_baseline(region_baseline, cases_dir, tmp_path):
    code = sample.main(["--data_dir", str(cases_dir / "Case_1"), "--out_dir", str(tmp_path), "--model_path",
                        str(region_baseline / "model.pt"), "--device", "cpu", "--no_progress", "--cleanup", "5"])
    assert code == 0
    metrics = _check_region_outputs(tmp_path / "Case_1", cases_dir, "Case_1")
    assert metrics["sampler"] == "one pass (deterministic U-Net)" and metrics["cleanup_min_voxels"] == 5


def test_sample_runs_the_bundled_model_that_bundled_names(region_model, cases_dir, tmp_path, monkeypatch, capsys):
    """--bundled brats runs the bundled region model (here a tiny one in its place); a missing one,
    or --bundled beside --model_path, is a plain error naming the fix."""
    monkeypatch.setitem(checkpoint.BUNDLED_MODELS, "brats", tmp_path / "not_installed.pt")
    args = ["--data_dir", str(cases_dir / "Case_1"), "--num_ensemble", "2", "--timestep_respacing", "3",
            "--device", "cpu", "--no_progress"]
    assert sample.main([*args, "--out_dir", str(tmp_path / "a"), "--bundled", "brats"]) == 2
    err = capsys.readouterr().err
    assert "not_installed.pt" in err and "is not installed" in err and "give a model checkpoint" in err
    assert sample.main([*args, "--out_dir", str(tmp_path / "b"), "--bundled", "brats", "--model_path",
                        str(region_model / "model.pt")]) == 2
    assert "give one of them" in capsys.readouterr().err

    monkeypatch.setitem(checkpoint.BUNDLED_MODELS, "brats", region_model / "model.pt")
    assert sample.main([*args, "--out_dir", str(tmp_path / "c"), "--bundled", "brats"]) == 0
    metrics = _check_region_outputs(tmp_path / "c" / "Case_1", cases_dir, "Case_1")
    assert metrics["regions"] == ["wt", "tc", "et"]


def test_a_whole_tumour_model_keeps_its_files_and_figures(cases_dir, tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny.pt", Geometry(resize_to=32))
    out = tmp_path / "out"
    (out / "Case_0").mkdir(parents=True)
    (out / "Case_0" / "labels.nii.gz").write_bytes(b"old")  # an earlier region run's
    code = sample.main(["--data_dir", str(cases_dir / "Case_0"), "--out_dir", str(out), "--model_path", str(model),
                        "--num_ensemble", "2", "--timestep_respacing", "3", "--device", "cpu", "--no_progress"])
    assert code == 0
    assert sorted(p.name for p in (out / "Case_0").iterdir()) == sorted([*BINARY_FILES, "metrics.json"])
    metrics = json.loads((out / "Case_0" / "metrics.json").read_text())
    assert set(metrics) == {"case", "dice", "hd95", "num_ensemble", "steps", "sampler", "seed", "seconds",
                            "cleanup_min_voxels"}


def test_eval_reports_every_figure_per_region(region_model, cases_dir, tmp_path, capsys):
    code = evaluate.main(["--data_dir", str(cases_dir), "--out_dir", str(tmp_path), "--model_path",
                          str(region_model / "model.pt"), "--num_ensemble", "3", "--ensemble_sizes", "1,3",
                          "--device", "cpu", "--save_maps"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["regions"] == "brats"
    row = report["cases"][0]
    for region in BRATS_REGIONS:
        for key in ("dice_ensemble", "hd95", "qubrats_variance", "auroc_variance_error", "dice_single_mean"):
            assert f"{key}_{region}" in row and f"{key}_{region}" in report["overall"]
    assert set(row["dice_by_ensemble_size_regions"]["3"]) == set(BRATS_REGIONS)
    mean = np.mean(list(row["dice_by_ensemble_size_regions"]["3"].values()))
    assert row["dice_by_ensemble_size"]["3"] == pytest.approx(mean)
    # the ensemble's figures are those of the label map of the per-region means
    case = data.load_case(data.find_cases(cases_dir)[0])
    with np.load(tmp_path / "maps" / f"{case.name}.npz") as maps:
        assert maps["probability"].shape == (3, *case.spatial_shape)
    markdown = (tmp_path / "report.md").read_text()
    assert "Dice WT | Dice TC | Dice ET" in markdown and "QU-BraTS var. ET" in markdown
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"dice_ensemble_wt", "dice_ensemble_tc", "dice_ensemble_et", "hd95_et_nan_cases"} <= set(final)


def test_eval_of_the_region_baseline_ranks_by_its_own_uncertainty(region_baseline, cases_dir, tmp_path):
    code = evaluate.main(["--data_dir", str(cases_dir), "--out_dir", str(tmp_path), "--model_path",
                          str(region_baseline / "model.pt"), "--device", "cpu", "--slices", "tumour"])
    assert code == 0
    row = json.loads((tmp_path / "report.json").read_text())["cases"][0]
    assert row["num_members_wt"] == 1
    assert np.isfinite(row["auroc_variance_error_wt"]) and np.isfinite(row["qubrats_variance_wt"])


def test_score_regions_nests_the_members_and_the_ensemble():
    """An enhancing member voxel outside its tumour core counts for no region inside it."""
    labels = np.zeros((8, 8), np.uint8)
    labels[2:6, 2:6] = 2
    labels[3:5, 3:5] = 4
    members = labels_to_regions(labels)[None].astype(np.float32).repeat(2, 0)
    members[:, 2, 0, 0] = 1.0  # ET far outside WT and TC
    row = evaluate.score_regions(members, labels)
    assert row["dice_ensemble_et"] == 1.0 and row["dice_single_mean_et"] == 1.0
    assert row["dice_ensemble_wt"] == row["dice_ensemble_tc"] == 1.0


def test_sample_on_a_shared_brats_case(region_model, brats18_dir, tmp_path):
    """Two slices of a real BraTS 2018 case: the label map lands on the source grid."""
    case = "Brats18_2013_2_1"
    code = sample.main(["--data_dir", str(brats18_dir / case), "--out_dir", str(tmp_path), "--model_path",
                        str(region_model / "model.pt"), "--num_ensemble", "2", "--device", "cpu", "--no_progress",
                        "--slices", "70:72", "--cleanup", "0"])
    assert code == 0
    metrics = _check_region_outputs(tmp_path / case, brats18_dir, case)
    assert metrics["slices"] == "70:72"
    labels = np.asarray(nib.load(tmp_path / case / "labels.nii.gz").dataobj)
    assert not labels[..., :70].any() and not labels[..., 72:].any()  # outside the slab: background


def test_the_bundled_region_model_is_installed_and_finds_the_parts_of_the_sample_slice():
    """The shipped region model: a 3-region diffusion model with the cross-validated recipe's
    settings, and on the bundled sample slice (a case it was trained on: a check that the file is
    the trained model, not a measure of accuracy) every part is found."""
    from napari_diffseg._sample_data import BRATS_SLICE, sample_files

    assert checkpoint.installed_bundled_models() == ["wt", "brats"]
    model = checkpoint.bundled_model("brats")
    payload = checkpoint.read_checkpoint(model)
    assert payload["regions"] == "brats" and payload["objective"] == "diffusion"
    assert payload["unet_config"]["mask_channels"] == 3 and payload["inputs"]["input_norm"] == "zscore"
    assert payload["sampling"]["timestep_respacing"] == "2" and payload["sampling"]["cleanup_min_voxels"] == 5000

    case = data.load_case(sample_files(BRATS_SLICE))
    segmenter = Segmenter.load(model, device="cpu")
    result = run_to_end(segmenter.run(case.images, SamplingOptions(seed=0), keep_samples=False))  # its 5 x 2 steps
    assert result.regions == "brats" and result.labels.shape == case.labels.shape
    truth = labels_to_regions(case.labels)
    found = labels_to_regions(result.labels)
    # Measured 2026-12-06 (seed 0): WT 0.90, TC 0.90, ET 0.60; an untrained model finds next to nothing.
    bars = {"wt": 0.8, "tc": 0.8, "et": 0.4}
    for index, region in enumerate(BRATS_REGIONS):
        assert dice(found[index], truth[index]) > bars[region], region
