"""How NIfTI voxel arrays become napari layers and back (no Qt; used by reader, writer, widget).

Orientation convention
----------------------
The core keeps nibabel voxel order: a slice is ``(X, Y)``, a volume ``(X, Y, Z)`` with Z the
axial slice index (the last voxel axis). napari layers hold the *reversed* spatial axes:
``(Y, X)`` for a slice and ``(Z, Y, X)`` for a volume. So

* napari's dimension slider runs over Z (axial slices), and
* the canvas shows rows = Y, columns = X, which for BraTS-style files (affine diag(-1, -1, 1))
  is the radiological view (anterior at the top, the patient's right on the left).

The reversal is its own inverse: ``to_core(to_display(a)) == a``. Extra leading axes (the
stacked ensemble members ``(N, ...)``) are left in front.

``scale`` is the voxel size in mm and ``translate`` the scanner position of voxel 0 along each
voxel axis, mirrored where the affine flips that axis (so the picture is not turned upside
down): napari's world coordinates are millimetres, exact in size, and exact in position up to
the sign of flipped axes. The full affine, the NIfTI header and the axis order are kept in
``layer.metadata`` (keys below) and are what the writer uses to restore the file geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_diffseg import MODALITIES

# layer.metadata keys
AFFINE = "affine"  # 4x4 float64, the source file's voxel -> scanner (mm) matrix
HEADER = "header"  # nibabel.Nifti1Header of the source file (written back by the writer)
VOXEL_SIZE = "voxel_size"  # mm per voxel, core (voxel) order
AXES = "axes"  # display axis i shows core spatial axis AXES[i]: (1, 0) or (2, 1, 0)
SPATIAL_SHAPE = "spatial_shape"  # core order
CASE = "case"  # case name, "" when unknown
SOURCE = "source"  # the file the layer came from, "" when computed
KIND = "kind"  # "t1" ... "flair", "seg", "image"; the widget's: "proposal", "uncertainty", "members",
# "preview", "segmentation"

GROUND_TRUTH = "ground truth"

# Spatial axes only; leading (non-spatial) axes stay first.


def reversed_axes(spatial_ndim: int) -> tuple[int, ...]:
    return tuple(range(spatial_ndim - 1, -1, -1))


def to_display(array: np.ndarray, spatial_ndim: int | None = None) -> np.ndarray:
    """Core (…, X, Y[, Z]) -> napari (…, [Z,] Y, X): reverse the trailing spatial axes (a view)."""
    array = np.asarray(array)
    spatial_ndim = array.ndim if spatial_ndim is None else spatial_ndim
    lead = array.ndim - spatial_ndim
    if lead < 0:
        raise ValueError(f"array of {array.ndim} dimensions cannot hold {spatial_ndim} spatial axes")
    order = tuple(range(lead)) + tuple(lead + axis for axis in reversed_axes(spatial_ndim))
    return array.transpose(order)


def to_core(array: np.ndarray, spatial_ndim: int | None = None) -> np.ndarray:
    """napari (…, [Z,] Y, X) -> core (…, X, Y[, Z]); the inverse of ``to_display`` (a view)."""
    return to_display(array, spatial_ndim)


def _voxel_axes_world(affine: np.ndarray, spatial_ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per core axis: voxel size (column norm), the sign of its dominant scanner axis, its origin."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    origin = np.asarray(affine, dtype=np.float64)[:3, 3]
    sizes, signs, starts = [], [], []
    for axis in range(spatial_ndim):
        column = linear[:, axis]
        dominant = int(np.argmax(np.abs(column)))
        sign = 1.0 if column[dominant] >= 0 else -1.0
        sizes.append(float(np.linalg.norm(column)) or 1.0)
        signs.append(sign)
        starts.append(sign * float(origin[dominant]) + 0.0)  # + 0.0: no "-0" in napari's display
    return np.array(sizes), np.array(signs), np.array(starts)


def world_transform(affine: np.ndarray, spatial_ndim: int, leading: int = 0) -> tuple[tuple, tuple]:
    """(scale, translate) in display order for a layer of ``leading`` + ``spatial_ndim`` axes."""
    sizes, _, starts = _voxel_axes_world(affine, spatial_ndim)
    order = list(reversed_axes(spatial_ndim))
    scale = (1.0,) * leading + tuple(float(sizes[axis]) for axis in order)
    translate = (0.0,) * leading + tuple(float(starts[axis]) for axis in order)
    return scale, translate


def spatial_metadata(
    affine: np.ndarray,
    header: nib.Nifti1Header | None,
    spatial_shape: Sequence[int],
    case: str = "",
    source: str | Path = "",
    kind: str = "image",
) -> dict:
    spatial_ndim = len(spatial_shape)
    affine = np.asarray(affine, dtype=np.float64)
    if header is None:
        header = header_for(affine, spatial_shape)
    sizes, _, _ = _voxel_axes_world(affine, spatial_ndim)
    return {
        AFFINE: affine,
        HEADER: header,
        VOXEL_SIZE: tuple(float(size) for size in sizes),
        AXES: reversed_axes(spatial_ndim),
        SPATIAL_SHAPE: tuple(int(n) for n in spatial_shape),
        CASE: case,
        SOURCE: str(source),
        KIND: kind,
    }


def header_for(affine: np.ndarray, spatial_shape: Sequence[int]) -> nib.Nifti1Header:
    """A fresh header (mm units, sform/qform from ``affine``) for arrays made from scratch."""
    image = nib.Nifti1Image(np.zeros(tuple(spatial_shape), np.uint8), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    return image.header


def axis_labels(spatial_ndim: int, leading: int = 0, leading_name: str = "volume") -> tuple[str, ...]:
    """Display-order axis names: ("z", "y", "x") for a volume, ("y", "x") for a slice.

    Named axes make napari's slider read "z" instead of "-3"; leading axes (a stack of volumes
    in a 4D file) are called ``leading_name``."""
    spatial = ("z", "y", "x")[-spatial_ndim:]
    lead = (leading_name,) if leading == 1 else tuple(f"{leading_name} {i}" for i in range(leading))
    return lead + spatial


def layer_kwargs(meta: dict, leading: int = 0, **extra) -> dict:
    """scale, translate, axis labels and metadata for a layer whose data is ``to_display`` of core data."""
    spatial_ndim = len(meta[SPATIAL_SHAPE])
    scale, translate = world_transform(meta[AFFINE], spatial_ndim, leading)
    metadata = dict(meta)
    if leading:
        metadata["leading_axes"] = leading
    return {"scale": scale, "translate": translate, "axis_labels": axis_labels(spatial_ndim, leading),
            "metadata": metadata, **extra}


def derived_metadata(meta: dict | None, kind: str, case: str | None = None) -> dict:
    """Metadata for a layer computed from a source layer's (same grid, no source file)."""
    out = dict(meta or {})
    out[KIND] = kind
    out[SOURCE] = ""
    out.pop("leading_axes", None)
    if case is not None:
        out[CASE] = case
    return out


def has_geometry(meta: dict | None) -> bool:
    return bool(meta) and AFFINE in meta and SPATIAL_SHAPE in meta


def affine_from_layer(scale: Sequence[float], translate: Sequence[float], spatial_ndim: int) -> np.ndarray:
    """An axis-aligned affine for a layer without NIfTI metadata (display -> core axis order)."""
    affine = np.eye(4)
    scale = list(scale)[-spatial_ndim:]
    translate = list(translate)[-spatial_ndim:]
    for display_axis, core_axis in enumerate(reversed_axes(spatial_ndim)):
        affine[core_axis, core_axis] = scale[display_axis]
        affine[core_axis, 3] = translate[display_axis]
    return affine


# ---------------------------------------------------------------------------------------------
# Cases -> layer data tuples
# ---------------------------------------------------------------------------------------------


def layer_name(case: str, what: str, prefix: bool) -> str:
    return f"{case} {what}" if prefix and case else what


def result_name(case: str, what: str) -> str:
    """``<case> diffseg proposal`` etc.; just ``diffseg proposal`` when the case has no name."""
    return f"{case} diffseg {what}".strip()


def segmentation_name(case: str) -> str:
    """The user's editable result: ``<case> segmentation``."""
    return layer_name(case, "segmentation", True)


def image_layer_tuple(core: np.ndarray, meta: dict, name: str, visible: bool = True) -> tuple:
    data = np.ascontiguousarray(to_display(core))
    finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    kwargs = layer_kwargs(meta, name=name, colormap="gray", contrast_limits=(low, high), visible=visible)
    return data, kwargs, "image"


def labels_layer_tuple(core: np.ndarray, meta: dict, name: str, opacity: float = 0.5) -> tuple:
    data = np.ascontiguousarray(to_display(np.asarray(core)))
    return data, layer_kwargs(meta, name=name, opacity=opacity), "labels"


def case_layer_tuples(
    name: str,
    images: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None,
    label: np.ndarray | None = None,
    files: dict | None = None,
    prefix: bool = False,
) -> list[tuple]:
    """Four Image layers (t1, t1ce, t2, flair) and a ``ground truth`` Labels layer, in display order.

    images: (4, X[, Y[, Z]]) core order; label: BraTS labels in the same grid, or None.
    """
    files = files or {}
    spatial = images.shape[1:]
    tuples = []
    for index, modality in enumerate(MODALITIES):
        meta = spatial_metadata(affine, header, spatial, case=name, source=files.get(modality, ""), kind=modality)
        layer = image_layer_tuple(images[index], meta, layer_name(name, modality, prefix))
        layer[1]["contrast_limits"] = (0.0, max(1.0, float(layer[1]["contrast_limits"][1])))
        tuples.append(layer)
    if label is not None:
        meta = spatial_metadata(affine, header, spatial, case=name, source=files.get("seg", ""), kind="seg")
        tuples.append(labels_layer_tuple(label.astype(np.uint8), meta, layer_name(name, GROUND_TRUTH, prefix)))
    return tuples


def seg_labels(seg: np.ndarray) -> np.ndarray:
    """A ground-truth file's label map as small non-negative integers (BraTS 0/1/2/4 stay)."""
    seg = np.asarray(seg)
    if seg.dtype.kind == "f":
        seg = np.rint(seg)
    seg = np.clip(seg, 0, None)
    return seg.astype(np.uint8 if seg.size == 0 or seg.max() < 256 else np.int32)
