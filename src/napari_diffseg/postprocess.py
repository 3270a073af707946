"""Post-processing of a whole-volume mask: small disconnected islands removed.

A 2D model sees one slice at a time, so a false positive far from the tumour (a bright vessel,
a flow artefact) survives as a small island in 3D; such islands dominate the HD95. nnU-Net keeps
a connected-component step only where cross-validation shows it helps, and so does this
project: the size is decided on the cross-validation folds (``scripts/crossval_table.py``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 26-connectivity in 3D (8 in 2D): touching at a corner still counts as one lesion
_STRUCTURE = {2: np.ones((3, 3), bool), 3: np.ones((3, 3, 3), bool)}


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """The mask without connected components of fewer than ``min_voxels`` voxels. The largest
    component is always kept, whatever its size, so a small tumour is never erased whole.
    ``min_voxels`` <= 0 returns the mask unchanged (as a bool copy)."""
    mask = np.asarray(mask).astype(bool)
    if min_voxels <= 0 or not mask.any():
        return mask.copy()
    labels, count = ndimage.label(mask, structure=_STRUCTURE.get(mask.ndim))
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.reshape(-1))[1:]
    keep = sizes >= min_voxels
    keep[int(np.argmax(sizes))] = True
    return keep[labels - 1] & mask
