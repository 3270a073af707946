"""The widget with a region model (WT, TC, ET; issue 26): BraTS label maps for the proposal, the
members and the segmentation, the region selector over the uncertainty and the threshold, the
figures per region, Accept with hand edits, save and reload, Refine with whole-tumour scribbles
(the parts have no marks yet); a whole-tumour model's widget as before."""

from __future__ import annotations

import numpy as np
import pytest
from gui_support import CASE, RUN_TIMEOUT_MS, run_and_wait, save_tiny_region_checkpoint

from napari_diffseg import _layerdata as ld
from napari_diffseg.refine import SCRIBBLE_BACKGROUND, SCRIBBLE_TUMOUR
from napari_diffseg.regions import labels_to_regions, nest_regions, regions_to_labels

BRATS = {0, 1, 2, 4}


@pytest.fixture(scope="module")
def region_checkpoint(tmp_path_factory):
    return save_tiny_region_checkpoint(tmp_path_factory.mktemp("region") / "regions.pt")


def _brats_truth(viewer) -> None:
    """The case's truth with the three parts: oedema around a core around an enhancing rim."""
    layer = viewer.layers["ground truth"] if "ground truth" in viewer.layers else next(
        layer for layer in viewer.layers if (layer.metadata or {}).get(ld.KIND) == ld.GROUND_TRUTH)
    data = np.zeros_like(layer.data)
    data[..., 6:26, 6:26] = 2
    data[..., 10:22, 10:22] = 1
    data[..., 13:19, 13:19] = 4
    layer.data = data


def _refine(qtbot, widget) -> None:
    widget.refine()
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)


def _rectangle(layer, rows, cols) -> None:
    corners = np.array([[rows[0], cols[0]], [rows[0], cols[1]], [rows[1], cols[1]], [rows[1], cols[0]]], float)
    layer.add_rectangles(corners)


def _labels(state, thresholds=(0.5, 0.5, 0.5)) -> np.ndarray:
    cut = np.asarray(thresholds, np.float32).reshape(3, 1, 1, 1)
    return ld.to_display(regions_to_labels(nest_regions(state.probability > cut)))


def test_a_region_model_shows_label_maps_with_a_region_selector(make_widget, qtbot, region_checkpoint, tmp_path):
    viewer, widget = make_widget(shape=(32, 32, 4), truth=True, num_ensemble=3)
    _brats_truth(viewer)
    widget.configure(persist=False, model_path=str(region_checkpoint))
    run_and_wait(qtbot, widget)
    state = widget.cases[CASE].result
    assert state.regions == ("wt", "tc", "et") and state.probability.shape == (3, 32, 32, 4)

    proposal = viewer.layers[f"{CASE} diffseg proposal"]
    assert set(np.unique(proposal.data)) <= BRATS
    np.testing.assert_array_equal(proposal.data, _labels(state))
    assert set(proposal.colormap.color_dict) >= {1, 2, 4}

    # The selector: WT first; ET shows ET's variance, and the slider is ET's threshold.
    assert not widget.review.region.native.isHidden() and not widget.review.legend.native.isHidden()
    assert "oedema" in widget.review.legend.value
    uncertainty = viewer.layers[f"{CASE} diffseg uncertainty WT"]
    np.testing.assert_array_equal(uncertainty.data, ld.to_display(state.variance[0]))
    widget.review.region.value = "et"
    assert uncertainty.name == f"{CASE} diffseg uncertainty ET"
    np.testing.assert_array_equal(uncertainty.data, ld.to_display(state.variance[2]))
    widget.review.threshold.value = 0.3
    assert state.threshold_of("et") == pytest.approx(0.3) and state.threshold_of("wt") == pytest.approx(0.5)
    np.testing.assert_array_equal(proposal.data, _labels(state, (0.5, 0.5, 0.3)))
    widget.review.region.value = "wt"
    assert widget.review.threshold.value == pytest.approx(0.5)

    # Figures per region, against the truth's labels.
    qtbot.waitUntil(lambda: widget.review.metrics is not None, timeout=RUN_TIMEOUT_MS)
    parts = widget.review.metrics["parts"]
    assert set(parts) == {"wt", "tc", "et"}
    assert all(0.0 <= part["dice"] <= 1.0 for part in parts.values())
    assert "WT Dice" in widget.review.metrics_label.value and "ET Dice" in widget.review.metrics_label.value

    # The members as label maps.
    members = viewer.layers[f"{CASE} diffseg members"]
    assert type(members).__name__ == "Labels" and members.data.shape == (3, 4, 32, 32)
    assert set(np.unique(members.data)) <= BRATS

    # Accept, a hand edit, Accept again: the edit stays; the layer saves and reloads as it is.
    widget.review.accept()
    segmentation = viewer.layers[f"{CASE} segmentation"]
    np.testing.assert_array_equal(segmentation.data, proposal.data)
    assert set(segmentation.colormap.color_dict) >= {1, 2, 4}
    where = (1, 2, 2)
    painted = 1 if segmentation.data[where] == 4 else 4
    segmentation.paint(where, painted, refresh=True)
    widget.review.threshold.value = 0.6  # a different proposal to accept over the edit
    widget.review.accept()
    assert segmentation.data[where] == painted
    from napari_diffseg._reader import read_paths
    from napari_diffseg._writer import write_labels

    (path,) = write_labels(str(tmp_path / "seg.nii.gz"), segmentation.data, segmentation.as_layer_data_tuple()[1])
    (back,) = read_paths(path)
    np.testing.assert_array_equal(back[0], segmentation.data)
    assert back[2] == "labels"

    # Refine with scribbles: they act on the whole tumour (and it says that the parts have no
    # marks yet); it starts from the slice's kept members, half-way down the 5-step chain.
    viewer.dims.set_point(viewer.dims.ndim - 3, 12.0 + 3.0 * 1)  # slice 1
    widget.refine_tools.scribble()
    scribbles = viewer.layers[f"{CASE} scribbles"]
    scribbles.data[1, 4:8, 4:8] = SCRIBBLE_TUMOUR
    scribbles.data[1, 20:24, 20:24] = SCRIBBLE_BACKGROUND
    before = len(widget.messages)
    _refine(qtbot, widget)
    said = widget.messages[before:]
    assert not [text for level, text in said if level == "error"], said
    assert any(level == "info" and "whole tumour" in text and "not supported yet" in text for level, text in said)
    assert widget.runner.progress_steps == 3 and "from the kept members" in widget.runner.status.value
    assert state is widget.cases[CASE].result and state.last_z == 1
    members = state.members_for(1)
    assert members.shape == (3, 3, 32, 32)
    assert (ld.to_display(members[:, 0], 2)[:, 4:8, 4:8] == 1).all()  # WT held at the tumour mark
    assert (ld.to_display(members, 2)[:, :, 20:24, 20:24] == 0).all()  # no part where there is no tumour
    assert (proposal.data[1, 20:24, 20:24] == 0).all() and (proposal.data[1, 4:8, 4:8] > 0).all()
    assert set(np.unique(proposal.data)) <= BRATS
    np.testing.assert_array_equal(proposal.data, _labels(state, (0.6, 0.5, 0.3)))


def test_a_region_refine_holds_the_label_map_outside_a_drawn_region(make_widget, qtbot, region_checkpoint,
                                                                    tiny_checkpoint):
    """Outside a drawn region the proposal's label map is held, every region of it, in every
    member; a refine with a model of other regions than the result's says to run it first."""
    viewer, widget = make_widget(num_ensemble=2, model_path=str(region_checkpoint))
    run_and_wait(qtbot, widget)
    for region in ("wt", "tc", "et"):  # a random network: low thresholds give a label map with parts
        widget.review.region.value = region
        widget.review.threshold.value = 0.2
    proposal = viewer.layers[f"{CASE} diffseg proposal"]
    before = proposal.data.copy()
    assert len(set(np.unique(before)) - {0}) >= 2, np.unique(before)
    widget.refine_tools.draw_region()
    _rectangle(viewer.layers[f"{CASE} refine region"], (8, 20), (6, 22))
    region = np.zeros((32, 32), bool)  # the rectangle, one pixel more for its rasterised edge
    region[7:22, 5:24] = True
    widget.refine_tools.scribble()
    scribbles = viewer.layers[f"{CASE} scribbles"]
    scribbles.data[10:13, 8:11] = SCRIBBLE_TUMOUR
    before_messages = len(widget.messages)
    _refine(qtbot, widget)
    assert not [text for level, text in widget.messages[before_messages:] if level == "error"]
    assert "proposal pixels outside the region" in widget.runner.status.value
    np.testing.assert_array_equal(proposal.data[~region], before[~region])
    state = widget.cases[CASE].result
    members = ld.to_display(state.members_for(0), 2)  # (N, 3, rows, cols)
    held = labels_to_regions(before).astype(np.float32)
    assert np.array_equal(members[:, :, ~region], np.broadcast_to(held[:, ~region], (2, 3, int((~region).sum()))))
    assert (members[:, 0, 10:13, 8:11] == 1).all() and (proposal.data[10:13, 8:11] > 0).all()

    widget.configure(persist=False, model_path=str(tiny_checkpoint))  # a whole-tumour model now
    before_messages = len(widget.messages)
    _refine(qtbot, widget)
    errors = [text for level, text in widget.messages[before_messages:] if level == "error"]
    assert len(errors) == 1 and "Run the slice with this model first" in errors[0], errors


def test_the_binary_model_keeps_its_widget_and_a_region_run_replaces_its_result(make_widget, qtbot,
                                                                                 region_checkpoint):
    viewer, widget = make_widget(shape=(32, 32, 4), num_ensemble=2)
    run_and_wait(qtbot, widget)
    assert widget.review.region.native.isHidden() and widget.review.legend.native.isHidden()
    proposal = viewer.layers[f"{CASE} diffseg proposal"]
    assert set(np.unique(proposal.data)) <= {0, 1}
    assert f"{CASE} diffseg uncertainty" in viewer.layers

    # The same case with a region model: a fresh result with regions, one uncertainty layer.
    widget.configure(persist=False, model_path=str(region_checkpoint), scope="slice")
    viewer.dims.set_point(viewer.dims.ndim - 3, 12.0 + 3.0 * 1)
    run_and_wait(qtbot, widget)
    state = widget.cases[CASE].result
    assert state.multi_region and state.slices == [1]
    assert sum(1 for layer in viewer.layers if (layer.metadata or {}).get(ld.KIND) == "uncertainty") == 1
    assert not widget.review.region.native.isHidden()
    np.testing.assert_array_equal(viewer.layers[f"{CASE} diffseg proposal"].data, _labels(state))


def test_the_bundled_models_are_a_choice_in_the_model_group(make_widget, qtbot, region_checkpoint, tiny_checkpoint,
                                                            monkeypatch, tmp_path):
    """Both bundled models installed (tiny ones in their place): the Model group offers them; the
    region model's run gives a label map, the whole tumour's a mask; a chosen checkpoint runs
    instead and greys the choice out. With one installed there is no choice to make."""
    from napari_diffseg import checkpoint

    monkeypatch.setitem(checkpoint.BUNDLED_MODELS, "wt", tiny_checkpoint)
    monkeypatch.setitem(checkpoint.BUNDLED_MODELS, "brats", region_checkpoint)
    viewer, widget = make_widget(shape=(32, 32, 4), num_ensemble=2, model_path="", scope="slice")
    box = widget.model
    assert not box.bundled.native.isHidden() and box.bundled.choices == ("wt", "brats")
    widget.configure(persist=False, bundled_model="brats")
    assert "tumour's parts" in box.model_status.value and box.bundled.enabled
    run_and_wait(qtbot, widget)
    assert widget.cases[CASE].result.multi_region
    assert set(np.unique(viewer.layers[f"{CASE} diffseg proposal"].data)) <= BRATS

    widget.configure(persist=False, bundled_model="wt")
    assert "whole tumour" in box.model_status.value
    run_and_wait(qtbot, widget)
    assert not widget.cases[CASE].result.multi_region
    assert widget.review.region.native.isHidden()

    widget.configure(persist=False, model_path=str(region_checkpoint))
    assert not box.bundled.enabled and str(region_checkpoint) in box.model_status.value

    monkeypatch.setitem(checkpoint.BUNDLED_MODELS, "brats", tmp_path / "not_installed.pt")
    _, single = make_widget(model_path="", bundled_model="brats")
    assert single.model.bundled.native.isHidden() and single.current_settings().bundled_model == "wt"


def test_the_demo_with_a_region_model_shows_a_region_and_writes_a_label_map(tmp_path):
    """``python -m napari_diffseg.demo --model REGION_MODEL --region et``: the ET uncertainty on show
    in the screenshot, and the files diffseg-sample writes for a region model (a label map, and a
    probability and uncertainty map per region) on the source grid. In a subprocess: napari
    registers the plugin once per process, and tests/test_widget.py runs the other demo."""
    import os
    import subprocess
    import sys

    import nibabel as nib

    from napari_diffseg._sample_data import BRATS_CASE, BRATS_SLICE, SAMPLE_DIR

    model = save_tiny_region_checkpoint(tmp_path / "regions32.pt", resize_to=32)
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "napari_diffseg.demo", "--headless", "--model", str(model),
                           "--region", "et", "--steps", "4", "--ensemble", "2", "--out", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "screenshot.png").is_file()
    source = nib.load(SAMPLE_DIR / f"{BRATS_SLICE}_t1.nii.gz")
    stem = out / f"{BRATS_CASE}_diffseg_"
    labels = nib.load(f"{stem}labels.nii.gz")
    assert labels.shape == source.shape and np.array_equal(labels.affine, source.affine)
    assert set(np.unique(np.asarray(labels.dataobj))) <= BRATS
    for region in ("wt", "tc", "et"):
        for what in ("probability", "uncertainty"):
            image = nib.load(f"{stem}{what}_{region}.nii.gz")
            assert image.shape == source.shape, (what, region)
    assert not (out / f"{BRATS_CASE}_diffseg_mask.nii.gz").exists()
    assert f"screenshot shows {BRATS_CASE} diffseg uncertainty ET" in proc.stdout


def test_the_demo_refuses_a_region_for_a_whole_tumour_model(tmp_path, capsys):
    """--region with a whole-tumour model: a plain error naming the model and the fix, before any
    viewer opens."""
    from gui_support import save_tiny_checkpoint

    from napari_diffseg import demo

    model = save_tiny_checkpoint(tmp_path / "tiny32.pt", resize_to=32)
    assert demo.main(["--headless", "--model", str(model), "--region", "et", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--region et" in err and str(model) in err and "--regions brats" in err
    assert not (tmp_path / "o").exists()
