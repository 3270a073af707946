"""Plot the training curves of the demo model and the U-Net baseline from their progress CSVs.

    python scripts/plot_training.py [--demo docs/evaluation/training_progress.csv]
        [--baseline docs/evaluation/baseline_training_progress.csv] [--out docs/evaluation/training_curves.png]

diffseg-train writes progress.csv (one row per log interval; val_loss on save steps only).
"""

import argparse
import csv
from pathlib import Path

from napari_diffseg.evaluate import _pyplot, _save_figure


def read_progress(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Column name -> [(step, value)] for every non-empty cell."""
    columns: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = float(row["step"])
            for name, value in row.items():
                if name != "step" and value not in ("", None):
                    columns.setdefault(name, []).append((step, float(value)))
    return columns


def plot_curves(axes, columns: dict, names: list[str], title: str) -> None:
    for name in names:
        if name in columns:
            steps, values = zip(*columns[name])
            axes.plot(steps, values, "o-" if name == "val_loss" else "-", ms=3, lw=1, label=name)
    axes.set_yscale("log")
    axes.set_xlabel("training step")
    if "lr" in columns:  # the schedule, on its own linear axis
        steps, values = zip(*columns["lr"])
        twin = axes.twinx()
        twin.plot(steps, values, "k--", lw=0.8, label="lr")
        twin.set_ylabel("learning rate", fontsize=8)
        twin.tick_params(labelsize=7)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("docs/evaluation/training_progress.csv"))
    parser.add_argument("--baseline", type=Path, default=Path("docs/evaluation/baseline_training_progress.csv"))
    parser.add_argument("--out", type=Path, default=Path("docs/evaluation/training_curves.png"))
    args = parser.parse_args()
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    figure.subplots_adjust(wspace=0.45)
    demo = read_progress(args.demo)
    plot_curves(left, demo, ["loss", "mse", "vb", "x0_loss", "val_loss"],
                "diffusion model (MSE on x0 + VB + Dice/BCE on x0; val: fixed t and noise)")
    left.set_ylabel("loss")
    plot_curves(right, read_progress(args.baseline), ["loss", "bce", "dice_loss", "val_loss"],
                "U-Net baseline (BCE + soft Dice)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(figure, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
