"""The review's figures: Dice and HD95 of a proposal against a ground truth, and how they read
(no Qt)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def evaluate(mask: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None,
             slices: Sequence[int] | None = None) -> dict | None:
    """Dice and HD95 (mm) of a mask against a label map (label > 0 is tumour): of a slice, or of
    a volume's sampled ``slices`` (last axis; default all). None when the metrics module is
    unavailable.

    Slices without tumour in the truth are left out of Dice and HD95 and counted apart: on
    them an empty proposal scores a perfect 1.0 (issue 24: "Dice 1.000" over 12 such slices
    read as a result) and any false positive a 0, whatever the tumour slices show. The
    result holds ``slices``, ``tumour_slices``, ``empty_slices``, ``empty_marked`` (of those,
    the ones the proposal marks) and ``empty_voxels`` (what it marks there); ``dice`` and
    ``hd95`` are NaN when no slice has tumour."""
    try:
        from ..metrics import dice, hd95
    except ImportError:
        return None
    pred = np.asarray(mask) > 0
    truth = np.asarray(truth) > 0
    volume = pred.ndim == 3
    if not volume:  # one slice: a stack of one
        pred, truth = pred[..., None], truth[..., None]
    elif slices is not None:
        pred, truth = pred[..., list(slices)], truth[..., list(slices)]
    has = truth.any(axis=(0, 1))
    marked = pred[..., ~has].any(axis=(0, 1))
    out = {"volume": volume, "slices": int(has.size), "tumour_slices": int(has.sum()),
           "empty_slices": int((~has).sum()), "empty_marked": int(marked.sum()),
           "empty_voxels": int(pred[..., ~has].sum()), "dice": float("nan"), "hd95": float("nan")}
    if has.any():
        pred, truth = (pred[..., has], truth[..., has]) if volume else (pred[..., 0], truth[..., 0])
        spacing = tuple(spacing) if spacing else None
        if spacing is not None and len(spacing) != pred.ndim:
            spacing = None
        out.update(dice=float(dice(pred, truth)), hd95=float(hd95(pred, truth, spacing)))
    return out


def evaluate_result(mask: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None,
                    slices: Sequence[int] | None = None, regions: Sequence[str] = ("wt",)) -> dict | None:
    """:func:`evaluate` of a proposal: a 0/1 mask, or a region model's BraTS label map, scored per
    region (WT, TC, ET) against the truth's labels. The whole tumour's figures stay at the top
    level (what the one-line summary and the coverage read); ``parts`` holds every region's, or
    ``parts_error`` says why the truth cannot be split into regions."""
    from ..errors import DiffSegError
    from ..regions import labels_to_regions

    whole = evaluate(mask, truth, spacing, slices)
    if whole is None or len(regions) == 1:
        return whole
    try:
        truths = labels_to_regions(truth, "brats")
    except DiffSegError as exc:
        return {**whole, "parts_error": str(exc)}
    preds = labels_to_regions(mask, "brats")
    # WT is label > 0 in both: the figures just computed (HD95 of a volume is not cheap)
    whole["parts"] = {name: dict(whole) if name == "wt" else evaluate(pred, region_truth, spacing, slices)
                      for name, pred, region_truth in zip(regions, preds, truths)}
    return whole


def _part_figures(name: str, metrics: dict) -> str:
    hd = metrics.get("hd95", float("nan"))
    if not metrics.get("tumour_slices"):
        return f"{name.upper()}: none in the truth"
    return f"{name.upper()} Dice {metrics['dice']:.3f}, HD95 {f'{hd:.1f} mm' if np.isfinite(hd) else 'n/a'}"


def format_metrics(metrics: dict | None, threshold: float | None = None) -> str:
    """:func:`_format_whole`, then a region model's figures per region (scored over the slices
    with each region in the truth) or why the truth has none."""
    text = _format_whole(metrics, threshold)
    if metrics is None:
        return text
    if "parts_error" in metrics:
        return f"{text}\nno figures per region: {metrics['parts_error']}"
    if "parts" in metrics:
        text = text.replace("Dice", "WT Dice", 1)
        text += "\n" + "; ".join(_part_figures(name, part) for name, part in metrics["parts"].items()
                                 if name != "wt")
    return text


def _format_whole(metrics: dict | None, threshold: float | None = None) -> str:
    """One or two lines for the review panel: what the figures cover, and what was left out."""
    if metrics is None:
        return "Dice/HD95: metrics module not available"
    at = "" if threshold is None else f" at threshold {threshold:.2f}"
    hd = metrics.get("hd95", float("nan"))
    figures = f"Dice {metrics['dice']:.3f}   HD95 {f'{hd:.1f} mm' if np.isfinite(hd) else 'n/a (empty proposal)'}"
    if "tumour_slices" not in metrics:  # an older dict: figures only
        return figures + at
    total, tumour, empty = metrics["slices"], metrics["tumour_slices"], metrics["empty_slices"]
    marked, voxels = metrics["empty_marked"], metrics["empty_voxels"]
    if not metrics.get("volume", True):
        if tumour:
            return figures + at
        return (f"no tumour in the truth on this slice: no Dice/HD95; the proposal{at} marks {voxels} pixel{'s' if voxels != 1 else ''}"
                if voxels else f"no tumour in the truth on this slice, none proposed{at}: no Dice/HD95")
    false_positives = (f"{marked} of them with false positives, {voxels} voxel{'s' if voxels != 1 else ''}"
                       if marked else "none with false positives")
    if not tumour:
        return f"no tumour in the truth on the {total} sampled slices: no Dice/HD95{at} ({false_positives})"
    text = f"{figures}{at}, on the {tumour} of {total} sampled slices with tumour in the truth"
    if empty:
        text += f"; the other {empty} are left out ({false_positives})"
    return text
