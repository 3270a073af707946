"""npe2 sample data: a real BraTS 2018 slice and sub-volume (see sample_data/README.md) and a
synthetic phantom. Each opens like a case folder: t1, t1ce, t2, flair and ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import MODALITIES
from . import _layerdata as ld
from ._reader import _case_tuples
from .data import case_files_from_paths
from .errors import DiffSegError

SAMPLE_DIR = Path(__file__).parent / "sample_data"
BRATS_CASE = "Brats18_TCIA10_637_1"
BRATS_SLICE = f"{BRATS_CASE}_z092"
BRATS_VOLUME = f"{BRATS_CASE}_z084-099"
PHANTOM_SEED = 7


def sample_files(stem: str):
    paths = {kind: SAMPLE_DIR / f"{stem}_{kind}.nii.gz" for kind in (*MODALITIES, "seg")}
    missing = [path.name for path in paths.values() if not path.is_file()]
    if missing:
        raise DiffSegError(
            f"sample data file(s) {', '.join(missing)} missing from {SAMPLE_DIR}; reinstall napari-diffseg "
            "or run scripts/make_sample_data.py"
        )
    return case_files_from_paths(*(paths[m] for m in MODALITIES), seg=paths["seg"], name=BRATS_CASE)


def _prefix() -> bool:
    from ._reader import _viewer_layer_names

    return bool(_viewer_layer_names() & {"t1", "t1ce", "t2", "flair", ld.GROUND_TRUTH})


def brats_slice() -> list[tuple]:
    """One axial BraTS 2018 slice (240 x 240) through the tumour, with ground truth."""
    return _case_tuples(sample_files(BRATS_SLICE), prefix=_prefix())


def brats_volume() -> list[tuple]:
    """16 axial BraTS 2018 slices (240 x 240 x 16) around the tumour, with ground truth."""
    return _case_tuples(sample_files(BRATS_VOLUME), prefix=_prefix())


def phantom(seed: int = PHANTOM_SEED, size: int = 240) -> list[tuple]:
    """A synthetic 4-modality phantom slice with a known tumour (1 mm pixels)."""
    from .synthetic import make_phantom

    made = make_phantom(seed, size=size)
    images = np.asarray(made["images"], dtype=np.float32)
    return ld.case_layer_tuples(f"phantom{seed}", images, np.eye(4), None,
                                ld.seg_labels(made["label"]), prefix=_prefix())
