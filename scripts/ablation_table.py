"""Markdown table of diffseg-eval reports, one row per folder: the ablation's summary.

    python scripts/ablation_table.py runs/ablation            # every <row>/eval_slices/report.json
    python scripts/ablation_table.py --reports A/report.json B/report.json --names a b
"""

import argparse
import csv
import json
import re
from pathlib import Path


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def row(name: str, report: dict, steps: int | None) -> str:
    o = report["overall"]
    empty = o.get("empty_tumour_slices", sum(c.get("empty_tumour_slices", 0) for c in report["cases"]))
    return (f"| {name} | {_fmt(o['dice_ensemble'])} | {_fmt(o['dice_single_mean'])} | {_fmt(o['hd95'], 1)} | "
            f"{_fmt(o['auroc_variance_error'])} | {empty} | {steps if steps is not None else '-'} |")


def trained_steps(folder: Path) -> int | None:
    """The step the row's model.pt was saved at (its training log), else the last logged step."""
    log = folder.parent / f"{folder.name}.log"
    if log.is_file():
        found = re.findall(r"model\.pt at step (\d+)", log.read_text(errors="replace"))
        if found:
            return int(found[-1])
    progress = folder / "progress.csv"
    if not progress.is_file():
        return None
    with open(progress, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return int(float(rows[-1]["step"])) if rows else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, help="a folder of <row>/eval_slices/report.json")
    parser.add_argument("--reports", nargs="*", type=Path, default=[])
    parser.add_argument("--names", nargs="*", default=[])
    args = parser.parse_args()
    entries = []
    if args.root:
        for report in sorted(args.root.glob("*/eval_slices/report.json")):
            entries.append((report.parent.parent.name, report, trained_steps(report.parent.parent)))
    for i, report in enumerate(args.reports):
        entries.append((args.names[i] if i < len(args.names) else report.parent.name, report, None))
    print("| row | Dice (ensemble) | Dice (single) | HD95 (mm) | AUROC var-err (10 px) | empty tumour slices | steps |")
    print("|---|---|---|---|---|---|---|")
    for name, report, steps in entries:
        print(row(name, json.loads(report.read_text()), steps))


if __name__ == "__main__":
    main()
