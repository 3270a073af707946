"""Refine with scribbles in the widget (issue 13): the scribble and region layers, Refine from the
kept members at half the chain, the "next mark" hint, and bad input as one notification.

Pure logic first (no display), then the widget with the tiny random-weight model of
conftest.py under Xvfb. A random network segments nothing sensible, which does not matter:
what is checked holds for any network (known pixels exact, steps saved, layers untouched).
"""

from __future__ import annotations

import numpy as np
import pytest
from gui_support import CASE, RUN_TIMEOUT_MS, errors_since, notification_count, run_and_wait

from napari_diffseg import _layerdata as ld
from napari_diffseg._gui import models
from napari_diffseg._gui.job import RunOutcome
from napari_diffseg._gui.results import ResultState
from napari_diffseg.refine import SCRIBBLE_BACKGROUND, SCRIBBLE_TUMOUR, known_pixels, next_mark, refine_start_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 10  # a 10-step chain: a refine from members starts at step 4 and runs 5


# ---------------------------------------------------------------------------------------------
# Pure logic
# ---------------------------------------------------------------------------------------------


def test_next_mark_outlines_the_region_with_the_most_variance():
    variance = np.zeros((40, 48), np.float32)
    variance[4:10, 20:26] = 0.2  # a lump the members disagree on: 36 px, summed 7.2
    variance[30:33, 5:8] = 0.25  # a smaller, more uncertain speck: summed 2.25
    variance[20, 10:40] = 0.25  # a one-pixel rim (members a pixel apart): summed 7.5, but thin
    hint = next_mark(variance)
    assert hint is not None
    r0, c0, r1, c1 = hint.bbox
    assert abs(r0 - 4) <= 1 and abs(c0 - 20) <= 1 and abs(r1 - 9) <= 1 and abs(c1 - 25) <= 1, hint.bbox
    assert hint.mask[6, 22] and not hint.mask[20].any() and not hint.mask[31, 6]
    assert 0.8 * 7.2 <= hint.score <= 7.2 + 1e-4  # the lump (its corners may fall below half the smoothed peak)
    corners = hint.rectangle(pad=1.0)  # pixel centres at integers: the outline lies outside the pixels
    assert corners.min(0) == pytest.approx([r0 - 1.5, c0 - 1.5])
    assert corners.max(0) == pytest.approx([r1 + 1.5, c1 + 1.5])

    variance[30:36, 2:12] = 0.24  # now the lower lump holds more
    r0, c0, r1, c1 = next_mark(variance).bbox
    assert 29 <= r0 <= 31 and r1 >= 34 and c0 <= 3
    assert next_mark(np.zeros((16, 16))) is None  # the members agree: nothing to point at
    assert next_mark(np.full((16, 16), 0.005)) is None  # noise below the floor


def test_known_pixels_from_scribbles_segmentation_and_region():
    scribbles = np.zeros((8, 10), np.uint8)
    scribbles[1, 1:4] = SCRIBBLE_TUMOUR
    scribbles[6, 6:9] = SCRIBBLE_BACKGROUND
    scribbles[7, 0] = 5  # not a scribble label
    segmentation = np.zeros((8, 10), np.uint8)
    segmentation[0:4, 0:5] = 1
    segmentation[5:8, 5:10] = 1  # accepted tumour under the not-tumour scribble

    only = known_pixels(scribbles, segmentation, None)  # no region: the scribbles alone
    assert only.count == 6 and only.tumour == 3 and only.background == 3 and only.from_segmentation == 0
    assert np.all(only.values[1, 1:4] == 1) and np.all(only.values[6, 6:9] == 0)
    assert only.ignored_labels == (5,) and not only.mask[7, 0]
    assert np.array_equal(known_pixels(scribbles, segmentation, np.zeros((8, 10), bool)).mask, only.mask)

    region = np.zeros((8, 10), bool)
    region[4:8, 4:10] = True  # redo the lower right
    known = known_pixels(scribbles, segmentation, region)
    outside = ~region
    assert known.mask[outside].all()  # everything outside the region is fixed...
    assert np.array_equal(known.values[outside], segmentation[outside].astype(np.float32))  # ...at the accepted value
    assert np.array_equal(known.mask[region], scribbles[region] == SCRIBBLE_BACKGROUND)  # inside: the scribbles only
    assert np.all(known.values[6, 6:9] == 0)  # a scribble wins over the accepted segmentation
    assert known.from_segmentation == outside.sum() - 3 and "accepted" in known.summary()  # less the scribbles there
    # Without a segmentation layer the outside is known empty (nothing accepted there).
    assert not known_pixels(scribbles, None, region).values[outside & (scribbles != 1)].any()


def test_refine_starts_half_way():
    assert refine_start_step(10) == 4  # runs 5 of 10 steps
    assert refine_start_step(50) == 24 and refine_start_step(5) == 2 and refine_start_step(1) == 0
    assert all(s + 1 <= (n + 1) // 2 + 1 for n in range(1, 300) for s in [refine_start_step(n)])


class _Seg:  # the part of inference.Segmentation that ResultState.merge reads
    def __init__(self, samples):
        self.samples = samples
        self.num_ensemble = samples.shape[0]
        self.probability = samples.mean(0)
        self.variance = samples.var(0)


def test_members_are_kept_per_slice_for_refine():
    rng = np.random.default_rng(0)
    state = ResultState.empty("c", (6, 5, 3))
    volume = (rng.random((4, 6, 5, 3)) > 0.5).astype(np.float32)
    state.merge(RunOutcome(_Seg(volume), None, [0, 1, 2], None, 0.0))
    assert np.array_equal(state.members_for(1), volume[..., 1])
    one = (rng.random((2, 6, 5)) > 0.5).astype(np.float32)
    state.merge(RunOutcome(_Seg(one), 2, [2], None, 0.0))  # a later run of slice 2 only
    assert np.array_equal(state.members_for(2), one) and np.array_equal(state.members_for(0), volume[..., 0])
    assert set(state.hints) <= {0, 1, 2} and state.hints  # random members disagree: every slice has a hint
    flat = ResultState.empty("d", (6, 5))
    flat.merge(RunOutcome(_Seg(one), None, [0], None, 0.0))
    assert np.array_equal(flat.members_for(None), one)


# ---------------------------------------------------------------------------------------------
# The widget
# ---------------------------------------------------------------------------------------------


def _press(viewer, key):
    from napari.utils.key_bindings import coerce_keybinding

    viewer.keymap[coerce_keybinding(key)](viewer)


def _refine(qtbot, widget, key=False):
    from napari_diffseg._gui.keys import REFINE_KEY

    if key:
        _press(widget.viewer, REFINE_KEY)
    else:
        widget.refine()
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)


def _rectangle(layer, rows, cols, z=None):
    corners = np.array([[rows[0], cols[0]], [rows[0], cols[1]], [rows[1], cols[1]], [rows[1], cols[0]]], float)
    if z is not None:
        corners = np.column_stack([np.full(4, float(z)), corners])
    layer.add_rectangles(corners)


def test_refine_holds_scribbles_and_accepted_pixels_outside_the_region(make_widget, qtbot):
    viewer, widget = make_widget(steps=str(STEPS), num_ensemble=3)
    start = notification_count()
    run_and_wait(qtbot, widget)
    run_steps = widget.runner.progress_steps
    assert run_steps == STEPS  # one progress report per denoising step
    widget.accept()
    seg = viewer.layers[f"{CASE} segmentation"]
    accepted = seg.data.copy()

    widget.refine_tools.scribble_button.native.click()  # the Scribble button
    scribbles = viewer.layers[f"{CASE} scribbles"]
    assert type(scribbles).__name__ == "Labels" and scribbles.data.shape == (32, 32)
    assert viewer.layers.selection.active is scribbles and scribbles.mode == "paint"
    assert scribbles.selected_label == SCRIBBLE_TUMOUR
    np.testing.assert_allclose(scribbles.scale, viewer.layers["t1"].scale)  # on the source grid
    np.testing.assert_allclose(scribbles.translate, viewer.layers["t1"].translate)
    colours = scribbles.colormap.map(np.array([1, 2]))
    assert colours[0, 0] > 0.9 > 0.3 > colours[0, 2] and colours[1, 2] > 0.9 > 0.3 > colours[1, 0]  # red, blue
    assert "tumour" in widget.refine_tools.scribble_button.tooltip and "not tumour" in widget.refine_tools.scribble_legend.value

    widget.refine_tools.region_button.native.click()  # the Region button
    region_layer = viewer.layers[f"{CASE} refine region"]
    assert type(region_layer).__name__ == "Shapes" and region_layer.mode == "add_rectangle"
    _rectangle(region_layer, (8, 20), (6, 22))
    region = np.zeros((32, 32), bool)  # what the rectangle covers, one pixel more for its rasterised edge
    region[7:22, 5:24] = True
    viewer.layers.selection.active = scribbles
    scribbles.brush_size = 3
    scribbles.paint((12, 10), SCRIBBLE_TUMOUR)  # marks inside the region
    scribbles.paint((17, 18), SCRIBBLE_BACKGROUND)
    marks = scribbles.data.copy()
    assert (marks == 1).sum() >= 5 and (marks == 2).sum() >= 5
    # The scribbles also travel as marks, for a model trained to read them (this one ignores them).
    np.testing.assert_array_equal(ld.to_display(widget.refine_tools.request(widget.build_request(current_slice=True)).marks), marks)

    _refine(qtbot, widget, key=True)  # Shift-R
    assert not errors_since(start), widget.messages
    assert widget.runner.progress_steps == STEPS // 2  # from the kept members at half the chain: half a Run
    assert "refined" in widget.runner.status.value and "from the kept members" in widget.runner.status.value
    state = widget.cases[CASE].result
    proposal = viewer.layers[f"{CASE} diffseg proposal"]
    # Outside the region the proposal is the accepted segmentation; the segmentation is untouched.
    np.testing.assert_array_equal(proposal.data[~region], accepted[~region])
    np.testing.assert_array_equal(seg.data, accepted)
    # Scribbled pixels end exactly at their value in every member and in the mean.
    members = ld.to_display(state.members, 2)  # (N, rows, cols)
    for label, value in ((SCRIBBLE_TUMOUR, 1.0), (SCRIBBLE_BACKGROUND, 0.0)):
        where = marks == label
        assert np.all(members[:, where] == value)
        assert np.all(ld.to_display(state.probability)[where] == value)
        assert np.all(ld.to_display(state.variance)[where] == 0)
    assert np.all(members[:, ~region] == accepted[~region].astype(np.float32))
    assert viewer.layers.selection.active is scribbles  # the user goes on marking

    # The hint outlines the slice's most uncertain region, computed from the shown variance.
    hint_layer = viewer.layers[f"{CASE} next mark"]
    expected = next_mark(viewer.layers[f"{CASE} diffseg uncertainty"].data)
    assert expected is not None and hint_layer.nshapes == 1 and hint_layer.shape_type == ["rectangle"]
    np.testing.assert_allclose(np.sort(hint_layer.data[0], axis=0), np.sort(expected.rectangle(), axis=0))
    near = np.zeros_like(region)  # the hint's smoothing may spill a little over the region's edge
    near[4:25, 2:27] = True
    assert not expected.mask[~near].any()  # nothing left to look at where everything is known


def test_a_region_before_any_accept_holds_the_proposal_outside_it(make_widget, qtbot):
    """Nothing accepted yet, so the segmentation is empty: outside a region the refine holds
    the proposal the user sees, not that emptiness (which wiped the proposal there); once the
    slice is accepted into, the segmentation counts again."""
    viewer, widget = make_widget(steps=str(STEPS), num_ensemble=2)
    widget.review.threshold.value = 0.3  # a random network: a proposal with tumour pixels to keep
    run_and_wait(qtbot, widget)
    proposal = viewer.layers[f"{CASE} diffseg proposal"]
    before = proposal.data.copy()
    assert before.any()
    widget.refine_tools.draw_region()
    _rectangle(viewer.layers[f"{CASE} refine region"], (8, 20), (6, 22))
    region = np.zeros((32, 32), bool)
    region[7:22, 5:24] = True
    _refine(qtbot, widget)
    assert "proposal pixels outside the region" in widget.runner.status.value
    np.testing.assert_array_equal(proposal.data[~region], before[~region])

    widget.accept()
    seg = viewer.layers[f"{CASE} segmentation"]
    seg.data_setitem(np.nonzero(seg.data), 0)  # the user clears the accepted slice (not a stroke)
    _refine(qtbot, widget)
    assert "accepted pixels outside the region" in widget.runner.status.value
    assert not proposal.data[~region].any()  # the (cleared) segmentation is what is held now


def test_refine_of_a_volume_slice_and_a_slice_without_members(make_widget, qtbot):
    viewer, widget = make_widget(shape=(32, 32, 4), steps=str(STEPS), num_ensemble=2, keep_members=False)
    widget.refine_tools.scribble()
    scribbles = viewer.layers[f"{CASE} scribbles"]
    assert scribbles.data.shape == (4, 32, 32) and tuple(scribbles.axis_labels) == ("z", "y", "x")
    viewer.dims.set_point(viewer.dims.ndim - 3, 12.0 + 3.0 * 1)  # slice 1 (the test affine: 12 mm + 3 mm/slice)
    scribbles.data[1, 4:8, 4:8] = SCRIBBLE_TUMOUR
    scribbles.data[1, 20:24, 20:24] = SCRIBBLE_BACKGROUND

    # No run yet: no members to start from, so the refine runs whole chains with the marks held.
    _refine(qtbot, widget)
    assert widget.runner.progress_steps == STEPS and "whole chains" in widget.runner.status.value
    state = widget.cases[CASE].result
    assert state.slices == [1] and state.members_for(1).shape == (2, 32, 32)  # kept though not shown
    assert f"{CASE} diffseg members" not in viewer.layers
    probability = ld.to_display(state.probability)
    assert np.all(probability[1, 4:8, 4:8] == 1) and np.all(probability[1, 20:24, 20:24] == 0)

    widget.configure(persist=False, scope="volume")
    run_and_wait(qtbot, widget)  # the whole volume: every slice gets members and a hint
    before = widget.cases[CASE].result.probability.copy()
    hints = viewer.layers[f"{CASE} next mark"]
    assert hints.ndim == 3 and {int(round(d[0, 0])) for d in hints.data} == set(widget.cases[CASE].result.hints)

    viewer.dims.set_point(viewer.dims.ndim - 3, 12.0 + 3.0 * 2)
    scribbles.data[2, 10:14, 10:14] = SCRIBBLE_TUMOUR
    _refine(qtbot, widget)
    assert widget.runner.progress_steps == STEPS // 2 and widget.cases[CASE].result.last_z == 2
    after = widget.cases[CASE].result.probability
    np.testing.assert_array_equal(np.delete(after, 2, axis=-1), np.delete(before, 2, axis=-1))  # other slices kept
    assert np.all(ld.to_display(after)[2, 10:14, 10:14] == 1)
    # The one-slice refine moved only slice 2's hint.
    assert {int(round(d[0, 0])) for d in hints.data} == set(widget.cases[CASE].result.hints)


def _refused(qtbot, widget, expected):
    viewer = widget.viewer
    names = [layer.name for layer in viewer.layers]
    start = notification_count()
    widget.refine()
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)
    errors = errors_since(start)
    assert len(errors) == 1 and expected in errors[0] and "\n" not in errors[0], errors
    assert [layer.name for layer in viewer.layers] == names
    assert widget.refine_tools.refine_button.enabled and widget.runner.run_button.enabled
    return errors[0]


def test_refine_errors_are_one_notification(make_widget, qtbot, monkeypatch, capfd, tiny_checkpoint):
    viewer, widget = make_widget(steps=str(STEPS))
    start = notification_count()
    widget.refine()  # nothing marked: a warning, nothing runs
    assert not widget.running and "nothing to refine" in widget.runner.status.value and not errors_since(start)

    widget.refine_tools.scribble()
    scribbles = viewer.layers[f"{CASE} scribbles"]
    scribbles.data[3:6, 3:6] = SCRIBBLE_TUMOUR
    capfd.readouterr()

    widget.pickers.set_layer("t2", None)  # no inputs
    _refused(qtbot, widget, "no layer chosen for t2")
    widget.pickers.set_layer("t2", "t2")

    monkeypatch.setattr(models, "demo_model_available", lambda *_: False)
    widget.configure(persist=False, model_path="")  # no model
    _refused(qtbot, widget, "choose a checkpoint")
    monkeypatch.undo()
    widget.configure(persist=False, model_path=str(tiny_checkpoint))

    scribbles.data = np.zeros((20, 20), np.uint8)  # a scribble layer on another grid
    text = _refused(qtbot, widget, f"'{CASE} scribbles' has shape 20x20")
    assert "32x32" in text and "press Scribble" in text
    start = notification_count()
    widget.refine_tools.scribble()  # the Scribble button says the same instead of painting on the wrong grid
    assert "20x20" in errors_since(start)[-1]
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert CASE not in widget.cases  # nothing ran


def test_simulated_scribbles_mark_the_largest_errors():
    from napari_diffseg.demo import simulated_scribbles

    truth = np.zeros((40, 40), np.uint8)
    truth[5:25, 5:25] = 1
    probability = np.zeros((40, 40), np.float32)
    probability[5:25, 5:15] = 0.9  # the right half of the tumour is missed
    probability[30:38, 28:38] = 0.3  # some members include a lump outside it
    marks = simulated_scribbles(truth, probability)
    tumour, background = marks == SCRIBBLE_TUMOUR, marks == SCRIBBLE_BACKGROUND
    assert tumour.sum() >= 10 and truth[tumour].all() and (probability[tumour] < 0.5).all()
    assert background.sum() >= 10 and not truth[background].any()
    assert set(np.nonzero(background)[0]) <= set(range(30, 38))

