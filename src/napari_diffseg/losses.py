"""The segmentation losses beside the diffusion loss: soft Dice + binary cross-entropy, of the
baseline's logits or of the diffusion model's x0 estimate.

A mask of several channels (the tumour's regions WT, TC, ET) is scored per channel and the
channels averaged, so a small region (ET) weighs as much as a large one (WT) in the Dice.
"""

from __future__ import annotations

import torch


def _soft_dice_loss(p: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    # The smoothing term keeps slices without tumour from dividing by zero and rewards
    # predicting them empty.
    if p.ndim > 2 and p.shape[1] > 1:  # one Dice per channel, then their mean
        dims = tuple(range(2, p.ndim))
        dice = (2 * (p * masks).sum(dims) + smooth) / (p.sum(dims) + masks.sum(dims) + smooth)
        return 1 - dice.mean(1)
    dims = tuple(range(1, p.ndim))
    return 1 - (2 * (p * masks).sum(dims) + smooth) / (p.sum(dims) + masks.sum(dims) + smooth)


def segmentation_losses(logits: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample BCE + soft Dice loss of (B, K, h, w) logits against {0, 1} masks (K channels:
    the BCE's mean runs over them too, the Dice is their mean)."""
    dims = tuple(range(1, logits.ndim))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks, reduction="none").mean(dims)
    dice = _soft_dice_loss(torch.sigmoid(logits), masks)
    return {"loss": bce + dice, "bce": bce, "dice_loss": dice}


def x0_dice_bce(x0: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample soft Dice + BCE of a clean-mask estimate read as a probability (per channel,
    averaged over the channels).

    The estimate lives on the mask's own scale, so it is clamped into (0, 1) rather than
    squashed by a sigmoid: a value past 0 or 1 on the right side costs nothing more."""
    p = x0.clamp(1e-4, 1 - 1e-4)
    dims = tuple(range(1, p.ndim))
    bce = torch.nn.functional.binary_cross_entropy(p, masks, reduction="none").mean(dims)
    return bce + _soft_dice_loss(p, masks)
