"""The tumour's parts: BraTS label maps and the nested regions a model segments (no torch, no Qt).

BraTS labels: 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing tumour. The challenge
scores three nested regions, and a region model (``diffseg-train --regions brats``) denoises
one binary mask per region, in this channel order:

- WT, whole tumour: labels 1, 2, 4
- TC, tumour core: labels 1, 4
- ET, enhancing tumour: label 4

A whole-tumour model (``--regions wt``, the default) has one channel, WT.

The nesting rule, one for every path (training targets never break it; predictions may):
a voxel keeps TC only where it is also WT, and ET only where it is also TC (and so WT):
``TC := TC & WT``, ``ET := ET & TC``, applied from the outside in. A lone ET or TC voxel
outside the whole tumour is dropped, never promoted into it: the outer regions are the ones a
model learns best (more voxels, clearer contrast), so they bound the inner ones, as nnU-Net's
region-based BraTS models do. On probabilities the same rule is the pointwise minimum, which
commutes with a threshold: thresholding nested probabilities gives nested masks.
"""

from __future__ import annotations

import numpy as np

from .errors import DiffSegError

# The region sets a model can be trained on, and their channels in order.
REGION_SETS: dict[str, tuple[str, ...]] = {"wt": ("wt",), "brats": ("wt", "tc", "et")}
BRATS_REGIONS = REGION_SETS["brats"]
# The BraTS labels inside each region.
REGION_LABELS: dict[str, tuple[int, ...]] = {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)}
BRATS_LABELS = (0, 1, 2, 4)
NECROTIC_CORE, OEDEMA, ENHANCING = 1, 2, 4


def region_names(regions: str) -> tuple[str, ...]:
    """The channels of a region set ("wt" or "brats"), e.g. ("wt", "tc", "et")."""
    try:
        return REGION_SETS[regions]
    except KeyError:
        raise DiffSegError(f"regions {regions!r} are unknown: use {' or '.join(REGION_SETS)}",
                           setting="regions") from None


def region_count(regions: str) -> int:
    return len(region_names(regions))


def labels_to_regions(labels: np.ndarray, regions: str = "brats") -> np.ndarray:
    """A BraTS label map (...) -> its region masks (R, ...) uint8 {0, 1}, R channels of ``regions``.

    For the three BraTS regions every label but 0, 1, 2, 4 is refused: BraTS 2023 calls the
    enhancing tumour 3, and a silent guess would score the wrong region. A map without tumour
    gives empty regions. For ``wt`` alone any positive label counts (the whole-tumour rule of
    :func:`data.label_to_mask`)."""
    labels = np.asarray(labels)
    if regions == "wt":
        return (labels > 0).astype(np.uint8)[None]
    names = region_names(regions)
    present = np.unique(labels)
    unknown = [int(v) if float(v).is_integer() else float(v) for v in present if v not in BRATS_LABELS]
    if unknown:
        raise DiffSegError(f"label map holds {', '.join(map(str, unknown[:5]))}: the tumour's regions need the "
                           "BraTS labels 0, 1 (necrotic core), 2 (oedema), 4 (enhancing); relabel it (BraTS 2023's "
                           "enhancing tumour 3 is 4 here)")
    return np.stack([np.isin(labels, REGION_LABELS[name]) for name in names]).astype(np.uint8)


def nest_regions(regions: np.ndarray) -> np.ndarray:
    """The (3, ...) WT, TC, ET channels with the nesting rule applied (a copy of the same type):
    TC only inside WT, ET only inside TC. Masks (bool or 0/1) or probabilities alike (the
    pointwise minimum, which is AND on masks)."""
    regions = np.asarray(regions)
    if regions.ndim < 1 or regions.shape[0] != len(BRATS_REGIONS):
        raise DiffSegError(f"region masks must have the {len(BRATS_REGIONS)} channels WT, TC, ET first; "
                           f"got shape {regions.shape}")
    nested = regions.copy()
    nested[1] = np.minimum(nested[1], nested[0])
    nested[2] = np.minimum(nested[2], nested[1])
    return nested


def regions_to_labels(regions: np.ndarray) -> np.ndarray:
    """(3, ...) WT, TC, ET masks (truthy = inside) -> a BraTS label map (...) uint8: 4 where ET,
    1 where TC and not ET, 2 where WT and not TC, 0 elsewhere; after the nesting rule (ET
    outside TC, or TC outside WT, is dropped)."""
    wt, tc, et = nest_regions(np.asarray(regions).astype(bool))
    labels = np.zeros(wt.shape, np.uint8)
    labels[wt] = OEDEMA
    labels[tc] = NECROTIC_CORE
    labels[et] = ENHANCING
    return labels


def labels_from_probability(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The label map of per-region ensemble means (3, ...): each region where its mean exceeds
    ``threshold``, then nested (:func:`regions_to_labels`)."""
    return regions_to_labels(np.asarray(probability) > threshold)


def clean_labels(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """The label map without whole-tumour islands under ``min_voxels`` voxels (the largest part
    always stays: :func:`postprocess.remove_small_components` on WT); what is removed goes with
    its core and enhancing voxels, so the regions stay nested."""
    from .postprocess import remove_small_components

    labels = np.asarray(labels)
    keep = remove_small_components(labels > 0, min_voxels)
    return np.where(keep, labels, 0).astype(labels.dtype)
