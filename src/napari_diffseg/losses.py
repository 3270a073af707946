"""The segmentation losses beside the diffusion loss: soft Dice + binary cross-entropy, of the
baseline's logits or of the diffusion model's x0 estimate.
"""

from __future__ import annotations

import torch


def _soft_dice_loss(p: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    # The smoothing term keeps slices without tumour from dividing by zero and rewards
    # predicting them empty.
    dims = tuple(range(1, p.ndim))
    return 1 - (2 * (p * masks).sum(dims) + smooth) / (p.sum(dims) + masks.sum(dims) + smooth)


def segmentation_losses(logits: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample BCE + soft Dice loss of (B, 1, h, w) logits against {0, 1} masks."""
    dims = tuple(range(1, logits.ndim))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks, reduction="none").mean(dims)
    dice = _soft_dice_loss(torch.sigmoid(logits), masks)
    return {"loss": bce + dice, "bce": bce, "dice_loss": dice}


def x0_dice_bce(x0: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample soft Dice + BCE of a clean-mask estimate read as a probability.

    The estimate lives on the mask's own scale, so it is clamped into (0, 1) rather than
    squashed by a sigmoid: a value past 0 or 1 on the right side costs nothing more."""
    p = x0.clamp(1e-4, 1 - 1e-4)
    dims = tuple(range(1, p.ndim))
    bce = torch.nn.functional.binary_cross_entropy(p, masks, reduction="none").mean(dims)
    return bce + _soft_dice_loss(p, masks)
