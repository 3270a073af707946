"""Reader, writer and sample data of the napari plugin: geometry survives the round trip."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_diffseg import MODALITIES
from napari_diffseg import _layerdata as ld
from napari_diffseg._reader import napari_get_reader, read_paths
from napari_diffseg._sample_data import brats_slice, brats_volume, phantom
from napari_diffseg._writer import write_image, write_labels
from napari_diffseg.errors import DiffSegError

# An oblique-free but flipped, anisotropic grid with a non-zero origin, like real scans.
AFFINE = np.array([
    [-1.2, 0.0, 0.0, 90.0],
    [0.0, -0.9, 0.0, 120.0],
    [0.0, 0.0, 2.5, -40.0],
    [0.0, 0.0, 0.0, 1.0],
])
SHAPE = (20, 24, 6)  # X, Y, Z (nibabel voxel order)
STORED = AFFINE.astype(np.float32).astype(np.float64)  # NIfTI keeps the affine in float32


@pytest.fixture(autouse=True)
def _no_open_viewer(request, monkeypatch):
    """Reader and writer look at the current viewer (names, geometry); keep other tests' out."""
    if "make_napari_viewer" not in request.fixturenames:
        monkeypatch.setattr("napari_diffseg._reader._viewer_layer_names", lambda: set())
        monkeypatch.setattr("napari_diffseg._writer._geometry_from_viewer", lambda shape: None)


def _write_case(folder: Path, name: str = "case01", shape=SHAPE, affine=AFFINE, seg: bool = True) -> dict:
    rng = np.random.default_rng(list(name.encode()))
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for modality in MODALITIES:
        data = rng.integers(1, 1000, size=shape).astype(np.int16)
        nib.save(nib.Nifti1Image(data, affine), folder / f"{name}_{modality}.nii.gz")
        arrays[modality] = data
    if seg:
        labels = np.zeros(shape, np.uint8)
        extra = len(shape) - 2
        labels[(slice(5, 10), slice(6, 12)) + (slice(1, 4),) * extra] = 2
        labels[(slice(6, 8), slice(8, 10)) + (2,) * extra] = 4
        nib.save(nib.Nifti1Image(labels, affine), folder / f"{name}_seg.nii.gz")
        arrays["seg"] = labels
    return arrays


def _by_name(tuples):
    return {kwargs["name"]: (data, kwargs, kind) for data, kwargs, kind in tuples}


def test_orientation_helpers_are_inverse():
    core = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    shown = ld.to_display(core)
    assert shown.shape == (4, 3, 2)
    assert shown[3, 2, 1] == core[1, 2, 3]
    np.testing.assert_array_equal(ld.to_core(shown), core)
    stacked = np.zeros((5, 2, 3, 4))
    assert ld.to_display(stacked, 3).shape == (5, 4, 3, 2)
    scale, translate = ld.world_transform(AFFINE, 3)
    assert scale == pytest.approx((2.5, 0.9, 1.2))
    # Flipped axes are mirrored: world = |spacing| * index + sign * origin.
    assert translate == pytest.approx((-40.0, -120.0, -90.0))
    np.testing.assert_allclose(ld.affine_from_layer((2.5, 0.9, 1.2), (1, 2, 3), 3)[:3, 3], (3, 2, 1))


def test_reader_case_folder_layers_and_geometry(tmp_path):
    arrays = _write_case(tmp_path / "case01")
    reader = napari_get_reader(str(tmp_path / "case01"))
    assert reader is not None
    layers = _by_name(reader(str(tmp_path / "case01")))
    assert list(layers) == ["t1", "t1ce", "t2", "flair", "ground truth"]
    for modality in MODALITIES:
        data, kwargs, kind = layers[modality]
        assert kind == "image" and data.dtype == np.float32
        assert data.shape == (6, 24, 20)  # (Z, Y, X): the slider runs over axial slices
        assert 0 <= data.min() and data.max() <= 1  # normalised like the model's input
        assert kwargs["scale"] == pytest.approx((2.5, 0.9, 1.2))
        meta = kwargs["metadata"]
        np.testing.assert_array_equal(meta[ld.AFFINE], STORED)
        assert isinstance(meta[ld.HEADER], nib.Nifti1Header)
        assert meta[ld.VOXEL_SIZE] == pytest.approx((1.2, 0.9, 2.5))
        assert meta[ld.CASE] == "case01" and meta[ld.KIND] == modality
        assert meta[ld.SOURCE].endswith(f"case01_{modality}.nii.gz")
    data, kwargs, kind = layers["ground truth"]
    assert kind == "labels" and data.dtype == np.uint8
    np.testing.assert_array_equal(ld.to_core(data), arrays["seg"])  # labels 2 and 4 kept


def test_round_trip_mask_written_on_source_grid(tmp_path):
    arrays = _write_case(tmp_path / "case01")
    layers = _by_name(read_paths(str(tmp_path / "case01")))
    data, kwargs, _ = layers["ground truth"]
    mask = (data > 0).astype(np.uint8)  # e.g. a mask painted in napari, in display order
    written = write_labels(str(tmp_path / "out" / "mask.nii.gz"), mask, kwargs)
    assert written == [str(tmp_path / "out" / "mask.nii.gz")]
    image = nib.load(written[0])
    np.testing.assert_array_equal(image.affine, STORED)
    assert image.shape == SHAPE
    np.testing.assert_array_equal(np.asarray(image.dataobj), (arrays["seg"] > 0).astype(np.uint8))
    assert image.get_data_dtype() == np.uint8
    # ... and it reads back through the plugin onto the same grid.
    again = _by_name(read_paths(written[0]))["mask"]
    assert again[2] == "labels"
    np.testing.assert_array_equal(again[0], mask)
    assert again[1]["scale"] == pytest.approx(kwargs["scale"])
    assert again[1]["translate"] == pytest.approx(kwargs["translate"])


def test_round_trip_image_and_stacked_members(tmp_path):
    _write_case(tmp_path / "case01")
    layers = _by_name(read_paths(str(tmp_path / "case01")))
    data, kwargs, _ = layers["flair"]
    path = write_image(str(tmp_path / "flair_copy"), data, kwargs)[0]
    assert path.endswith(".nii.gz")
    image = nib.load(path)
    np.testing.assert_array_equal(image.affine, STORED)
    np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), ld.to_core(data))
    members = np.stack([data, 1 - data])  # (N, Z, Y, X) like the widget's members layer
    meta = {**kwargs["metadata"], "leading_axes": 1}
    path = write_image(str(tmp_path / "members.nii.gz"), members, {"metadata": meta})[0]
    image = nib.load(path)
    assert image.shape == (*SHAPE, 2)
    np.testing.assert_array_equal(image.affine, STORED)
    (back,) = read_paths(path)  # a stack of volumes: its extra slider is named too
    assert back[0].shape == (2, *reversed(SHAPE)) and back[1]["axis_labels"] == ("volume", "z", "y", "x")


def test_writer_without_metadata_uses_scale_and_translate(tmp_path):
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 2, 3] = 7
    path = write_labels(str(tmp_path / "new.nii"), labels, {"scale": (2.0, 1.0, 0.5), "translate": (10, 20, 30),
                                                          "metadata": {}})[0]
    image = nib.load(path)
    assert image.shape == (5, 4, 3)
    np.testing.assert_allclose(np.diag(image.affine)[:3], (0.5, 1.0, 2.0))
    np.testing.assert_allclose(image.affine[:3, 3], (30, 20, 10))
    assert np.asarray(image.dataobj)[3, 2, 1] == 7


def test_writer_refuses_a_layer_off_its_grid(tmp_path):
    _write_case(tmp_path / "case01")
    _, kwargs, _ = _by_name(read_paths(str(tmp_path / "case01")))["ground truth"]
    with pytest.raises(DiffSegError, match="not on its source grid"):
        write_labels(str(tmp_path / "bad.nii.gz"), np.zeros((6, 24, 21), np.uint8), kwargs)


def test_reader_2d_slice_folder_and_several_cases(tmp_path):
    root = tmp_path / "training"
    _write_case(root / "000001", name="brats_train_001", shape=(16, 16), seg=True)
    _write_case(root / "000002", name="brats_train_002", shape=(16, 16), seg=False)
    layers = _by_name(read_paths(str(root)))
    # Two cases: every name is prefixed by its case.
    assert set(layers) == {f"000001 {m}" for m in MODALITIES} | {"000001 ground truth"} | {
        f"000002 {m}" for m in MODALITIES}
    data, kwargs, _ = layers["000001 t1"]
    assert data.shape == (16, 16) and kwargs["scale"] == pytest.approx((0.9, 1.2))


def test_reader_selected_files_single_files_and_refusals(tmp_path):
    _write_case(tmp_path / "c", name="p7")
    files = sorted(str(p) for p in (tmp_path / "c").iterdir())
    assert len(files) == 5
    layers = _by_name(read_paths(files))  # the five files of a case picked together
    assert set(layers) == {"t1", "t1ce", "t2", "flair", "ground truth"}
    # A file that names no modality keeps its stored values: an int map of few values as Labels,
    # else an Image, named after the file.
    rng = np.random.default_rng(3)
    nib.save(nib.Nifti1Image(rng.integers(0, 3000, size=SHAPE).astype(np.int16), AFFINE),
             tmp_path / "p7_brain.nii.gz")
    nib.save(nib.Nifti1Image(rng.integers(0, 3, size=SHAPE).astype(np.uint8), AFFINE), tmp_path / "p7_mask.nii.gz")
    raw = _by_name(read_paths(str(tmp_path / "p7_brain.nii.gz")))["p7_brain"]
    assert raw[2] == "image" and raw[0].dtype == np.int16 and raw[0].max() > 1
    assert _by_name(read_paths(str(tmp_path / "p7_mask.nii.gz")))["p7_mask"][2] == "labels"
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    (tmp_path / "empty").mkdir()
    assert napari_get_reader(str(tmp_path / "empty")) is None
    for i in range(9):
        _write_case(tmp_path / "many" / f"c{i}", name=f"c{i}", shape=(4, 4), seg=False)
    with pytest.raises(DiffSegError, match="9 cases found"):
        read_paths(str(tmp_path / "many"))
    (tmp_path / "c" / "p7_flair.nii.gz").unlink()
    with pytest.raises(DiffSegError, match="flair"):
        read_paths(str(tmp_path / "c"))


def test_modality_files_opened_one_by_one_form_the_case(tmp_path):
    """File > Open with several files calls the reader once per file: each modality file comes in
    as its case's layer, named and normalised as the case folder's, and the pickers match them."""
    from napari_diffseg._gui.inputs import LayerInfo, match_layers

    arrays = _write_case(tmp_path / "folder", name="Brats18_X_1")
    folder = _by_name(read_paths(str(tmp_path / "folder")))
    one_by_one = {}
    for path in sorted((tmp_path / "folder").iterdir()):
        assert napari_get_reader(str(path)) is not None
        (layer,) = read_paths(str(path))
        one_by_one[layer[1]["name"]] = layer
    assert set(one_by_one) == {f"Brats18_X_1 {m}" for m in MODALITIES} | {"Brats18_X_1 ground truth"}
    for what in (*MODALITIES, "ground truth"):
        data, kwargs, kind = one_by_one[f"Brats18_X_1 {what}"]
        ref_data, ref_kwargs, ref_kind = folder[what]
        assert kind == ref_kind
        np.testing.assert_array_equal(data, ref_data)  # normalised exactly as in the folder
        assert data.dtype == ref_data.dtype and kwargs["scale"] == ref_kwargs["scale"]
        assert kwargs.get("contrast_limits") == ref_kwargs.get("contrast_limits")
        meta = kwargs["metadata"]
        assert meta[ld.CASE] == "Brats18_X_1" and meta[ld.KIND] == ref_kwargs["metadata"][ld.KIND]
        np.testing.assert_array_equal(meta[ld.AFFINE], STORED)
    t1 = one_by_one["Brats18_X_1 t1"][0]
    assert t1.dtype == np.float32 and 0 <= t1.min() and t1.max() == 1  # not the stored int16
    np.testing.assert_array_equal(ld.to_core(one_by_one["Brats18_X_1 ground truth"][0]), arrays["seg"])
    infos = [LayerInfo(name, kind, kwargs["metadata"][ld.CASE]) for name, (_, kwargs, kind) in one_by_one.items()]
    chosen, truth = match_layers(infos)
    assert chosen == {m: f"Brats18_X_1 {m}" for m in MODALITIES} and truth == "Brats18_X_1 ground truth"


@pytest.mark.parametrize("file_name, case", [
    ("BraTS-GLI-00001-000-t2f.nii.gz", "BraTS-GLI-00001-000"),  # dashes kept
    ("p9_seg.nii.gz", "p9"),
    ("brats_train_001_seg_080_w.nii.gz", "brats_train_001_080_w"),  # the reference's slice names
    ("flair.nii", "sub"),  # no case in the name: the folder's
])
def test_lone_file_case_names(tmp_path, file_name, case):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / file_name
    nib.save(nib.Nifti1Image(np.arange(1, 17, dtype=np.int16).reshape(4, 4), AFFINE), path)
    (layer,) = read_paths(str(path))
    assert layer[1]["metadata"][ld.CASE] == case
    assert layer[1]["name"].startswith(f"{case} ")


def test_lone_modality_file_with_nan_is_one_line(tmp_path):
    data = np.ones(SHAPE, np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "p7_flair.nii.gz")
    with pytest.raises(DiffSegError, match=r"p7_flair\.nii\.gz: 1 voxels are NaN"):
        read_paths(str(tmp_path / "p7_flair.nii.gz"))


@pytest.mark.parametrize("loader, shape", [(brats_slice, (240, 240)), (brats_volume, (16, 240, 240)),
                                           (phantom, (240, 240))])
def test_sample_data(loader, shape):
    layers = _by_name(loader())
    assert list(layers) == ["t1", "t1ce", "t2", "flair", "ground truth"]
    for name, (data, kwargs, kind) in layers.items():
        assert data.shape == shape
        assert ld.has_geometry(kwargs["metadata"])
        assert kwargs["axis_labels"] == ("z", "y", "x")[-len(shape):]
    truth = layers["ground truth"][0]
    assert truth.dtype == np.uint8 and set(np.unique(truth)) <= {0, 1, 2, 4} and truth.any()
    assert 0 <= layers["flair"][0].min() and layers["flair"][0].max() <= 1


def test_brats_sample_keeps_scanner_position():
    _, kwargs, _ = _by_name(brats_volume())["t1"]
    affine = kwargs["metadata"][ld.AFFINE]
    assert affine[2, 3] == 84  # the sub-volume starts at axial slice 84 of the case
    assert kwargs["translate"][0] == 84


def test_viewer_open_and_save_through_napari(make_napari_viewer, tmp_path):
    """The manifest's reader and writer as napari calls them (File > Open, File > Save Layers)."""
    arrays = _write_case(tmp_path / "case01")
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "case01"), plugin="napari-diffseg")
    assert [layer.name for layer in viewer.layers] == ["t1", "t1ce", "t2", "flair", "ground truth"]
    # Named axes: the slider over the axial slices reads "z", not "-3", before any run.
    assert all(tuple(layer.axis_labels) == ("z", "y", "x") for layer in viewer.layers)
    assert tuple(viewer.dims.axis_labels) == ("z", "y", "x")
    truth = viewer.layers["ground truth"]
    assert tuple(truth.scale) == pytest.approx((2.5, 0.9, 1.2))
    out = tmp_path / "saved.nii.gz"
    viewer.layers.selection = {truth}
    viewer.layers.save(str(out), selected=True, plugin="napari-diffseg")
    image = nib.load(out)
    np.testing.assert_array_equal(image.affine, STORED)
    np.testing.assert_array_equal(np.asarray(image.dataobj), arrays["seg"])
    # A second case opened next to the first is prefixed by its name.
    _write_case(tmp_path / "case02", name="case02")
    viewer.open(str(tmp_path / "case02"), plugin="napari-diffseg")
    assert "case02 t1" in [layer.name for layer in viewer.layers]
    # File > Open with the four files of a third case: napari reads them one at a time.
    _write_case(tmp_path / "case03", name="case03", seg=False)
    files = [str(tmp_path / "case03" / f"case03_{m}.nii.gz") for m in MODALITIES]
    viewer.open(files, plugin="napari-diffseg")
    assert [layer.name for layer in viewer.layers][-4:] == [f"case03 {m}" for m in MODALITIES]
    assert all(viewer.layers[f"case03 {m}"].data.dtype == np.float32 for m in MODALITIES)
