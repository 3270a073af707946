"""npe2 writers: Labels and Image layers -> .nii/.nii.gz on the source file's grid.

A layer read by this plugin (or computed by the widget) carries the source affine, header and
axis order in ``layer.metadata``; the writer undoes the display order exactly, so reading the
written file with nibabel gives the source affine, shape and voxel order. A layer without that
metadata (e.g. a new Labels layer painted by hand) takes the geometry of an open layer of the
same shape that has it, else an axis-aligned affine from its scale and translate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import _layerdata as ld
from .data import save_nifti
from .errors import DiffSegError


def _with_extension(path: str) -> Path:
    lowered = path.lower()
    if lowered.endswith(".nii") or lowered.endswith(".nii.gz"):
        return Path(path)
    return Path(path + ".nii.gz")


def _geometry_from_viewer(display_shape: tuple[int, ...]) -> dict | None:
    """Metadata of an open layer on the same grid, for layers that have none of their own."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:
        return None
    if viewer is None:
        return None
    for layer in viewer.layers:
        meta = getattr(layer, "metadata", None)
        if ld.has_geometry(meta) and tuple(reversed(meta[ld.SPATIAL_SHAPE])) == tuple(display_shape):
            return meta
    return None


def _label_dtype(data: np.ndarray) -> np.dtype:
    if data.size == 0:
        return np.dtype(np.uint8)
    low, high = int(data.min()), int(data.max())
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise DiffSegError(f"label values {low}..{high} do not fit a 32-bit NIfTI; relabel the layer first")


def write_layer(path: str, data: Any, attributes: dict, is_labels: bool) -> list[str]:
    target = _with_extension(str(path))
    array = np.asarray(data)
    meta = attributes.get("metadata") or {}
    leading = int(meta.get("leading_axes", 0))
    spatial_ndim = array.ndim - leading
    if not ld.has_geometry(meta) or len(meta[ld.SPATIAL_SHAPE]) != spatial_ndim:
        leading = 0
        spatial_ndim = array.ndim
        meta = _geometry_from_viewer(array.shape) or {}
    if spatial_ndim not in (2, 3):
        raise DiffSegError(
            f"layer {attributes.get('name', '')!r} has shape {array.shape}; only 2D slices and 3D volumes "
            "(optionally with one stacked axis) can be written as NIfTI"
        )
    core = ld.to_core(array, spatial_ndim)
    if ld.has_geometry(meta):
        expected = tuple(meta[ld.SPATIAL_SHAPE])
        if core.shape[leading:] != expected:
            raise DiffSegError(
                f"layer {attributes.get('name', '')!r}: shape {array.shape} is not on its source grid "
                f"({tuple(reversed(expected))}); it cannot be written with the source affine"
            )
        affine, header = meta[ld.AFFINE], meta.get(ld.HEADER)
    else:
        affine = ld.affine_from_layer(attributes.get("scale", (1.0,) * array.ndim),
                                      attributes.get("translate", (0.0,) * array.ndim), spatial_ndim)
        header = None
    if leading:  # stacked members (N, ...) -> (X, Y, Z, N): NIfTI keeps extra axes last
        core = np.moveaxis(core, list(range(leading)), list(range(-leading, 0)))
    if is_labels:
        dtype = _label_dtype(core)
    else:
        dtype = np.dtype(np.float32) if core.dtype.kind in "fb" or core.dtype.itemsize > 4 else core.dtype
    save_nifti(target, core, affine, header=header, dtype=dtype)
    return [str(target)]


def write_labels(path: str, data: Any, attributes: dict) -> list[str]:
    return write_layer(path, data, attributes, is_labels=True)


def write_image(path: str, data: Any, attributes: dict) -> list[str]:
    return write_layer(path, data, attributes, is_labels=False)
