"""Simulated clinician: scribbles steer the diffusion sampler (the protocol of interactive
segmentation papers), against the same scribbles painted by hand without resampling.

On each labelled slice: start from the ensemble's mask (round 0). Each round puts one scribble,
a disk of ``--radius`` pixels, at the centre of the largest error region of the current mask
(the point of it farthest from its border): a missed region gets a tumour scribble, a false
one a not-tumour scribble. Then

* **refine**: the slice is resampled with every scribble so far as known pixels, starting from
  the current members noised to ``--start_step`` (``Segmenter.run(known_mask=..., init=...)``);
  With ``--region_margin M`` the user also draws a box around the error region (M pixels beyond
  it) and only the box is resampled: outside it the current mask is kept (the widget's Region);
* **by hand**: the scribbled pixels alone overwrite the current mask, nothing is resampled.

Each row gets its scribbles from its own errors. Reported: Dice after 0, 1, 3 and 5 rounds,
NoC@85 and NoC@90 (rounds until Dice reaches 0.85 / 0.90, 0 if it starts there, capped at
``--max_rounds`` when never reached) and the seconds per refine round.

    python benchmarks/bench_interactive.py [--data_dir runs/val_slices] [--json out.json]
    python benchmarks/bench_interactive.py --quick      # phantoms and a tiny random model: checks the script
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, fmt, make_parser, start, table, write_json

from napari_diffseg import data, metrics
from napari_diffseg.clicks import NOT_TUMOUR, TUMOUR, largest_error, next_click

THRESHOLDS = (0.85, 0.90)
REPORT_ROUNDS = (0, 1, 3, 5)


def region_box(region: np.ndarray, margin: int) -> np.ndarray:
    """The bounding box of ``region`` grown by ``margin`` pixels: the rectangle a user draws
    around the error to refine only there (the widget's Region)."""
    ys, xs = np.nonzero(region)
    box = np.zeros(region.shape, bool)
    box[max(0, ys.min() - margin) : ys.max() + margin + 1, max(0, xs.min() - margin) : xs.max() + margin + 1] = True
    return box


def rounds_to(dices: list[float], threshold: float, cap: int) -> int:
    for k, value in enumerate(dices):
        if value >= threshold:
            return k
    return cap


def simulate(segmenter, images: np.ndarray, truth: np.ndarray, args) -> dict:
    from napari_diffseg.refine import known_pixels
    from napari_diffseg.inference import run_to_end
    from napari_diffseg.options import Guidance, SamplingOptions

    start = run_to_end(segmenter.run(images, SamplingOptions(num_ensemble=args.ensemble, seed=args.seed),
                                     preview_interval=None))
    first = start.mask.astype(bool)
    rows = {}
    for mode in ("refine", "by_hand"):
        mask, members = first.copy(), start.samples
        marks = np.zeros(truth.shape, np.uint8)
        dices, seconds = [metrics.dice(mask, truth)], []
        for _ in range(args.max_rounds):
            mark = next_click(mask, truth, args.radius)
            if mark is None:  # perfect: every later round scores the same
                dices.append(dices[-1])
                continue
            disk, value = mark
            box = None if args.region_margin is None else region_box(largest_error(mask, truth)[0], args.region_margin)
            marks[disk] = TUMOUR if value else NOT_TUMOUR
            if mode == "by_hand":
                scribbled = known_pixels(marks)
                mask = np.where(scribbled.mask, scribbled.values > 0.5, mask)
            else:
                # the widget's rule: outside a drawn region the current mask stays, the marks win
                known = known_pixels(marks, segmentation=mask, region=box)
                t0 = time.perf_counter()
                options = SamplingOptions(num_ensemble=args.ensemble, respacing=args.refine_respacing,
                                          seed=args.seed + len(dices))
                guidance = Guidance(known_mask=known.mask, known_values=known.values, marks=marks, init=members,
                                    start_step=args.start_step, resample=args.resample)
                result = run_to_end(segmenter.run(images, options, guidance, preview_interval=None))
                seconds.append(time.perf_counter() - t0)
                mask, members = result.mask.astype(bool), result.samples
            dices.append(metrics.dice(mask, truth))
        rows[mode] = {"dice": dices, "seconds_per_round": seconds}
    return rows


def summarise(per_slice: list[dict], cap: int) -> dict:
    summary = {}
    for mode in ("refine", "by_hand"):
        dice = np.array([s[mode]["dice"] for s in per_slice])  # (slices, rounds + 1)
        seconds = [x for s in per_slice for x in s[mode]["seconds_per_round"]]
        summary[mode] = {
            **{f"dice_{k}": float(dice[:, k].mean()) for k in REPORT_ROUNDS if k < dice.shape[1]},
            **{f"noc{int(t * 100)}": float(np.mean([rounds_to(list(d), t, cap) for d in dice])) for t in THRESHOLDS},
            "seconds_per_round": float(np.median(seconds)) if seconds else None,
        }
    return summary


def _quick_setup(tmp: Path):
    """Three phantoms and a tiny random checkpoint: seconds, figures meaningless."""
    import torch

    from napari_diffseg import checkpoint, synthetic
    from napari_diffseg.diffusion import DiffusionConfig
    from napari_diffseg.geometry import Geometry
    from napari_diffseg.unet import UNet, UNetConfig

    synthetic.write_phantoms(tmp / "cases", n=2, seed=3, size=64)
    config = UNetConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                        attention_resolutions="", num_heads=1, learn_sigma=True, norm_groups=8)
    torch.manual_seed(0)
    model = UNet(config)
    path = tmp / "tiny.pt"
    checkpoint.atomic_save(checkpoint.make_payload(
        config, DiffusionConfig(predict_xstart=True), Geometry(crop_border=0, resize_to=32),
        {"model": model.state_dict()},
        sampling={"timestep_respacing": "6", "sampler": "ddpm", "num_ensemble": 3, "clip_range": [0.0, 1.0]}), path)
    return tmp / "cases", path


def main(argv=None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--data_dir", default=str(REPO / "runs" / "val_slices"),
                        help="labelled 2D slices (scripts/make_val_slices.py writes the 15 validation slices of the "
                        "earlier models' split, which the bundled seventh model trained on; "
                        "../shared/seed-data/data/training holds 6 that no model saw)")
    parser.add_argument("--model_path", default=None, help="checkpoint (default: the bundled model)")
    parser.add_argument("--ensemble", type=int, default=5, help="members per slice (default 5)")
    parser.add_argument("--start_step", type=int, default=None,
                        help="respaced step a refine starts from (default: the middle of the model's preset chain)")
    parser.add_argument("--radius", type=int, default=3, help="scribble disk radius in pixels (default 3)")
    parser.add_argument("--region_margin", type=int, default=None,
                        help="refine only inside a box drawn around the error region, this many pixels beyond "
                        "it, the current mask kept outside (the widget's Region; default: the whole slice)")
    parser.add_argument("--resample", type=int, default=1,
                        help="RePaint resampling: each refine step done this many times (default 1: off)")
    parser.add_argument("--max_rounds", type=int, default=10, help="rounds per slice, the NoC cap (default 10)")
    parser.add_argument("--precision", default="auto", help="auto (default), fp32 or bf16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device, info = start(args, "interactive refinement")

    from napari_diffseg.refine import refine_chain
    from napari_diffseg.inference import Segmenter

    with tempfile.TemporaryDirectory() as tmp:
        data_dir, model_path = (_quick_setup(Path(tmp)) if args.quick else (args.data_dir, args.model_path))
        if args.quick:
            args.max_rounds = min(args.max_rounds, 3)
        segmenter = Segmenter.load(model_path, device=device, precision=args.precision)
        # The refine's chain and start step as the widget's Refine picks them.
        args.refine_respacing, steps, start_step = refine_chain(segmenter)
        if args.start_step is None:
            args.start_step = start_step  # half the chain: start_step + 1 steps a round
        cases = [c for c in data.find_cases(data_dir) if c.seg is not None]
        if not cases:
            print(f"error: {data_dir}: no labelled slices; run scripts/make_val_slices.py first", file=sys.stderr)
            return 2
        per_slice = []
        for files in cases:
            case = data.load_case(files)
            images = case.images if not case.is_volume else case.images[..., case.images.shape[-1] // 2]
            truth = (case.label if not case.is_volume else case.label[..., case.label.shape[-1] // 2]).astype(bool)
            rows = simulate(segmenter, images, truth, args)
            per_slice.append({"case": case.name, **rows})
            print(f"{case.name}: refine {' '.join(f'{d:.3f}' for d in rows['refine']['dice'][:6])} | "
                  f"by hand {' '.join(f'{d:.3f}' for d in rows['by_hand']['dice'][:6])}", file=sys.stderr)
    summary = summarise(per_slice, args.max_rounds)
    print(f"{len(per_slice)} slices, {args.ensemble} members, refine chain {steps} steps, refine from step "
          f"{args.start_step} ({args.start_step + 1} steps a round, resample {args.resample}), scribble radius {args.radius} px, "
          f"{'whole slice' if args.region_margin is None else f'region = error box + {args.region_margin} px'}, "
          f"precision {segmenter.precision}, rounds capped at {args.max_rounds}")
    header = ["mode", *[f"Dice@{k}" for k in REPORT_ROUNDS], "NoC@85", "NoC@90", "s/round"]
    rows = [[mode, *[fmt(row.get(f"dice_{k}"), ".3f") for k in REPORT_ROUNDS], fmt(row["noc85"], ".2f"),
             fmt(row["noc90"], ".2f"), fmt(row["seconds_per_round"], ".2f")] for mode, row in summary.items()]
    print(table(rows, header))
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    print(write_json({"machine": info, "settings": settings, "steps": steps, "summary": summary,
                      "slices": per_slice}, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
