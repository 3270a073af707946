"""Getting MR cases from disk into arrays and results back onto disk (NIfTI, no Qt).

A *case* is one patient (a 3D volume per modality) or one 2D slice (the reference's data
layout): four co-registered images t1, t1ce, t2, flair and optionally a segmentation.
Files are recognised by the tokens of their names, so the layouts of the reference repository
(``brats_train_001_t1ce_080_w.nii.gz`` or plain ``t1ce.nii.gz``), of BraTS 2018-2021
(``Brats18_2013_2_1_t1ce.nii.gz``, ``BraTS20_Training_001_t1ce.nii.gz``) and of BraTS 2023
(``BraTS-GLI-00000-000-t1c.nii.gz``) all load without configuration.

Arrays stay in nibabel voxel order (no reorientation): the reference does the same, so a
model trained on its slices sees the same orientation, and results written with the t1 file's
affine land exactly on the input grid. Every problem a user can cause is a ``DiffSegError``
whose one-line message names the file or folder and says what to do.
"""

from __future__ import annotations

import gzip
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt

from napari_diffseg import MODALITIES
from napari_diffseg.errors import DiffSegError
from napari_diffseg.files import atomic_write

__all__ = [
    "MODALITY_ALIASES",
    "SEG",
    "SEG_TOKENS",
    "Case",
    "CaseFiles",
    "brain_slices",
    "case_files_from_paths",
    "classify_file",
    "find_case_files",
    "find_cases",
    "label_to_mask",
    "load_case",
    "load_nifti",
    "name_tokens",
    "nifti_stem",
    "normalise_intensity",
    "save_nifti",
]

PathLike = str | os.PathLike[str]

# --------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------

SEG = "seg"
"""What ``classify_file`` returns for a segmentation (ground-truth label map) file."""

# Each alias is a sequence of name tokens. Two-token aliases catch names such as
# "T1_Gd" or "T2-FLAIR" whose separator would otherwise split them into a plain "t1"/"t2".
MODALITY_ALIASES: dict[str, tuple[tuple[str, ...], ...]] = {
    "t1": (("t1",), ("t1n",), ("t1w",)),
    "t1ce": (("t1ce",), ("t1c",), ("t1gd",), ("t1", "ce"), ("t1", "gd"), ("t1", "c")),
    "t2": (("t2",), ("t2w",)),
    "flair": (("flair",), ("t2f",), ("t2flair",), ("t2", "flair")),
}

# "mask" is deliberately absent: it names brain masks and predicted masks (ours included)
# far more often than ground truth, and a second "segmentation" in a case folder would be an error.
SEG_TOKENS = frozenset({"seg", "label", "labels", "gt"})

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SEPARATORS = re.compile(r"([_\-.]+)")

# Longest aliases first, so that "t1_ce" reads as t1ce and not as t1 followed by junk.
_ALIASES_LONGEST_FIRST = sorted(
    ((alias, modality) for modality, aliases in MODALITY_ALIASES.items() for alias in aliases),
    key=lambda item: -len(item[0]),
)


def nifti_stem(file_name: str) -> str | None:
    """The name without .nii/.nii.gz (any case), or None when it is not a NIfTI name."""
    lowered = file_name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if lowered.endswith(suffix) and len(file_name) > len(suffix):
            return file_name[: -len(suffix)]
    return None


def _split_stem(stem: str) -> list[str]:
    """Tokens and the separators between them, alternating: "a_b-c" -> [a, _, b, -, c]."""
    return _SEPARATORS.split(stem)


def name_tokens(file_name: str) -> list[str]:
    """Lower-case tokens of a NIfTI file name: extension stripped, split on ``_``, ``-``, ``.``."""
    stem = nifti_stem(file_name)
    if stem is None:
        stem = file_name
    return [token for token in _split_stem(stem.lower())[::2] if token]


def _modality_matches(tokens: Sequence[str]) -> list[tuple[str, int, int]]:
    """(modality, first token, end token) for every alias found, scanning left to right."""
    matches = []
    position = 0
    while position < len(tokens):
        for alias, modality in _ALIASES_LONGEST_FIRST:
            if tuple(tokens[position : position + len(alias)]) == alias:
                matches.append((modality, position, position + len(alias)))
                position += len(alias)
                break
        else:
            position += 1
    return matches


def classify_file(path: PathLike) -> str | None:
    """Which modality a file holds (a key of MODALITIES), ``SEG``, or None.

    None for files that are not .nii/.nii.gz, hidden files, and NIfTI files whose name has
    no modality token (outputs, brain masks, ...): those are ignored when finding cases.
    A segmentation token wins over modality tokens ("flair_seg" is a segmentation).
    """
    file_name = Path(path).name
    if file_name.startswith(".") or nifti_stem(file_name) is None:
        return None
    tokens = name_tokens(file_name)
    if SEG_TOKENS.intersection(tokens):
        return SEG
    modalities = sorted({modality for modality, _, _ in _modality_matches(tokens)})
    if len(modalities) > 1:
        raise DiffSegError(
            f"{path}: the name matches more than one modality ({', '.join(modalities)}); "
            "rename it so that it names exactly one of t1, t1ce, t2, flair"
        )
    return modalities[0] if modalities else None


def _name_without_modality(path: Path) -> str:
    """Case name from an image file name: "Brats18_2013_2_1_t1.nii.gz" -> "Brats18_2013_2_1"."""
    stem = nifti_stem(path.name) or path.name
    parts = _split_stem(stem)
    tokens = [token.lower() for token in parts[::2]]
    dropped: set[int] = set()
    for _, start, end in _modality_matches(tokens):
        dropped.update(range(start, end))
    kept = [parts[2 * i] for i in range(len(tokens)) if i not in dropped and parts[2 * i]]
    # Re-join with the name's own first separator, so "BraTS-GLI-00000-000" keeps its dashes.
    separator = next((part for part in parts[1::2]), "_")
    name = separator.join(kept)
    return name or path.parent.name or stem


def _alias_hint(modality: str) -> str:
    return "|".join("_".join(alias) for alias in MODALITY_ALIASES[modality])


# --------------------------------------------------------------------------------------------
# Finding cases
# --------------------------------------------------------------------------------------------


@dataclass
class CaseFiles:
    """Where one case's files are; nothing is loaded."""

    name: str
    images: dict[str, Path]  # keys exactly MODALITIES, in that order
    seg: Path | None = None


def _list_folder(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise DiffSegError(f"{folder}: cannot list the folder ({_one_line(exc)}); check its permissions") from exc


def _classified_files(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in _list_folder(folder):
        if path.is_file():
            kind = classify_file(path)
            if kind is not None:
                found.setdefault(kind, []).append(path)
    return found


def find_case_files(folder: PathLike) -> CaseFiles:
    """The four images (and the segmentation, if any) in one case folder.

    Works for a reference slice folder and for a BraTS case folder alike. Raises when a
    modality is missing or matched by two files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise DiffSegError(f"{folder}: {what}; give the folder that holds one case's t1, t1ce, t2 and flair files")
    found = _classified_files(folder)
    for kind, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(path.name for path in paths)
            raise DiffSegError(
                f"{folder}: {len(paths)} files match {kind} ({names}); keep one {kind} file per case folder "
                "(each case needs its own folder)"
            )
    missing = [modality for modality in MODALITIES if modality not in found]
    if missing:
        example = ", ".join(f"{folder.name}_{modality}.nii.gz" for modality in missing)
        accepted = "; ".join(f"{modality}: {_alias_hint(modality)}" for modality in missing)
        raise DiffSegError(
            f"{folder}: no {', '.join(missing)} image found (expected a file whose name contains the "
            f"modality as a token, e.g. {example}; accepted tokens {accepted})"
        )
    seg = found.get(SEG, [None])[0]
    return CaseFiles(name=folder.name, images={m: found[m][0] for m in MODALITIES}, seg=seg)


def _is_case_folder(folder: Path) -> bool:
    """A folder holding at least one file named like a modality or a segmentation."""
    try:
        return bool(_classified_files(folder))
    except DiffSegError:
        return True  # an ambiguous name: let find_case_files report it


# A case folder, a folder of case folders (training/), or a folder of those (data/).
_MAX_SEARCH_DEPTH = 2


def _case_folders(folder: Path, depth: int) -> list[Path]:
    if _is_case_folder(folder):
        return [folder]
    if depth == 0:
        return []
    found: list[Path] = []
    for child in _list_folder(folder):
        if child.is_dir() and not child.name.startswith("."):
            found.extend(_case_folders(child, depth - 1))
    return found


def find_cases(path: PathLike) -> list[CaseFiles]:
    """All cases at or below ``path``, sorted by name.

    ``path`` may be one case folder, a folder of case folders (the reference's training/ or
    testing/, a BraTS release), or a folder whose subfolders hold case folders (data/ with
    training/ and testing/). Folders without NIfTI files named after a modality are skipped;
    a case folder missing a modality is an error.
    """
    root = Path(path)
    if not root.exists():
        raise DiffSegError(f"{root}: no such folder; check the path")
    if not root.is_dir():
        raise DiffSegError(
            f"{root}: is a file; give the case folder (or a folder of case folders), "
            "or pass the four image files explicitly"
        )
    cases = [find_case_files(folder) for folder in _case_folders(root, _MAX_SEARCH_DEPTH)]
    if not cases:
        raise DiffSegError(
            f"{root}: no cases found; a case folder holds one NIfTI file per modality, named e.g. "
            "case_t1.nii.gz, case_t1ce.nii.gz, case_t2.nii.gz, case_flair.nii.gz (and case_seg.nii.gz)"
        )
    # Names need not be unique across subsets (training/x, testing/x): the path breaks ties.
    return sorted(cases, key=lambda case: (case.name, str(case.images[MODALITIES[0]])))


def case_files_from_paths(
    t1: PathLike,
    t1ce: PathLike,
    t2: PathLike,
    flair: PathLike,
    seg: PathLike | None = None,
    name: str | None = None,
) -> CaseFiles:
    """A case from four explicit files (and an optional segmentation).

    The name defaults to the t1 file name without its modality token. A file whose name
    clearly says another modality than the one it was given as is refused: swapped inputs
    would silently give a wrong segmentation.
    """
    images = {modality: Path(p) for modality, p in zip(MODALITIES, (t1, t1ce, t2, flair))}
    for modality, path in images.items():
        if not path.is_file():
            raise DiffSegError(f"{path}: {modality} file not found; check the path")
        try:
            named = classify_file(path)
        except DiffSegError:
            named = None  # a name mentioning two modalities says nothing reliable
        if named is not None and named != modality:
            raise DiffSegError(
                f"{path}: given as the {modality} image but its name says {named}; "
                "check the order of the files (t1, t1ce, t2, flair)"
            )
    seg_path = None if seg is None else Path(seg)
    if seg_path is not None and not seg_path.is_file():
        raise DiffSegError(f"{seg_path}: segmentation file not found; check the path")
    return CaseFiles(name=name or _name_without_modality(images["t1"]), images=images, seg=seg_path)


# --------------------------------------------------------------------------------------------
# NIfTI input and output
# --------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_nifti(path: PathLike) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """(voxels, 4x4 affine, header) of a .nii/.nii.gz file.

    Voxels keep their stored type after scl_slope/inter (int16 stays int16 when unscaled).
    Trailing axes of length 1 beyond the second are dropped: (X, Y, Z, 1) -> (X, Y, Z),
    (X, Y, 1) -> (X, Y).
    """
    path = Path(path)
    if not path.exists():
        raise DiffSegError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise DiffSegError(f"{path}: is a folder, not a NIfTI file; give a .nii or .nii.gz file")
    if nifti_stem(path.name) is None:
        raise DiffSegError(f"{path}: not a NIfTI file; give a .nii or .nii.gz file (convert DICOM etc. first)")
    try:
        image = nib.load(path)
        # Reading the voxels is where a truncated .gz fails, so it belongs in the try.
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel, gzip, zlib and numpy all raise their own types here
        raise DiffSegError(
            f"{path}: cannot be read as NIfTI ({_one_line(exc)}); the file is corrupt or truncated, "
            "export or download it again"
        ) from exc
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise DiffSegError(f"{path}: is a {type(image).__name__}, not NIfTI; convert it to .nii.gz")
    if data.dtype.kind not in "biuf":
        raise DiffSegError(f"{path}: voxels are of type {data.dtype}; save the image as real numbers (e.g. float32)")
    while data.ndim > 2 and data.shape[-1] == 1:
        data = data[..., 0]
    return data, np.array(image.affine, dtype=np.float64), image.header


def _cast_for_saving(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to the on-disk type, refusing casts that would change integer values."""
    if np.issubdtype(dtype, np.integer) and array.size and array.dtype != dtype:
        values = array.astype(np.float64)
        info = np.iinfo(dtype)
        if (
            not np.all(np.isfinite(values))
            or np.any(values != np.round(values))
            or values.min() < info.min
            or values.max() > info.max
        ):
            raise ValueError(f"values do not fit {dtype} exactly; threshold or round them before saving")
    return np.asarray(array, dtype=dtype)


def save_nifti(
    path: PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> None:
    """Write ``array`` as NIfTI, atomically: a reader never sees a half-written file.

    With ``header`` (usually the t1 file's), the orientation codes and units are kept; the
    data type is set to ``dtype`` and any intensity scaling is dropped so the stored values
    are exactly the given ones. Missing folders are created.
    """
    path = Path(path)
    stem = nifti_stem(path.name)
    if stem is None:
        raise DiffSegError(f"{path}: output name must end in .nii or .nii.gz")
    suffix = path.name[len(stem) :]
    dtype = np.dtype(dtype)
    data = _cast_for_saving(np.asarray(array), dtype)

    new_header = None
    image_class: type[nib.Nifti1Image] = nib.Nifti1Image
    if header is not None:
        new_header = header.copy()
        new_header.set_slope_inter(np.nan, np.nan)
        # A display window copied from the t1 would make a mask or a probability map look empty.
        new_header["cal_min"] = 0
        new_header["cal_max"] = 0
        if isinstance(header, nib.Nifti2Header):
            image_class = nib.Nifti2Image
    image = image_class(data, np.asarray(affine, dtype=np.float64), header=new_header)
    image.set_data_dtype(dtype)

    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffSegError(
            f"{folder}: cannot create the output folder ({_one_line(exc)}); choose another folder"
        ) from exc
    if path.is_dir():
        raise DiffSegError(f"{path}: is a folder; give a file name ending in .nii.gz")

    def write(handle) -> None:
        # Compressed as nibabel compresses a .nii.gz of its own (level 1, no name, no time).
        target = gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=handle, mtime=0) \
            if suffix.lower() == ".nii.gz" else handle
        image.to_file_map({"image": nib.FileHolder(fileobj=target)})
        if target is not handle:
            target.close()

    try:
        atomic_write(path, write, "wb")
    except OSError as exc:
        raise DiffSegError(f"{folder}: cannot write {path.name} ({_one_line(exc)}); choose a writable folder") from exc


# --------------------------------------------------------------------------------------------
# Intensities and labels
# --------------------------------------------------------------------------------------------


def normalise_intensity(volume: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Robust per-volume scaling to [0, 1], as float32.

    Percentiles are taken over the non-zero (brain) voxels only, so the skull-stripped
    background does not pull the low bound to 0; clipping at the high percentile keeps a few
    bright outliers (BraTS has voxels at 32767) from squashing the brain into a thin band.
    Background (exactly 0) stays 0. Data already within [0, 1], like the reference's slices,
    is returned unchanged. A constant brain maps to 1.
    """
    result = np.array(volume, dtype=np.float32)  # always a copy: callers may own `volume`
    if result.size == 0 or (result.min() >= 0 and result.max() <= 1):
        return result
    brain = result != 0
    if not brain.any():
        return result
    low, high = (float(value) for value in np.percentile(result[brain], [low_pct, high_pct]))
    if high <= low:
        result[brain] = 1.0
        return result
    np.clip(result, low, high, out=result)
    result -= low
    result /= high - low
    result[~brain] = 0.0
    return result


def label_to_mask(label: np.ndarray) -> np.ndarray:
    """Whole-tumour mask: every BraTS label (1, 2, 4) counts as tumour. uint8 {0, 1}."""
    return (np.asarray(label) > 0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Cases in memory
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One loaded case: four images stacked in MODALITIES order, plus the whole-tumour label
    and the label map it came from (for the tumour's regions, :mod:`regions`)."""

    name: str
    images: np.ndarray = field(repr=False)  # float32 (4, X, Y) or (4, X, Y, Z)
    label: np.ndarray | None = field(repr=False)  # uint8 {0, 1}, spatial shape, or None
    affine: np.ndarray = field(repr=False)  # 4x4 of the t1 file
    header: nib.Nifti1Header = field(repr=False)  # of the t1 file, for writing results
    files: CaseFiles
    labels: np.ndarray | None = field(default=None, repr=False)  # the segmentation's labels (0, 1, 2, 4 ...)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def is_volume(self) -> bool:
        return self.images.ndim == 4

    @property
    def voxel_size(self) -> tuple[float, ...]:
        """Voxel spacing (mm) of the spatial axes, from the t1 header (napari layer scale)."""
        zooms = self.header.get_zooms()
        return tuple(float(zoom) for zoom in zooms[: len(self.spatial_shape)])


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(size) for size in shape)


def _check_voxels(path: Path, data: np.ndarray) -> None:
    """Problems of a single file: dimensionality, NaN/Inf."""
    if data.ndim > 3:
        raise DiffSegError(
            f"{path}: is {data.ndim}D (shape {_shape_text(data.shape)}); give one 3D volume per "
            "modality and one for the segmentation (split the extra axes into separate files)"
        )
    if data.ndim < 2:
        raise DiffSegError(f"{path}: is {data.ndim}D; give a 2D slice or a 3D volume")
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise DiffSegError(
                f"{path}: {bad} voxels are NaN or Inf; replace them (e.g. with 0) and save the file again"
            )


def _check_same_grid(
    path: Path, data: np.ndarray, affine: np.ndarray, ref_path: Path, ref_data: np.ndarray, ref_affine: np.ndarray
) -> None:
    if data.shape != ref_data.shape:
        raise DiffSegError(
            f"{path}: shape {_shape_text(data.shape)} differs from {ref_path} ({_shape_text(ref_data.shape)}); "
            "all files of a case must be co-registered on the same voxel grid (resample them first)"
        )
    # A differing affine with equal shapes usually means unregistered images; the voxels are
    # still usable, so this only warns.
    if not np.allclose(affine, ref_affine, atol=1e-3):
        warnings.warn(
            f"{path}: its affine differs from {ref_path}'s; check that the images are co-registered",
            stacklevel=3,
        )


def _label_map(path: Path, seg: np.ndarray) -> np.ndarray:
    """Validate a label map: whole, non-negative numbers, returned as integers (uint8 where
    they fit, as BraTS labels do).

    Non-integer or negative values are an error, not a warning: they mean a probability map
    or a wrong file, and ``label > 0`` would then silently mark most of the image as tumour.
    Float files holding whole numbers (the reference's {0., 2., 4.}) are fine.
    """
    if seg.dtype.kind == "f":
        rounded = np.rint(seg)
        off = np.abs(seg - rounded) > 1e-3
        if off.any():
            example = float(seg[off].flat[0])
            raise DiffSegError(
                f"{path}: segmentation has {int(np.count_nonzero(off))} voxels that are not whole numbers "
                f"(e.g. {example:g}); give a label map (0 = background, 1/2/4 = tumour), not a probability map"
            )
        seg = rounded
    if seg.size and seg.min() < 0:
        raise DiffSegError(
            f"{path}: segmentation has negative labels (min {seg.min():g}); labels must be 0 (background) "
            "or positive (tumour)"
        )
    if seg.size and seg.max() <= np.iinfo(np.uint8).max:
        return seg.astype(np.uint8)
    return seg.astype(np.int64)


def load_case(files: CaseFiles, normalise: bool = True) -> Case:
    """Load and check one case; images become float32 (4, *spatial) in [0, 1].

    With ``normalise=False`` the voxels are only cast to float32 (no scaling).
    """
    missing = [modality for modality in MODALITIES if files.images.get(modality) is None]
    if missing:
        raise DiffSegError(f"{files.name}: no {', '.join(missing)} file given; a case needs t1, t1ce, t2 and flair")

    ref_path = Path(files.images[MODALITIES[0]])
    ref_data, affine, header = load_nifti(ref_path)
    images: np.ndarray | None = None
    for index, modality in enumerate(MODALITIES):
        path = Path(files.images[modality])
        data, this_affine = (ref_data, affine) if index == 0 else load_nifti(path)[:2]
        _check_voxels(path, data)
        if index > 0:
            _check_same_grid(path, data, this_affine, ref_path, ref_data, affine)
        if not np.any(data):
            raise DiffSegError(f"{path}: the {modality} image is all zeros; check that the right file was exported")
        if images is None:
            images = np.empty((len(MODALITIES), *data.shape), dtype=np.float32)
        images[index] = normalise_intensity(data) if normalise else data

    label = labels = None
    if files.seg is not None:
        seg_path = Path(files.seg)
        seg, seg_affine, _ = load_nifti(seg_path)
        _check_voxels(seg_path, seg)
        _check_same_grid(seg_path, seg, seg_affine, ref_path, ref_data, affine)
        labels = _label_map(seg_path, seg)
        label = label_to_mask(labels)

    assert images is not None  # MODALITIES is not empty
    return Case(name=files.name, images=images, label=label, affine=affine, header=header, files=files,
                labels=labels)


def brain_slices(images: np.ndarray) -> list[int]:
    """Slices (the last axis) of (C, X, Y, Z) images where any channel is non-zero: an empty
    slice carries no brain and is left out of sampling and training. (C, X, Y) images are one
    slice, 0, unless all zero."""
    images = np.asarray(images)
    if images.ndim == 3:
        return [0] if np.any(images) else []
    occupied = images.reshape(-1, images.shape[-1]).any(axis=0)
    return [int(z) for z in np.flatnonzero(occupied)]
