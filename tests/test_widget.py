"""The "Diffusion segmentation" widget with a tiny random-weight model (a few steps, 32x32).

GUI tests run under Xvfb (pytest-xvfb); they wait for the worker thread with qtbot.waitUntil.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffseg import _layerdata as ld
from napari_diffseg._gui import inputs as gui_inputs
from napari_diffseg._gui.inputs import LayerInfo, case_prefix, match_layers, modality_of
from napari_diffseg._gui.job import prepare_images
from napari_diffseg._gui.results import ResultState, rank_slices
from napari_diffseg.checkpoint import atomic_save, make_payload
from napari_diffseg.diffusion import DiffusionConfig
from napari_diffseg.errors import DiffSegError
from napari_diffseg.geometry import Geometry
from napari_diffseg.unet import UNet, UNetConfig

CASE = "pat01"
AFFINE = np.array([[-1.5, 0, 0, 40.0], [0, 1.5, 0, -30.0], [0, 0, 3.0, 12.0], [0, 0, 0, 1]])
RUN_TIMEOUT_MS = 120_000


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


def _tiny_model(channels: int = 32) -> tuple[UNetConfig, UNet]:
    torch.manual_seed(0)
    config = UNetConfig(image_size=32, num_channels=channels, num_res_blocks=1, channel_mult="1,2",
                        attention_resolutions="", learn_sigma=True)
    model = UNet(config)
    torch.nn.init.normal_(model.out[2].weight, std=0.05)  # the output conv starts at zero
    return config, model


def _save_tiny(path, resize_to=None):
    config, model = _tiny_model()
    sampling = {"timestep_respacing": "5", "sampler": "ddpm", "num_ensemble": 5}
    atomic_save(make_payload(config, DiffusionConfig(), Geometry(crop_border=0, resize_to=resize_to),
                             {"model": model.state_dict()}, sampling=sampling), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny.pt")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Settings in tmp_path; one torch thread (the machine is shared; tiny models gain nothing)."""
    monkeypatch.setenv("NAPARI_DIFFSEG_CONFIG_DIR", str(tmp_path / "config"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _case_layers(shape=(32, 32), case=CASE, seed=0, truth=True):
    rng = np.random.default_rng(seed)
    images = rng.random((4, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[(slice(8, 20), slice(10, 24)) + (slice(None),) * (len(shape) - 2)] = 2
    return ld.case_layer_tuples(case, images, AFFINE, None, label if truth else None)


def _add(viewer, tuples):
    return [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in tuples]


@pytest.fixture
def make_widget(make_napari_viewer, tiny_checkpoint, qtbot):
    from napari_diffseg._gui.widget import DiffSegWidget

    made = []

    def make(shape=(32, 32), show=False, truth=False, **settings):
        viewer = make_napari_viewer(show=show)
        _add(viewer, _case_layers(shape, truth=truth))
        widget = DiffSegWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Diffusion segmentation")
        values = {"model_path": str(tiny_checkpoint), "steps": "5", "num_ensemble": 3, "keep_members": True,
                  "scope": "volume", "seed": 0}
        widget.configure(persist=False, **{**values, **settings})
        made.append(widget)
        return viewer, widget

    yield make
    for widget in made:  # never leave a worker running into the next test
        if widget.closed:  # closed with its viewer (test_lifecycle.py): nothing of it runs any more
            continue
        if widget.worker is not None:
            widget.cancel()
            qtbot.waitUntil(lambda w=widget: w.worker is None, timeout=RUN_TIMEOUT_MS)
        widget._metrics_timer.stop()
        qtbot.waitUntil(lambda w=widget: w._metrics_worker is None, timeout=RUN_TIMEOUT_MS)


def _run(qtbot, widget):
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)


def _errors_since(start: int) -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records[start:] if str(n.severity) == "error"]


def _records() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def _result_names(viewer) -> list[str]:
    return [layer.name for layer in viewer.layers if "diffseg" in layer.name]


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


def test_settings_file_is_forgiving(tmp_path):
    from napari_diffseg._gui.settings import DEFAULTS, load_settings, save_settings, settings_path

    assert load_settings() == DEFAULTS  # no file yet
    settings_path().parent.mkdir(parents=True)
    settings_path().write_text("{not json")
    assert load_settings() == DEFAULTS
    settings_path().write_text('{"num_ensemble": "many", "device": "cpu", "steps": "50 steps"}')
    assert load_settings() == {**DEFAULTS, "device": "cpu", "steps": "50 steps"}
    save_settings({**DEFAULTS, "num_ensemble": 9})
    assert load_settings()["num_ensemble"] == 9


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
    assert widget.chosen_names() == {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair",
                                     "seg": "ground truth"}  # filled from the layer names
    widget.ensemble.value = 4
    _run(qtbot, widget)
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
    state = widget.results[CASE]
    assert state.num_ensemble == 4
    np.testing.assert_array_equal(mask.data, (ld.to_display(state.probability) > 0.5).astype(np.uint8))
    np.testing.assert_allclose(ld.to_display(members.data.mean(0), 2), ld.to_display(state.probability).T,
                               atol=1e-5)
    assert widget.preview_updates >= 1  # the live preview was drawn
    assert not [name for name in _result_names(viewer) if "preview" in name]  # and removed at the end
    assert "Dice" in widget.metrics_label.value and "HD95" in widget.metrics_label.value
    assert widget.metrics is not None and 0 <= widget.metrics["dice"] <= 1

    # The proposal is an ordinary Labels layer: the writer puts it back on the source grid.
    import nibabel as nib

    from napari_diffseg._writer import write_labels

    mask.data[0, 0] = 1  # a correction painted by hand
    written = nib.load(write_labels(str(tmp_path / "mask.nii.gz"), mask.data, mask.as_layer_data_tuple()[1])[0])
    np.testing.assert_array_equal(written.affine, AFFINE.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(written.dataobj), ld.to_core(mask.data))

    # The review tools: re-threshold instantly, flip through the members.
    widget.threshold.value = 0.9
    np.testing.assert_array_equal(mask.data, (ld.to_display(state.probability) > 0.9).astype(np.uint8))
    widget.member.value = 2
    assert members.visible and viewer.dims.current_step[0] == 1

    # Running again replaces the results; the model is cached.
    loads = widget.cache.loads
    names = _result_names(viewer)
    widget.ensemble.value = 2
    _run(qtbot, widget)
    assert _result_names(viewer) == names
    assert viewer.layers[f"{CASE} diffseg members"].data.shape == (2, 32, 32)
    assert widget.cache.loads == loads


def test_volume_scope_ranking_and_current_slice(make_widget, qtbot, tmp_path):
    viewer, widget = make_widget(shape=(32, 32, 4), num_ensemble=2)
    _run(qtbot, widget)
    mask = viewer.layers[f"{CASE} diffseg proposal"]
    assert mask.data.shape == (4, 32, 32)
    np.testing.assert_allclose(mask.scale, (3.0, 1.5, 1.5))
    assert viewer.layers[f"{CASE} diffseg members"].data.shape == (2, 4, 32, 32)
    assert widget.ranking.count() == 4  # every slice, most uncertain first
    values = [float(widget.ranking.item(i).text().split()[-1]) for i in range(4)]
    assert values == sorted(values, reverse=True)
    item = widget.ranking.item(widget.ranking.count() - 1)
    widget._on_ranking_clicked(item)
    z = int(item.data(0x0100))
    assert viewer.dims.point[-3] == pytest.approx(12.0 + 3.0 * z)  # world mm of that slice

    # The current slice only: the other slices keep their result, members cover that slice.
    widget.configure(persist=False, scope="slice", num_ensemble=3)
    viewer.dims.set_point(viewer.dims.ndim - 3, 12.0 + 3.0 * 2)
    before = widget.results[CASE].probability.copy()
    _run(qtbot, widget)
    state = widget.results[CASE]
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
    qtbot.waitUntil(lambda: widget.progress_bar.native.value() >= 2, timeout=RUN_TIMEOUT_MS)
    assert widget.running and widget.cancel_button.enabled
    worker = widget.worker
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)
    assert worker.abort_requested
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10_000)
    assert [layer.name for layer in viewer.layers] == before  # no result layers, preview gone
    assert widget.progress_bar.native.value() < 400
    assert widget.run_button.enabled and "cancelled" in widget.status.value
    assert CASE not in widget.results


# ---------------------------------------------------------------------------------------------
# Bad input: a notification, a live viewer, nothing lost
# ---------------------------------------------------------------------------------------------


def _assert_refused(qtbot, viewer, widget, expected: str):
    names = [layer.name for layer in viewer.layers]
    data = [layer.data for layer in viewer.layers]
    start = _records()
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)
    errors = _errors_since(start)
    assert errors and expected in errors[-1], errors
    assert [layer.name for layer in viewer.layers] == names  # nothing added, nothing removed
    assert all(a is b for a, b in zip(data, [layer.data for layer in viewer.layers]))
    assert widget.run_button.enabled
    viewer.add_points([[1, 1]], name="still alive")  # the viewer keeps working
    viewer.layers.remove("still alive")


def test_bad_inputs_give_notifications(make_widget, qtbot):
    viewer, widget = make_widget()
    widget.set_layer("t2", None)
    _assert_refused(qtbot, viewer, widget, "no layer chosen for t2")
    widget.set_layer("t2", "t2")

    viewer.add_image(np.zeros((40, 40), np.float32) + 0.5, name="other t1ce")
    widget.set_layer("t1ce", "other t1ce")
    _assert_refused(qtbot, viewer, widget, "different shapes")
    widget.set_layer("t1ce", "t1ce")

    labels = viewer.add_labels(np.ones((32, 32), np.uint8), name="a labels layer")
    with pytest.raises(ValueError, match="a labels layer"):  # the modality pickers offer Image layers only
        widget.set_layer("flair", "a labels layer")
    with pytest.raises(DiffSegError, match="not an image"):  # and the check behind them says why
        gui_inputs.check_inputs({**widget.chosen_layers(), "flair": labels})

    holes = viewer.layers["t1"].data.copy()
    holes[3, 4] = np.nan
    viewer.add_image(holes, name="t1 with holes")
    widget.set_layer("t1", "t1 with holes")
    _assert_refused(qtbot, viewer, widget, "NaN")
    widget.set_layer("t1", "t1")

    widget.set_layer("t1ce", "t1")
    _assert_refused(qtbot, viewer, widget, "chosen for both")
    widget.set_layer("t1ce", "t1ce")

    widget.set_steps("fifty")
    _assert_refused(qtbot, viewer, widget, "fifty")
    assert not _result_names(viewer)


def test_bad_checkpoints_and_out_of_memory_give_notifications(make_widget, qtbot, tmp_path, monkeypatch,
                                                              tiny_checkpoint):
    viewer, widget = make_widget()
    config, _ = _tiny_model()
    _, other = _tiny_model(channels=64)
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
    assert "ensemble size" in widget.status.value and "cpu" in widget.status.value
    assert not _result_names(viewer)


def test_missing_demo_model_is_explained(make_widget, qtbot, monkeypatch):
    import napari_diffseg._gui.widget as widget_module

    monkeypatch.setattr(widget_module, "demo_model_available", lambda: False)
    viewer, widget = make_widget(model_path="")
    qtbot.waitUntil(lambda: any("no bundled demo model" in text for _, text in widget.messages), timeout=5000)
    assert "choose a checkpoint" in widget.model_status.value
    _assert_refused(qtbot, viewer, widget, "choose a checkpoint")


# ---------------------------------------------------------------------------------------------
# Settings and pixels
# ---------------------------------------------------------------------------------------------


def test_settings_persist_between_sessions(make_widget, tmp_path):
    from napari_diffseg._gui.settings import settings_path
    from napari_diffseg._gui.widget import DiffSegWidget

    viewer, widget = make_widget()
    widget.ensemble.value = 7
    widget.set_steps("25 steps")
    widget.model_path.value = "/some/model.pt"
    widget.device.value = "cpu"
    assert widget.precision.value == "auto"  # the default
    widget.precision.value = "fp32"
    widget.threshold.value = 0.35
    assert settings_path().parent == tmp_path / "config" and settings_path().is_file()
    again = DiffSegWidget(viewer)
    assert again.ensemble.value == 7
    assert again.respacing() == "25"
    assert again.current_settings()["model_path"] == "/some/model.pt"
    assert again.device.value == "cpu"
    assert again.precision.value == "fp32"
    assert again.threshold.value == pytest.approx(0.35)
    again.deleteLater()


def test_screenshot_of_result_is_not_blank(make_widget, qtbot):
    viewer, widget = make_widget(show=True)
    _run(qtbot, widget)
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
    model = _save_tiny(tmp_path / "tiny32.pt", resize_to=32)  # the 240x240 slice sampled at 32x32
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
