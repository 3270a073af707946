"""The cross-validation table: one row per arm, from the per-fold reports of scripts/crossval.sh.

    .venv/bin/python scripts/crossval_table.py [--docs docs/evaluation/crossval]

Reads DOCS/<arm>/fold<k>/report.json (diffseg-eval's) and writes DOCS/table.md and
DOCS/table.json: per arm the mean +- sd over the cases of every held-out fold (each case scored
once, by the model that never saw it), and per case. An arm with fewer than 4 folds is marked so.
A region model's arm (its report scores WT, TC and ET) shows its whole tumour in the main table,
comparable with the whole-tumour arms, and every region in a table of its own.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from napari_diffseg.cli import json_safe
from napari_diffseg.files import atomic_write

FOLDS = 4
# (report key, column title, digits); the first is the one the bar reads
COLUMNS = [
    ("dice_ensemble", "3D Dice", 3),
    ("dice_single_mean", "single member", 3),
    ("hd95", "HD95 mm", 1),
    ("empty_tumour_slices", "empty tumour slices", 0),
    ("auroc_variance_error", "AUROC 10 px", 3),
    ("qubrats_variance", "QU-BraTS var.", 3),
    ("qubrats_entropy", "QU-BraTS entropy", 3),
    ("seconds", "s / volume", 0),
]


REGIONS = ("wt", "tc", "et")
# what the per-region table shows of each region
REGION_COLUMNS = [("dice_ensemble", "3D Dice", 3), ("hd95", "HD95 mm", 1), ("empty_tumour_slices", "empty slices", 0),
                  ("auroc_variance_error", "AUROC 10 px", 3), ("qubrats_variance", "QU-BraTS var.", 3),
                  ("qubrats_entropy", "QU-BraTS entropy", 3)]


def is_region_row(row: dict) -> bool:
    return "dice_ensemble_wt" in row


def region_view(row: dict, region: str) -> dict:
    """A region model's case row as a whole-tumour row of one region (its ``<key>_<region>``
    figures under the plain keys; the keys of no region as they are)."""
    out = {k: v for k, v in row.items() if not k.endswith(tuple(f"_{r}" for r in REGIONS))}
    out.update({k[: -len(region) - 1]: v for k, v in row.items() if k.endswith(f"_{region}")})
    return out


def arm_rows(arm_dir: Path) -> tuple[list[dict], list[int]]:
    rows, folds = [], []
    for fold in range(FOLDS):
        report = arm_dir / f"fold{fold}" / "report.json"
        if not report.is_file():
            continue
        folds.append(fold)
        for case in json.loads(report.read_text())["cases"]:
            rows.append({"fold": fold, **case})
    return rows, folds


def region_summaries(rows: list[dict]) -> dict | None:
    """Per region, the summary of the arm's rows seen as that region's; None for a whole-tumour arm."""
    if not rows or not is_region_row(rows[0]):
        return None
    return {region: summarise([region_view(r, region) for r in rows]) for region in REGIONS}


def _stat(values: list) -> tuple[float, float, int]:
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0, int(finite.size)


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key, _, _ in COLUMNS:
        values = [r.get(key) for r in rows]
        if key == "empty_tumour_slices":
            out[key] = {"total": int(sum(v or 0 for v in values)), "mean": _stat(values)[0]}
            continue
        mean, sd, n = _stat(values)
        out[key] = {"mean": mean, "sd": sd, "n": n}
    out["cases"] = len(rows)
    out["worst_case"] = min(rows, key=lambda r: r["dice_ensemble"])["case"] if rows else None
    out["min_dice"] = min((r["dice_ensemble"] for r in rows), default=float("nan"))
    return out


def _cell(summary: dict, key: str, digits: int) -> str:
    entry = summary[key]
    if key == "empty_tumour_slices":
        return str(entry["total"])
    if not math.isfinite(entry["mean"]):
        return "-"
    text = f"{entry['mean']:.{digits}f} +- {entry['sd']:.{digits}f}"
    if key == "hd95" and entry["n"] < summary["cases"]:
        text += f" ({summary['cases'] - entry['n']} undefined)"
    return text


def render(arms: dict[str, dict]) -> str:
    lines = ["# Cross-validation table", "",
             "16 BraTS 2018 cases, 4 folds of 4 (scripts/crossval.sh: name order, case i in fold i mod 4); each "
             "case scored once, in 3D over every brain slice, by the fold model that never saw it. Mean +- sd "
             "over cases; empty tumour slices summed. Written by scripts/crossval_table.py.", "",
             "| arm | folds | " + " | ".join(title for _, title, _ in COLUMNS) + " | lowest case |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for name, arm in arms.items():
        s = arm["summary"]
        folds = ",".join(str(f) for f in arm["folds"])
        cells = " | ".join(_cell(s, key, digits) for key, _, digits in COLUMNS)
        lowest = f"{s['worst_case']} {s['min_dice']:.3f}" if s["worst_case"] else "-"
        lines.append(f"| {name} | {folds} | {cells} | {lowest} |")
    region_arms = {name: arm for name, arm in arms.items() if arm.get("regions")}
    if region_arms:
        lines += ["", "## Per region (region models: WT labels 1, 2, 4; TC 1, 4; ET 4)", "",
                  "| arm | region | " + " | ".join(title for _, title, _ in REGION_COLUMNS) + " | lowest case |",
                  "|---" * (len(REGION_COLUMNS) + 3) + "|"]
        for name, arm in region_arms.items():
            for region, s in arm["regions"].items():
                cells = " | ".join(_cell(s, key, digits) for key, _, digits in REGION_COLUMNS)
                lowest = f"{s['worst_case']} {s['min_dice']:.3f}" if s["worst_case"] else "-"
                lines.append(f"| {name} | {region.upper()} | {cells} | {lowest} |")
    lines += ["", "## Per case (3D Dice / HD95 mm; region models: whole tumour)", ""]
    cases = sorted({r["case"] for arm in arms.values() for r in arm["rows"]})
    names = list(arms)
    lines += ["| case | fold | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for case in cases:
        cells, fold = [], "-"
        for name in names:
            row = next((r for r in arms[name]["rows"] if r["case"] == case), None)
            if row is not None and is_region_row(row):
                row = region_view(row, "wt")
            if row is None:
                cells.append("-")
                continue
            fold = str(row["fold"])
            hd = row.get("hd95")
            hd_text = f"{hd:.1f}" if hd is not None and math.isfinite(hd) else "-"
            cells.append(f"{row['dice_ensemble']:.3f} / {hd_text}")
        lines.append(f"| {case} | {fold} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="docs/evaluation/crossval", help="the folder of the per-arm reports")
    args = parser.parse_args()
    docs = Path(args.docs)
    arms = {}
    for arm_dir in sorted(p for p in docs.iterdir() if p.is_dir()):
        rows, folds = arm_rows(arm_dir)
        if rows:
            per_region = region_summaries(rows)
            whole = [region_view(r, "wt") for r in rows] if per_region else rows
            arms[arm_dir.name] = {"rows": rows, "folds": folds, "summary": summarise(whole), "regions": per_region}
    table = render(arms)
    data = json.dumps(json_safe(
        {name: {"folds": a["folds"], "summary": a["summary"], "regions": a["regions"],
                "cases": {r["case"]: ({k: r.get(k) for k, _, _ in COLUMNS} if not a["regions"] else
                                      {region: {k: region_view(r, region).get(k) for k, _, _ in COLUMNS}
                                       for region in REGIONS})
                          for r in a["rows"]}}
         for name, a in arms.items()}), indent=2) + "\n"
    atomic_write(docs / "table.md", lambda handle: handle.write(table))
    atomic_write(docs / "table.json", lambda handle: handle.write(data))
    print(table)


if __name__ == "__main__":
    main()
