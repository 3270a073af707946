"""Phantoms: format, determinism, files, command line, and that they are hard but learnable."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from napari_diffseg import MODALITIES
from napari_diffseg.synthetic import (best_single_modality_dice, case_rng, main, make_phantom,
                                      write_phantoms)

SIZE = 128  # smaller than the 240 default, for speed


@pytest.fixture(scope="module")
def phantoms() -> list[dict[str, np.ndarray]]:
    return [make_phantom(case_rng(0, i), SIZE) for i in range(8)]


def test_phantom_format(phantoms):
    for phantom in phantoms:
        images, label = phantom["images"], phantom["label"]
        assert images.shape == (len(MODALITIES), SIZE, SIZE) and images.dtype == np.float32
        assert label.shape == (SIZE, SIZE) and label.dtype == np.uint8
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert set(np.unique(label)) <= {0, 1, 2, 4}
    assert sum(p["label"].any() for p in phantoms) >= 6


def test_healthy_contrasts_follow_mri(phantoms):
    # Pixels where t2 is brightest are CSF: dark in flair and t1 compared with the brain.
    for phantom in phantoms:
        t1, _, t2, flair = phantom["images"]
        healthy_head = (phantom["label"] == 0) & (ndimage.gaussian_filter(t1, 2) > 0.3)
        csf = healthy_head & (t2 > np.percentile(t2[healthy_head], 97)) & (t1 < 0.4)
        assert csf.sum() > 10
        assert np.median(flair[csf]) < np.median(flair[healthy_head]) - 0.1


def test_tumour_size_is_sane(phantoms):
    fractions = [np.mean(p["label"] > 0) for p in phantoms if p["label"].any()]
    assert all(0.002 < f < 0.2 for f in fractions)
    assert 0.005 < np.mean(fractions) < 0.15


def test_same_seed_same_arrays_different_seed_different():
    a, b = make_phantom(case_rng(3, 1), 64), make_phantom(case_rng(3, 1), 64)
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["label"], b["label"])
    c = make_phantom(case_rng(4, 1), 64)
    assert not np.array_equal(a["images"], c["images"])
    assert np.array_equal(make_phantom(7, 64)["images"], make_phantom(7, 64)["images"])


def test_no_single_modality_threshold_segments_the_tumour(phantoms):
    dices = [best_single_modality_dice(p["images"], p["label"])
             for p in phantoms if p["label"].any()]
    assert np.mean(dices) <= 0.7
    assert np.median(dices) <= 0.7


def test_modalities_together_do_much_better(phantoms):
    # One fixed, hand-made combination of three modalities (bright in t2 AND flair, not
    # bright in t1) beats the best single modality on every case: the tumour is in the
    # joint pattern.
    for phantom in phantoms:
        if not phantom["label"].any():
            continue
        t1, _, t2, flair = phantom["images"]
        combination = ndimage.gaussian_filter(np.minimum(t2, flair) - t1, 1.0)
        joint = best_single_modality_dice(combination[None], phantom["label"])
        single = best_single_modality_dice(phantom["images"], phantom["label"])
        assert joint > single + 0.15


def test_best_single_modality_dice_is_exact_on_easy_images():
    label = np.zeros((20, 20), np.uint8)
    label[5:10, 5:10] = 2
    bright, dark = (label > 0).astype(np.float32), (label == 0).astype(np.float32)
    assert best_single_modality_dice(bright[None], label) == 1.0
    assert best_single_modality_dice(dark[None], label) == 1.0  # image < threshold works too
    half = bright.copy()
    half[5:10, 5:10] = np.where(np.arange(5) < 3, 1.0, 0.0)  # 15 of 25 tumour pixels bright
    assert best_single_modality_dice(half[None], label) == pytest.approx(2 * 15 / (15 + 25))
    assert np.isnan(best_single_modality_dice(bright[None], np.zeros_like(label)))


def test_written_files_load_and_repeat(tmp_path):
    first = write_phantoms(tmp_path / "a", n=2, seed=5, size=64)
    again = write_phantoms(tmp_path / "b", n=2, seed=5, size=64)
    other = write_phantoms(tmp_path / "c", n=2, seed=6, size=64)
    assert [f.name for f in first] == ["phantom_0000", "phantom_0001"]
    for folder, folder_again, folder_other in zip(first, again, other):
        for part in (*MODALITIES, "seg"):
            name = f"{folder.name}_{part}.nii.gz"
            image = nib.load(folder / name)
            data = np.asanyarray(image.dataobj)
            assert data.shape == (64, 64)
            assert data.dtype == (np.uint8 if part == "seg" else np.float32)
            np.testing.assert_array_equal(image.affine, np.eye(4))
            assert np.array_equal(data, np.asanyarray(nib.load(folder_again / name).dataobj))
            if part != "seg":
                other_data = np.asanyarray(nib.load(folder_other / name).dataobj)
                assert not np.array_equal(data, other_data)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{folder.name}_{part}.nii.gz" for part in (*MODALITIES, "seg"))  # no temp files left
    # the files hold what make_phantom makes for that case
    expected = make_phantom(case_rng(5, 1), 64)
    flair = np.asanyarray(nib.load(first[1] / "phantom_0001_flair.nii.gz").dataobj)
    np.testing.assert_array_equal(flair, expected["images"][MODALITIES.index("flair")])


def test_project_loader_reads_phantoms_back(tmp_path):
    from napari_diffseg.data import find_cases, load_case

    write_phantoms(tmp_path, n=2, seed=2, size=64)
    cases = find_cases(tmp_path)
    assert [case.name for case in cases] == ["phantom_0000", "phantom_0001"]
    for index, files in enumerate(cases):
        case = load_case(files)
        expected = make_phantom(case_rng(2, index), 64)
        np.testing.assert_array_equal(case.images, expected["images"])  # already in [0, 1]
        np.testing.assert_array_equal(case.label, expected["label"] > 0)


def test_main_prints_summary(tmp_path, capsys):
    assert main(["--out_dir", str(tmp_path), "--n", "2", "--seed", "1", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 cases" in out and "best single-modality" in out
    assert (tmp_path / "phantom_0001" / "phantom_0001_seg.nii.gz").is_file()


@pytest.mark.parametrize("args", [
    ["--n", "0"],
    ["--size", "32"],
    ["--n", "lots"],
    ["--seed", "-1"],
    ["--out_dir", "{file}/inside_a_file"],
])
def test_cli_bad_arguments_exit_2_without_traceback(tmp_path, args):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["--out_dir", str(tmp_path / "out")] + [a.format(file=blocker) for a in args]
    result = subprocess.run([sys.executable, "-m", "napari_diffseg.synthetic", *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
