"""A region model's speed against the whole-tumour model's, side by side in one run (issue 26).

The bar: in the widget's path, a region model (WT, TC, ET: three mask channels in and out) is no
slower than 1.3x the whole-tumour model of the same network, for a 5-member current slice and
for a whole volume. The models are the two bundled ones (whole tumour, and WT, TC, ET); where the
region model is not installed, or with --twin, the region model is the whole-tumour model's
network with three mask channels (random weights: the arithmetic, and so the time, does not
depend on them). Both run through ``_gui.job.run_job``, the worker's code, on one BraTS volume,
with a fixed batching (so that a probe does not time one and not the other), alternating model by
model, and each figure is the best of its repeats.

    .venv/bin/python benchmarks/bench_regions.py [--case DIR] [--repeats 3] [--no_volume] [--twin] [--quick]

It prints one JSON line with the seconds and the ratios (region / whole tumour). Timings taken
while another job runs on the machine mean nothing; the ratio, measured alternately, means more,
but retake it on an idle machine before quoting it. --quick: tiny networks on a random volume
(checks the script only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import _common as common

CASE = common.REPO.parent / "shared" / "brats18" / "Brats18_2013_2_1"
ENSEMBLE = 5


def _region_twin(whole_path: Path | None, out: Path) -> Path:
    """The whole-tumour model's network with three mask channels, stored as a region model."""
    from napari_diffseg.checkpoint import atomic_save, load_model, make_payload
    from napari_diffseg.unet import UNet

    loaded = load_model(whole_path)
    config = loaded.unet_config
    twin = type(config)(**{**config.__dict__, "in_channels": config.in_channels + 2, "mask_channels": 3})
    torch.manual_seed(0)
    model = UNet(twin)
    atomic_save(make_payload(twin, loaded.diffusion_config, loaded.geometry, {"model": model.state_dict()},
                             sampling=dict(loaded.sampling), regions="brats", inputs=loaded.inputs.to_dict()),
                out)
    return out


def _inputs(images: np.ndarray, spacing):
    """The widget's Inputs of a (4, X, Y, Z) volume, display order, no truth (timing only)."""
    from napari_diffseg import _layerdata as ld
    from napari_diffseg._gui.inputs import Inputs

    arrays = [np.ascontiguousarray(ld.to_display(m)) for m in images]
    return Inputs(arrays, 3, arrays[0].shape, "bench", None, spacing=tuple(spacing))


def _time(model: str, inputs, z: int | None, settings) -> float:
    from napari_diffseg._gui.job import RunRequest, run_job

    request = RunRequest(inputs, settings.updated(model_path=model), z, keep_members=False, keep_samples=z is not None)
    began = time.perf_counter()
    job = run_job(request)
    while True:
        try:
            next(job)
        except StopIteration:
            break
    return time.perf_counter() - began


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=CASE)
    parser.add_argument("--repeats", type=int, default=3, help="5-member slice runs per model (the best counts)")
    parser.add_argument("--no_volume", action="store_true", help="skip the whole-volume runs")
    parser.add_argument("--twin", action="store_true",
                        help="time the whole-tumour network with three mask channels instead of the bundled region model")
    parser.add_argument("--quick", action="store_true", help="tiny models on a random volume: checks the script")
    args = parser.parse_args(argv)

    os.environ.setdefault("NAPARI_DIFFSEG_BATCHING", "20")  # fixed: a probe would time one model only
    from napari_diffseg import data
    from napari_diffseg._gui.settings import Settings
    from napari_diffseg.checkpoint import BUNDLED_MODELS, installed_bundled_models

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.quick:
            sys.path.insert(0, str(common.REPO / "tests"))
            from gui_support import save_tiny_checkpoint

            whole = str(save_tiny_checkpoint(tmp / "whole.pt"))
            rng = np.random.default_rng(0)
            images, spacing = rng.random((4, 32, 32, 4)).astype(np.float32), (1.0, 1.0, 1.0)
        else:
            if not args.case.is_dir():
                raise SystemExit(f"{args.case}: no such case folder (the shared BraTS data); give --case DIR")
            whole = ""  # the bundled model
            case = data.load_case(data.find_cases(args.case)[0])
            images, spacing = case.images, case.voxel_size
        twin = args.quick or args.twin or "brats" not in installed_bundled_models()
        region = str(_region_twin(Path(whole) if whole else None, tmp / "regions.pt") if twin else BUNDLED_MODELS["brats"])
        inputs = _inputs(images, spacing)
        brain = data.brain_slices(images)
        z = brain[len(brain) // 2]
        settings = Settings(num_ensemble=ENSEMBLE, device="cpu", precision="auto", seed=0, scope="slice")
        models = {"whole_tumour": whole, "regions": region}
        for path in models.values():  # load both (cached) and warm them up before any timing
            _time(path, inputs, z, settings)
        slice_s = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, path in models.items():
                slice_s[name].append(_time(path, inputs, z, settings))
        result = {"cpu": common.cpu_name(), "case": "random (quick)" if args.quick else args.case.name,
                  "region_model": "twin (random weights)" if twin else "bundled",
                  "slice_z": int(z), "ensemble": ENSEMBLE, "threads": torch.get_num_threads(),
                  "slice_s": {name: min(times) for name, times in slice_s.items()},
                  "slice_repeats_s": slice_s}
        result["slice_ratio"] = result["slice_s"]["regions"] / result["slice_s"]["whole_tumour"]
        if not args.no_volume:
            volume_s = {name: _time(path, inputs, None, settings.updated(scope="volume"))
                        for name, path in models.items()}
            result["volume_s"] = volume_s
            result["volume_ratio"] = volume_s["regions"] / volume_s["whole_tumour"]
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
