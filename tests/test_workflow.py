"""The widget as a user meets it: each way of docking it, the proposal -> accept -> correct ->
save workflow, cancelling a volume, bad checkpoints, and how the results look.

Tiny random-weight models (32x32, a few steps) under Xvfb; fixtures in conftest.py, helpers in gui_support.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gui_support import (
    AFFINE,
    CASE,
    RUN_TIMEOUT_MS,
    add_layers,
    case_layers,
    errors_since,
    notification_count,
    run_and_wait,
    tiny_unet,
)

from napari_diffseg import _layerdata as ld
from napari_diffseg._gui import inputs as gui_inputs
from napari_diffseg._gui.results import HandEdits

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"steps": "3", "num_ensemble": 2, "keep_members": False, "seed": 0}


# ---------------------------------------------------------------------------------------------
# Docking: the Plugins menu, add_plugin_dock_widget, and what `napari -w napari-diffseg` does
# ---------------------------------------------------------------------------------------------


def _dock_from_plugins_menu(viewer):
    from napari._app_model import get_app_model

    # The menu item runs this command (the manifest's widget command); napari docks what it returns.
    from napari_diffseg._gui.widget import DiffSegWidget

    get_app_model().commands.execute_command("napari-diffseg.widget").result()
    docked = [w for w in viewer.window.dock_widgets.values() if isinstance(w, DiffSegWidget)]
    assert len(docked) == 1, dict(viewer.window.dock_widgets)
    return docked[0]


def _dock_with_public_api(viewer):
    return viewer.window.add_plugin_dock_widget("napari-diffseg", "Diffusion segmentation")[1]


def _dock_like_napari_dash_w(viewer):
    # napari/__main__.py for `napari -w napari-diffseg`: no widget name, tabified
    return viewer.window.add_plugin_dock_widget("napari-diffseg", tabify=True)[1]


@pytest.mark.parametrize("dock", [_dock_from_plugins_menu, _dock_with_public_api, _dock_like_napari_dash_w],
                         ids=["plugins-menu", "add_plugin_dock_widget", "napari-w"])
def test_every_docking_path_segments(dock, make_napari_viewer, qtbot, tiny_checkpoint):
    from napari_diffseg._gui.widget import DiffSegWidget

    viewer = make_napari_viewer()
    add_layers(viewer, case_layers(truth=True))
    widget = dock(viewer)
    assert isinstance(widget, DiffSegWidget)
    # napari hands plugins docked through its public API a PublicOnlyProxy of the viewer.
    assert (type(widget.viewer).__name__ == "PublicOnlyProxy") == (dock is not _dock_from_plugins_menu)
    try:
        assert widget.pickers.chosen_names() == {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair",
                                         "seg": "ground truth"}
        widget.configure(persist=False, model_path=str(tiny_checkpoint), **TINY)
        start = notification_count()
        run_and_wait(qtbot, widget)
        assert not errors_since(start)
        proposal = viewer.layers[f"{CASE} diffseg proposal"]
        assert proposal.data.shape == (32, 32) and set(np.unique(proposal.data)) <= {0, 1}
        assert f"{CASE} segmentation" in viewer.layers
        # The pickers follow the layer list by themselves (magicgui + napari's reset_choices).
        viewer.add_image(np.ones((32, 32), np.float32), name="later t1ce")
        assert "later t1ce" in [layer.name for layer in widget.pickers.layer_pickers["t1ce"].choices if layer]
        viewer.layers.remove("later t1ce")
        assert "later t1ce" not in [layer.name for layer in widget.pickers.layer_pickers["t1ce"].choices if layer]
    finally:
        if widget.runner.worker is not None:
            widget.cancel()
            qtbot.waitUntil(lambda: widget.runner.worker is None, timeout=RUN_TIMEOUT_MS)
        widget.review.timer.stop()
        qtbot.waitUntil(lambda: widget.review.metrics_worker is None, timeout=RUN_TIMEOUT_MS)


def test_a_wide_dock_puts_the_groups_side_by_side(make_napari_viewer, qtbot, tiny_checkpoint):
    """Docked at the bottom the groups sit in three columns, so the dock needs far less height than
    the single column of a side dock and leaves the canvas its room; narrow again, one column.
    The groups scroll, so neither dock makes napari's window taller than it was (a single
    column is taller than a laptop screen), and a side dock scrolls up and down only."""
    from napari_diffseg._gui.layout import WIDE_LAYOUT_MIN_WIDTH
    from napari_diffseg._gui.widget import DiffSegWidget

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1280, 700)
    qtbot.waitUntil(lambda: window.height() == 700)
    add_layers(viewer, case_layers(truth=True))
    widget = DiffSegWidget(viewer)
    widget.persist_settings = False
    dock = viewer.window.add_dock_widget(widget, name="Diffusion segmentation", area="right")
    qtbot.waitUntil(lambda: widget.width() > 0)
    assert widget.width() < WIDE_LAYOUT_MIN_WIDTH and not widget.is_wide_layout
    narrow_height = widget._content.minimumSizeHint().height()
    assert narrow_height > 700  # the single column does not fit: it scrolls
    assert window.height() == 700
    qtbot.waitUntil(lambda: widget._scroll.verticalScrollBar().isVisible(), timeout=5000)
    assert not widget._scroll.horizontalScrollBar().isVisible()
    # A group that widens once docked (a longer label after a run) widens the dock, not a scroll bar.
    docked_width, label = widget.width(), widget.review.cleanup.text
    widget.review.cleanup.text = "3D clean-up: a label far wider than the dock was when it opened"
    qtbot.waitUntil(lambda: widget.width() > docked_width, timeout=5000)
    qtbot.wait(100)
    assert not widget._scroll.horizontalScrollBar().isVisible()
    widget.review.cleanup.text = label
    viewer.window.remove_dock_widget(dock)

    viewer.window.add_dock_widget(widget, name="Diffusion segmentation", area="bottom")
    qtbot.waitUntil(lambda: widget.is_wide_layout, timeout=5000)
    assert widget.minimumSizeHint().width() < WIDE_LAYOUT_MIN_WIDTH  # fits the width that switches it
    assert widget._content.minimumSizeHint().height() < 0.6 * narrow_height
    assert window.height() == 700
    widget.resize(WIDE_LAYOUT_MIN_WIDTH - 200, 900)  # made narrow (a floating window): one column again
    qtbot.waitUntil(lambda: not widget.is_wide_layout, timeout=5000)
    widget.configure(persist=False, model_path=str(tiny_checkpoint), **TINY)
    run_and_wait(qtbot, widget)  # and it still works
    assert f"{CASE} diffseg proposal" in viewer.layers
    widget.review.timer.stop()
    qtbot.waitUntil(lambda: widget.review.metrics_worker is None, timeout=RUN_TIMEOUT_MS)


def test_layer_checks_see_through_napari_proxies():
    """Layers handed out by a PublicOnlyProxy viewer are proxies: type() lies, isinstance does not."""
    from napari.layers import Image
    from napari.utils._proxies import PublicOnlyProxy

    layers = {m: PublicOnlyProxy(Image(np.random.default_rng(i).random((8, 8)) + 0.1, name=m))
              for i, m in enumerate(("t1", "t1ce", "t2", "flair"))}
    assert type(layers["t1"]).__name__ == "PublicOnlyProxy"
    inputs = gui_inputs.check_inputs(layers)
    assert inputs.display_shape == (8, 8) and gui_inputs.layer_kind(layers["t1"]) == "image"


# ---------------------------------------------------------------------------------------------
# Proposal, accept, correct, save
# ---------------------------------------------------------------------------------------------


def _accept_by_key(viewer):
    from napari.utils.key_bindings import coerce_keybinding

    from napari_diffseg._gui.keys import ACCEPT_KEY

    viewer.keymap[coerce_keybinding(ACCEPT_KEY)](viewer)


def _go_to(viewer, z):
    viewer.dims.set_point(viewer.dims.ndim - 3, 12.0 + 3.0 * z)  # the test affine: z0 = 12 mm, 3 mm slices


def test_corrections_survive_runs_threshold_and_accept(make_widget, qtbot, tmp_path):
    import nibabel as nib

    from napari_diffseg._writer import write_labels

    viewer, widget = make_widget(shape=(32, 32, 4), **TINY)
    assert not widget.review.accept_button.enabled and not widget.review.threshold.enabled  # nothing to review yet
    run_and_wait(qtbot, widget)  # whole volume
    assert widget.review.accept_button.enabled and widget.review.threshold.enabled
    proposal = viewer.layers[f"{CASE} diffseg proposal"]
    seg = viewer.layers[f"{CASE} segmentation"]
    assert type(seg).__name__ == "Labels" and not seg.data.any()  # made empty: only Accept fills it
    np.testing.assert_array_equal(seg.metadata[ld.AFFINE], AFFINE)

    widget.accept()  # a volume run: every sampled slice
    np.testing.assert_array_equal(seg.data, proposal.data)
    accepted = seg.data.copy()

    # The user corrects slice 1: paints (label 2, which no proposal holds) and erases.
    _go_to(viewer, 1)
    seg.brush_size = 5
    seg.paint((1, 8, 8), 2)
    seg.paint((1, 24, 24), 0)
    painted = seg.data.copy()
    touched = widget.cases[CASE].edits.touched.copy()  # what the brush changed
    assert touched[1].sum() > 20 and not touched[[0, 2, 3]].any()
    assert (painted == 2).sum() > 10 and not ((painted != accepted) & ~touched).any()

    # A run of slice 2 and a new threshold change the proposal, never the segmentation.
    widget.configure(persist=False, scope="slice", seed=5)
    _go_to(viewer, 2)
    run_and_wait(qtbot, widget)
    widget.review.threshold.value = 0.05
    expected = (ld.to_display(widget.cases[CASE].result.probability) > 0.05).astype(np.uint8)
    np.testing.assert_array_equal(proposal.data, expected)
    np.testing.assert_array_equal(seg.data, painted)

    # Accept (keyboard shortcut) on slice 1: its proposal comes in, the painted voxels stay.
    _go_to(viewer, 1)
    _accept_by_key(viewer)
    np.testing.assert_array_equal(seg.data[touched], painted[touched])
    untouched = ~touched[1]
    np.testing.assert_array_equal(seg.data[1][untouched], expected[1][untouched])
    np.testing.assert_array_equal(seg.data[[0, 2, 3]], painted[[0, 2, 3]])  # other slices: not in scope
    assert "were kept" in widget.runner.status.value

    # One undo step takes the accept back; redo puts it in again.
    after = seg.data.copy()
    seg.undo()
    np.testing.assert_array_equal(seg.data, painted)
    seg.redo()
    np.testing.assert_array_equal(seg.data, after)

    # Saved on the source grid, read back with nibabel.
    path = write_labels(str(tmp_path / "seg.nii.gz"), seg.data, seg.as_layer_data_tuple()[1])[0]
    image = nib.load(path)
    np.testing.assert_array_equal(image.affine, AFFINE.astype(np.float32))
    assert image.shape == (32, 32, 4)
    np.testing.assert_array_equal(np.asarray(image.dataobj), ld.to_core(after))


def test_hand_edits_follow_napari_undo():
    """The user's voxels are those a stroke changed and that still differ from what the accepts
    wrote: napari's undo writes values back without a paint event, so an undone stroke must hand
    its voxels back to the next Accept, and an undone Accept must leave nothing marked."""
    from napari.layers import Labels

    layer = Labels(np.zeros((2, 16, 16), np.uint8))
    edits = HandEdits(layer.data)
    accepting = []  # the widget does not record its own writes as strokes
    layer.events.paint.connect(lambda event: None if accepting else edits.mark(event.value))

    def accept(proposal):
        indices, values, kept = edits.commit(layer.data, proposal, [0])
        accepting.append(True)
        layer.data_setitem(indices, values)
        accepting.clear()
        written = np.zeros(layer.data.shape, bool)
        written[indices] = True
        return written, kept

    proposal = np.zeros((2, 16, 16), np.uint8)
    proposal[:, 4:12, 4:12] = 1
    _, kept = accept(proposal)
    assert kept == 0 and edits.accepted.tolist() == [True, False]
    layer.brush_size = 5
    layer.paint((0, 8, 8), 0)  # erase in the accepted tumour
    erased = edits.edited(layer.data)
    assert erased.sum() > 10 and not layer.data[erased].any()
    assert edits.holds_work(layer.data, 0) and not edits.holds_work(layer.data, 1)

    layer.undo()  # the stroke is gone: nothing is the user's
    assert not edits.edited(layer.data).any()
    new_proposal = proposal.copy()
    new_proposal[0, 4:12, 4:8] = 0
    _, kept = accept(new_proposal)
    assert kept == 0 and np.array_equal(layer.data[0], new_proposal[0])

    layer.paint((0, 8, 10), 2)  # a stroke the next Accept keeps
    stroke = edits.edited(layer.data)
    written, kept = accept(proposal)
    assert kept > 0 and written.any() and not (written & stroke).any() and (layer.data[stroke] == 2).all()
    layer.undo()  # undo that Accept: the stroke is still the user's, the rest is not
    assert np.array_equal(edits.edited(layer.data), stroke)


def test_accept_refuses_a_slice_without_proposal(make_widget, qtbot):
    viewer, widget = make_widget(shape=(32, 32, 4), **{**TINY, "scope": "slice"})
    _go_to(viewer, 0)
    run_and_wait(qtbot, widget)
    seg = viewer.layers[f"{CASE} segmentation"]
    _go_to(viewer, 3)
    widget.accept()
    assert not seg.data.any() and "slice 3 has no proposal" in widget.runner.status.value


# ---------------------------------------------------------------------------------------------
# Cancel keeps the finished slices
# ---------------------------------------------------------------------------------------------


def test_cancelled_volume_keeps_finished_slices(make_widget, qtbot):
    depth, steps = 12, 100
    viewer, widget = make_widget(shape=(32, 32, depth), steps=str(steps), num_ensemble=3, keep_members=False)
    widget.run()  # 3 chains: 2 slices a batch on the CPU, 6 batches
    qtbot.waitUntil(lambda: widget.runner.progress_bar.native.value() > 2 * steps, timeout=RUN_TIMEOUT_MS)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.runner.worker is None, timeout=RUN_TIMEOUT_MS)
    state = widget.cases[CASE].result
    done = len(state.slices)
    assert 4 <= done < depth and state.partial == (done, depth)
    name = f"{CASE} diffseg proposal (partial: {done}/{depth} slices)"
    proposal = viewer.layers[name]
    assert ld.KIND in proposal.metadata and "partial" in widget.runner.status.value
    missing = sorted(set(range(depth)) - set(state.slices))
    assert not state.probability[..., missing].any()  # unfinished slices are empty
    assert state.variance[..., state.slices].any()  # finished ones hold the ensemble
    assert widget.review.ranking.count() == done

    widget.accept()  # only the finished slices are committed
    seg = viewer.layers[f"{CASE} segmentation"]
    np.testing.assert_array_equal(seg.data, proposal.data)

    widget.configure(persist=False, steps="3")  # a full run renames the proposal back
    run_and_wait(qtbot, widget)
    assert f"{CASE} diffseg proposal" in viewer.layers and name not in viewer.layers
    assert widget.cases[CASE].result.partial is None


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: one notification line, no traceback
# ---------------------------------------------------------------------------------------------


def test_bad_checkpoints_are_one_line_without_traceback(make_widget, qtbot, tmp_path, capfd):
    viewer, widget = make_widget()
    text = tmp_path / "readme.pt"
    text.write_text("this is not a checkpoint\nsecond line\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    classifier = tmp_path / "resnet_classifier.pt"
    torch.manual_seed(0)
    torch.save({"conv1.weight": torch.randn(8, 3, 3, 3), "fc.weight": torch.randn(10, 8),
                "fc.bias": torch.zeros(10)}, classifier)
    reference = tmp_path / "savedmodel000300.pt"
    torch.save(tiny_unet()[1].state_dict(), reference)  # a bare UNet state dict, as the reference saves
    names = [layer.name for layer in viewer.layers]
    capfd.readouterr()
    for path in (text, empty, classifier, reference):
        widget.configure(persist=False, model_path=str(path))
        start = notification_count()
        run_and_wait(qtbot, widget)
        errors = errors_since(start)
        assert len(errors) == 1 and path.name in errors[0] and "\n" not in errors[0], errors
        assert [layer.name for layer in viewer.layers] == names
    assert "flags JSON" in errors[0] and "--num_channels" not in errors[0]  # the widget's field, not CLI flags
    assert "flags JSON" in widget.model.model_status.value
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out


# ---------------------------------------------------------------------------------------------
# How it looks
# ---------------------------------------------------------------------------------------------


def test_results_are_told_apart(make_widget, qtbot):
    viewer, widget = make_widget(shape=(32, 32, 4), truth=True, **{**TINY, "keep_members": True})
    run_and_wait(qtbot, widget)
    truth = viewer.layers["ground truth"]
    proposal = viewer.layers[f"{CASE} diffseg proposal"]
    seg = viewer.layers[f"{CASE} segmentation"]
    members = viewer.layers[f"{CASE} diffseg members"]
    assert truth.contour > 0  # an outline over the filled proposal
    brats = truth.colormap.map(np.array([1, 2, 4]))[:, :3]
    for layer in (proposal, seg):
        color = layer.colormap.map(np.array([1]))[0, :3]
        assert np.abs(brats - color).sum(axis=1).min() > 0.5, (layer.name, color)
    assert np.abs(proposal.colormap.map(np.array([1]))[0, :3] - seg.colormap.map(np.array([1]))[0, :3]).sum() > 0.5
    assert str(members.blending) == "translucent" and members.colormap.map([0.0])[0, 3] == 0
    assert tuple(members.axis_labels) == ("member", "z", "y", "x")
    assert viewer.dims.axis_labels[0] == "member"  # the extra slider is named
