"""The 3D clean-up lever on the cross-validation: connected components below a size removed.

    .venv/bin/python scripts/crossval_cleanup.py ARM [--runs runs/cv] [--docs docs/evaluation/crossval]

Needs the four folds of ARM scored by scripts/crossval.sh (their maps/ folders). The size is
learned without the fold it is applied to: for fold k, the candidate size (0 = off) with the
best mean 3D Dice over the other three folds' held-out cases (each predicted by a model that
never saw it) is applied to fold k's cases; ties go to the smaller size. Writes
DOCS/ARM+cleanup/fold<k>/report.json in diffseg-eval's layout (so scripts/crossval_table.py
shows it as one more arm) and DOCS/ARM+cleanup/sizes.json (the size chosen per fold, and the
size chosen on all 16 cases: the one a model trained on all of them would ship with).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from napari_diffseg import data
from napari_diffseg.cli import json_safe
from napari_diffseg.evaluate import load_maps, score_case
from napari_diffseg.files import write_json_atomically
from napari_diffseg.metrics import dice, entropy_uncertainty, qubrats_score
from napari_diffseg.postprocess import remove_small_components

CANDIDATES = [0, 50, 100, 250, 500, 1000, 2500, 5000, 10**9]  # voxels; the last keeps the largest component alone
FOLDS = 4


def best_size(dices: dict[int, list[float]]) -> int:
    """The candidate with the highest mean Dice; the smaller on a tie (within 1e-6)."""
    means = {size: float(np.mean(values)) for size, values in dices.items()}
    top = max(means.values())
    return min(size for size, mean in means.items() if mean >= top - 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arm")
    parser.add_argument("--runs", default="runs/cv")
    parser.add_argument("--docs", default="docs/evaluation/crossval")
    args = parser.parse_args()
    cases = []  # (fold, case files, original report row)
    for fold in range(FOLDS):
        eval_dir = Path(args.runs) / args.arm / f"fold{fold}" / "eval"
        report = json.loads((eval_dir / "report.json").read_text())
        rows = {r["case"]: r for r in report["cases"]}
        if any("dice_ensemble_wt" in r for r in rows.values()):
            raise SystemExit(f"{args.arm}: a region model's arm; the clean-up is decided on whole-tumour arms "
                             "(diffseg-sample --cleanup removes whole-tumour islands with their core)")
        # the cases the report scored (a sampling arm scores another arm's split: crossval.sh)
        for files in data.find_cases(report["settings"]["data_dir"]):
            cases.append((fold, files, rows[files.name], eval_dir / "maps" / f"{files.name}.npz"))

    dices = {}  # case -> {size: Dice}
    loaded = {}
    for fold, files, row, maps in cases:
        case = data.load_case(files)
        probability, uncertainty = load_maps(maps)
        truth = case.label.astype(bool)
        mask = probability > 0.5
        dices[files.name] = {size: dice(remove_small_components(mask, size), truth) for size in CANDIDATES}
        loaded[files.name] = (case, probability, uncertainty)
        print(f"{files.name}: " + ", ".join(f"{s}: {d:.3f}" for s, d in dices[files.name].items()), flush=True)

    chosen = {}
    for fold in range(FOLDS):
        others = [f.name for k, f, _, _ in cases if k != fold]
        chosen[fold] = best_size({size: [dices[name][size] for name in others] for size in CANDIDATES})
    overall = best_size({size: [dices[f.name][size] for _, f, _, _ in cases] for size in CANDIDATES})

    dest = Path(args.docs) / f"{args.arm}+cleanup"
    for fold in range(FOLDS):
        rows = []
        for k, files, row, _ in cases:
            if k != fold:
                continue
            case, probability, uncertainty = loaded[files.name]
            keep = remove_small_components(probability > 0.5, chosen[fold])
            cleaned = np.where(keep, probability, 0.0)  # what the clean-up hands over: background there
            truth, brain = case.label.astype(bool), case.images.any(axis=0)
            scores = score_case(cleaned[None], truth, case.voxel_size, uncertainty=uncertainty, brain=brain)
            # the uncertainty maps stay the model's: only the mask they are scored against changed
            scores["qubrats_entropy"] = qubrats_score(entropy_uncertainty(probability), keep, truth, brain)["score"]
            # single members are not kept; their Dice is the arm's own, before the clean-up
            rows.append({**row, **scores, "dice_single_mean": row["dice_single_mean"],
                         "dice_single": row["dice_single"], "num_members": row["num_members"],
                         "cleanup_min_voxels": chosen[fold]})
        write_json_atomically(dest / f"fold{fold}" / "report.json", json_safe({"cases": rows}))
    write_json_atomically(dest / "sizes.json", {"candidates": CANDIDATES, "chosen_per_fold": chosen,
                                                "chosen_on_all_cases": overall, "dice_per_case_and_size": dices})
    print(f"sizes per fold {chosen}; on all cases {overall}")


if __name__ == "__main__":
    main()
