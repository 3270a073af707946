"""The "Diffusion segmentation" widget with a tiny random-weight model (a few steps, 32x32).

GUI tests run under Xvfb (pytest-xvfb); they wait for the worker thread with qtbot.waitUntil.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gui_support import (
    AFFINE,
    CASE,
    RUN_TIMEOUT_MS,
    errors_since,
    notification_count,
    result_names,
    run_and_wait,
    save_tiny_checkpoint,
    tiny_unet,
)

from napari_diffseg import _layerdata as ld
from napari_diffseg._gui import inputs as gui_inputs
from napari_diffseg._gui.inputs import LayerInfo, case_prefix, match_layers, modality_of
from napari_diffseg._gui.job import prepare_images
from napari_diffseg._gui.results import ResultState, rank_slices
from napari_diffseg.checkpoint import atomic_save, make_payload
from napari_diffseg.diffusion import DiffusionConfig
from napari_diffseg.errors import DiffSegError
from napari_diffseg.geometry import Geometry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------------------------------------
# Pure logic
# ---------------------------------------------------------------------------------------------


def test_layer_names_are_matched_to_modalities():
    assert modality_of("Brats18_x t1ce") == "t1ce" and modality_of("case_T2-FLAIR") == "flair"
    assert modality_of("pat diffseg mask") is None and modality_of("pat ground truth") == "seg"
    assert case_prefix("Brats18_x flair") == "Brats18_x" and case_prefix("t1") == ""
    layers = [LayerInfo(n, "image") for n in ("a t1", "a t1ce", "a t2", "a flair")]
    layers += [LayerInfo("a ground truth", "labels"), LayerInfo("b t1", "image"), LayerInfo("b t2", "image"),
               LayerInfo("c flair", "labels")]
    chosen, truth = match_layers(layers)
    assert chosen == {"t1": "a t1", "t1ce": "a t1ce", "t2": "a t2", "flair": "a flair"}  # the complete case
    assert truth == "a ground truth"
    chosen, truth = match_layers([LayerInfo("t1", "image"), LayerInfo("x_flair", "image")])
    assert chosen == {"t1": "t1", "t1ce": None, "t2": None, "flair": "x_flair"} and truth is None


def test_uncertainty_ranking_and_result_bookkeeping():
    variance = np.zeros((4, 4, 5), np.float32)
    variance[..., 3] = 0.2
    variance[..., 1] = 0.1
    assert rank_slices(variance, [0, 1, 3]) == [(3, pytest.approx(0.2)), (1, pytest.approx(0.1)), (0, 0.0)]
    state = ResultState.empty("c", (4, 4, 5))
    state.probability[..., 2] = 0.6
    assert state.mask().sum() == 16 and state.mask(0.7).sum() == 0


def test_result_layers_are_worked_out_without_a_viewer():
    """What our layers hold and where they sit, for a volume whose last run covered slice 2."""
    from types import SimpleNamespace

    from napari_diffseg._gui.result_layers import hint_rectangles, result_layer_tuples, segmentation_layer_tuple

    reference = SimpleNamespace(scale=(3.0, 1.5, 1.5), translate=(12.0, -30.0, 40.0), metadata={"source": "t1.nii"})
    state = ResultState.empty("c", (6, 5, 4))  # core (X, Y, Z)
    state.probability[1:4, 1:3, 2] = 0.8
    members = np.zeros((2, 6, 5, 1), np.float32)
    members[:, 1:4, 1:3] = 1.0
    state.members, state.members_z = members, 2
    state.variance[0:3, 0:3, 2] = 0.2
    state.update_hints([2])
    (variance, heat, _), (mask, proposal, kind), (stack, shown, _) = result_layer_tuples(state, reference)
    assert [m["metadata"][ld.KIND] for m in (heat, proposal, shown)] == ["uncertainty", "proposal", "members"]
    assert kind == "labels" and proposal["name"] == "c diffseg proposal"
    assert all(m["metadata"][ld.CASE] == "c" and m["metadata"][ld.SOURCE] == "" for m in (heat, proposal, shown))
    assert variance.shape == mask.shape == (4, 5, 6)  # display (Z, Y, X)
    np.testing.assert_array_equal(mask, ld.to_display(state.mask()))
    assert stack.shape == (2, 1, 5, 6) and shown["visible"] is False
    assert shown["translate"][1] == pytest.approx(12.0 + 2 * 3.0)  # the one slice sits at z = 2
    assert len(result_layer_tuples(state, reference, keep_members=False)) == 2
    data, kwargs, _ = segmentation_layer_tuple(state, reference)
    assert data.shape == (4, 5, 6) and not data.any() and kwargs["name"] == "c segmentation"
    (corners,) = hint_rectangles(state)
    assert corners.shape == (4, 3) and set(corners[:, 0]) == {2.0}  # a rectangle on slice 2


def test_the_core_imports_nothing_of_the_gui():
    """The modules whose names do not start with "_" import neither the GUI package nor Qt or
    napari; demo.py starts napari (its widget comes through the plugin manifest)."""
    import ast
    from pathlib import Path

    import napari_diffseg

    qt = {"qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "napari", "superqt"}
    for path in sorted(Path(napari_diffseg.__file__).parent.glob("[!_]*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert "_gui" not in name.split("."), (path.name, name)
                assert path.name == "demo.py" or name.split(".")[0] not in qt, (path.name, name)


def test_settings_file_is_forgiving(tmp_path):
    import json

    from napari_diffseg._gui.settings import Settings, load_settings, save_settings, settings_path

    assert load_settings() == Settings()  # no file yet
    settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings_path().write_text("{not json")
    assert load_settings() == Settings()
    settings_path().write_text('{"num_ensemble": "many", "device": "cpu", "steps": "50 steps", "later": 1}')
    assert load_settings() == Settings(device="cpu", steps="50 steps")
    save_settings(Settings(num_ensemble=9))
    assert load_settings().num_ensemble == 9
    # The file of an older version (no eta, no cleanup, no bundled model) loads; the keys are those it
    # always had, and the new ones.
    old = {"model_path": "", "flags_path": "", "num_ensemble": 7, "steps": "", "sampler": "ddim", "device": "auto",
           "precision": "auto", "seed": 3, "scope": "slice", "keep_members": True, "threshold": 0.4}
    settings_path().write_text(json.dumps(old))
    assert load_settings() == Settings(**old)
    save_settings(load_settings())
    assert json.loads(settings_path().read_text()) == {**old, "bundled_model": "wt", "eta": 0.0, "cleanup": True}


def test_widget_feeds_the_model_what_the_core_loader_reads():
    """Reader -> layers -> widget input is exactly load_case's array (orientation and scaling)."""
    from napari.layers import Image

    from napari_diffseg._sample_data import BRATS_VOLUME, sample_files
    from napari_diffseg.data import load_case

    files = sample_files(BRATS_VOLUME)
    layers = {kwargs["name"]: Image(data, **kwargs) for data, kwargs, kind in
              _session_tuples(files) if kind == "image"}
    inputs = gui_inputs.check_inputs(layers)
    core = load_case(files).images
    np.testing.assert_array_equal(prepare_images(inputs, None), core)
    np.testing.assert_array_equal(prepare_images(inputs, 5), core[..., 5])


def _session_tuples(files):
    from napari_diffseg._reader import _case_tuples

    return _case_tuples(files, prefix=False)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def test_run_creates_mask_and_uncertainty_layers(make_widget, qtbot, tmp_path):
    viewer, widget = make_widget(truth=True)
    assert widget.pickers.chosen_names() == {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair",
                                     "seg": "ground truth"}  # filled from the layer names
    widget.sampling.ensemble.value = 4
    run_and_wait(qtbot, widget)
    assert not [s for s, _ in widget.messages if s == "error"], widget.messages
    t1 = viewer.layers["t1"]
    mask = viewer.layers[f"{CASE} diffseg proposal"]
    uncertainty = viewer.layers[f"{CASE} diffseg uncertainty"]
    members = viewer.layers[f"{CASE} diffseg members"]
    assert type(mask).__name__ == "Labels" and mask.data.dtype == np.uint8 and mask.data.shape == (32, 32)
    assert type(uncertainty).__name__ == "Image" and uncertainty.data.dtype == np.float32
    assert uncertainty.data.shape == (32, 32)
    # A translucent heatmap on a fixed scale (variance of {0, 1} members <= 0.25) with a legend.
    assert str(uncertainty.blending) == "translucent" and uncertainty.colormap.map([0.0])[0, 3] == 0
    assert list(uncertainty.contrast_limits) == [0.0, 0.25] and uncertainty.colorbar.visible
    for layer in (mask, uncertainty):
        np.testing.assert_allclose(layer.scale, t1.scale)
        np.testing.assert_allclose(layer.translate, t1.translate)
        np.testing.assert_array_equal(layer.metadata[ld.AFFINE], AFFINE)
    assert members.data.shape == (4, 32, 32)  # the slider value is the number of chains sampled
    state = widget.cases[CASE].result
    assert state.num_ensemble == 4
    np.testing.assert_array_equal(mask.data, (ld.to_display(state.probability) > 0.5).astype(np.uint8))
    np.testing.assert_allclose(ld.to_display(members.data.mean(0), 2), ld.to_display(state.probability).T,
                               atol=1e-5)
    assert widget.runner.preview.updates >= 1  # the live preview was drawn
    assert not [name for name in result_names(viewer) if "preview" in name]  # and removed at the end
    assert "Dice" in widget.review.metrics_label.value and "HD95" in widget.review.metrics_label.value
    assert widget.review.metrics is not None and 0 <= widget.review.metrics["dice"] <= 1

    # The proposal is an ordinary Labels layer: the writer puts it back on the source grid.
    import nibabel as nib

    from napari_diffseg._writer import write_labels

    mask.data[0, 0] = 1  # a correction painted by hand
    written = nib.load(write_labels(str(tmp_path / "mask.nii.gz"), mask.data, mask.as_layer_data_tuple()[1])[0])
    np.testing.assert_array_equal(written.affine, AFFINE.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(written.dataobj), ld.to_core(mask.data))

    # The review tools: re-threshold instantly, flip through the members.
    widget.review.threshold.value = 0.9
    np.testing.assert_array_equal(mask.data, (ld.to_display(state.probability) > 0.9).astype(np.uint8))
    widget.review.member.value = 2
    assert members.visible and viewer.dims.current_step[0] == 1

    # Running again replaces the results; the model is cached.
    loads = widget.runner.cache.loads
    names = result_names(viewer)
    widget.sampling.ensemble.value = 2
    run_and_wait(qtbot, widget)
    assert result_names(viewer) == names
    assert viewer.layers[f"{CASE} diffseg members"].data.shape == (2, 32, 32)
    assert widget.runner.cache.loads == loads


def test_volume_scope_ranking_and_current_slice(make_widget, qtbot, tmp_path):
    viewer, widget = make_widget(shape=(32, 32, 4), num_ensemble=2)
    run_and_wait(qtbot, widget)
    mask = viewer.layers[f"{CASE} diffseg proposal"]
    assert mask.data.shape == (4, 32, 32)
    np.testing.assert_allclose(mask.scale, (3.0, 1.5, 1.5))
    assert viewer.layers[f"{CASE} diffseg members"].data.shape == (2, 4, 32, 32)
    assert widget.review.ranking.count() == 4  # every slice, most uncertain first
    values = [float(widget.review.ranking.item(i).text().split()[-1]) for i in range(4)]
    assert values == sorted(values, reverse=True)
    item = widget.review.ranking.item(widget.review.ranking.count() - 1)
    widget.review.on_ranking_clicked(item)
    z = int(item.data(0x0100))
    assert viewer.dims.point[-3] == pytest.approx(12.0 + 3.0 * z)  # world mm of that slice

    # The current slice only: the other slices keep their result, members cover that slice.
    widget.configure(persist=False, scope="slice", num_ensemble=3)
    viewer.dims.set_point(viewer.dims.ndim - 3, 12.0 + 3.0 * 2)
    before = widget.cases[CASE].result.probability.copy()
    run_and_wait(qtbot, widget)
    state = widget.cases[CASE].result
    assert state.slices == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.delete(state.probability, 2, axis=-1), np.delete(before, 2, axis=-1))
    members = viewer.layers[f"{CASE} diffseg members"]
    assert members.data.shape == (3, 1, 32, 32)
    assert members.translate[1] == pytest.approx(12.0 + 3.0 * 2)
    import nibabel as nib

    from napari_diffseg._writer import write_image

    written = nib.load(write_image(str(tmp_path / "m.nii.gz"), members.data, members.as_layer_data_tuple()[1])[0])
    assert written.shape == (32, 32, 1, 3)
    assert written.affine[2, 3] == pytest.approx(12.0 + 3.0 * 2)  # the one slice sits where it was sampled


def test_cancel_mid_run_leaves_no_results(make_widget, qtbot):
    viewer, widget = make_widget(steps="400", num_ensemble=2)
    before = [layer.name for layer in viewer.layers]
    widget.run()
    qtbot.waitUntil(lambda: widget.runner.progress_bar.native.value() >= 2, timeout=RUN_TIMEOUT_MS)
    assert widget.running and widget.runner.cancel_button.enabled
    worker = widget.runner.worker
    widget.cancel()
    qtbot.waitUntil(lambda: widget.runner.worker is None, timeout=RUN_TIMEOUT_MS)
    assert worker.abort_requested
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10_000)
    assert [layer.name for layer in viewer.layers] == before  # no result layers, preview gone
    assert widget.runner.progress_bar.native.value() < 400
    assert widget.runner.run_button.enabled and "cancelled" in widget.runner.status.value
    assert CASE not in widget.cases


# ---------------------------------------------------------------------------------------------
# Bad input: a notification, a live viewer, nothing lost
# ---------------------------------------------------------------------------------------------


def _assert_refused(qtbot, viewer, widget, expected: str):
    names = [layer.name for layer in viewer.layers]
    data = [layer.data for layer in viewer.layers]
    start = notification_count()
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)
    errors = errors_since(start)
    assert errors and expected in errors[-1], errors
    assert [layer.name for layer in viewer.layers] == names  # nothing added, nothing removed
    assert all(a is b for a, b in zip(data, [layer.data for layer in viewer.layers]))
    assert widget.runner.run_button.enabled
    viewer.add_points([[1, 1]], name="still alive")  # the viewer keeps working
    viewer.layers.remove("still alive")


def test_bad_inputs_give_notifications(make_widget, qtbot):
    viewer, widget = make_widget()
    widget.pickers.set_layer("t2", None)
    _assert_refused(qtbot, viewer, widget, "no layer chosen for t2")
    widget.pickers.set_layer("t2", "t2")

    viewer.add_image(np.zeros((40, 40), np.float32) + 0.5, name="other t1ce")
    widget.pickers.set_layer("t1ce", "other t1ce")
    _assert_refused(qtbot, viewer, widget, "different shapes")
    widget.pickers.set_layer("t1ce", "t1ce")

    labels = viewer.add_labels(np.ones((32, 32), np.uint8), name="a labels layer")
    with pytest.raises(ValueError, match="a labels layer"):  # the modality pickers offer Image layers only
        widget.pickers.set_layer("flair", "a labels layer")
    with pytest.raises(DiffSegError, match="not an image"):  # and the check behind them says why
        gui_inputs.check_inputs({**widget.pickers.chosen_layers(), "flair": labels})

    holes = viewer.layers["t1"].data.copy()
    holes[3, 4] = np.nan
    viewer.add_image(holes, name="t1 with holes")
    widget.pickers.set_layer("t1", "t1 with holes")
    _assert_refused(qtbot, viewer, widget, "NaN")
    widget.pickers.set_layer("t1", "t1")

    widget.pickers.set_layer("t1ce", "t1")
    _assert_refused(qtbot, viewer, widget, "chosen for both")
    widget.pickers.set_layer("t1ce", "t1ce")

    widget.sampling.set_steps("fifty")
    _assert_refused(qtbot, viewer, widget, "fifty")
    assert not result_names(viewer)


def test_bad_checkpoints_and_out_of_memory_give_notifications(make_widget, qtbot, tmp_path, monkeypatch,
                                                              tiny_checkpoint):
    viewer, widget = make_widget()
    config, _ = tiny_unet()
    _, other = tiny_unet(channels=64)
    wrong = tmp_path / "wrong.pt"
    atomic_save(make_payload(config, DiffusionConfig(), Geometry(), {"model": other.state_dict()}), wrong)
    widget.configure(persist=False, model_path=str(wrong))
    _assert_refused(qtbot, viewer, widget, "do not fit")

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    widget.configure(persist=False, model_path=str(text))
    _assert_refused(qtbot, viewer, widget, "notes.pt")

    widget.configure(persist=False, model_path=str(tmp_path / "missing.pt"))
    _assert_refused(qtbot, viewer, widget, "not found")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    from napari_diffseg.inference import Segmenter

    monkeypatch.setattr(Segmenter, "run", out_of_memory)
    widget.configure(persist=False, model_path=str(tiny_checkpoint))
    _assert_refused(qtbot, viewer, widget, "out of memory")
    assert "ensemble size" in widget.runner.status.value and "cpu" in widget.runner.status.value
    assert not result_names(viewer)


def test_missing_demo_model_is_explained(make_widget, qtbot, monkeypatch):
    from napari_diffseg._gui import models

    monkeypatch.setattr(models, "demo_model_available", lambda *_: False)
    viewer, widget = make_widget(model_path="")
    qtbot.waitUntil(lambda: any("no bundled demo model" in text for _, text in widget.messages), timeout=5000)
    assert "choose a checkpoint" in widget.model.model_status.value
    _assert_refused(qtbot, viewer, widget, "choose a checkpoint")


# ---------------------------------------------------------------------------------------------
# Settings and pixels
# ---------------------------------------------------------------------------------------------


def test_settings_persist_between_sessions(make_widget, tmp_path):
    from napari_diffseg._gui.settings import settings_path
    from napari_diffseg._gui.widget import DiffSegWidget

    viewer, widget = make_widget()
    widget.sampling.ensemble.value = 7
    widget.sampling.set_steps("25 steps")
    widget.model.model_path.value = "/some/model.pt"
    widget.sampling.device.value = "cpu"
    assert widget.sampling.precision.value == "auto"  # the default
    widget.sampling.precision.value = "fp32"
    widget.review.threshold.value = 0.35
    assert settings_path().is_file()
    again = DiffSegWidget(viewer)
    assert again.sampling.ensemble.value == 7
    assert again.current_settings().respacing == "25"
    assert again.current_settings().model_path == "/some/model.pt"
    assert again.sampling.device.value == "cpu"
    assert again.sampling.precision.value == "fp32"
    assert again.review.threshold.value == pytest.approx(0.35)
    again.deleteLater()


def test_ddim_eta_is_saved_restored_and_reaches_the_sampler(make_widget, qtbot, monkeypatch):
    """A control added as a settings field and a form control, nothing more: DDIM's eta is
    offered for DDIM, kept in the settings file, shown again by a new widget, and used by the
    DDIM step of the run."""
    import inspect
    import json

    from napari_diffseg._gui.settings import settings_path
    from napari_diffseg._gui.widget import DiffSegWidget
    from napari_diffseg.diffusion import Diffusion

    viewer, widget = make_widget(num_ensemble=2, steps="4")
    eta = widget.sampling.eta
    assert not eta.enabled  # DDPM (the model's default here) has no eta
    widget.sampling.sampler.value = "ddim"
    assert eta.enabled
    eta.value = 0.3
    assert json.loads(settings_path().read_text())["eta"] == pytest.approx(0.3)
    again = DiffSegWidget(viewer)
    assert again.sampling.eta.value == pytest.approx(0.3) and again.sampling.eta.enabled
    assert again.current_settings().eta == pytest.approx(0.3)
    again.deleteLater()

    step = Diffusion.ddim_step
    seen = []

    def spy(self, *args, **kwargs):
        seen.append(inspect.signature(step).bind(self, *args, **kwargs).arguments.get("eta"))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Diffusion, "ddim_step", spy)
    run_and_wait(qtbot, widget)
    assert not [m for s, m in widget.messages if s == "error"], widget.messages
    assert seen and all(value == pytest.approx(0.3) for value in seen)


def test_screenshot_of_result_is_not_blank(make_widget, qtbot):
    viewer, widget = make_widget(show=True)
    run_and_wait(qtbot, widget)
    for layer in viewer.layers:
        layer.visible = "diffseg" in layer.name and "members" not in layer.name
    viewer.reset_view()
    qtbot.wait(100)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    lit = np.any(shot[..., :3] > 20, axis=-1)
    assert lit.mean() > 0.01, "the result layers draw nothing"
    assert len(np.unique(shot[..., :3].reshape(-1, 3), axis=0)) > 10  # a heatmap, not a flat colour


def test_demo_runs_headless(qapp, tmp_path):
    """The main job (python -m napari_diffseg.demo): sample case + widget + run + screenshot; with
    --refine also scribbles, a refine and refine.png taken mid-refine (one demo per test process:
    napari registers the plugin once)."""
    import nibabel as nib
    from PIL import Image

    from napari_diffseg import demo
    from napari_diffseg._sample_data import BRATS_SLICE, SAMPLE_DIR

    out = tmp_path / "demo"
    model = save_tiny_checkpoint(tmp_path / "tiny32.pt", resize_to=32)  # the 240x240 slice sampled at 32x32
    code = demo.main(["--headless", "--refine", "--out", str(out), "--model", str(model), "--steps", "4",
                      "--ensemble", "2"])
    assert code == 0
    shot = np.asarray(Image.open(out / "screenshot.png"))
    assert shot.shape[0] > 300 and shot[..., :3].std() > 10
    refine = np.asarray(Image.open(out / "refine.png"))
    assert refine.shape[0] > 300 and refine[..., :3].std() > 10
    red = (refine[..., 0] > 200) & (refine[..., 1] < 80) & (refine[..., 2] < 80)
    assert red.sum() > 20  # the tumour scribble is drawn (the random model misses tumour somewhere)
    mask = nib.load(out / "Brats18_TCIA10_637_1_diffseg_mask.nii.gz")
    source = nib.load(SAMPLE_DIR / f"{BRATS_SLICE}_t1.nii.gz")
    assert mask.shape == source.shape == (240, 240)
    np.testing.assert_array_equal(mask.affine, source.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    from napari_diffseg._gui.settings import settings_path

    assert not settings_path().exists()  # the demo leaves the user's settings alone


def test_cleanup_box_removes_islands_of_a_whole_volume_result_at_every_threshold(make_widget, qtbot, tmp_path):
    """With a model that stores a clean-up size, a whole-volume proposal (and its figures) is the
    cleaned mask at every threshold; the box turns it off and on; a lone slice is never cleaned."""
    from scipy import ndimage

    from napari_diffseg.checkpoint import read_checkpoint
    from napari_diffseg.postprocess import remove_small_components

    def parts(mask):
        return ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]

    viewer, widget = make_widget(shape=(32, 32, 4), truth=True, num_ensemble=2, keep_members=False)
    payload = read_checkpoint(widget.settings.model_path)
    payload["sampling"]["cleanup_min_voxels"] = 10**6  # every part but the largest is an island
    model = tmp_path / "cleanup.pt"
    atomic_save(payload, model)
    widget.configure(persist=False, model_path=str(model), cleanup=True)
    run_and_wait(qtbot, widget)
    state = widget.cases[CASE].result
    proposal = viewer.layers[f"{CASE} diffseg proposal"]
    raw = state.probability > state.threshold
    assert parts(raw) > 1  # random inputs: islands to remove
    np.testing.assert_array_equal(proposal.data, ld.to_display(remove_small_components(raw, 10**6)))
    assert parts(proposal.data) == 1
    assert widget.review.cleanup.enabled and "1,000,000" in widget.review.cleanup.text
    # the job's figures are of the cleaned mask, as shown
    cleaned_dice = widget.review.metrics["dice"]

    widget.review.threshold.value = 0.3
    qtbot.waitUntil(lambda: widget.review.metrics is not None, timeout=RUN_TIMEOUT_MS)
    raw = state.probability > 0.3
    np.testing.assert_array_equal(proposal.data, ld.to_display(remove_small_components(raw, 10**6)))
    widget.review.threshold.value = 0.5
    qtbot.waitUntil(lambda: widget.review.metrics is not None, timeout=RUN_TIMEOUT_MS)
    assert widget.review.metrics["dice"] == pytest.approx(cleaned_dice)

    widget.review.cleanup.value = False
    qtbot.waitUntil(lambda: widget.review.metrics is not None, timeout=RUN_TIMEOUT_MS)
    np.testing.assert_array_equal(proposal.data, ld.to_display(state.probability > 0.5))
    assert widget.current_settings().cleanup is False
    widget.review.cleanup.value = True
    assert parts(proposal.data) == 1

    # A slice run of a new case: no clean-up there.
    viewer2, widget2 = make_widget(shape=(32, 32, 4), num_ensemble=2, keep_members=False, scope="slice")
    tiny = widget2.settings.model_path
    widget2.configure(persist=False, model_path=str(model), cleanup=True)
    run_and_wait(qtbot, widget2)
    state2 = widget2.cases[CASE].result
    assert not state2.cleans_up and not widget2.review.cleanup.enabled
    assert "volumes only" in widget2.review.cleanup.text and "1,000,000" in widget2.review.cleanup.tooltip
    np.testing.assert_array_equal(viewer2.layers[f"{CASE} diffseg proposal"].data,
                                  ld.to_display((state2.probability > 0.5).astype(np.uint8)))
    # A whole-volume run of a model that stores no size: the box is off and says so.
    widget2.configure(persist=False, model_path=tiny, scope="volume")
    run_and_wait(qtbot, widget2)
    assert not widget2.cases[CASE].result.cleans_up and not widget2.review.cleanup.enabled
    assert "model stores no size" in widget2.review.cleanup.text


def test_a_model_that_stores_flips_runs_them_and_says_so(make_widget, qtbot, tmp_path):
    """A model trained with --flip_members: the widget's run mirrors every second member (other
    numbers than the same model without it, same seed) and its status line says so."""
    from napari_diffseg.checkpoint import read_checkpoint

    viewer, widget = make_widget(num_ensemble=3, keep_members=False, scope="slice")
    run_and_wait(qtbot, widget)
    plain = np.array(widget.cases[CASE].result.probability)
    assert "mirrored" not in widget.runner.status.value
    payload = read_checkpoint(widget.settings.model_path)
    payload["sampling"]["flip_members"] = True
    model = tmp_path / "flips.pt"
    atomic_save(payload, model)
    widget.configure(persist=False, model_path=str(model))
    run_and_wait(qtbot, widget)
    assert "every second on the mirrored slice" in widget.runner.status.value
    assert not np.array_equal(widget.cases[CASE].result.probability, plain)
