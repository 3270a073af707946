"""The reference acceptance check at full length: our sampler on the reference's small model, 100
respaced steps and 4 members on the seed slice 000246, scored by Dice against the reference's
own 1000-step samples of that slice (the mean of its 2 members > 0.5).

tests/test_cli.py runs the same check at 30 steps (seconds); this one takes about a minute on an
idle 2-core CPU, too long for every test run (issue 24). It needs ../shared/reference/small and
../shared/seed-data. --quick: 2 steps, 1 member (checks the script only; the Dice means nothing).
"""

from __future__ import annotations

import json
import time

import _common as common
import numpy as np
import torch

from napari_diffseg import data
from napari_diffseg.checkpoint import read_flags_file
from napari_diffseg.inference import Segmenter, run_to_end
from napari_diffseg.options import SamplingOptions

SMALL = common.REPO.parent / "shared" / "reference" / "small"
SLICE = common.REPO.parent / "shared" / "seed-data" / "data" / "testing" / "000246"
THRESHOLD_DICE = 0.55  # what the issue that set the check asked of 100 steps and 4 members


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def main(argv=None) -> dict:
    parser = common.make_parser(__doc__)
    parser.add_argument("--steps", default="100", help="timestep respacing (default 100)")
    parser.add_argument("--ensemble", type=int, default=4, help="members (default 4)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.ensemble = "2", 1
    device, info = common.start(args, "reference acceptance")
    segmenter = Segmenter.load(SMALL / "savedmodel000300.pt", device=device,
                               reference_flags=read_flags_file(SMALL / "flags.json"))
    case = data.load_case(data.find_case_files(SLICE))
    reference = torch.load(SMALL / "sample_reference.pt", map_location="cpu", weights_only=True)
    ref_mask = ((reference["samples"][0] + reference["samples"][1]) / 2 > 0.5)[0, 0].numpy()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        began = time.perf_counter()
        options = SamplingOptions(num_ensemble=args.ensemble, respacing=args.steps, seed=seed)
        result = run_to_end(segmenter.run(case.images, options, preview_interval=None))
        seconds = time.perf_counter() - began
        score = dice(result.mask[8:-8, 8:-8], ref_mask)  # the reference never sees the 8-pixel border
        rows.append({"seed": seed, "dice": score, "seconds": seconds,
                     "chains_per_call": result.settings["chains_per_call"]})
        verdict = "ok" if score >= THRESHOLD_DICE else f"BELOW {THRESHOLD_DICE}"
        print(f"seed {seed}: {args.ensemble} members x {result.steps} steps, Dice vs reference {score:.3f} "
              f"({verdict}), {seconds:.1f} s, {result.settings['chains_per_call']} chains per call")
    out = {"machine": info, "steps": args.steps, "ensemble": args.ensemble, "threshold": THRESHOLD_DICE,
           "rows": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
