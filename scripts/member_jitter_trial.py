"""Does giving each ensemble member its own view of the slice make the variance flag the
errors better? Each member is sampled on its own (its own seed), optionally after a test-time
intensity jitter (the training augmentation's gamma and gain), a left-right flip (undone on
its mask), or by another checkpoint (members taken from the models in turn). Scored on the
15 held-out slices as diffseg-eval scores them (5 members, each model's preset), beside the
AUROC of the ensemble mean's p(1 - p).

    python scripts/member_jitter_trial.py MODEL[,MODEL...] VARIANT[,VARIANT...] OUT.json
VARIANT: plain, intensity, flip, intensity+flip (member 0 always sees the slice unchanged).
"""
import argparse
import json

import numpy as np
import torch

from napari_diffseg import augment, data, metrics
from napari_diffseg.evaluate import score_case, summarise
from napari_diffseg.inference import Segmenter, run_to_end
from napari_diffseg.options import SamplingOptions

KEYS = ("dice_ensemble", "dice_single_mean", "auroc_variance_error", "auroc_mixture_p1p", "hd95")


def member(segmenter: Segmenter, images: np.ndarray, k: int, variant: str, seed: int) -> np.ndarray:
    view = torch.from_numpy(np.asarray(images, np.float32))[None]
    if "intensity" in variant and k > 0:
        view = augment.jitter_intensity(view, np.random.default_rng(1000 + seed))
    flipped = "flip" in variant and k % 2 == 1
    if flipped:
        view = view.flip(-2)
    run = run_to_end(segmenter.run(view[0].numpy(), SamplingOptions(num_ensemble=1, seed=seed), preview_interval=None))
    return run.samples[0][::-1] if flipped else run.samples[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models")
    parser.add_argument("variants")
    parser.add_argument("out")
    parser.add_argument("--data_dir", default="runs/val_slices")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--first_seed", type=int, default=0, help="member k is drawn with seed first_seed + k")
    args = parser.parse_args()
    cases = [data.load_case(f) for f in data.find_cases(args.data_dir)]
    segmenters = [Segmenter.load(path, precision="auto") for path in args.models.split(",")]
    results = {"models": args.models.split(","), "members": args.members, "first_seed": args.first_seed}
    for variant in args.variants.split(","):
        rows = []
        for case in cases:
            members = np.stack([member(segmenters[k % len(segmenters)], case.images, k, variant,
                                       args.first_seed + k)
                                for k in range(args.members)])
            truth = case.label.astype(bool)
            rows.append(score_case(members, truth, case.voxel_size))
            # The mixture's own Bernoulli variance p(1 - p) = member variance + mean member m(1 - m):
            # with soft members it also counts what each member is unsure of.
            mean = members.mean(0)
            rows[-1]["auroc_mixture_p1p"] = metrics.variance_error_auroc(mean * (1 - mean), mean > 0.5, truth)["neighbourhood"]
        summary = {key: summarise(rows, KEYS)[key] for key in KEYS}
        summary["per_slice_auroc"] = [round(r["auroc_variance_error"], 3) for r in rows]
        results[variant] = summary
        print(variant, {key: round(summary[key], 3) for key in KEYS}, flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
