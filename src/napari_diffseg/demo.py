"""The main job, out of the box: napari with a BraTS sample case, the widget, and a segmentation.

    python -m napari_diffseg.demo                 # with a display: the viewer stays open
    python -m napari_diffseg.demo --headless --out diffseg-demo
        # no display needed (re-runs itself under xvfb-run when there is none): saves
        # screenshot.png of the viewer (FLAIR with the proposal's outline and the uncertainty)
        # and the result NIfTIs (mask, probability, uncertainty)
    python -m napari_diffseg.demo --refine
        # then plays a user who scribbles into the largest missed and the largest wrongly
        # included part (read off the ground truth) and presses Refine; with --headless it
        # saves refine.png while the refine is under way (docs/refine.png is made so)

It uses the bundled demo model and its default sampling settings unless told otherwise
(--model or --bundled, --flags, --steps, --ensemble, --sampler, --device, --seed). The widget's saved
settings are neither used nor changed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import DiffSegError

SAMPLES = {"slice": "brats_slice", "volume": "brats_volume", "phantom": "phantom"}
XVFB_SCREEN = "1600x1000x24"


def _has_display() -> bool:
    if sys.platform.startswith(("win", "darwin")):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _rerun_under_xvfb(argv: list[str]) -> int:
    xvfb_run = shutil.which("xvfb-run")
    if xvfb_run is None:
        raise DiffSegError(
            "no display and no xvfb-run: install Xvfb (e.g. apt-get install xvfb) or run with a display"
        )
    command = [xvfb_run, "-a", "-s", f"-screen 0 {XVFB_SCREEN}", sys.executable, "-m", "napari_diffseg.demo",
               *argv, "--headless"]
    return subprocess.call(command)


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_model_path_flags

    parser = argparse.ArgumentParser(
        prog="python -m napari_diffseg.demo",
        description="Open napari with a BraTS sample case and the diffusion-segmentation widget, and segment it.",
    )
    parser.add_argument("--out", default="diffseg-demo", help="folder for screenshot.png and the result NIfTIs")
    parser.add_argument("--headless", action="store_true",
                        help="save the screenshot and results, then quit (implied when there is no display)")
    parser.add_argument("--sample", choices=sorted(SAMPLES), default="slice",
                        help="the BraTS slice (default), the 16-slice BraTS volume, or the synthetic phantom")
    add_model_path_flags(parser, dest="model")
    parser.add_argument("--flags", default="", help="model flags JSON for a reference checkpoint")
    parser.add_argument("--steps", default="model default", help="respacing, e.g. 50 or ddim25")
    parser.add_argument("--ensemble", type=int, default=None, help="ensemble size (default: the model's)")
    parser.add_argument("--sampler", choices=["", "ddpm", "ddim"], default="")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--region", choices=["wt", "tc", "et"], default=None,
                        help="a region model's region whose uncertainty is shown (default: WT)")
    parser.add_argument("--refine", action="store_true",
                        help="after the run, scribble where the proposal is most wrong (from the ground truth) "
                             "and refine; headless: save refine.png mid-refine")
    return parser


def _process_events_until(app, done, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            return False
        app.processEvents()
        time.sleep(0.02)
    return True


def _close_toasts(window) -> None:
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in window.findChildren(NapariQtNotification):
            toast.close()
    except Exception:  # only cosmetic
        pass


def _save_results(widget, out: Path) -> list[Path]:
    from . import _layerdata as ld
    from .data import save_nifti

    case = widget.cases.current
    state = case.result
    meta = case.reference.metadata or {}
    affine = meta.get(ld.AFFINE)
    header = meta.get(ld.HEADER)
    if affine is None:
        return []
    stem = (state.case or "case").replace(" ", "_")
    written = []
    if state.multi_region:  # as diffseg-sample writes a region model's result: a label map, maps per region
        files = [("labels", state.mask(), "uint8")]
        for i, region in enumerate(state.regions):
            files += [(f"probability_{region}", state.probability[i], "float32"),
                      (f"uncertainty_{region}", state.variance[i], "float32")]
    else:
        files = [("mask", state.mask(), "uint8"), ("probability", state.probability, "float32"),
                 ("uncertainty", state.variance, "float32")]
    for what, array, dtype in files:
        path = out / f"{stem}_diffseg_{what}.nii.gz"
        save_nifti(path, array, affine, header=header, dtype=dtype)
        written.append(path)
    return written


def show_overlay(viewer, widget, region: str | None = None) -> None:
    """The view a reader of MR knows: FLAIR, the proposal as an outline, the uncertainty heatmap
    (with its colour scale; a region model's of ``region``, else its WT) and the ground truth as
    a thin outline (white beside a region model's BraTS-coloured proposal); the other layers hidden."""
    from napari.utils.colormaps import DirectLabelColormap

    from . import _layerdata as ld

    if region is not None:
        widget.review.region.value = region
    case = widget.cases.current_name
    for layer in viewer.layers:
        kind = (layer.metadata or {}).get(ld.KIND)
        layer.visible = kind in ("flair", "proposal", "uncertainty", "seg") and (
            kind == "flair" or (layer.metadata or {}).get(ld.CASE, "") == (case or ""))
        if kind == "proposal":
            layer.contour = 2
            layer.opacity = 1.0
        if kind == "seg":
            layer.contour = 1
            if widget.cases.current.result.multi_region:  # the proposal's BraTS colours alone: the expert's in white
                layer.colormap = DirectLabelColormap(color_dict={None: (1.0, 1.0, 1.0, 1.0), 0: (0, 0, 0, 0)})
    viewer.reset_view()
    # The groups scroll in a side dock: bring the Review group's Dice into view.
    widget._scroll.ensureWidgetVisible(widget.review.metrics_label.native)


def simulated_scribbles(truth, probability, width: int = 2, min_pixels: int = 20):
    """Scribbles a user might draw (display order, 1 = tumour, 2 = not tumour): a short stroke
    through the middle of the largest tumour part the ensemble mean misses (< 0.5) and of the
    largest non-tumour part some members include (> 0.2), each along the row where that part is
    thickest."""
    import numpy as np
    from scipy import ndimage

    from .refine import SCRIBBLE_BACKGROUND, SCRIBBLE_TUMOUR

    truth = np.asarray(truth) > 0
    probability = np.asarray(probability)
    marks = np.zeros(truth.shape, np.uint8)
    for label, error in ((SCRIBBLE_TUMOUR, truth & (probability < 0.5)),
                         (SCRIBBLE_BACKGROUND, ~truth & (probability > 0.2))):
        parts, count = ndimage.label(error)
        if count == 0:
            continue
        sizes = ndimage.sum_labels(error, parts, index=np.arange(1, count + 1))
        biggest = parts == int(np.argmax(sizes)) + 1
        if biggest.sum() < min_pixels:
            continue
        depth = ndimage.distance_transform_edt(biggest)
        row, _ = np.unravel_index(int(np.argmax(depth)), depth.shape)
        band = np.zeros_like(biggest)
        band[max(0, row - width): row + width + 1] = True
        # Keep off the part's edge, as a careful stroke would.
        marks[band & (depth >= min(2.0, depth.max()))] = label
    return marks


def _refine_demo(viewer, widget) -> bool:
    """Scribble where the proposal is most wrong and start a refine; False without ground truth
    (or on a volume: the demo refines slices)."""
    import numpy as np

    from . import _layerdata as ld

    truth = widget.pickers.truth_picker.value
    case = widget.cases.current
    state = None if case is None else case.result
    if truth is None or state is None or state.is_volume:
        return False
    widget.refine_tools.scribble()
    scribbles = widget.layers.find("scribbles", case.name)
    marks = simulated_scribbles(truth.data, ld.to_display(state.probability))
    if marks.shape != scribbles.data.shape:
        return False
    scribbles.data = marks
    for layer in viewer.layers:
        kind = (layer.metadata or {}).get(ld.KIND)
        if kind == "uncertainty":
            layer.visible = False  # the preview and the hint read better without the heatmap
        if kind == "hint":
            layer.visible = True
    rows, cols = np.nonzero(np.asarray(truth.data) > 0)
    if rows.size:  # close in on the tumour
        centre = np.array([rows.mean(), cols.mean()])
        viewer.scene.camera.center = tuple(np.asarray(truth.translate) + centre * np.asarray(truth.scale))
        viewer.scene.camera.zoom *= 1.6
    widget.refine()
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if not _has_display():
            return _rerun_under_xvfb([a for a in argv if a != "--headless"])
        return _run(args)
    except DiffSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from . import _layerdata as ld
    from .checkpoint import read_checkpoint
    from .cli import model_path_from_args

    model = model_path_from_args(args, dest="model")  # the bundled model missing: says so, names the fix
    if args.region is not None and read_checkpoint(model).get("regions", "wt") == "wt":
        raise DiffSegError(f"--region {args.region}: {args.model or 'the bundled model'} segments the whole tumour "
                           "only; leave --region out, or run a region model (--bundled brats, or a checkpoint of "
                           "diffseg-train --regions brats)")
    out = Path(args.out)
    viewer = napari.Viewer(title="napari-diffseg demo", show=True)
    if args.headless:
        viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample("napari-diffseg", SAMPLES[args.sample])
    # Docked as napari docks a plugin's widget (the Plugins menu, `napari -w`): through the manifest.
    _, widget = viewer.window.add_plugin_dock_widget("napari-diffseg", "Diffusion segmentation")
    widget.persist_settings = False  # the demo's choices are not the user's
    settings = {"model_path": args.model or "", "bundled_model": args.bundled or "wt", "flags_path": args.flags,
                "steps": args.steps, "sampler": args.sampler, "device": args.device, "seed": args.seed,
                "scope": "volume", "keep_members": False, "threshold": 0.5}
    if args.ensemble is not None:
        settings["num_ensemble"] = args.ensemble
    else:  # loaded into the widget's model cache: its run finds it there
        segmenter = widget.runner.cache.get(str(model), args.flags or None, args.device)
        settings["num_ensemble"] = int(segmenter.defaults["num_ensemble"])
    widget.configure(persist=False, **settings)
    app = QApplication.instance()
    started = time.monotonic()
    widget.run()
    if not args.headless:
        if widget.runner.worker is not None:  # after the widget has shown the result
            def shown(*_):
                show_overlay(viewer, widget, args.region)
                if args.refine:
                    QTimer.singleShot(500, lambda: _refine_demo(viewer, widget))  # after the run's end

            widget.runner.worker.returned.connect(shown)
        napari.run()
        return 0
    _process_events_until(app, lambda: not widget.running, timeout=3600)
    errors = [text for severity, text in widget.messages if severity == "error"]
    if errors or widget.cases.current is None:
        raise DiffSegError(errors[-1] if errors else "the segmentation did not finish")
    out.mkdir(parents=True, exist_ok=True)
    written = _save_results(widget, out)
    show_overlay(viewer, widget, args.region)
    _close_toasts(viewer.window._qt_window)
    settle = time.monotonic() + 0.5  # let the canvas redraw
    _process_events_until(app, lambda: time.monotonic() > settle, timeout=5)
    screenshot = out / "screenshot.png"
    viewer.screenshot(str(screenshot), canvas_only=False)
    written.append(screenshot)
    uncertainty = [layer.name for layer in viewer.layers
                   if layer.visible and (layer.metadata or {}).get(ld.KIND) == "uncertainty"]
    print("screenshot shows " + (", ".join(uncertainty) or "no uncertainty layer"))
    print(f"{widget.runner.status.value} ({time.monotonic() - started:.1f} s including the model load)")
    if widget.review.metrics_label.value:
        print(widget.review.metrics_label.value)
    if args.refine:
        written.extend(_headless_refine(viewer, widget, app, out))
    for path in written:
        print(f"wrote {path}")
    viewer.close()
    return 0


def _headless_refine(viewer, widget, app, out: Path) -> list[Path]:
    """Refine as a user would and save refine.png half-way through it."""
    if not _refine_demo(viewer, widget):
        raise DiffSegError("--refine needs a 2D sample with its ground truth to play the user's scribbles")
    shot = out / "refine.png"
    taken: list[Path] = []

    def capture(progress) -> None:
        # In the progress slot itself (after the widget's own, which drew the preview): waiting
        # in the event loop instead could let a fast refine end and its preview go first.
        if not taken and progress.step >= max(1, progress.total // 2):
            _close_toasts(viewer.window._qt_window)
            viewer.screenshot(str(shot), canvas_only=False)
            taken.append(shot)

    if widget.runner.worker is None:
        raise DiffSegError("the refine did not start: " + widget.runner.status.value)
    widget.runner.worker.yielded.connect(capture)
    _process_events_until(app, lambda: not widget.running, timeout=3600)
    errors = [text for severity, text in widget.messages if severity == "error"]
    if errors or not taken:
        raise DiffSegError(errors[-1] if errors else "the refine ended before its preview could be captured")
    print(widget.runner.status.value)
    return taken


if __name__ == "__main__":
    raise SystemExit(main())
