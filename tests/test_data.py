"""The data layer: finding, checking, loading and writing cases."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_diffseg import MODALITIES
from napari_diffseg.data import (
    SEG,
    Case,
    brain_slices,
    case_files_from_paths,
    classify_file,
    find_case_files,
    find_cases,
    label_to_mask,
    load_case,
    load_nifti,
    name_tokens,
    normalise_intensity,
    save_nifti,
)
from napari_diffseg.errors import DiffSegError

SHAPE = (12, 10, 6)
AFFINE = np.array([[-1.0, 0, 0, 11], [0, -1.0, 0, 9], [0, 0, 2.0, -5], [0, 0, 0, 1]])


def _write(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


def _brain_volume(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """int16 'raw scanner' intensities inside a box, zero background."""
    rng = np.random.default_rng(seed)
    volume = np.zeros(shape, dtype=np.int16)
    inner = tuple(slice(2, size - 2) if size > 4 else slice(None) for size in shape)
    volume[inner] = rng.integers(100, 1000, size=volume[inner].shape)
    return volume


def _make_case(folder: Path, names: dict[str, str] | None = None, seg: bool = True,
               shape: tuple[int, ...] = SHAPE) -> Path:
    """A synthetic case folder; ``names`` maps modality (and "seg") to a file name."""
    names = names or {m: f"{folder.name}_{m}.nii.gz" for m in (*MODALITIES, "seg")}
    for index, modality in enumerate(MODALITIES):
        _write(folder / names[modality], _brain_volume(index, shape))
    if seg:
        label = np.zeros(shape, dtype=np.uint8)
        label[4:6, 4:6] = 2
        label[5, 5] = 4
        _write(folder / names["seg"], label)
    return folder


# --------------------------------------------------------------------------- file names


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("Brats18_2013_2_1_t1.nii.gz", "t1"),
        ("Brats18_2013_2_1_t1ce.nii.gz", "t1ce"),
        ("Brats18_2013_2_1_t2.nii.gz", "t2"),
        ("Brats18_2013_2_1_flair.nii.gz", "flair"),
        ("Brats18_2013_2_1_seg.nii.gz", SEG),
        ("BraTS20_Training_001_t1.nii.gz", "t1"),
        ("BraTS20_Training_001_t1ce.nii.gz", "t1ce"),
        ("case_t1gd.nii", "t1ce"),
        ("case_T1Gd.NII.GZ", "t1ce"),
        ("case_t1c.nii.gz", "t1ce"),
        ("case_T1_CE.nii.gz", "t1ce"),
        ("case_T2-FLAIR.nii.gz", "flair"),
        ("BraTS-GLI-00000-000-t1n.nii.gz", "t1"),
        ("BraTS-GLI-00000-000-t1c.nii.gz", "t1ce"),
        ("BraTS-GLI-00000-000-t2w.nii.gz", "t2"),
        ("BraTS-GLI-00000-000-t2f.nii.gz", "flair"),
        ("BraTS-GLI-00000-000-seg.nii.gz", SEG),
        ("brats_train_001_t1_080_w.nii.gz", "t1"),
        ("brats_train_001_t1ce_080_w.nii.gz", "t1ce"),
        ("brats_train_001_seg_080_w.nii.gz", SEG),
        ("t1.nii.gz", "t1"),
        ("t1ce.nii.gz", "t1ce"),
        ("flair.nii.gz", "flair"),
        ("seg.nii.gz", SEG),
        ("case_label.nii.gz", SEG),
        ("case_t1.txt", None),  # not NIfTI
        ("case_t1.nii.gz.json", None),
        ("case_t10.nii.gz", None),  # tokens, not prefixes
        ("case_t1cet.nii.gz", None),
        ("notes.nii.gz", None),
        ("case_brainmask.nii.gz", None),
        (".case_t1.nii.gz", None),  # hidden (e.g. a save_nifti temp file)
    ],
)
def test_classify_file(file_name: str, expected: str | None) -> None:
    assert classify_file(file_name) == expected


def test_name_tokens_strip_extension_and_lower_case() -> None:
    assert name_tokens("BraTS-GLI-00000-000-T1C.nii.gz") == ["brats", "gli", "00000", "000", "t1c"]
    assert name_tokens("a_b.c.nii") == ["a", "b", "c"]


def test_file_naming_two_modalities_is_an_error() -> None:
    with pytest.raises(DiffSegError, match=r"case_t1_t2\.nii\.gz.*more than one modality"):
        classify_file("case_t1_t2.nii.gz")


# --------------------------------------------------------------------------- finding cases


@pytest.mark.parametrize(
    "names",
    [
        {m: f"brats_train_001_{m}_080_w.nii.gz" for m in (*MODALITIES, "seg")},
        {m: f"{m}.nii.gz" for m in (*MODALITIES, "seg")},
        {"t1": "BraTS-GLI-00001-000-t1n.nii.gz", "t1ce": "BraTS-GLI-00001-000-t1c.nii.gz",
         "t2": "BraTS-GLI-00001-000-t2w.nii.gz", "flair": "BraTS-GLI-00001-000-t2f.nii.gz",
         "seg": "BraTS-GLI-00001-000-seg.nii.gz"},
        {"t1": "x_t1.nii", "t1ce": "x_t1gd.nii", "t2": "x_t2.nii", "flair": "x_flair.nii", "seg": "x_seg.nii"},
    ],
    ids=["reference-slice", "reference-readme", "brats2023", "t1gd-uncompressed"],
)
def test_find_case_files_naming_schemes(tmp_path: Path, names: dict[str, str]) -> None:
    folder = _make_case(tmp_path / "000246", names)
    (folder / "notes.txt").write_text("ignored")
    files = find_case_files(folder)
    assert files.name == "000246"
    assert list(files.images) == list(MODALITIES)
    assert {m: p.name for m, p in files.images.items()} == {m: names[m] for m in MODALITIES}
    assert files.seg is not None and files.seg.name == names["seg"]


def test_missing_modality_names_folder_and_modality(tmp_path: Path) -> None:
    folder = _make_case(tmp_path / "case1")
    (folder / "case1_flair.nii.gz").unlink()
    with pytest.raises(DiffSegError, match=r"case1: no flair image found.*case1_flair\.nii\.gz") as info:
        find_case_files(folder)
    assert "\n" not in str(info.value)


def test_duplicate_modality_names_both_files(tmp_path: Path) -> None:
    folder = _make_case(tmp_path / "case1")
    _write(folder / "case1_t2f.nii.gz", _brain_volume(9))
    with pytest.raises(DiffSegError, match=r"2 files match flair.*case1_flair\.nii\.gz.*case1_t2f\.nii\.gz"):
        find_case_files(folder)


def test_find_cases_layouts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ("b", "a"):
        _make_case(data / "training" / name)
    _make_case(data / "testing" / "c", seg=False)
    (data / "training" / "empty").mkdir()
    _write(data / "outputs" / "prediction.nii.gz", np.zeros(SHAPE, np.uint8))  # no modality tokens

    assert [c.name for c in find_cases(data)] == ["a", "b", "c"]
    assert [c.name for c in find_cases(data / "training")] == ["a", "b"]
    single = find_cases(data / "testing" / "c")
    assert [c.name for c in single] == ["c"] and single[0].seg is None


def test_find_cases_errors(tmp_path: Path) -> None:
    with pytest.raises(DiffSegError, match="no such folder"):
        find_cases(tmp_path / "absent")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DiffSegError, match="empty: no cases found"):
        find_cases(tmp_path / "empty")
    partial = _make_case(tmp_path / "cases" / "p1")
    (partial / "p1_t1ce.nii.gz").unlink()
    with pytest.raises(DiffSegError, match=r"p1: no t1ce image found"):
        find_cases(tmp_path / "cases")
    with pytest.raises(DiffSegError, match="is a file"):
        find_cases(partial / "p1_t1.nii.gz")


def test_case_files_from_paths(tmp_path: Path) -> None:
    folder = _make_case(tmp_path / "x", {m: f"Brats18_2013_2_1_{m}.nii.gz" for m in (*MODALITIES, "seg")})
    paths = [folder / f"Brats18_2013_2_1_{m}.nii.gz" for m in MODALITIES]
    files = case_files_from_paths(*paths, seg=folder / "Brats18_2013_2_1_seg.nii.gz")
    assert files.name == "Brats18_2013_2_1"
    assert files.images == dict(zip(MODALITIES, paths))
    assert case_files_from_paths(*paths, name="mine").name == "mine"

    swapped = [paths[1], paths[0], paths[2], paths[3]]
    with pytest.raises(DiffSegError, match=r"t1ce\.nii\.gz: given as the t1 image but its name says t1ce"):
        case_files_from_paths(*swapped)
    with pytest.raises(DiffSegError, match=r"nope_t2\.nii\.gz: t2 file not found"):
        case_files_from_paths(paths[0], paths[1], folder / "nope_t2.nii.gz", paths[3])


# --------------------------------------------------------------------------- loading and checks


def test_load_synthetic_volume(tmp_path: Path) -> None:
    case = load_case(find_case_files(_make_case(tmp_path / "vol")))
    assert isinstance(case, Case)
    assert case.images.shape == (4, *SHAPE) and case.images.dtype == np.float32
    assert case.is_volume and case.spatial_shape == SHAPE
    assert 0 <= case.images.min() and case.images.max() <= 1
    assert case.label is not None and case.label.dtype == np.uint8
    assert set(np.unique(case.label).tolist()) == {0, 1} and case.label.sum() == 2 * 2 * SHAPE[2]
    np.testing.assert_array_equal(case.affine, AFFINE)
    assert case.voxel_size == (1.0, 1.0, 2.0)

    raw = load_case(case.files, normalise=False)
    np.testing.assert_array_equal(raw.images[2], _brain_volume(2).astype(np.float32))


def test_shape_mismatch_names_both_files(tmp_path: Path) -> None:
    folder = _make_case(tmp_path / "c")
    _write(folder / "c_t2.nii.gz", _brain_volume(2, (12, 10, 5)))
    with pytest.raises(DiffSegError, match=r"c_t2\.nii\.gz: shape 12x10x5 differs from .*c_t1\.nii\.gz \(12x10x6\)"):
        load_case(find_case_files(folder))


def test_affine_mismatch_warns(tmp_path: Path) -> None:
    folder = _make_case(tmp_path / "c")
    _write(folder / "c_t2.nii.gz", _brain_volume(2), affine=np.eye(4))
    with pytest.warns(UserWarning, match=r"c_t2\.nii\.gz: its affine differs from .*c_t1\.nii\.gz"):
        load_case(find_case_files(folder))


def test_seg_shape_mismatch(tmp_path: Path) -> None:
    folder = _make_case(tmp_path / "c")
    _write(folder / "c_seg.nii.gz", np.zeros((12, 10), np.uint8))
    with pytest.raises(DiffSegError, match=r"c_seg\.nii\.gz: shape 12x10 differs"):
        load_case(find_case_files(folder))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path: Path, bad: float) -> None:
    folder = _make_case(tmp_path / "c")
    volume = _brain_volume(3).astype(np.float32)
    volume[3, 3, 1:4] = bad
    _write(folder / "c_flair.nii.gz", volume)
    with pytest.raises(DiffSegError, match=r"c_flair\.nii\.gz: 3 voxels are NaN or Inf"):
        load_case(find_case_files(folder))


def test_4d_file_is_refused_unless_last_axis_is_one(tmp_path: Path) -> None:
    folder = _make_case(tmp_path / "c")
    _write(folder / "c_t1ce.nii.gz", np.stack([_brain_volume(1)] * 2, axis=-1))
    with pytest.raises(DiffSegError, match=r"c_t1ce\.nii\.gz: is 4D \(shape 12x10x6x2\); give one 3D volume"):
        load_case(find_case_files(folder))

    _write(folder / "c_t1ce.nii.gz", _brain_volume(1)[..., None])
    assert load_case(find_case_files(folder)).spatial_shape == SHAPE


def test_all_zero_image(tmp_path: Path) -> None:
    folder = _make_case(tmp_path / "c")
    _write(folder / "c_t2.nii.gz", np.zeros(SHAPE, np.int16))
    with pytest.raises(DiffSegError, match=r"c_t2\.nii\.gz: the t2 image is all zeros"):
        load_case(find_case_files(folder))


def test_corrupt_files(tmp_path: Path) -> None:
    folder = _make_case(tmp_path / "c")
    t1 = folder / "c_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[:200])  # truncated download
    with pytest.raises(DiffSegError, match=r"c_t1\.nii\.gz: cannot be read as NIfTI.*corrupt or truncated"):
        load_case(find_case_files(folder))

    noise = folder / "c_t2.nii.gz"
    noise.write_bytes(os.urandom(2048))
    with pytest.raises(DiffSegError, match=r"c_t2\.nii\.gz: cannot be read as NIfTI"):
        load_nifti(noise)

    gzipped_text = tmp_path / "text.nii.gz"
    gzipped_text.write_bytes(gzip.compress(b"not an image at all" * 30))
    with pytest.raises(DiffSegError, match=r"text\.nii\.gz: cannot be read as NIfTI"):
        load_nifti(gzipped_text)


def test_load_nifti_path_errors(tmp_path: Path) -> None:
    with pytest.raises(DiffSegError, match=r"missing\.nii\.gz: file not found"):
        load_nifti(tmp_path / "missing.nii.gz")
    png = tmp_path / "slice.png"
    png.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(DiffSegError, match=r"slice\.png: not a NIfTI file"):
        load_nifti(png)


@pytest.mark.parametrize(
    ("values", "message"),
    [((0.0, 0.37), r"not whole numbers \(e\.g\. 0\.37\)"), ((0, -1), r"negative labels")],
)
def test_seg_values_must_be_labels(tmp_path: Path, values: tuple[float, float], message: str) -> None:
    folder = _make_case(tmp_path / "c")
    seg = np.full(SHAPE, values[0], dtype=np.float32)
    seg[5, 5, 2] = values[1]
    _write(folder / "c_seg.nii.gz", seg)
    with pytest.raises(DiffSegError, match=r"c_seg\.nii\.gz: segmentation has .*" + message):
        load_case(find_case_files(folder))


# --------------------------------------------------------------------------- shared data


def test_seed_slices_load_unchanged(seed_data_dir: Path) -> None:
    files = find_case_files(seed_data_dir / "training" / "000001")
    case = load_case(files)
    assert case.images.shape == (4, 240, 240) and not case.is_volume
    for index, modality in enumerate(MODALITIES):
        stored = np.asanyarray(nib.load(files.images[modality]).dataobj).astype(np.float32)
        np.testing.assert_array_equal(case.images[index], stored)  # pre-normalised: not altered
    assert case.label is not None and set(np.unique(case.label)) == {0, 1}
    stored_seg = np.asanyarray(nib.load(files.seg).dataobj)
    np.testing.assert_array_equal(case.label, stored_seg > 0)
    assert brain_slices(case.images) == [0]


def test_find_cases_on_seed_data(seed_data_dir: Path) -> None:
    training = find_cases(seed_data_dir / "training")
    assert [c.name for c in training] == ["000001", "000002", "000003", "000004", "000005", "000006"]
    assert all(c.seg is not None for c in training)
    testing = find_cases(seed_data_dir / "testing")
    assert [c.name for c in testing] == ["000246", "001919"] and all(c.seg is None for c in testing)
    everything = find_cases(seed_data_dir)
    assert len(everything) == 8
    assert [c.name for c in everything] == sorted(c.name for c in everything)


def test_brats18_case(brats18_dir: Path) -> None:
    files = find_case_files(brats18_dir / "Brats18_2013_2_1")
    assert files.name == "Brats18_2013_2_1"
    case = load_case(files)
    assert case.images.shape == (4, 240, 240, 155) and case.images.dtype == np.float32
    assert case.images.min() >= 0 and case.images.max() <= 1
    assert case.label is not None and set(np.unique(case.label)) == {0, 1}
    np.testing.assert_array_equal(case.affine, nib.load(files.images["t1"]).affine)
    brain = brain_slices(case.images)
    assert 0 < len(brain) < 155 and brain == list(range(brain[0], brain[-1] + 1))


# --------------------------------------------------------------------------- intensities


def test_normalise_intensity_clips_outliers() -> None:
    rng = np.random.default_rng(0)
    volume = np.zeros((30, 30, 8), dtype=np.int16)
    volume[5:25, 5:25] = rng.integers(200, 1500, size=(20, 20, 8))
    volume[10, 10, 4] = 32767  # one scanner outlier, as in BraTS
    result = normalise_intensity(volume)
    assert result.dtype == np.float32
    brain = volume != 0
    assert np.all(result[~brain] == 0)
    assert result.min() == 0 and result.max() == 1
    assert np.percentile(result[brain], 99) > 0.5  # without clipping it would be ~0.05
    assert result[10, 10, 4] == 1


def test_normalise_intensity_leaves_unit_range_alone() -> None:
    data = np.random.default_rng(1).random((16, 16))
    data[:3] = 0
    np.testing.assert_array_equal(normalise_intensity(data), data.astype(np.float32))
    assert np.all(normalise_intensity(np.zeros((4, 4), np.int16)) == 0)
    constant = np.zeros((4, 4), np.int16)
    constant[1:3, 1:3] = 7
    np.testing.assert_array_equal(normalise_intensity(constant), (constant > 0).astype(np.float32))


def test_label_to_mask() -> None:
    mask = label_to_mask(np.array([0, 1, 2, 4]))
    assert mask.dtype == np.uint8 and mask.tolist() == [0, 1, 1, 1]


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_save_nifti_round_trip(tmp_path: Path, dtype: type) -> None:
    source = _write(tmp_path / "src_t1.nii.gz", _brain_volume(0))  # int16 header
    _, affine, header = load_nifti(source)
    header.set_slope_inter(2.0, 10.0)  # must not leak into the output
    values = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 2).astype(dtype)
    if dtype == np.float32:
        values = values * np.float32(0.3)
    out = tmp_path / "out" / "case_mean.nii.gz"
    save_nifti(out, values, affine, header=header, dtype=dtype)

    image = nib.load(out)
    stored = np.asanyarray(image.dataobj)
    assert stored.dtype == dtype and stored.shape == SHAPE
    np.testing.assert_array_equal(stored, values)
    np.testing.assert_array_equal(image.affine, AFFINE)
    with open(out, "rb") as handle:
        assert handle.read(2) == b"\x1f\x8b"  # gzip, as the suffix asks
    assert sorted(p.name for p in out.parent.iterdir()) == ["case_mean.nii.gz"]  # no temp files left


def test_save_nifti_2d_without_header_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "slice_mask.nii"
    save_nifti(out, np.ones((5, 7), bool), np.eye(4), dtype=np.uint8)
    save_nifti(out, np.zeros((5, 7)), np.eye(4), dtype=np.uint8)  # replaces in place
    data, affine, _ = load_nifti(out)
    assert data.shape == (5, 7) and data.dtype == np.uint8 and not data.any()
    with pytest.raises(ValueError, match="do not fit uint8"):
        save_nifti(out, np.full((5, 7), 0.5), np.eye(4), dtype=np.uint8)
    assert os.listdir(tmp_path) == ["slice_mask.nii"]


def test_save_nifti_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(DiffSegError, match=r"not_a_folder: cannot create the output folder"):
        save_nifti(blocker / "out.nii.gz", np.zeros((2, 2)), np.eye(4))
    with pytest.raises(DiffSegError, match=r"must end in \.nii or \.nii\.gz"):
        save_nifti(tmp_path / "out.png", np.zeros((2, 2)), np.eye(4))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_save_nifti_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(DiffSegError, match=r"ro: cannot write out\.nii\.gz"):
            save_nifti(folder / "out.nii.gz", np.zeros((2, 2)), np.eye(4))
    finally:
        folder.chmod(0o700)


# --------------------------------------------------------------------------- brain slices


def test_brain_slices() -> None:
    images = np.zeros((4, 3, 3, 5), np.float32)
    images[2, 1, 1, 1:4] = 0.5
    images[0, 0, 0, 3] = -0.5  # any non-zero value counts, negative ones (z-scored inputs) too
    assert brain_slices(images) == [1, 2, 3]
    assert brain_slices(images[..., 2]) == [0] and brain_slices(np.zeros((4, 3, 3))) == []
