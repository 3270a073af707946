"""How much the 15-slice figures move with the sampling seed alone: each model, each seed, the
same slices, 5 members at the model's preset (Segmenter.run + evaluate.score_case, as
diffseg-eval scores them). A difference between two models smaller than this spread says little.

    python scripts/seed_spread.py MODEL[,MODEL...] SEED[,SEED...] OUT.json [--data_dir runs/val_slices]
"""
import argparse
import json

import numpy as np

from napari_diffseg import data
from napari_diffseg.evaluate import score_case, summarise
from napari_diffseg.inference import Segmenter, run_to_end
from napari_diffseg.options import SamplingOptions

KEYS = ("dice_ensemble", "dice_single_mean", "auroc_variance_error", "hd95")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models")
    parser.add_argument("seeds")
    parser.add_argument("out")
    parser.add_argument("--data_dir", default="runs/val_slices")
    args = parser.parse_args()
    cases = [data.load_case(f) for f in data.find_cases(args.data_dir)]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for path in args.models.split(","):
        segmenter = Segmenter.load(path, precision="auto")
        per_seed = []
        for seed in seeds:
            rows = []
            for case in cases:
                run = run_to_end(segmenter.run(case.images, SamplingOptions(num_ensemble=5, seed=seed),
                                               preview_interval=None))
                rows.append(score_case(run.samples, case.label.astype(bool), case.voxel_size))
            summary = summarise(rows)
            summary["empty"] = sum(r["empty_tumour_slices"] for r in rows)
            summary["per_slice_dice"] = [round(r["dice_ensemble"], 3) for r in rows]
            per_seed.append(summary)
            print(f"{path} seed {seed}: Dice {summary['dice_ensemble']:.4f}, "
                  f"AUROC {summary['auroc_variance_error']:.4f}, empty {summary['empty']}", flush=True)
        results[path] = {key: [round(s[key], 4) for s in per_seed] for key in KEYS}
        results[path]["empty"] = [s["empty"] for s in per_seed]
        results[path]["per_slice_dice"] = [s["per_slice_dice"] for s in per_seed]
        print(path, {key: f"{np.mean(results[path][key]):.4f} +- {np.std(results[path][key]):.4f}" for key in KEYS})
    with open(args.out, "w") as handle:
        json.dump({"seeds": seeds, "data_dir": args.data_dir, "models": results}, handle, indent=1)


if __name__ == "__main__":
    main()
