"""A case's result as the widget keeps it: the ensemble statistics (re-thresholded, ranked,
hinted) and what the user painted by hand into the segmentation (no Qt).

A region model's result (WT, TC, ET: :mod:`napari_diffseg.regions`) keeps a region axis first in
probability and variance, a threshold per region, and its proposal is a BraTS label map; the
hints and the ranking read the whole tumour's variance."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .. import _layerdata as ld
from ..refine import Hint, next_mark
from ..regions import clean_labels, nest_regions, regions_to_labels

if TYPE_CHECKING:
    from .inputs import Inputs
    from .job import Partial, RunOutcome


@dataclass
class ResultState:
    """Ensemble statistics of one case in core order, kept for re-thresholding and review."""

    case: str
    spatial_shape: tuple[int, ...]
    probability: np.ndarray
    variance: np.ndarray
    threshold: float = 0.5
    members: np.ndarray | None = None  # (N, X, Y[, Z]) or (N, X, Y, 1) for one slice of a volume
    members_z: int | None = None  # the slice the members belong to when they cover one slice
    slices: list[int] = field(default_factory=list)  # sampled slices (volume), [0] for 2D
    num_ensemble: int = 0
    summary: str = ""
    last_z: int | None = None  # the slice of the last run; None: it covered the whole input
    partial: tuple[int, int] | None = None  # (finished, total) slices when the last run was cancelled
    # Per slice (0 for a 2D input): the members of the last run of that slice, (N, X, Y), which a
    # Refine starts from, and the "next mark" hint of its variance.
    slice_members: dict[int, np.ndarray] = field(default_factory=dict)
    hints: dict[int, "Hint"] = field(default_factory=dict)
    # 3D clean-up (regions.clean_labels) of the proposal: the size in voxels, 0 = off.
    # It acts only on a whole-volume result, as cross-validated; a lone slice's islands are kept.
    cleanup_voxels: int = 0
    stored_cleanup: int = 0  # the size the model stores (what the widget's box turns on)
    whole_volume: bool = False  # a whole-volume run was merged (later single-slice runs keep it so)
    regions: tuple[str, ...] = ("wt",)  # the model's regions; more than one: a region axis first
    region_thresholds: dict[str, float] = field(default_factory=dict)  # a region's own, else `threshold`
    shown_region: str = "wt"  # whose variance the uncertainty layer shows

    @classmethod
    def empty(cls, case: str, spatial_shape: Sequence[int], threshold: float = 0.5,
              regions: Sequence[str] = ("wt",)) -> "ResultState":
        shape = tuple(int(n) for n in spatial_shape)
        full = shape if len(regions) == 1 else (len(regions), *shape)
        return cls(case, shape, np.zeros(full, np.float32), np.zeros(full, np.float32), threshold,
                   regions=tuple(regions))

    @property
    def multi_region(self) -> bool:
        return len(self.regions) > 1

    def threshold_of(self, region: str) -> float:
        return self.region_thresholds.get(region, self.threshold)

    def thresholded_at(self, threshold: float) -> bool:
        """Whether every region's proposal is cut at ``threshold``."""
        return all(abs(self.threshold_of(r) - threshold) < 1e-6 for r in self.regions)

    def variance_of(self, region: str = "wt") -> np.ndarray:
        """The spatial variance map of one region (the only one of a whole-tumour model)."""
        return self.variance[self.regions.index(region)] if self.multi_region else self.variance

    def member_labels(self) -> np.ndarray | None:
        """A region model's members as BraTS label maps (N, *spatial) (each member's regions at
        0.5, nested), or None when the members were not kept."""
        if self.members is None:
            return None
        return np.stack([regions_to_labels(member > 0.5) for member in self.members])

    def region_masks(self) -> np.ndarray:
        """(R, *spatial) bool: each region's mean above its threshold, nested (TC in WT, ET in TC)."""
        cut = np.array([self.threshold_of(r) for r in self.regions], np.float32)
        return nest_regions(self.probability > cut.reshape(-1, *([1] * len(self.spatial_shape))))

    @property
    def is_volume(self) -> bool:
        return len(self.spatial_shape) == 3

    @property
    def cleans_up(self) -> bool:
        return self.cleanup_voxels > 0 and self.is_volume and self.whole_volume

    def mask(self, threshold: float | None = None) -> np.ndarray:
        """The proposal: 0/1, or a region model's BraTS labels 0/1/2/4 (``threshold``: whole
        tumour only)."""
        if self.multi_region:
            mask = regions_to_labels(self.region_masks())
        else:
            mask = (self.probability > (self.threshold if threshold is None else threshold)).astype(np.uint8)
        # clean_labels takes a 0/1 mask as a label map of one label
        return clean_labels(mask, self.cleanup_voxels) if self.cleans_up else mask

    def merge(self, outcome: RunOutcome) -> None:
        """Put a run's result in: the whole case, or one slice of a volume (others are kept)."""
        seg = outcome.segmentation
        self.num_ensemble = seg.num_ensemble
        if outcome.z is None:
            self.probability = np.asarray(seg.probability, np.float32)
            self.variance = np.asarray(seg.variance, np.float32)
            self.members = None if seg.samples is None else np.asarray(seg.samples, np.float32)
            self.members_z = None
            self.slices = list(outcome.slices)
            self.whole_volume = self.is_volume
            self.slice_members.clear()
            self.hints.clear()
            if self.members is not None:
                if self.is_volume:  # views, not copies
                    self.slice_members.update({z: self.members[..., z] for z in self.slices})
                else:
                    self.slice_members[0] = self.members
        else:
            z = outcome.z
            self.probability[..., z] = seg.probability
            self.variance[..., z] = seg.variance
            self.members = None if seg.samples is None else np.asarray(seg.samples, np.float32)[..., None]
            self.members_z = z
            self.slices = sorted(set(self.slices) | {z})
            if self.members is not None:
                self.slice_members[z] = self.members[..., 0]
            else:
                self.slice_members.pop(z, None)  # older members no longer match this slice's result
        self.update_hints(self.slices if outcome.z is None else [outcome.z])
        self.last_z = outcome.z
        self.partial = None

    def merge_partial(self, partial: Partial) -> None:
        """Put in the finished slices of a cancelled volume run (the other slices are kept)."""
        for z in partial.finished:
            self.probability[..., z] = partial.probability[z]
            self.variance[..., z] = partial.variance[z]
            self.slice_members.pop(z, None)  # the cancelled run's members were not kept
        self.num_ensemble = partial.num_ensemble
        self.members = None  # the members of unfinished batches were never complete
        self.members_z = None
        self.slices = sorted(set(self.slices) | set(partial.finished))
        self.update_hints(partial.finished)
        self.last_z = None
        self.partial = (len(partial.finished), partial.total)

    def variance_slice(self, z: int | None) -> np.ndarray:
        """The (X, Y) whole-tumour variance of slice z (the whole map of a 2D input)."""
        variance = self.variance_of("wt")
        return variance[..., z] if self.is_volume else variance

    def members_for(self, z: int | None) -> np.ndarray | None:
        """The (N, X, Y) members of the last run of slice z (None for a 2D input), if kept."""
        return self.slice_members.get(0 if z is None else int(z))

    def update_hints(self, zs: Iterable[int]) -> None:
        """Recompute the "next mark" hint of these slices from their variance."""
        for z in zs:
            key = int(z) if self.is_volume else 0
            hint = next_mark(ld.to_display(self.variance_slice(key if self.is_volume else None)))
            if hint is None:
                self.hints.pop(key, None)
            else:
                self.hints[key] = hint

    def ranked_slices(self) -> list[tuple[int, float]]:
        return rank_slices(self.variance_of("wt"), self.slices) if self.is_volume else []


def rank_slices(variance: np.ndarray, slices: Iterable[int] | None = None) -> list[tuple[int, float]]:
    """(z, mean variance of the slice) for the given slices of a (X, Y, Z) map, most uncertain first."""
    variance = np.asarray(variance)
    zs = range(variance.shape[-1]) if slices is None else slices
    means = [(int(z), float(variance[..., z].mean())) for z in zs]
    return sorted(means, key=lambda item: (-item[1], item[0]))


def mark_painted(painted: np.ndarray, atoms) -> None:
    """Record the voxels of a napari Labels paint event (its ``value``: the history atoms of
    one edit) in the boolean array ``painted`` (the layer's shape).

    An atom is either (indices, old values, new values) or, for brush/fill/polygon edits in
    recent napari, a record with ``slice_key`` (bounding box) and ``mask`` (None = all of it).
    """
    for atom in atoms or ():
        slice_key = getattr(atom, "slice_key", None)
        if slice_key is not None:
            mask = getattr(atom, "mask", None)
            if mask is None:
                painted[tuple(slice_key)] = True
            else:
                painted[tuple(slice_key)] |= np.asarray(mask, bool)
        else:
            indices = atom[0]
            painted[tuple(indices)] = True


class HandEdits:
    """What the user did by hand in a case's segmentation layer (display order).

    A voxel is the user's while a paint stroke has reached it and it still differs from what the
    accepts wrote there. napari's undo writes the old values back without a paint event, so an
    undone stroke hands its voxels back to the next Accept, and an undone Accept leaves nothing
    marked as painted.
    """

    def __init__(self, initial: np.ndarray):
        self.written = np.array(initial, copy=True)  # the layer as the accepts left it, strokes aside
        self.touched = np.zeros(self.written.shape, bool)  # voxels a paint stroke reached
        # per slice of display axis 0 (one flag for a 2D slice): accepted into at least once
        self.accepted = np.zeros(self.written.shape[0] if self.written.ndim == 3 else 1, bool)

    def mark(self, atoms) -> None:
        mark_painted(self.touched, atoms)

    def edited(self, segmentation: np.ndarray) -> np.ndarray:
        return self.touched & (np.asarray(segmentation) != self.written)

    def holds_work(self, segmentation: np.ndarray, z: int | None) -> bool:
        """Whether the slice (None: the 2D slice) was accepted into or edited by hand."""
        where = slice(None) if z is None else z
        edited = self.touched[where] & (np.asarray(segmentation)[where] != self.written[where])
        return bool(self.accepted[0 if z is None else z] or edited.any())

    def commit(self, segmentation: np.ndarray, proposal: np.ndarray,
               zs: Sequence[int] | None = None) -> tuple[tuple[np.ndarray, ...], np.ndarray, int]:
        """What accepting ``proposal`` into ``segmentation`` changes, recorded as written.

        Only slices ``zs`` (display axis 0) are touched, all of it when None. The user's voxels
        are left alone. Returns (indices, new values, number of the user's voxels kept that the
        proposal would have changed): indices and values go to ``Labels.data_setitem`` so the
        accept is one step of napari's undo history.
        """
        segmentation, proposal = np.asarray(segmentation), np.asarray(proposal)
        region = np.zeros(segmentation.shape, bool)
        region[slice(None) if zs is None else list(zs)] = True
        edited = self.edited(segmentation)
        differs = region & (segmentation != proposal)
        kept = int(np.count_nonzero(differs & edited))
        indices = np.nonzero(differs & ~edited)
        ours = region & ~edited
        self.written[ours] = proposal[ours]
        self.touched[ours] = False
        self.accepted[slice(None) if zs is None or self.written.ndim != 3 else list(zs)] = True
        return indices, proposal[indices], kept



@dataclass
class CaseResult:
    """What the widget holds of one case: its result, the user's hand edits in its segmentation
    layer, the input layer its layers are placed by, and the ground truth its figures are of."""

    name: str
    result: ResultState
    reference: object = None  # the t1 layer of the shown result (scale, translate, metadata)
    truth: np.ndarray | None = None  # display order
    spacing: tuple[float, ...] = ()  # voxel size, core order (for HD95)
    edits: HandEdits | None = None  # made with the case's segmentation layer

    def result_fits(self, display_shape: Sequence[int]) -> bool:
        """Whether the result is of images of this shape (display order)."""
        return self.result.spatial_shape == tuple(reversed(tuple(display_shape)))


class CaseResults:
    """The cases this widget has results of, by name, and the one on screen."""

    def __init__(self):
        self._cases: dict[str, CaseResult] = {}
        self.current_name: str | None = None

    def __contains__(self, name: str) -> bool:
        return name in self._cases

    def __getitem__(self, name: str) -> CaseResult:
        return self._cases[name]

    def get(self, name: str | None) -> CaseResult | None:
        return self._cases.get(name or "")

    @property
    def current(self) -> CaseResult | None:
        return self.get(self.current_name)

    def state_for(self, name: str, display_shape: Sequence[int], threshold: float, whole: bool,
                  regions: Sequence[str] = ("wt",)) -> ResultState:
        """The result state a run of the case merges into: the case's, or a fresh one when the
        input changed shape, the model segments other regions, or the run covers it all (kept
        only once shown: ``show``)."""
        core_shape = tuple(reversed(tuple(display_shape)))
        case = self._cases.get(name)
        state = None if case is None else case.result
        if state is None or state.spatial_shape != core_shape or state.regions != tuple(regions) or whole:
            old = state
            state = ResultState.empty(name, core_shape, threshold, regions)
            if old is not None and old.multi_region and old.regions == state.regions:
                state.region_thresholds = dict(old.region_thresholds)  # the user's, kept over a re-run
                state.shown_region = old.shown_region
        if not state.multi_region:
            state.threshold = threshold
        return state

    def show(self, inputs: Inputs, state: ResultState) -> CaseResult:
        """Make ``state`` the result of the inputs' case, and that case the one on screen."""
        case = self._cases.get(inputs.case)
        if case is None:
            case = self._cases[inputs.case] = CaseResult(inputs.case, state)
        case.result, case.reference, case.truth, case.spacing = state, inputs.reference, inputs.truth, inputs.spacing
        self.current_name = inputs.case
        return case
