"""A poisoned batching choice against a clean one, side by side in one run (issue 24).

A batching probe run once while the CPU was busy had stored "1 chain per call", and every later
whole-volume Run in the widget crawled (10x slower). This script plays that user on one BraTS
volume with the bundled model, in a fresh config folder of its own (yours is never touched):

1. ``diffseg-sample`` of the volume, as a user runs it (a subprocess; it probes and stores);
2. the stored entry overwritten with what a loaded probe leaves: 1 chain per call, with the
   real single-chain time and a larger batch timed 3x too dear;
3. a whole-volume Run in the widget (napari under a display: use ``xvfb-run -a`` where there
   is none), timed from Run to result, with the batching its status line showed first and last;
4. ``diffseg-sample`` again (the choice the widget left in the file).

It prints one JSON line; ``widget_vs_sample`` is the widget's time over the first sample run's
(the issue asks for at most 1.10 on an idle CPU). Timings taken while another job runs mean
nothing. --quick: the 16-slice sample volume instead of a whole case (checks the script only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common

CASE = common.REPO.parent / "shared" / "brats18" / "Brats18_2013_2_1"


def _sample(case: Path, out: Path, env: dict) -> float:
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "napari_diffseg.sample", "--data_dir", str(case), "--out_dir",
                           str(out), "--precision", "auto", "--no_progress"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"diffseg-sample failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - began


def _poison() -> dict:
    """Store 1 chain per call for the bundled model's volume scope, as a loaded probe would."""
    from napari_diffseg import batching
    from napari_diffseg.inference import Segmenter

    segmenter = Segmenter.load(None, device="cpu", precision="auto", batching="auto")
    net = segmenter.loaded.geometry.network_size(240, 240, segmenter.loaded.unet_config.size_multiple)
    timer = batching._call_timer(segmenter.model, segmenter.device, tuple(net), segmenter.precision, True)
    timer(1)
    one = 1000 * min(timer(1) for _ in range(3))
    timer(5)
    five = 1000 * min(timer(5) for _ in range(3)) / 5
    entry = batching.BatchingChoice(1, "stored", {1: one, 5: 3 * five}, capped=True)
    batching.store_batching(segmenter._stored_key((*net, segmenter.precision)), entry)
    return {"chains": 1, "ms_per_chain": entry.ms_per_chain}


def _widget_run(case: Path) -> dict:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_diffseg._reader import read_paths
    from napari_diffseg._gui.widget import DiffSegWidget

    viewer = napari.Viewer(show=False)
    for data, kwargs, kind in read_paths(str(case)):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = DiffSegWidget(viewer)
    widget.persist_settings = False
    viewer.window.add_dock_widget(widget, name="Diffusion segmentation")
    widget.configure(persist=False, scope="volume", keep_members=False, precision="auto")
    app = QApplication.instance()
    seen = []
    began = time.perf_counter()
    widget.run()
    widget.runner.worker.yielded.connect(lambda progress: seen.append(progress.batching))
    while widget.running:
        app.processEvents()
        time.sleep(0.01)
    seconds = time.perf_counter() - began
    errors = [m for s, m in widget.messages if s == "error"]
    viewer.close()
    if errors:
        raise SystemExit(f"the widget's run failed: {errors}")
    return {"seconds": round(seconds, 2), "first": seen[0] if seen else None, "last": seen[-1] if seen else None}


def main(argv=None) -> dict:
    parser = common.make_parser(__doc__)
    parser.add_argument("--case", type=Path, default=CASE, help="a BraTS case folder (default Brats18_2013_2_1)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        tmp = Path(tmp)
        case = args.case
        if args.quick:  # the bundled 16-slice volume, in a folder of its own
            from napari_diffseg._sample_data import BRATS_VOLUME, SAMPLE_DIR

            case = tmp / "case"
            case.mkdir()
            for path in SAMPLE_DIR.glob(f"{BRATS_VOLUME}_*.nii.gz"):
                (case / path.name).symlink_to(path.resolve())
        os.environ["NAPARI_DIFFSEG_CONFIG_DIR"] = str(tmp / "config")
        os.environ.pop("NAPARI_DIFFSEG_BATCHING", None)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        first = _sample(case, tmp / "a", env)
        poisoned = _poison()
        widget = _widget_run(case)
        second = _sample(case, tmp / "b", env)
        stored = json.loads((tmp / "config" / "batching.json").read_text())
    out = {"case": case.name, "load_1min_at_end": round(os.getloadavg()[0], 2), "sample_first_s": round(first, 2),
           "poisoned": poisoned, "widget": widget, "sample_after_s": round(second, 2),
           "widget_vs_sample": round(widget["seconds"] / first, 3),
           "stored_after": [entry.get("chains") for entry in stored.values()], "machine": common.machine()}
    print(common.write_json(out, args.json))
    return out


if __name__ == "__main__":
    main()
