"""Copy a diffseg-train model.pt into the package as the bundled demo model.

Keeps only the EMA weights (what inference uses), records the sampling defaults chosen
from the evaluation (over the model's own, such as its clean-up size), and the data citation:
    python scripts/export_demo_model.py runs/final/marks/model.pt --respacing 2 [--sampler ddpm] [--cases 16]
    python scripts/export_demo_model.py runs/final_regions/model.pt --respacing 2   # the region model
The file goes where the bundled model of its regions lives (checkpoint.BUNDLED_MODELS), unless --out.
"""

import argparse
from pathlib import Path

from napari_diffseg.checkpoint import BUNDLED_MODELS, MASK_CLIP_RANGE, atomic_save, read_checkpoint

CITATION = (
    "Trained on {cases} BraTS 2018 training cases. Cite: Menze et al., IEEE TMI 34(10):1993-2024, 2015; "
    "Bakas et al., Sci. Data 4:170117, 2017; Bakas et al., arXiv:1811.02629."
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--respacing", default="50")
    parser.add_argument("--sampler", default="ddpm")
    parser.add_argument("--num_ensemble", type=int, default=5)
    parser.add_argument("--cases", type=int, default=16, help="BraTS cases the model trained on (for the citation)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: the bundled model's file for the model's regions (wt or brats)")
    args = parser.parse_args()
    payload = read_checkpoint(args.model)
    out = args.out or BUNDLED_MODELS[payload.get("regions", "wt")]
    weights = payload["weights"]
    payload["weights"] = {"model": weights.get("ema") or weights["model"]}
    # the training run's stored choices (clean-up size, flips) stay; the preset is set here
    payload["sampling"] = {**payload.get("sampling", {}), "timestep_respacing": args.respacing, "sampler": args.sampler,
                           "num_ensemble": args.num_ensemble, "clip_range": list(MASK_CLIP_RANGE),
                           "clamp_variance": True}
    payload["citation"] = CITATION.format(cases=args.cases)
    payload.pop("train_args", None)
    atomic_save(payload, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) from step {payload.get('step')}")


if __name__ == "__main__":
    main()
