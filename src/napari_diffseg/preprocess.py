"""What a model sees of the four images: their normalisation and the neighbouring slices.

A model records its :class:`InputSpec` in its checkpoint (``diffseg-train --input_norm``,
``--context``), so training and every sampling path build the same input from the same
[0, 1]-scaled volume (``data.normalise_intensity``):

- ``input_norm``: ``"percentile"`` (the [0, 1] scaling as it is) or ``"zscore"``: each
  modality minus its mean, over its standard deviation, both taken over the brain of the whole
  volume (nnU-Net's choice for MRI: a scanner's gain and offset cancel out), background 0;
- ``context``: k neighbouring slices on either side of each modality as extra condition
  channels (2.5D). Channel order: the slice itself first (t1, t1ce, t2, flair), then the
  offsets -1, +1, -2, +2 ... each as the same four. A volume feeds its real neighbours (a slice
  at its edge repeats the edge slice); a lone 2D slice repeats itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import DiffSegError

MODALITY_COUNT = 4
INPUT_NORMS = ("percentile", "zscore")
MIN_STD = 1e-6  # below this a modality counts as constant: it is centred, not divided


@dataclass(frozen=True)
class InputSpec:
    input_norm: str = "percentile"
    context: int = 0

    def __post_init__(self):
        if self.input_norm not in INPUT_NORMS:
            raise DiffSegError(f"input normalisation {self.input_norm!r}: use one of {', '.join(INPUT_NORMS)}")
        if int(self.context) < 0:
            raise DiffSegError(f"context {self.context}: give 0 or more neighbouring slices")

    @classmethod
    def from_dict(cls, values: dict | None) -> "InputSpec":
        values = values or {}
        return cls(str(values.get("input_norm", "percentile")), int(values.get("context", 0)))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def offsets(self) -> list[int]:
        """Slice offsets in channel order: 0, -1, +1, -2, +2, ..."""
        out = [0]
        for d in range(1, self.context + 1):
            out += [-d, d]
        return out

    @property
    def channels(self) -> int:
        return MODALITY_COUNT * len(self.offsets)


def volume_statistics(volume: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(4, 2) mean and standard deviation per modality over the brain (voxels where any
    modality is non-zero) of a (4, *spatial) volume; (0, 1) rows, a no-op, for ``percentile``."""
    stats = np.zeros((volume.shape[0], 2), np.float32)
    stats[:, 1] = 1.0
    if spec.input_norm == "zscore":
        brain = np.asarray(volume).any(axis=0)
        if brain.any():
            for m in range(volume.shape[0]):
                voxels = np.asarray(volume[m])[brain].astype(np.float64)
                stats[m] = voxels.mean(), voxels.std()
    return stats


def neighbour_slices(volume: np.ndarray, zs: list[int], spec: InputSpec) -> np.ndarray:
    """(S, 4 * (2k + 1), H, W) float32 condition channels of slices ``zs`` of a (4, H, W, Z)
    volume, in :attr:`InputSpec.offsets` order; offsets past an edge repeat the edge slice."""
    depth = volume.shape[-1]
    planes = []
    for z in zs:
        picks = [min(max(int(z) + d, 0), depth - 1) for d in spec.offsets]
        planes.append(np.concatenate([volume[..., p] for p in picks], axis=0))
    return np.ascontiguousarray(np.stack(planes), dtype=np.float32)


def normalise(images: torch.Tensor, stats: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Apply ``input_norm`` to (S, C, H, W) condition channels with their volume's (S, 4, 2)
    statistics (C = 4 per offset). The background (all modalities 0 at a pixel of one offset)
    stays 0; a constant modality is centred (std below ``MIN_STD`` is not divided by)."""
    if spec.input_norm == "percentile":
        return images
    s, c = images.shape[:2]
    repeats = c // MODALITY_COUNT
    mean = stats[..., 0].repeat(1, repeats).to(images).view(s, c, 1, 1)
    std = stats[..., 1].repeat(1, repeats).to(images).view(s, c, 1, 1)
    std = torch.where(std < MIN_STD, torch.ones_like(std), std)
    grouped = images.view(s, repeats, MODALITY_COUNT, *images.shape[2:])
    brain = (grouped != 0).any(dim=2, keepdim=True).expand_as(grouped).reshape(images.shape)
    return torch.where(brain, (images - mean) / std, torch.zeros_like(images))
