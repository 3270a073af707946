"""The widget around a run's edges (issue 24): closing napari during a run or right after
Cancel, review figures that always belong to the result on screen, and the batching shown in
the status line with a way to re-time it.

Tiny random-weight models (32x32) under Xvfb; fixtures in conftest.py, helpers in gui_support.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from gui_support import CASE, RUN_TIMEOUT_MS, run_and_wait

from napari_diffseg import _layerdata as ld
from napari_diffseg import batching as batching_module
from napari_diffseg._gui import models, review, workers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _start_volume(qtbot, widget, steps_before: int = 2):
    widget.run()
    qtbot.waitUntil(lambda: widget.runner.progress_steps >= steps_before, timeout=RUN_TIMEOUT_MS)
    return widget.runner.worker


def _slow_metrics(monkeypatch, seconds: float) -> None:
    """HD95 of a whole BraTS volume takes seconds on a busy CPU: so long the metrics worker runs."""
    real = review.evaluate_result

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(review, "evaluate_result", slow)


# ---------------------------------------------------------------------------------------------
# Closing napari during a run, or right after Cancel
# ---------------------------------------------------------------------------------------------


def test_closing_the_viewer_mid_run_stops_the_worker(make_widget, qtbot):
    viewer, widget = make_widget(shape=(32, 32, 8), steps="400", num_ensemble=2)
    worker = _start_volume(qtbot, widget)
    viewer.close()
    assert widget.closed and worker.abort_requested and widget.runner.worker is None
    qtbot.waitUntil(lambda: worker not in workers._LIVE_WORKERS, timeout=RUN_TIMEOUT_MS)
    qtbot.wait(100)  # whatever the worker still sent reaches no slot: no layer, no exception
    assert CASE not in widget.cases


def test_closing_the_viewer_right_after_cancel(make_widget, qtbot, monkeypatch):
    """Cancel keeps the finished slices and starts their Dice/HD95 in a second worker; napari
    closed a moment later stops both and leaves nothing running."""
    _slow_metrics(monkeypatch, 1.0)
    viewer, widget = make_widget(shape=(32, 32, 8), steps="20", num_ensemble=2, truth=True)
    worker = _start_volume(qtbot, widget, steps_before=25)  # 8 chains a call: a 4-slice batch is done
    widget.cancel()
    qtbot.waitUntil(lambda: widget.runner.worker is None, timeout=RUN_TIMEOUT_MS)
    metrics = widget.review.metrics_worker
    assert metrics is not None and "partial" in widget.runner.status.value
    viewer.close()
    assert widget.review.metrics_worker is None and widget.review.metrics is None
    # Both end (their finished signal still reaches the module's bookkeeping, not the widget).
    qtbot.waitUntil(lambda: not {worker, metrics} & workers._LIVE_WORKERS, timeout=RUN_TIMEOUT_MS)
    qtbot.wait(100)
    assert widget.review.metrics is None  # the figure never reached the closed widget


EXIT_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication
    from napari_diffseg import _layerdata as ld
    from napari_diffseg._gui import review, widget as _widget

    mode, model = sys.argv[1:3]
    rng = np.random.default_rng(0)
    label = np.zeros((32, 32, 8), np.uint8)
    label[8:20, 10:24] = 2
    viewer = napari.Viewer(show=False)
    for data, kwargs, kind in ld.case_layer_tuples("pat", rng.random((4, 32, 32, 8)).astype(np.float32),
                                                   np.eye(4), None, label):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = _widget.DiffSegWidget(viewer)
    widget.persist_settings = False
    viewer.window.add_dock_widget(widget)
    widget.configure(persist=False, model_path=model, steps="20" if mode == "cancel" else "400",
                     num_ensemble=2, scope="volume", keep_members=False)
    real = review.evaluate_result
    review.evaluate_result = lambda *a, **k: (time.sleep(3), real(*a, **k))[1]  # HD95 of a big volume
    app = QApplication.instance()

    def wait_for(done):
        end = time.monotonic() + 120
        while not done() and time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    widget.run()
    wait_for(lambda: widget.runner.progress_steps >= (25 if mode == "cancel" else 2))
    if mode == "cancel":
        widget.cancel()
        wait_for(lambda: widget.runner.worker is None)  # the partial is shown, its metrics are running
        assert widget.review.metrics_worker is not None
    viewer.close()
    print("closed", flush=True)
    sys.exit(0)  # at once, as napari does when its last window closes
""")


@pytest.mark.parametrize("mode", ["mid-run", "cancel"])
def test_the_process_exits_cleanly_when_napari_closes(mode, tiny_checkpoint, tmp_path):
    """The crash of the issue needs a real exit: the interpreter deletes the workers' signals
    while a step (or an HD95) is still running, and PyQt aborts the process on the error."""
    script = tmp_path / "close_napari.py"
    script.write_text(EXIT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), mode, str(tiny_checkpoint)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "closed" in proc.stdout, proc.stderr[-3000:]
    assert "RuntimeError" not in proc.stderr and "Aborted" not in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Review figures belong to the result on screen
# ---------------------------------------------------------------------------------------------


def _cancelled_run(qtbot, widget, slices_at_least: int, seed: int) -> int:
    widget.configure(persist=False, seed=seed)
    widget.run()
    qtbot.waitUntil(lambda: len(widget.runner.partial.finished) > slices_at_least, timeout=RUN_TIMEOUT_MS)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.runner.worker is None, timeout=RUN_TIMEOUT_MS)
    return len(widget.cases[CASE].result.slices)


def test_a_partial_result_never_shows_the_figures_of_the_one_it_replaced(make_widget, qtbot, monkeypatch):
    """Issue 24: after a second cancelled volume the review still said "Dice 1.000 HD95 0.0 mm
    (at threshold 0.50, 12 slices)", the figure of the first partial result, on slices without
    tumour. Now the old figure goes the moment the new result is shown, the new one says what it
    covers, and slices without tumour in the truth are counted apart."""
    _slow_metrics(monkeypatch, 0.5)
    viewer, widget = make_widget(shape=(32, 32, 16), steps="20", num_ensemble=2, truth=True, keep_members=False)
    truth = viewer.layers["ground truth"]
    data = truth.data.copy()
    data[:6] = 0  # display axis 0 is the slice: no tumour in slices 0-5
    truth.data = data
    first = _cancelled_run(qtbot, widget, 0, seed=0)  # 8 chains a call: 4 slices a batch
    assert first < 6  # only slices without tumour
    qtbot.waitUntil(lambda: widget.review.metrics is not None, timeout=RUN_TIMEOUT_MS)
    old = widget.review.metrics_label.value
    assert old.startswith(f"no tumour in the truth on the {first} sampled slices"), old
    assert "Dice 1.000" not in old

    second = _cancelled_run(qtbot, widget, 7, seed=1)
    assert second > first
    # Shown at once with the new partial result, before its figures are computed.
    assert widget.review.metrics is None and widget.review.metrics_label.value != old
    assert f"the {second} sampled slices: computing" in widget.review.metrics_label.value
    qtbot.waitUntil(lambda: widget.review.metrics is not None, timeout=RUN_TIMEOUT_MS)
    text = widget.review.metrics_label.value
    tumour = second - 6
    assert text.startswith("Dice ") and f"on the {tumour} of {second} sampled slices with tumour" in text, text
    assert "the other 6 are left out" in text
    assert widget.review.metrics["tumour_slices"] == tumour and widget.review.metrics["empty_slices"] == 6


def test_figures_follow_the_threshold_of_the_result_on_screen(make_widget, qtbot):
    """A whole run shown at another threshold than the job's 0.5: the job's own figures would be
    of another mask; they are recomputed at the slider's threshold."""
    viewer, widget = make_widget(shape=(32, 32, 3), steps="3", num_ensemble=2, truth=True, threshold=0.3)
    run_and_wait(qtbot, widget)
    qtbot.waitUntil(lambda: widget.review.metrics is not None, timeout=RUN_TIMEOUT_MS)
    assert "at threshold 0.30" in widget.review.metrics_label.value
    state = widget.cases[CASE].result
    expected = review.evaluate_result(state.mask(0.3), ld.to_core(viewer.layers["ground truth"].data),
                                None, state.slices)
    assert widget.review.metrics["dice"] == pytest.approx(expected["dice"])


# ---------------------------------------------------------------------------------------------
# Batching: in the status line, and re-timed on request
# ---------------------------------------------------------------------------------------------


def test_the_status_line_shows_the_batching_and_re_time_forgets_it(make_widget, qtbot, monkeypatch, fake_timer):
    monkeypatch.delenv("NAPARI_DIFFSEG_BATCHING")  # auto, as a user has it
    # timings that agree, so that the choice is stored however busy the CPU is
    fake_timer.update({n: 0.001 * (4 + n) for n in range(1, 41)})
    viewer, widget = make_widget(shape=(32, 32, 6), steps="4", num_ensemble=2)
    widget.runner.cache = models.ModelCache()  # models loaded by earlier tests keep the fixed batching
    assert "auto" in widget.sampling.batching_label.value
    seen = []
    widget.run()
    widget.runner.worker.yielded.connect(lambda _progress: seen.append(widget.runner.status.value))
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_TIMEOUT_MS)
    assert seen and "chains per call (timed now)" in seen[0] and all("chains per call (" in t for t in seen), seen
    assert "slices" in seen[-1] and "chains per call" in widget.runner.status.value  # the closing message too
    assert batching_module.batching_file().is_file()
    run_and_wait(qtbot, widget)  # the same model: the choice held in memory
    assert "chains per call (" in widget.sampling.batching_label.value and "timed now" not in widget.sampling.batching_label.value

    widget.sampling.batching_button.changed.emit(True)  # Re-time
    assert not batching_module.batching_file().exists() and "auto" in widget.sampling.batching_label.value
    assert all(not s._probed for s in widget.runner.cache._items.values())
    probes = sum(s.probes for s in widget.runner.cache._items.values())
    run_and_wait(qtbot, widget)
    assert sum(s.probes for s in widget.runner.cache._items.values()) == probes + 1
    assert batching_module.batching_file().is_file()


def test_a_cancelled_run_leaves_its_thread_as_it_found_it(make_widget, qtbot):
    """Cancel stops the job between two steps, inside torch's autocast (bf16) and inference mode.
    They are closed in the worker's own thread, which the pool hands the next job: left open, a
    later fp32 run computed in bf16 there."""
    import torch
    from napari.qt.threading import create_worker
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    threads = pool.maxThreadCount()
    pool.setMaxThreadCount(1)  # the next worker runs in the cancelled one's thread
    try:
        viewer, widget = make_widget(steps="400", num_ensemble=2, precision="bf16")
        _start_volume(qtbot, widget)
        widget.cancel()
        qtbot.waitUntil(lambda: widget.runner.worker is None, timeout=RUN_TIMEOUT_MS)
        seen = []
        create_worker(lambda: (torch.is_autocast_enabled("cpu"), torch.is_inference_mode_enabled()),
                      _connect={"returned": seen.append})
        qtbot.waitUntil(lambda: bool(seen), timeout=RUN_TIMEOUT_MS)
        assert seen == [(False, False)]
    finally:
        pool.setMaxThreadCount(threads)
