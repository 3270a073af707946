"""Where a user would mark a mask, and the marks as network input.

One rule places a mark, shared by the simulated clinician (``benchmarks/bench_interactive.py``)
and by training (``diffseg-train --click_fraction``): a disk at the centre of the mask's
largest error region, the protocol of interactive-segmentation papers. A model trained with
marks sees them as two input channels of their own (tumour, not tumour), so a refine can tell
a mark from the model's own state.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

TUMOUR, NOT_TUMOUR = 1, 2  # mark labels, as the widget's scribble layer paints them
HINT_CHANNELS = 2  # one input channel per mark label


def largest_error(mask: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The largest connected error region of the mask (bool) and the label it should have (1: a
    missed tumour region, 0: a false one); None when the mask has no error."""
    mask, truth = np.asarray(mask, bool), np.asarray(truth, bool)
    best = None
    for value, error in ((1, truth & ~mask), (0, mask & ~truth)):
        labels, count = ndimage.label(error)
        if count == 0:
            continue
        sizes = ndimage.sum(error, labels, index=np.arange(1, count + 1))
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (sizes[k], value, labels == k + 1)
    return None if best is None else (best[2], best[1])


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def next_click(mask: np.ndarray, truth: np.ndarray, radius: float) -> tuple[np.ndarray, int] | None:
    """The disk (bool, mask-shaped) at the centre of the largest error region, and its label
    (1: a missed tumour region, 0: a false one); None when the mask has no error."""
    found = largest_error(mask, truth)
    if found is None:
        return None
    region, value = found
    # The interior point farthest from the region's border (of several, the one nearest the
    # region's centroid): a click a person would make.
    inside = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(inside == inside.max())
    centroid = np.argwhere(region).mean(axis=0)
    k = int(np.argmin((ys - centroid[0]) ** 2 + (xs - centroid[1]) ** 2))
    return disk(region.shape, (ys[k], xs[k]), radius), value


def marks_to_hints(marks: np.ndarray) -> np.ndarray:
    """(..., H, W) mark labels (1 tumour, 2 not tumour, else none) -> (..., 2, H, W) float32."""
    marks = np.asarray(marks)
    return np.stack([marks == TUMOUR, marks == NOT_TUMOUR], axis=-3).astype(np.float32)


def simulate_marks(estimate: np.ndarray, truth: np.ndarray, rng: np.random.Generator,
                   radii: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0), most_extra: int = 2,
                   band: int = 10) -> np.ndarray:
    """The marks a user might have made on one slice, as labels (H, W) uint8.

    One mark where ``estimate`` (bool) is most wrong against ``truth`` (bool), plus up to
    ``most_extra`` earlier marks that agree with the truth: inside the tumour, or outside it
    within ``band`` pixels (where the boundary is disputed), or anywhere without tumour.
    Radii are drawn from ``radii``; a later mark overwrites an earlier one where they overlap.
    """
    truth = np.asarray(truth, bool)
    marks = np.zeros(truth.shape, np.uint8)
    near = ndimage.binary_dilation(truth, iterations=band) & ~truth if truth.any() else ~truth
    for _ in range(int(rng.integers(0, most_extra + 1))):
        inside = bool(truth.any()) and rng.random() < 0.5
        pool = np.flatnonzero(truth if inside else (near if near.any() else ~truth))
        if pool.size == 0:
            continue
        centre = np.unravel_index(int(rng.choice(pool)), truth.shape)
        marks[disk(truth.shape, centre, float(rng.choice(radii)))] = TUMOUR if inside else NOT_TUMOUR
    click = next_click(estimate, truth, float(rng.choice(radii)))
    if click is not None:
        region, value = click
        marks[region] = TUMOUR if value else NOT_TUMOUR
    return marks
