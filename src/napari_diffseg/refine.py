"""Refining a proposal with the user's marks, without Qt or napari: the scribble labels, the
known pixels a refine holds (scribbles, and the accepted segmentation outside a drawn region;
per region for a region model: :func:`region_known_pixels`),
the chain a refine runs on and where it starts, the "next mark" hint of where a mark would help
most, and the scribbles a simulated user draws.

The widget's Refine and the simulated clinician of ``benchmarks/bench_interactive.py`` both take
these from here, so that a benchmark measures what the user gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .clicks import NOT_TUMOUR, TUMOUR

SCRIBBLE_TUMOUR, SCRIBBLE_BACKGROUND = TUMOUR, NOT_TUMOUR  # label values of the "<case> scribbles" layer
SCRIBBLE_NAMES = {SCRIBBLE_TUMOUR: "tumour", SCRIBBLE_BACKGROUND: "not tumour"}


REFINE_MIN_STEPS = 10


def refine_respacing(preset_steps: int) -> str | None:
    """The chain a refine runs on when the user chose no step count: the model's preset, but at
    least 10 steps. A refine starts half-way down its chain; on the demo model's 5-step preset
    that leaves 3 steps (from t = 500) to follow the new marks, and refining lost to painting by
    hand (benchmarks/README.md); half of 10 steps did not. None keeps the preset."""
    return None if preset_steps >= REFINE_MIN_STEPS else str(REFINE_MIN_STEPS)


def refine_start_step(chain_steps: int) -> int:
    """The respaced step a refine starts at: about half the chain (SDEdit-style), so that the
    members' shape survives the noise but the model has room to follow the new marks. A
    10-step chain starts at step 4 and runs 5 steps."""
    return max(0, (int(chain_steps) + 1) // 2 - 1)


def refine_chain(segmenter, respacing: str | None = None) -> tuple[str, int, int]:
    """A refine from members: its respacing (the user's step count, else the model's preset but
    at least REFINE_MIN_STEPS), that chain's length and the step it starts at. The widget's
    Refine and the simulated clinician (benchmarks/bench_interactive.py) both take it from here."""
    chosen = segmenter.defaults["timestep_respacing"] if respacing is None else respacing
    if respacing is None:
        chosen = refine_respacing(segmenter.num_steps(chosen)) or chosen
    steps = segmenter.num_steps(chosen)
    return chosen, steps, refine_start_step(steps)


@dataclass
class KnownPixels:
    """Pixels of one slice whose mask value the user gave (display order, (rows, cols); a region
    model's mask and values (R, rows, cols): :func:`region_known_pixels`)."""

    mask: np.ndarray  # bool
    values: np.ndarray  # float32, 0 or 1 where mask
    tumour: int = 0  # scribbled pixels of each kind
    background: int = 0
    from_segmentation: int = 0  # pixels outside the region taken from the segmentation below
    outside_source: str = "accepted"  # what that segmentation is: "accepted" or "proposal" pixels
    ignored_labels: tuple[int, ...] = ()  # scribble labels other than 1 and 2 (not used)
    marks: np.ndarray | None = None  # uint8: the scribbles of labels 1 and 2, 0 elsewhere

    @property
    def count(self) -> int:
        """Pixels known (in any region)."""
        mask = self.mask if self.mask.ndim == 2 else np.any(self.mask, axis=0)
        return int(np.count_nonzero(mask))

    def summary(self) -> str:
        parts = []
        if self.tumour or self.background:
            parts.append(f"{self.tumour} tumour and {self.background} not-tumour scribbled pixels")
        if self.from_segmentation:
            parts.append(f"{self.from_segmentation} {self.outside_source} pixels outside the region")
        return " and ".join(parts) or "no known pixels"


def known_pixels(scribbles: np.ndarray, segmentation: np.ndarray | None = None,
                 region: np.ndarray | None = None, source: str = "accepted") -> KnownPixels:
    """The known pixels of a refine, from 2D arrays of one slice (the same shape).

    scribbles: 1 = tumour (known 1), 2 = not tumour (known 0), anything else unmarked.
    segmentation, region: where a region is drawn, the accepted segmentation (label > 0 is
    tumour) is known everywhere outside it, so the refine redoes only the region; without a
    region (None or empty) only the scribbles are known. Scribbles win over the segmentation.
    source: what the segmentation is, for the summary ("accepted", or "proposal" where the
    caller holds the current proposal because nothing was accepted on the slice).
    """
    scribbles = np.asarray(scribbles)
    known = np.zeros(scribbles.shape, bool)
    values = np.zeros(scribbles.shape, np.float32)
    from_segmentation = 0
    if region is not None and np.any(region):
        outside = ~np.asarray(region, bool)
        seg = np.zeros(scribbles.shape, bool) if segmentation is None else np.asarray(segmentation) > 0
        known |= outside
        values[outside] = seg[outside]
    tumour = scribbles == SCRIBBLE_TUMOUR
    background = scribbles == SCRIBBLE_BACKGROUND
    if region is not None and np.any(region):
        from_segmentation = int(np.count_nonzero(known & ~tumour & ~background))
    known |= tumour | background
    values[tumour] = 1.0
    values[background] = 0.0
    other = np.unique(scribbles[(scribbles != 0) & ~tumour & ~background])
    marks = np.where(tumour | background, scribbles, 0).astype(np.uint8)
    return KnownPixels(known, values, int(tumour.sum()), int(background.sum()), from_segmentation, source,
                       tuple(int(v) for v in other), marks)


def region_known_pixels(scribbles: np.ndarray, segmentation: np.ndarray | None = None,
                        region: np.ndarray | None = None, source: str = "accepted",
                        regions: str = "brats") -> KnownPixels:
    """The known pixels of a refine with a region model: :func:`known_pixels` with a region axis
    first in ``mask`` and ``values``, (R, rows, cols) in the channel order of ``regions``
    (WT, TC, ET), each region known or not on its own. The scribbles are whole-tumour marks:

    - tumour (1): WT = 1 only. The mark says nothing about the parts, so TC and ET stay free
      for the model - except outside a drawn region where the segmentation is tumour too: there
      the mark agrees with it and the segmentation's parts stay (it holds them fixed).
    - not tumour (2): WT = TC = ET = 0 (no tumour means no part of it).
    - outside a drawn region (as :func:`known_pixels`): every region as in ``segmentation``, a
      BraTS label map (0, 1, 2, 4; :func:`regions.labels_to_regions`, which refuses other labels);
      no segmentation holds all of them at 0.

    Marks for the parts themselves (core, enhancing) do not exist yet. The counts, marks and
    summary are those of :func:`known_pixels`.
    """
    from .regions import labels_to_regions, region_names

    flat = known_pixels(scribbles, segmentation, region, source)
    scribbles = np.asarray(scribbles)
    count = len(region_names(regions))
    mask = np.zeros((count, *scribbles.shape), bool)
    values = np.zeros((count, *scribbles.shape), np.float32)
    if region is not None and np.any(region):
        outside = ~np.asarray(region, bool)
        parts = (np.zeros((count, *scribbles.shape), np.uint8) if segmentation is None
                 else labels_to_regions(segmentation, regions))
        mask[:, outside] = True
        values[:, outside] = parts[:, outside]
    tumour = scribbles == SCRIBBLE_TUMOUR
    background = scribbles == SCRIBBLE_BACKGROUND
    # A tumour mark frees the parts unless a held segmentation already calls the pixel tumour.
    held_tumour = mask[0] & (values[0] > 0)
    free_parts = tumour & ~held_tumour
    mask[1:, free_parts] = False
    values[1:, free_parts] = 0.0
    mask[0, tumour] = True
    values[0, tumour] = 1.0
    mask[:, background] = True
    values[:, background] = 0.0
    flat.mask, flat.values = mask, values
    return flat


@dataclass
class Hint:
    """The most uncertain connected region of a slice (display order, (rows, cols))."""

    bbox: tuple[int, int, int, int]  # row0, col0, row1, col1, inclusive
    score: float  # summed variance over the region
    pixels: int
    mask: np.ndarray  # bool, the region

    def rectangle(self, pad: float = 1.0) -> np.ndarray:
        """Corners of a rectangle around it in data coordinates (pixel centres at integers)."""
        r0, c0, r1, c1 = self.bbox
        top, left, bottom, right = r0 - 0.5 - pad, c0 - 0.5 - pad, r1 + 0.5 + pad, c1 + 0.5 + pad
        return np.array([[top, left], [top, right], [bottom, right], [bottom, left]], float)


HINT_FLOOR = 0.02  # smoothed variance below this is no disagreement worth a look
HINT_RELATIVE = 0.5  # regions are where the smoothed variance reaches half its peak
HINT_SIGMA = 1.5  # pixels


def next_mark(variance: np.ndarray, floor: float = HINT_FLOOR, relative: float = HINT_RELATIVE,
              sigma: float = HINT_SIGMA) -> Hint | None:
    """Where a mark would help most: the connected region of high ensemble variance with the
    largest summed variance, or None when the members agree everywhere.

    The map is smoothed first, so that a whole lump the members disagree on outranks the
    one-pixel rim every tumour boundary has (members that differ by a pixel); regions are where
    the smoothed variance reaches ``relative`` of its peak (at least ``floor``), 8-connected,
    and ranked by the raw variance they hold.
    """
    from scipy import ndimage

    variance = np.nan_to_num(np.asarray(variance, np.float64))
    if variance.ndim != 2 or variance.size == 0:
        raise ValueError(f"next_mark needs a 2D variance map, got shape {variance.shape}")
    smooth = ndimage.gaussian_filter(variance, sigma) if sigma > 0 else variance
    peak = float(smooth.max())
    if peak < floor:
        return None
    labels, count = ndimage.label(smooth >= max(floor, relative * peak), structure=np.ones((3, 3), bool))
    scores = ndimage.sum_labels(variance, labels, index=np.arange(1, count + 1))
    best = int(np.argmax(scores)) + 1
    region = labels == best
    rows, cols = ndimage.find_objects(region.astype(np.int8))[0]
    return Hint((rows.start, cols.start, rows.stop - 1, cols.stop - 1), float(scores[best - 1]),
                int(region.sum()), region)
