"""``diffseg-eval``: score a model against ground truth; report.json, report.md and plots.

For every case with a label the ensemble is sampled ONCE, with the largest ensemble any
figure needs; smaller ensembles are the first k members of that run, so Dice against
ensemble size costs no extra sampling. Volumes are scored in 3D on the input grid
(arrays are (X, Y, Z); a 2D slice case is scored in 2D).

Figures per case (:func:`score_case`, reusable for any model that yields members):

- ``dice_ensemble``: Dice of the ensemble mask (mean of the N members > 0.5);
- ``dice_single_mean``: mean Dice of the single members (each member > 0.5);
- ``hd95``: 95th-percentile Hausdorff distance (mm, the case's voxel size) of the ensemble
  mask; nan where exactly one of prediction and truth is empty (counted in the summary);
- ``auroc_variance_error`` / ``auroc_variance_error_all``: how well the ensemble variance
  flags wrong voxels, within 10 voxels of prediction or truth / over every voxel; nan for a
  single member (a deterministic model: variance 0 everywhere carries no ranking);
- ``slice_variance_dice_pearson``: Pearson correlation, over the slices (last axis) holding
  tumour in the truth or the prediction, between a slice's mean variance and its Dice;
- ``qubrats_variance`` / ``qubrats_entropy``: the QU-BraTS uncertainty score (whole tumour,
  true negatives counted inside the brain) of the ensemble variance (scaled by 0.25 to
  [0, 100]) and of the binary entropy of the ensemble mean; nan where there is no ranking.

``--save_maps`` also keeps each case's probability (ensemble mean) and uncertainty (ensemble
variance, or the baseline's p(1 - p)) as ``maps/<case>.npz`` (float16, the case's grid), so that
post-processing can be decided on them later without sampling again.

``--slices brain`` (default) samples every brain slice. ``--slices tumour`` samples only
the slices with tumour in the truth, two slices either side included, which is much faster
on full volumes; slices not sampled count as predicted background (probability 0), so
false positives there are not seen and the figures are optimistic.

``--sweep`` repeats the evaluation (ensemble ``--sweep_ensemble``, default 5) for each step
count of ``--sweep_steps`` on the first ``--sweep_cases`` cases.

A region model (``diffseg-train --regions brats``) is scored per region: every figure above
is reported as ``<figure>_wt``, ``_tc`` and ``_et``, on the masks of the label map the
ensemble's per-region means give (:mod:`regions`: thresholded, then nested), against the
regions of the truth's BraTS labels; a single member's masks are nested the same way. Its
Dice-vs-ensemble-size curve is the mean of the three regions' Dice (per region beside it).

The last line on stdout is one JSON object with the overall figures (nan written as null).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data, metrics
from .cli import (add_model_flags, add_model_path_flags, add_sampling_flags, guarded, json_safe, make_parser,
                  model_path_from_args, positive_int, reference_flags_from_args, sampling_options_from_args,
                  slab_indices, slice_range, slice_text)
from .ensemble import THRESHOLD, ensemble_statistics
from .errors import DiffSegError
from .files import atomic_write, check_writable_folder
from .regions import BRATS_REGIONS, labels_from_probability, labels_to_regions

RADIUS = 10
TUMOUR_SLICE_MARGIN = 2
SUMMARY_KEYS = ("dice_ensemble", "dice_single_mean", "hd95", "auroc_variance_error", "auroc_variance_error_all",
                "slice_variance_dice_pearson", "qubrats_variance", "qubrats_entropy")
# A region model's: each figure per region, the regions side by side.
REGION_SUMMARY_KEYS = tuple(f"{key}_{region}" for key in SUMMARY_KEYS for region in BRATS_REGIONS)


# --------------------------------------------------------------------------------------------
# Scoring (numpy in and out: any model that produces members can use it)
# --------------------------------------------------------------------------------------------


def ensemble_masks(members: np.ndarray, threshold: float = THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probability, variance, mask) of (N, *spatial) members, as numpy arrays (a boolean mask):
    :func:`ensemble.ensemble_statistics`, the rule sampling uses."""
    mean, variance, mask = ensemble_statistics(torch.from_numpy(np.asarray(members, dtype=np.float32)), threshold)
    return mean.numpy(), variance.numpy(), mask.numpy().astype(bool)


def per_slice_dice(pred: np.ndarray, truth: np.ndarray, slices: list[int]) -> np.ndarray:
    return np.array([metrics.dice(pred[..., z], truth[..., z]) for z in slices], dtype=np.float64)


def score_case(members: np.ndarray, truth: np.ndarray, spacing=None, radius: float = RADIUS,
               threshold: float = THRESHOLD, uncertainty: np.ndarray | None = None,
               brain: np.ndarray | None = None, mask: np.ndarray | None = None,
               member_masks: np.ndarray | None = None) -> dict:
    """Score the probability members (N, *spatial) of one case against its truth mask.

    N = 1 (a deterministic model) is allowed: the ensemble is the single member, the
    variance is 0 and the variance figures are nan, unless the model brings its own
    ``uncertainty`` map (the baseline's Bernoulli variance p(1 - p)), which then stands in
    for the ensemble variance. ``brain`` (default: every voxel) bounds the true negatives of
    the QU-BraTS score. ``mask`` and ``member_masks`` (N, *spatial), where given, are the
    ensemble's and the members' masks to score instead of their own thresholds (a region
    model's, nested: :func:`score_regions`). Returns floats (nan where undefined) and a few
    counts; see the module docstring for the meaning of each key.
    """
    members = np.asarray(members, dtype=np.float32)
    truth = np.asarray(truth).astype(bool)
    if members.ndim == truth.ndim:  # one member given without its axis
        members = members[None]
    if members.shape[1:] != truth.shape:
        raise ValueError(f"members {members.shape} do not match the truth {truth.shape} (expected (N, *spatial))")
    n = members.shape[0]
    if n < 1:
        raise ValueError("no members to score")
    probability, variance, own_mask = ensemble_masks(members, threshold)
    mask = own_mask if mask is None else np.asarray(mask).astype(bool)
    if uncertainty is not None:
        variance = np.asarray(uncertainty, dtype=np.float32)
    ranked = n > 1 or uncertainty is not None
    if member_masks is None:
        singles = [metrics.dice(member > threshold, truth) for member in members]
    else:
        singles = [metrics.dice(member, truth) for member in member_masks]
    if ranked:
        auroc = metrics.variance_error_auroc(variance, mask, truth, radius=radius)
    else:
        auroc = {"neighbourhood": float("nan"), "all": float("nan")}

    if ranked:
        qu_variance = metrics.qubrats_score(metrics.variance_to_uncertainty(variance), mask, truth, brain)["score"]
        qu_entropy = metrics.qubrats_score(metrics.entropy_uncertainty(probability), mask, truth, brain)["score"]
    else:
        qu_variance = qu_entropy = float("nan")

    correlation, tumour_slices = float("nan"), 0
    if truth.ndim >= 3:
        has_tumour = (truth | mask).reshape(-1, truth.shape[-1]).any(axis=0)
        slices = [int(z) for z in np.flatnonzero(has_tumour)]
        tumour_slices = len(slices)
        if ranked and len(slices) >= 2:
            slice_variance = variance.reshape(-1, truth.shape[-1])[:, slices].mean(axis=0)
            correlation = metrics.pearson(slice_variance, per_slice_dice(mask, truth, slices))
    return {
        "num_members": int(n),
        "dice_ensemble": float(metrics.dice(mask, truth)),
        "dice_single_mean": float(np.mean(singles)),
        "dice_single": [float(d) for d in singles],
        "hd95": float(metrics.hd95(mask, truth, spacing=spacing)),
        "auroc_variance_error": float(auroc["neighbourhood"]),
        "auroc_variance_error_all": float(auroc["all"]),
        "slice_variance_dice_pearson": float(correlation),
        "qubrats_variance": float(qu_variance),
        "qubrats_entropy": float(qu_entropy),
        "tumour_slices": int(tumour_slices),
        "empty_tumour_slices": empty_tumour_slices(mask, truth),
        "truth_voxels": int(truth.sum()),
        "predicted_voxels": int(mask.sum()),
        "mean_variance_in_mask_or_truth": float(variance[mask | truth].mean()) if (mask | truth).any() else 0.0,
    }


def _member_region_masks(members: np.ndarray, index: int, threshold: float) -> np.ndarray:
    """(N, *spatial) bool: region ``index`` of each member's thresholded, nested masks. Under the
    nesting rule a region holds where it and every region outside it are above the threshold
    (regions.nest_regions), computed one region at a time to spare memory."""
    return np.all(members[:, : index + 1] > threshold, axis=1)


def score_regions(members: np.ndarray, labels: np.ndarray, spacing=None, radius: float = RADIUS,
                  threshold: float = THRESHOLD, uncertainty: np.ndarray | None = None,
                  brain: np.ndarray | None = None) -> dict:
    """:func:`score_case` per region of a region model's members (N, 3, *spatial) against a
    BraTS label map (*spatial): every key as ``<key>_wt``, ``_tc``, ``_et``. The ensemble's
    masks are the regions of the label map of its per-region means; ``uncertainty`` (3, *spatial)
    stands in for the variance per region (the one-pass baseline's p(1 - p))."""
    members = np.asarray(members, dtype=np.float32)
    truth = labels_to_regions(labels)
    if members.ndim != truth.ndim + 1 or members.shape[1:] != truth.shape:
        raise ValueError(f"members {members.shape} do not match the regions {truth.shape} (expected (N, 3, *spatial))")
    masks = labels_to_regions(labels_from_probability(members.mean(axis=0), threshold))
    row: dict = {}
    for index, region in enumerate(BRATS_REGIONS):
        scores = score_case(members[:, index], truth[index], spacing, radius, threshold,
                            None if uncertainty is None else uncertainty[index], brain, mask=masks[index],
                            member_masks=_member_region_masks(members, index, threshold))
        row.update({f"{key}_{region}": value for key, value in scores.items()})
    return row


def dice_by_ensemble_size_regions(members: np.ndarray, labels: np.ndarray, sizes,
                                  threshold: float = THRESHOLD) -> dict:
    """{k: {region: Dice}} of the label map of the first k members' means, for every k <= N."""
    members = np.asarray(members, dtype=np.float32)
    truth = labels_to_regions(labels)
    out = {}
    for k in sorted({int(s) for s in sizes if 1 <= int(s) <= members.shape[0]}):
        masks = labels_to_regions(labels_from_probability(members[:k].mean(axis=0), threshold))
        out[k] = {region: float(metrics.dice(masks[i], truth[i])) for i, region in enumerate(BRATS_REGIONS)}
    return out


def empty_tumour_slices(mask: np.ndarray, truth: np.ndarray) -> int:
    """Slices (the last axis of a volume; a 2D case is one slice) where the truth holds tumour
    and the mask holds none: a whole lesion section missed."""
    if truth.ndim < 3:
        return int(truth.any() and not mask.any())
    depth = truth.shape[-1]
    return int((truth.reshape(-1, depth).any(axis=0) & ~mask.reshape(-1, depth).any(axis=0)).sum())


def dice_by_ensemble_size(members: np.ndarray, truth: np.ndarray, sizes, threshold: float = THRESHOLD) -> dict:
    """{k: Dice of the ensemble mask of the first k members} for every k <= N in sizes."""
    members = np.asarray(members, dtype=np.float32)
    truth = np.asarray(truth).astype(bool)
    return {k: float(metrics.dice(ensemble_masks(members[:k], threshold)[2], truth))
            for k in sorted(set(int(s) for s in sizes if 1 <= int(s) <= members.shape[0]))}


def summarise(rows: list[dict], keys=SUMMARY_KEYS) -> dict:
    """Mean over cases per key, nan skipped; how many cases were nan is reported too."""
    summary: dict = {"cases": len(rows)}
    for key in keys:
        values = np.array([r.get(key, float("nan")) for r in rows], dtype=np.float64)
        finite = np.isfinite(values)
        summary[key] = float(values[finite].mean()) if finite.any() else float("nan")
        summary[f"{key}_nan_cases"] = int((~finite).sum())
    return summary


# --------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text))


def _save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100, bbox_inches="tight"), "wb")
    plt.close(figure)


def save_maps(path: Path, probability: np.ndarray, uncertainty: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: np.savez_compressed(
        handle, probability=probability.astype(np.float16), uncertainty=uncertainty.astype(np.float16)), "wb")


def load_maps(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(probability, uncertainty) as float32, from a file of :func:`save_maps`."""
    with np.load(path) as maps:
        return maps["probability"].astype(np.float32), maps["uncertainty"].astype(np.float32)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dice_vs_ensemble(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5))
    sizes = sorted({int(k) for r in rows for k in r["dice_by_ensemble_size"]})
    for r in rows:
        ks = sorted(int(k) for k in r["dice_by_ensemble_size"])
        axes.plot(ks, [r["dice_by_ensemble_size"][k] for k in ks], color="0.75", lw=0.8)
    means = [np.mean([r["dice_by_ensemble_size"][k] for r in rows if k in r["dice_by_ensemble_size"]]) for k in sizes]
    axes.plot(sizes, means, "o-", color="C0", label="ensemble (mean over cases)")
    per_region = "dice_single_mean" not in rows[0]  # a region model's rows: the mean of its regions
    single = np.mean([np.mean([r[f"dice_single_mean_{g}"] for g in BRATS_REGIONS]) if per_region
                      else r["dice_single_mean"] for r in rows])
    axes.axhline(single, color="C1", ls="--", label="single sample (mean)")
    axes.set_xlabel("ensemble size")
    axes.set_ylabel("Dice (mean of WT, TC, ET)" if per_region else "Dice (whole tumour)")
    axes.set_xticks(sizes)
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title(f"Dice vs ensemble size ({len(rows)} cases)")
    _save_figure(figure, path)


def plot_dice_vs_steps(sweep: list[dict], path: Path, regions: bool = False) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5))
    steps = [s["steps"] for s in sweep]
    if regions:  # each region's ensemble Dice
        for g in BRATS_REGIONS:
            axes.plot(steps, [s[f"dice_ensemble_{g}"] for s in sweep], "o-", label=f"ensemble, {g.upper()}")
    else:
        axes.plot(steps, [s["dice_ensemble"] for s in sweep], "o-", label="ensemble")
        axes.plot(steps, [s["dice_single_mean"] for s in sweep], "s--", label="single sample (mean)")
    axes.set_xscale("log")
    axes.set_xticks(steps)
    axes.set_xticklabels([str(s) for s in steps])
    axes.set_xlabel("sampling steps")
    axes.set_ylabel("Dice" if regions else "Dice (whole tumour)")
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("Dice vs sampling steps")
    _save_figure(figure, path)


def panel_slice(truth: np.ndarray, mask: np.ndarray) -> int | None:
    """The slice (last axis) with the largest tumour area in the truth (else the prediction);
    None for a 2D case."""
    if truth.ndim < 3:
        return None
    for source in (truth, mask):
        area = source.reshape(-1, source.shape[-1]).sum(axis=0)
        if area.max() > 0:
            return int(area.argmax())
    return truth.shape[-1] // 2


def plot_panel(flair: np.ndarray, truth: np.ndarray, mask: np.ndarray, variance: np.ndarray, title: str,
               path: Path) -> None:
    plt = _pyplot()
    z = panel_slice(truth, mask)
    pick = (lambda a: a) if z is None else (lambda a: a[..., z])
    figure, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    panels = [("FLAIR", pick(flair), "gray"), ("truth", pick(truth), "gray"), ("ensemble mask", pick(mask), "gray"),
              ("variance", pick(variance), "magma")]
    for ax, (name, image, cmap) in zip(axes, panels):
        shown = ax.imshow(np.asarray(image, dtype=np.float32).T, cmap=cmap, origin="lower")
        ax.set_title(name)
        ax.axis("off")
        if name == "variance":
            figure.colorbar(shown, ax=ax, fraction=0.046)
    figure.suptitle(title if z is None else f"{title} (slice {z})")
    _save_figure(figure, path)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "diffseg-eval",
        "Evaluate a diffusion segmentation ensemble against ground truth: Dice, HD95, "
        "uncertainty-vs-error AUROC; writes report.json, report.md and plots.",
    )
    add_model_path_flags(parser)
    parser.add_argument("--flags_json", help="JSON of the reference model flags (e.g. the flags.json beside a checkpoint)")
    parser.add_argument("--data_dir", required=True, help="case folders with ground truth (cases without are skipped)")
    parser.add_argument("--out_dir", required=True, help="where report.json, report.md and the plots go")
    parser.add_argument("--num_ensemble", type=positive_int, default=5, help="ensemble size of the main figures")
    add_sampling_flags(parser)
    parser.add_argument("--max_cases", type=positive_int, default=None, help="evaluate at most this many labelled cases")
    parser.add_argument("--slices", type=_slice_choice, default="brain", metavar="brain|tumour|START:STOP",
                        help="volumes: sample every brain slice, only slices with tumour in the truth (+-2; slices "
                        "not sampled count as predicted background), or score only the slab START..STOP-1")
    parser.add_argument("--ensemble_sizes", type=_int_list, default=[1, 2, 5, 10],
                        help="ensemble sizes for the Dice-vs-size curve")
    parser.add_argument("--radius", type=float, default=RADIUS, help="neighbourhood radius (voxels) of the AUROC")
    parser.add_argument("--sweep", action="store_true", help="also evaluate each step count of --sweep_steps")
    parser.add_argument("--sweep_steps", type=_int_list, default=[10, 25, 50, 100, 250, 1000],
                        help="sampling step counts of the Dice-vs-steps sweep")
    parser.add_argument("--sweep_cases", type=positive_int, default=None, help="cases in the sweep (default: all)")
    parser.add_argument("--sweep_ensemble", type=positive_int, default=5, help="ensemble size in the sweep")
    parser.add_argument("--save_maps", action="store_true",
                        help="also write maps/<case>.npz: probability and uncertainty (float16) on the case's grid")
    # The reference's model flags, only read for a reference checkpoint (ours embed them).
    add_model_flags(parser, with_defaults=False, skip=("timestep_respacing",))
    return parser


def _slice_choice(value: str) -> str | slice:
    return value if value in ("brain", "tumour") else slice_range(value)


def _slices_text(slab: str | slice) -> str:
    return slab if isinstance(slab, str) else slice_text(slab)


def restrict_case(case: data.Case, slab: str | slice) -> data.Case:
    """The case cut to a slab of its last axis (a volume and --slices START:STOP), else itself."""
    if not isinstance(slab, slice) or not case.is_volume:
        return case
    slab_indices(slab, case.images.shape[-1], case.name)  # a slab with no slice is an error, not an empty score
    label = None if case.label is None else case.label[..., slab]
    labels = None if case.labels is None else case.labels[..., slab]
    return dataclasses.replace(case, images=case.images[..., slab], label=label, labels=labels)


def tumour_slices(truth: np.ndarray, margin: int = TUMOUR_SLICE_MARGIN) -> list[int]:
    """Slices (last axis) with tumour in the truth, `margin` slices either side included."""
    depth = truth.shape[-1]
    has = np.flatnonzero(truth.reshape(-1, depth).any(axis=0))
    chosen = set()
    for z in has:
        chosen.update(range(max(0, z - margin), min(depth, z + margin + 1)))
    return sorted(int(z) for z in chosen)


def _sample(segmenter, case: data.Case, options, args) -> tuple[np.ndarray, np.ndarray | None]:
    """The ensemble's members (options.num_ensemble, *spatial) on the case's grid, and the model's
    own uncertainty map where it has one instead of an ensemble (the deterministic baseline). A
    region model's have the region axis: (N, 3, *spatial), (3, *spatial)."""
    from .inference import run_to_end

    deterministic = segmenter.loaded.deterministic  # main() asks it for one member
    slices = tumour_slices(case.label) if args.slices == "tumour" and case.is_volume else None
    if slices is not None and not slices:  # no tumour in the truth: nothing to sample, all background
        regions = (len(segmenter.loaded.region_names),) if segmenter.loaded.multi_region else ()
        empty = np.zeros((options.num_ensemble, *regions, *case.spatial_shape), np.float32)
        return empty, (empty[0] if deterministic else None)
    result = run_to_end(segmenter.run(case.images, options, keep_samples=True, slices=slices, preview_interval=None))
    return result.samples, (result.variance if deterministic else None)


def _case_table(rows: list[dict], overall: dict) -> list[str]:
    lines = ["| case | Dice ens. | Dice single | HD95 (mm) | AUROC var-err (nbhd) | AUROC var-err (all) "
             "| slice var~Dice r | QU-BraTS var. | QU-BraTS entropy | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cells(r: dict) -> str:
        return (f"{_fmt(r['dice_ensemble'])} | {_fmt(r['dice_single_mean'])} | {_fmt(r['hd95'], 2)} | "
                f"{_fmt(r['auroc_variance_error'])} | {_fmt(r['auroc_variance_error_all'])} | "
                f"{_fmt(r['slice_variance_dice_pearson'])} | {_fmt(r.get('qubrats_variance'))} | "
                f"{_fmt(r.get('qubrats_entropy'))}")

    lines += [f"| {r['case']} | {cells(r)} | {_fmt(r['seconds'], 1)} |" for r in rows]
    lines.append(f"| **mean** | {cells(overall)} | |")
    return lines


def _region_case_table(rows: list[dict], overall: dict) -> list[str]:
    """A region model's per-case table: each figure for WT, TC and ET side by side."""
    figures = (("Dice", "dice_ensemble", 3), ("HD95 (mm)", "hd95", 2), ("AUROC var-err (nbhd)", "auroc_variance_error", 3),
               ("QU-BraTS var.", "qubrats_variance", 3))
    names = [g.upper() for g in BRATS_REGIONS]
    head = " | ".join(f"{title} {n}" for title, _, _ in figures for n in names)
    lines = [f"| case | {head} | s |", "|---" * (len(figures) * len(names) + 2) + "|"]

    def cells(r: dict) -> str:
        return " | ".join(_fmt(r.get(f"{key}_{g}"), digits) for _, key, digits in figures for g in BRATS_REGIONS)

    lines += [f"| {r['case']} | {cells(r)} | {_fmt(r['seconds'], 1)} |" for r in rows]
    lines.append(f"| **mean** | {cells(overall)} | |")
    return lines


def _region_notes(overall: dict) -> list[str]:
    per = ", ".join(f"{g.upper()} {overall[f'hd95_{g}_nan_cases']}" for g in BRATS_REGIONS)
    empty = ", ".join(f"{g.upper()} {overall.get(f'empty_tumour_slices_{g}', 0)}" for g in BRATS_REGIONS)
    return [f"HD95 undefined (one mask empty), cases per region: {per}; those are left out of the mean.",
            f"Slices with the region in the truth and none in the mask: {empty}.",
            "Every other figure of a region is in report.json as `<figure>_<region>`.", ""]


def render_markdown(report: dict) -> str:
    s, overall, rows = report["settings"], report["overall"], report["cases"]
    if s.get("regions", "wt") != "wt":
        return _render_region_markdown(report)
    lines = ["# diffseg-eval report", "", f"Model: `{report['model']}`", "",
             f"## Per case (ensemble of {s['num_ensemble']}, {s['steps']} steps, {s['sampler']})", ""]
    lines += _case_table(rows, overall)
    lines += ["", f"HD95 undefined (one mask empty) in {overall['hd95_nan_cases']} case(s); "
              "those are left out of the mean.",
              f"Slices with tumour in the truth and an empty mask: {overall.get('empty_tumour_slices', 0)}.", ""]
    sizes = report["dice_vs_ensemble_size"]
    lines += ["## Dice vs ensemble size (first k members of one run)", "", "| k | mean Dice |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sizes.items()]
    if report.get("sweep"):
        lines += ["", f"## Dice vs sampling steps (ensemble {s['sweep_ensemble']}, "
                  f"{report['sweep'][0]['cases']} cases)", "",
                  "| steps | Dice ens. | Dice single | HD95 | AUROC (nbhd) | s |", "|---|---|---|---|---|---|"]
        for row in report["sweep"]:
            lines.append(f"| {row['steps']} | {_fmt(row['dice_ensemble'])} | {_fmt(row['dice_single_mean'])} | "
                         f"{_fmt(row['hd95'], 2)} | {_fmt(row['auroc_variance_error'])} | {_fmt(row['seconds'], 1)} |")
    lines += ["", "## Settings", ""]
    lines += [f"- {k}: `{v}`" for k, v in s.items()]
    if s["slices"] == "tumour":
        lines += ["", "Only slices with tumour in the truth (+-2) were sampled; the others count as predicted "
                  "background, so false positives outside them are not seen."]
    lines += ["", f"Total time: {report['timing']['total_seconds']:.1f} s", ""]
    return "\n".join(lines)


def _render_region_markdown(report: dict) -> str:
    """:func:`render_markdown` for a region model."""
    s, overall, rows = report["settings"], report["overall"], report["cases"]
    lines = ["# diffseg-eval report", "", f"Model: `{report['model']}` (regions WT, TC, ET)", "",
             f"## Per case (ensemble of {s['num_ensemble']}, {s['steps']} steps, {s['sampler']})", ""]
    lines += _region_case_table(rows, overall) + [""] + _region_notes(overall)
    sizes = report["dice_vs_ensemble_size"]
    lines += ["## Dice vs ensemble size (first k members of one run; mean of WT, TC, ET)", "", "| k | mean Dice |",
              "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sizes.items()]
    if report.get("sweep"):
        title = f"## Dice vs sampling steps (ensemble {s['sweep_ensemble']}, {report['sweep'][0]['cases']} cases)"
        lines += ["", title, "", "| steps | Dice WT | Dice TC | Dice ET | s |", "|---|---|---|---|---|"]
        for row in report["sweep"]:
            dices = " | ".join(_fmt(row[f"dice_ensemble_{g}"]) for g in BRATS_REGIONS)
            lines.append(f"| {row['steps']} | {dices} | {_fmt(row['seconds'], 1)} |")
    lines += ["", "## Settings", ""]
    lines += [f"- {k}: `{v}`" for k, v in s.items()]
    if s["slices"] == "tumour":
        lines += ["", ("Only slices with tumour in the truth (+-2) were sampled; the others count as predicted "
                       "background, so false positives outside them are not seen.")]
    lines += ["", f"Total time: {report['timing']['total_seconds']:.1f} s", ""]
    return "\n".join(lines)


def _score(members: np.ndarray, case: data.Case, radius: float, uncertainty: np.ndarray | None,
           regions: bool) -> dict:
    """A case's figures: :func:`score_case` on the whole tumour, or :func:`score_regions`."""
    brain = case.images.any(axis=0)
    if regions:
        return score_regions(members, case.labels, case.voxel_size, radius, uncertainty=uncertainty, brain=brain)
    return score_case(members, case.label.astype(bool), case.voxel_size, radius, uncertainty=uncertainty, brain=brain)


@guarded
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.radius > 0:
        raise DiffSegError(f"--radius {args.radius}: the AUROC's neighbourhood needs a radius above 0 (default {RADIUS})")
    started = time.time()
    out_dir = Path(args.out_dir)
    files = data.find_cases(args.data_dir)
    labelled = []
    for f in files:
        if f.seg is None:
            print(f"{f.name}: skipped (no ground-truth segmentation)", file=sys.stderr)
        else:
            labelled.append(f)
    if not labelled:
        raise DiffSegError(f"{args.data_dir}: none of the {len(files)} case(s) has a ground-truth segmentation "
                           "(a *_seg.nii.gz file); diffseg-eval needs labelled cases")
    if args.max_cases:
        labelled = labelled[: args.max_cases]
    check_writable_folder(out_dir, setting="out_dir")

    from .checkpoint import ONE_PASS
    from .inference import Segmenter  # torch: only once the inputs look right

    segmenter = Segmenter.load(model_path_from_args(args), device=args.device,
                               reference_flags=reference_flags_from_args(args), compile=args.compile)
    options = sampling_options_from_args(args)
    respacing = segmenter.defaults["timestep_respacing"] if options.respacing is None else options.respacing
    deterministic = segmenter.loaded.deterministic
    sampler_name = ONE_PASS if deterministic else options.sampler or segmenter.defaults["sampler"]
    if deterministic:  # one member; its uncertainty is the Bernoulli variance p(1 - p)
        args.num_ensemble, args.sweep = 1, False
    sizes = [1] if deterministic else sorted(set(args.ensemble_sizes))
    num_run = max(args.num_ensemble, max(sizes))
    total_steps = segmenter.loaded.diffusion_config.diffusion_steps
    regions = segmenter.loaded.multi_region  # WT, TC, ET: every figure per region
    keys = REGION_SUMMARY_KEYS if regions else SUMMARY_KEYS

    rows = []
    for index, case_files in enumerate(labelled):
        case = restrict_case(data.load_case(case_files), args.slices)
        t0 = time.time()
        members, uncertainty = _sample(segmenter, case, dataclasses.replace(options, num_ensemble=num_run), args)
        sampled = time.time() - t0
        truth = case.label.astype(bool)
        row = {"case": case.name, **_score(members[: args.num_ensemble], case, args.radius, uncertainty, regions)}
        if regions:
            per_region = dice_by_ensemble_size_regions(members, case.labels, sizes)
            row["dice_by_ensemble_size"] = {k: float(np.mean(list(d.values()))) for k, d in per_region.items()}
            row["dice_by_ensemble_size_regions"] = per_region
        else:
            row["dice_by_ensemble_size"] = dice_by_ensemble_size(members, truth, sizes)
        row["sampling_seconds"] = round(sampled, 3)
        row["seconds"] = round(time.time() - t0, 3)
        row["shape"] = list(case.spatial_shape)
        row["voxel_size"] = list(case.voxel_size)
        rows.append(row)
        probability, variance, mask = ensemble_masks(members[: args.num_ensemble])
        if uncertainty is not None:
            variance = uncertainty
        if args.save_maps:  # a region model's with the region axis first
            save_maps(out_dir / "maps" / f"{case.name}.npz", probability, variance)
        if regions:  # the label maps, and the whole tumour's variance
            plot_panel(case.images[3], case.labels, labels_from_probability(probability), variance[0], case.name,
                       out_dir / f"panel_{case.name}.png")
            figures = ", ".join(f"{g.upper()} {row[f'dice_ensemble_{g}']:.3f}" for g in BRATS_REGIONS)
            print(f"[{index + 1}/{len(labelled)}] {case.name}: Dice {figures}, {row['seconds']:.1f} s", file=sys.stderr)
            continue
        plot_panel(case.images[3], truth, mask, variance, case.name, out_dir / f"panel_{case.name}.png")
        print(f"[{index + 1}/{len(labelled)}] {case.name}: Dice {row['dice_ensemble']:.3f} "
              f"(single {row['dice_single_mean']:.3f}), HD95 {_fmt(row['hd95'], 2)}, {row['seconds']:.1f} s",
              file=sys.stderr)

    overall = summarise(rows, keys)
    if regions:
        for g in BRATS_REGIONS:
            overall[f"empty_tumour_slices_{g}"] = int(sum(r[f"empty_tumour_slices_{g}"] for r in rows))
    else:
        overall["empty_tumour_slices"] = int(sum(r["empty_tumour_slices"] for r in rows))
    by_size = {k: float(np.mean([r["dice_by_ensemble_size"][k] for r in rows])) for k in sizes if k <= num_run}
    plot_dice_vs_ensemble(rows, out_dir / "dice_vs_ensemble.png")

    sweep = []
    if args.sweep:
        sweep_files = labelled[: args.sweep_cases] if args.sweep_cases else labelled
        for steps in args.sweep_steps:
            spacing = "" if steps == total_steps else str(steps)
            sweep_options = dataclasses.replace(options, num_ensemble=args.sweep_ensemble, respacing=spacing)
            t0 = time.time()
            sweep_rows = []
            for case_files in sweep_files:
                case = data.load_case(case_files)
                members, _ = _sample(segmenter, case, sweep_options, args)
                if regions:
                    sweep_rows.append({"case": case.name, **_score(members, case, args.radius, None, regions)})
                    continue
                sweep_rows.append({"case": case.name, **score_case(members, case.label, case.voxel_size, args.radius,
                                                                   brain=case.images.any(axis=0))})
            per_case = ({r["case"]: {g: r[f"dice_ensemble_{g}"] for g in BRATS_REGIONS} for r in sweep_rows}
                        if regions else {r["case"]: r["dice_ensemble"] for r in sweep_rows})
            entry = {"steps": steps, "timestep_respacing": spacing, "seconds": round(time.time() - t0, 3),
                     **summarise(sweep_rows, keys), "per_case": per_case}
            sweep.append(entry)
            dice = (", ".join(f"{g.upper()} {entry[f'dice_ensemble_{g}']:.3f}" for g in BRATS_REGIONS) if regions
                    else f"{entry['dice_ensemble']:.3f}")
            print(f"sweep {steps} steps: Dice {dice} ({entry['seconds']:.1f} s)", file=sys.stderr)
        plot_dice_vs_steps(sweep, out_dir / "dice_vs_steps.png", regions=regions)

    settings = {
        "data_dir": str(args.data_dir), "num_ensemble": args.num_ensemble, "members_sampled": num_run,
        "ensemble_sizes": sizes, "timestep_respacing": respacing, "steps": 1 if deterministic else segmenter.num_steps(respacing),
        "sampler": sampler_name, "eta": args.eta, "seed": args.seed, "device": str(segmenter.device),
        "precision": args.precision, "compile": args.compile, "slices": _slices_text(args.slices), "radius": args.radius, "threshold": THRESHOLD,
        "max_cases": args.max_cases, "sweep": args.sweep,
        "sweep_steps": args.sweep_steps if args.sweep else None,
        "sweep_ensemble": args.sweep_ensemble if args.sweep else None,
        "sweep_cases": args.sweep_cases if args.sweep else None,
    }
    if regions:  # a whole-tumour report stays as it was
        settings["regions"] = segmenter.loaded.regions
    if (segmenter.defaults.get("flip_members", False) if options.flip_members is None else options.flip_members):
        settings["flip_members"] = True  # likewise: named only when on
    report = {
        "model": segmenter.loaded.source,
        "settings": settings,
        "overall": overall,
        "dice_vs_ensemble_size": by_size,
        "cases": rows,
        "skipped_unlabelled": [f.name for f in files if f.seg is None],
        "sweep": sweep,
        "timing": {"total_seconds": round(time.time() - started, 3),
                   "sampling_seconds": round(sum(r["sampling_seconds"] for r in rows), 3)},
    }
    _write_text(out_dir / "report.json", json.dumps(json_safe(report), indent=2) + "\n")
    _write_text(out_dir / "report.md", render_markdown(report))

    if regions:
        print("\n".join(_region_case_table(rows, overall)))
        final = {key: overall[key] for key in keys}
        final.update(cases=len(rows), **{f"hd95_{g}_nan_cases": overall[f"hd95_{g}_nan_cases"] for g in BRATS_REGIONS},
                     **{f"empty_tumour_slices_{g}": overall[f"empty_tumour_slices_{g}"] for g in BRATS_REGIONS},
                     dice_vs_ensemble_size=by_size, report=str(out_dir / "report.json"))
        if sweep:
            final["dice_vs_steps"] = {s["steps"]: {g: s[f"dice_ensemble_{g}"] for g in BRATS_REGIONS} for s in sweep}
        print(json.dumps(json_safe(final)))
        return 0
    print("\n".join(_case_table(rows, overall)))
    final = {key: overall[key] for key in SUMMARY_KEYS}
    final.update(cases=len(rows), hd95_nan_cases=overall["hd95_nan_cases"],
                 empty_tumour_slices=overall["empty_tumour_slices"],
                 dice_vs_ensemble_size=by_size, report=str(out_dir / "report.json"))
    if sweep:
        final["dice_vs_steps"] = {s["steps"]: s["dice_ensemble"] for s in sweep}
    print(json.dumps(json_safe(final)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
