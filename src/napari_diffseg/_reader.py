"""npe2 reader: NIfTI files and case folders -> napari layers (geometry in layer.metadata).

* a case folder (the reference's slice folders, BraTS case folders, or a folder of those)
  opens as Image layers ``t1``, ``t1ce``, ``t2``, ``flair`` (intensities normalised as the
  model sees them) and a Labels layer ``ground truth`` when a seg file is present; names are
  prefixed by the case name when several cases are opened or already open;
* the four files of a case passed together (File > Open Files as Stack, or ``read_paths`` given
  the list) open the same way;
* a file named after a modality opens as that modality of its case: an Image layer
  ``<case> t1`` (etc.), normalised per volume exactly as in a case folder, and a seg file as the
  Labels layer ``<case> ground truth``. File > Open with several files calls the reader once per
  file, so the four modality files picked there arrive one by one; each becomes its case's
  modality layer and the widget's pickers fill from the names. (Opening the whole case whenever
  one of its files is picked was the other choice; it was not taken because it opens files the
  user did not pick, and picking the four files would open the case four times.)
* any other .nii/.nii.gz opens as one layer named after the file: a small-integer map as Labels,
  everything else as an Image with its stored values.

Arrays are shown in display order (see ``_layerdata``): (Z, Y, X) for volumes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import MODALITIES
from . import _layerdata as ld
from .data import (
    SEG,
    SEG_TOKENS,
    CaseFiles,
    _name_without_modality,
    case_files_from_paths,
    classify_file,
    find_cases,
    load_case,
    load_nifti,
    nifti_stem as _nifti_stem,
    normalise_intensity,
)
from .errors import DiffSegError

PathOrPaths = str | Sequence[str]
MAX_LABEL_VALUES = 64  # an integer file with at most this many values opens as Labels
MAX_CASES = 8  # more cases than this in one go would swamp the viewer (and the memory)


def _is_nifti(path: str | Path) -> bool:
    return _nifti_stem(Path(path).name) is not None


def _folder_has_nifti(folder: Path, depth: int = 2) -> bool:
    try:
        children = list(folder.iterdir())
    except OSError:
        return False
    if any(child.is_file() and _is_nifti(child) for child in children):
        return True
    return depth > 0 and any(
        child.is_dir() and not child.name.startswith(".") and _folder_has_nifti(child, depth - 1) for child in children
    )


def napari_get_reader(path: PathOrPaths) -> Callable | None:
    """The reader function for ``path`` (a file, a folder or a list of them), or None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        return None
    for item in paths:
        item = Path(item)
        if item.is_dir():
            if not _folder_has_nifti(item):
                return None
        elif not _is_nifti(item):
            return None
    return read_paths


def _viewer_layer_names() -> set[str]:
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no napari application: nothing is open
        return set()
    return set() if viewer is None else {layer.name for layer in viewer.layers}


def _case_tuples(files: CaseFiles, prefix: bool) -> list[tuple]:
    case = load_case(files)
    label = None
    if files.seg is not None:
        # load_case validated the seg file and reduced it to whole tumour; show the full label map.
        label = ld.seg_labels(load_nifti(files.seg)[0])
    sources = {modality: str(path) for modality, path in files.images.items()}
    if files.seg is not None:
        sources["seg"] = str(files.seg)
    return ld.case_layer_tuples(case.name, case.images, case.affine, case.header, label, sources, prefix)


def _case_name(path: Path, kind: str) -> str:
    """The case a modality or seg file belongs to: its name without the modality/seg token."""
    if kind != SEG:
        return _name_without_modality(path)
    stem = _nifti_stem(path.name) or path.name
    parts = re.split(r"([_\-.]+)", stem)
    kept = [part for part in parts[::2] if part and part.lower() not in SEG_TOKENS]
    separator = next((part for part in parts[1::2]), "_")  # the name's own, as in data
    return separator.join(kept) or path.parent.name or stem


def _modality_file_tuple(path: Path, kind: str, data: np.ndarray, affine, header) -> tuple:
    """One file of a case as the case folder would show it: ``<case> <modality>``, normalised,
    or ``<case> ground truth`` as BraTS labels."""
    case = _case_name(path, kind)
    meta = ld.spatial_metadata(affine, header, data.shape, case=case, source=path, kind=kind)
    if kind == SEG:
        return ld.labels_layer_tuple(ld.seg_labels(data), meta, ld.layer_name(case, ld.GROUND_TRUTH, True))
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise DiffSegError(f"{path}: {bad} voxels are NaN or Inf; replace them (e.g. with 0) and save the file again")
    layer = ld.image_layer_tuple(normalise_intensity(data), meta, ld.layer_name(case, kind, True))
    layer[1]["contrast_limits"] = (0.0, max(1.0, float(layer[1]["contrast_limits"][1])))  # as case_layer_tuples
    return layer


def _single_file_tuple(path: Path) -> tuple:
    data, affine, header = load_nifti(path)
    if data.ndim not in (2, 3, 4):
        raise DiffSegError(f"{path}: is {data.ndim}D; napari-diffseg reads 2D, 3D or 4D (stacked) NIfTI files")
    name = _nifti_stem(path.name) or path.name
    try:
        kind = classify_file(path)
    except DiffSegError:
        kind = None
    if kind in (*MODALITIES, SEG) and data.ndim <= 3:
        return _modality_file_tuple(path, kind, data, affine, header)
    # A 4D file is a stack of volumes (e.g. ensemble members written by the writer): stack first.
    spatial_ndim = min(data.ndim, 3)
    leading = data.ndim - spatial_ndim
    core = np.moveaxis(data, -1, 0) if leading else data
    meta = ld.spatial_metadata(affine, header, core.shape[leading:], source=path, kind=kind or "image")
    is_labels = data.dtype.kind in "biu" and len(np.unique(data[:: max(1, data.size // 2_000_000)])) <= MAX_LABEL_VALUES
    display = np.ascontiguousarray(ld.to_display(core, spatial_ndim))
    if is_labels and not leading:
        return display, ld.layer_kwargs(meta, name=name, opacity=0.5), "labels"
    finite = display[np.isfinite(display)] if display.dtype.kind == "f" else display
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    kwargs = ld.layer_kwargs(meta, leading, name=name, colormap="gray",
                             contrast_limits=(low, high if high > low else low + 1.0))
    return display, kwargs, "image"


def _group_as_case(paths: list[Path]) -> CaseFiles | None:
    """Four modality files (and at most one seg) selected together, else None."""
    if not 4 <= len(paths) <= 5 or not all(path.is_file() for path in paths):
        return None
    found: dict[str, Path] = {}
    for path in paths:
        try:
            kind = classify_file(path)
        except DiffSegError:
            return None
        if kind is None or kind in found:
            return None
        found[kind] = path
    if not all(modality in found for modality in ("t1", "t1ce", "t2", "flair")):
        return None
    return case_files_from_paths(found["t1"], found["t1ce"], found["t2"], found["flair"], found.get("seg"))


def read_paths(path: PathOrPaths) -> list[tuple]:
    """Layer data tuples for ``path`` (see the module docstring). Errors are one-line DiffSegErrors."""
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    cases: list[CaseFiles] = []
    singles: list[Path] = []
    grouped = _group_as_case(paths)
    if grouped is not None:
        cases.append(grouped)
    else:
        for item in paths:
            if item.is_dir():
                cases.extend(find_cases(item))
            else:
                singles.append(item)
    if len(cases) > MAX_CASES:
        raise DiffSegError(
            f"{len(cases)} cases found under {', '.join(str(p) for p in paths)}; open one case folder "
            f"(or at most {MAX_CASES} cases) at a time"
        )
    existing = _viewer_layer_names()
    plain = {ld.layer_name("", what, False) for what in ("t1", "t1ce", "t2", "flair", ld.GROUND_TRUTH)}
    prefix = len(cases) > 1 or bool(existing & plain)
    tuples: list[tuple] = []
    for files in cases:
        tuples.extend(_case_tuples(files, prefix))
    for item in singles:
        tuples.append(_single_file_tuple(item))
    return tuples
