"""The training slices: every labelled slice of slice folders or BraTS volumes, in memory, and the
batches drawn from them (tumour slices at a set share).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data
from .errors import DiffSegError
from .geometry import Geometry
from .preprocess import InputSpec, neighbour_slices, volume_statistics
from .regions import labels_to_regions


@dataclass
class SliceSet:
    """Every training slice preprocessed to the network's size, kept in memory (fp16)."""

    images: torch.Tensor  # (M, C, h, w): 4 modalities per slice offset (preprocess.InputSpec), [0, 1]
    masks: torch.Tensor  # (M, K, h, w) {0, 1}: whole tumour (K = 1), or WT, TC, ET (regions.py)
    names: list[str]
    # (M, 4, 2) mean and std per modality of each slice's volume, for --input_norm zscore; the
    # normalisation is applied per batch, after the augmentation, which works on [0, 1] images
    stats: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @functools.cached_property
    def tumour_indices(self) -> np.ndarray:
        """Rows whose mask holds any tumour pixel, of any region (computed once: the set never
        changes)."""
        return np.flatnonzero(self.masks.flatten(1).amax(1).numpy() > 0)

    def draw(self, rng: np.random.Generator, size: int, tumour_fraction: float = 0.0) -> np.ndarray:
        """``size`` row indices: a ``tumour_fraction`` share from tumour slices, the rest
        uniformly from all. A fractional share is rounded at random, so the expected share is
        exact at any batch size."""
        if tumour_fraction <= 0:
            return rng.integers(0, len(self), size=size)
        tumour = self.tumour_indices
        if tumour.size == 0:
            raise DiffSegError("--tumour_fraction: no training slice holds tumour; use 0 or add labelled tumour cases")
        wanted = tumour_fraction * size
        n_tumour = int(math.floor(wanted)) + int(rng.random() < wanted - math.floor(wanted))
        return np.concatenate([rng.choice(tumour, size=n_tumour), rng.integers(0, len(self), size=size - n_tumour)])


def build_slice_set(path: str | Path, geometry: Geometry, multiple: int, require_labels: bool = True,
                    log=print, spec: InputSpec = InputSpec(), regions: str = "wt") -> SliceSet:
    """Every brain slice of the labelled cases under ``path``; the masks hold the whole tumour
    (``regions`` "wt") or its three nested regions WT, TC, ET ("brats"; a case without labels
    1, 2, 4 has empty regions)."""
    cases = data.find_cases(path)
    images, masks, names, stats = [], [], [], []
    for files in cases:
        if files.seg is None:
            if require_labels:
                raise DiffSegError(
                    f"{files.images['t1'].parent}: no segmentation file; training needs one per case "
                    f"(e.g. {files.name}_seg.nii.gz)"
                )
            continue
        case = data.load_case(files)
        zs = data.brain_slices(case.images)
        vol = case.images if case.is_volume else case.images[..., None]
        batch = torch.from_numpy(neighbour_slices(vol, zs, spec))
        if regions == "wt":
            lab = case.label if case.is_volume else case.label[..., None]
            label = torch.from_numpy(np.ascontiguousarray(np.moveaxis(lab[..., zs], -1, 0)))[:, None].float()
        else:
            try:
                parts = labels_to_regions(case.labels, regions)  # (K, *spatial)
            except DiffSegError as exc:
                raise DiffSegError(f"{files.seg}: {exc}") from None
            parts = parts if case.is_volume else parts[..., None]
            # (K, X, Y, Z) -> (slices, K, X, Y), as the images
            label = torch.from_numpy(np.ascontiguousarray(np.moveaxis(parts[..., zs], -1, 0))).float()
        images.append(geometry.to_network(batch, multiple).half())
        stats.append(torch.from_numpy(volume_statistics(vol, spec))[None].expand(len(zs), -1, -1))
        masks.append(geometry.to_network(label, multiple, is_mask=True).to(torch.uint8))
        names.extend(f"{case.name}:{z}" for z in zs)
    if not names:
        raise DiffSegError(f"{path}: no labelled cases found; training needs images with a segmentation")
    log(f"loaded {len(names)} slices from {len(cases)} cases in {path}")
    return SliceSet(torch.cat(images), torch.cat(masks), names, torch.cat(stats))
