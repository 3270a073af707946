"""Segmentation and uncertainty metrics: numpy arrays in, floats out.

Masks are boolean or 0/1 arrays of any dimension (a 2D slice or a 3D volume); a pair of
masks must have the same shape. Nothing here imports torch or MONAI at module level:
MONAI (several seconds to import) is loaded only when hd95 is called.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, stats


def _as_masks(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: pred {pred.shape}, truth {truth.shape}")
    return pred, truth


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap 2|P & T| / (|P| + |T|); 1.0 when both masks are empty (nothing to find,
    nothing found)."""
    pred, truth = _as_masks(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def hd95(pred: np.ndarray, truth: np.ndarray,
         spacing: Sequence[float] | float | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the mask surfaces, in mm.

    `spacing` is the voxel size (one number per axis, or one for all; None = 1 mm). The
    value is MONAI's ``compute_hausdorff_distance(percentile=95)``, the convention of the
    BraTS literature: the 95th percentile of the distances from each surface to the other,
    the larger of the two directions.

    Both masks empty -> 0.0 (perfect agreement). Exactly one empty -> nan: no finite
    distance exists, and nan (rather than inf or an image-size penalty) keeps the choice
    to the caller; ``np.nanmean`` skips such cases, so report how many there were.
    """
    pred, truth = _as_masks(pred, truth)
    pred_empty, truth_empty = not pred.any(), not truth.any()
    if pred_empty and truth_empty:
        return 0.0
    if pred_empty or truth_empty:
        return float("nan")
    if spacing is not None and np.ndim(spacing) == 0:
        spacing = [float(spacing)] * pred.ndim
    if spacing is not None and len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values "
                         f"for a {pred.ndim}D mask")

    from monai.metrics import compute_hausdorff_distance  # slow import: only when needed

    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own internal use of a deprecated argument.
        warnings.simplefilter("ignore", FutureWarning)
        distance = compute_hausdorff_distance(
            pred[None, None], truth[None, None], include_background=True, percentile=95,
            spacing=None if spacing is None else [float(s) for s in spacing],
        )
    return float(distance.reshape(-1)[0])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` as a detector of `labels` (truthy = positive).

    Rank-based (Mann-Whitney U): the probability that a random positive scores above a
    random negative, ties counting one half. Entries with a non-finite score are left out.
    nan when either class is absent.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).astype(bool).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in size")
    keep = np.isfinite(scores)
    scores, labels = scores[keep], labels[keep]
    n_positive = int(labels.sum())
    n_negative = labels.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    ranks = stats.rankdata(scores)  # tied scores share their average rank
    u = ranks[labels].sum() - n_positive * (n_positive + 1) / 2.0
    return float(u / (n_positive * n_negative))


def neighbourhood(pred: np.ndarray, truth: np.ndarray, radius: float = 10) -> np.ndarray:
    """Boolean mask of the pixels within `radius` pixels (Euclidean) of pred OR truth.

    Distances are taken in the array's own dimensions: in 3D the neighbourhood is a 3D
    ball in voxel units (isotropic voxels assumed), not a per-slice disc. Where an error
    could plausibly happen, uncertainty is worth judging; far from any tumour it is not.
    All False when both masks are empty.
    """
    pred, truth = _as_masks(pred, truth)
    foreground = pred | truth
    if not foreground.any():
        return np.zeros_like(foreground)
    return ndimage.distance_transform_edt(~foreground) <= radius


def variance_error_auroc(variance: np.ndarray, pred: np.ndarray, truth: np.ndarray,
                         radius: float = 10) -> dict[str, float]:
    """How well the ensemble variance flags the segmentation's errors (pred != truth).

    ``{"neighbourhood": AUROC within `radius` pixels of pred or truth, "all": AUROC over
    every pixel}``. The "all" figure is inflated by the mass of easy background (zero
    variance, no error); the neighbourhood one asks the harder question. nan where a
    region holds no error or only errors.
    """
    pred, truth = _as_masks(pred, truth)
    variance = np.asarray(variance)
    if variance.shape != pred.shape:
        raise ValueError(f"variance shape {variance.shape} differs from mask shape {pred.shape}")
    error = pred != truth
    near = neighbourhood(pred, truth, radius)
    return {"neighbourhood": auroc(variance[near], error[near]), "all": auroc(variance, error)}


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over the pairs where both values are finite; nan when fewer than
    two such pairs remain or either side is constant."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x ({x.size}) and y ({y.size}) differ in size")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    if denominator == 0:
        return float("nan")
    return float((dx * dy).sum() / denominator)


# --------------------------------------------------------------------------------------------
# QU-BraTS uncertainty score (Mehta et al., MELBA 2022)
# --------------------------------------------------------------------------------------------

QUBRATS_THRESHOLDS = np.linspace(100.0, 0.0, 41)  # tau from 100 down to 0 in 40 steps


def variance_to_uncertainty(variance: np.ndarray) -> np.ndarray:
    """Ensemble variance of {0, 1} members -> QU-BraTS uncertainty in [0, 100] (0.25 is the
    largest variance such members can have)."""
    return np.clip(np.asarray(variance, dtype=np.float32) / 0.25 * 100.0, 0.0, 100.0)


def entropy_uncertainty(probability: np.ndarray) -> np.ndarray:
    """Binary entropy (bits) of the ensemble mean, scaled to [0, 100]."""
    p = np.clip(np.asarray(probability, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(p < 1, (1 - p) * np.log2(1 - p), 0.0))
    return (100.0 * h).astype(np.float32)


def _kept_counts(uncertainty: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of the given voxels have uncertainty <= each threshold (kept at that tau)."""
    return np.searchsorted(np.sort(uncertainty.reshape(-1)), thresholds, side="right")


def qubrats_score(uncertainty: np.ndarray, pred: np.ndarray, truth: np.ndarray,
                  brain: np.ndarray | None = None, thresholds: np.ndarray = QUBRATS_THRESHOLDS) -> dict[str, float]:
    """The QU-BraTS score of an uncertainty map u in [0, 100] for one region.

    At each threshold tau the voxels with u > tau are filtered out. On the rest: the Dice of
    pred against truth, the share of the true positives that were filtered (FTP, relative to
    the unfiltered count) and the share of the true negatives inside the brain that were
    filtered (FTN). Each curve's area over tau / 100 gives AUC(Dice), AUC(FTP), AUC(FTN);
    ``score = (AUC(Dice) + (1 - AUC(FTP)) + (1 - AUC(FTN))) / 3``, higher is better. A
    threshold where nothing of pred or truth is left scores Dice 1 (nothing to find, nothing
    found), as :func:`dice` does; with no true positive (negative) at all FTP (FTN) is 0.
    ``brain`` defaults to every voxel.
    """
    pred, truth = _as_masks(pred, truth)
    u = np.asarray(uncertainty, dtype=np.float32)
    if u.shape != pred.shape:
        raise ValueError(f"uncertainty shape {u.shape} differs from mask shape {pred.shape}")
    brain = np.ones_like(pred) if brain is None else np.asarray(brain).astype(bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    tp = _kept_counts(u[pred & truth], thresholds).astype(np.float64)
    fp = _kept_counts(u[pred & ~truth], thresholds).astype(np.float64)
    fn = _kept_counts(u[~pred & truth], thresholds).astype(np.float64)
    tn = _kept_counts(u[~pred & ~truth & brain], thresholds).astype(np.float64)
    total = 2 * tp + fp + fn
    dice_curve = np.where(total > 0, 2 * tp / np.maximum(total, 1), 1.0)
    tp_all = int((pred & truth).sum())
    tn_all = int((~pred & ~truth & brain).sum())
    ftp = (tp_all - tp) / tp_all if tp_all else np.zeros_like(tp)
    ftn = (tn_all - tn) / tn_all if tn_all else np.zeros_like(tn)
    span = abs(thresholds[0] - thresholds[-1])

    def area(curve: np.ndarray) -> float:  # trapezoid rule (np.trapezoid needs numpy 2)
        return float(abs(np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(thresholds))) / span)

    auc_dice, auc_ftp, auc_ftn = area(dice_curve), area(ftp), area(ftn)
    return {"score": (auc_dice + (1 - auc_ftp) + (1 - auc_ftn)) / 3, "auc_dice": auc_dice,
            "auc_ftp": auc_ftp, "auc_ftn": auc_ftn}


def region_scores(mask: np.ndarray, truth: np.ndarray, variance: np.ndarray | None = None,
                  spacing: Sequence[float] | float | None = None, brain: np.ndarray | None = None,
                  radius: float = 10) -> dict[str, float]:
    """One region's figures: Dice, HD95 (mm) and, given an uncertainty map (an ensemble's
    variance, or a one-pass model's p(1 - p)), the QU-BraTS score of that map and the AUROC of
    the variance as a detector of the mask's errors within ``radius`` voxels of mask or truth
    (:func:`variance_error_auroc`); nan for those two without a map."""
    row = {"dice": dice(mask, truth), "hd95": hd95(mask, truth, spacing=spacing),
           "qubrats": float("nan"), "auroc": float("nan")}
    if variance is not None:
        row["qubrats"] = qubrats_score(variance_to_uncertainty(variance), mask, truth, brain)["score"]
        row["auroc"] = variance_error_auroc(variance, mask, truth, radius)["neighbourhood"]
    return row
