"""``diffseg-sample``: batch inference over cases; writes mask, probability and variance NIfTIs.

For each case: ``OUT/<case>/mask.nii.gz`` (uint8, ensemble mean > 0.5),
``probability.nii.gz`` (ensemble mean) and ``variance.nii.gz`` (float32), on the input's
grid and affine; ``samples.nii.gz`` with ``--save_samples``; ``metrics.json`` where ground
truth is present. A region model (``diffseg-train --regions brats``) writes instead
``labels.nii.gz`` (uint8 BraTS labels 0, 1, 2, 4: :mod:`regions`) and per region (wt, tc, et)
``probability_<region>.nii.gz``, ``variance_<region>.nii.gz`` (``samples_<region>.nii.gz``),
and its metrics.json holds every figure per region. Under ``torchrun`` the cases are shared
out across the processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import data, metrics
from .cli import (add_model_flags, add_model_path_flags, add_sampling_flags, guarded, json_safe, make_parser,
                  model_path_from_args, reference_flags_from_args, sampling_options_from_args, slab_indices,
                  slice_range, slice_text)
from .errors import DiffSegError
from .files import atomic_write, check_writable_folder
from .checkpoint import ONE_PASS
from .inference import Segmentation, Segmenter, run_to_end
from .options import SamplingOptions
from .postprocess import remove_small_components
from .regions import BRATS_REGIONS, clean_labels, labels_to_regions

# What a run writes, by kind of model: the files of the other kind left by an earlier run are removed.
BINARY_OUTPUTS = ("mask.nii.gz", "probability.nii.gz", "variance.nii.gz")
REGION_OUTPUTS = ("labels.nii.gz", *(f"{kind}_{region}.nii.gz" for kind in ("probability", "variance")
                                     for region in BRATS_REGIONS))


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "diffseg-sample", "Segment cases with a diffusion ensemble: mean mask, probability and variance maps.")
    source = parser.add_argument_group("input (either --data_dir or the four files)")
    source.add_argument("--data_dir", help="slice folders, BraTS case folders, or one case folder")
    for modality in data.MODALITIES:
        source.add_argument(f"--{modality}", help=f"{modality} NIfTI file of one case")
    source.add_argument("--seg", help="optional ground truth for the four files (adds metrics.json)")
    add_model_path_flags(parser)  # a reference checkpoint needs its model flags, as flags or --flags_json
    parser.add_argument("--flags_json", help="JSON of the reference model flags (e.g. the flags.json beside a checkpoint)")
    parser.add_argument("--num_ensemble", type=int, default=5, help="chains per slice: ensemble members")
    add_sampling_flags(parser)
    parser.add_argument("--out_dir", default="results", help="results go to OUT_DIR/<case>/")
    parser.add_argument("--save_samples", action="store_true", help="also write every ensemble member")
    parser.add_argument("--slices", type=slice_range, default=None, metavar="START:STOP",
                        help="volumes: segment only the brain slices START..STOP-1 of the last axis; the others "
                        "are written as background (default: every brain slice)")
    parser.add_argument("--cleanup", type=int, default=None, metavar="VOXELS",
                        help="volumes: remove connected parts of the mask smaller than this many voxels (the largest "
                        "always stays; probability and variance are left as sampled); default: the size stored in "
                        "the model (decided by cross-validation), else 0 = off")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    # The reference's model flags, only read for a reference checkpoint (ours embed them).
    add_model_flags(parser, with_defaults=False, skip=("timestep_respacing",))
    return parser


def _cases(args: argparse.Namespace) -> list[data.CaseFiles]:
    files = [getattr(args, m) for m in data.MODALITIES]
    if args.data_dir and any(files):
        raise DiffSegError("give either --data_dir or --t1/--t1ce/--t2/--flair, not both")
    if args.data_dir:
        cases = data.find_cases(args.data_dir)
    elif all(files):
        cases = [data.case_files_from_paths(*files, seg=args.seg)]
    elif any(files):
        missing = [f"--{m}" for m, f in zip(data.MODALITIES, files) if not f]
        raise DiffSegError(f"missing {', '.join(missing)}: all four modalities are needed")
    else:
        raise DiffSegError("no input: give --data_dir or the four files --t1 --t1ce --t2 --flair")
    # Two subsets can hold cases of the same name; keep their outputs apart.
    names = [c.name for c in cases]
    for case in cases:
        if names.count(case.name) > 1:
            case.name = f"{case.images['t1'].parent.parent.name}_{case.name}"
    return cases


@contextlib.contextmanager
def disk_arrays(folder: Path):
    """An allocator for Segmenter.run that puts the result arrays in .npy memmaps under
    ``folder`` (removed afterwards): a volume's results go to disk slice by slice, so memory
    does not grow with the volume or the ensemble size."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield lambda name, shape, dtype: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+",
                                                                   dtype=dtype, shape=shape)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_results(case: data.Case, result: Segmentation, out: Path, save_samples: bool) -> None:
    if result.labels is not None:
        write_region_results(case, result, out, save_samples)
        return
    save = data.save_nifti
    # np.asarray, not astype: no in-memory copy of (possibly disk-backed) results.
    save(out / "mask.nii.gz", np.asarray(result.mask, np.uint8), case.affine, case.header, dtype=np.uint8)
    save(out / "probability.nii.gz", np.asarray(result.probability, np.float32), case.affine, case.header,
         dtype=np.float32)
    save(out / "variance.nii.gz", np.asarray(result.variance, np.float32), case.affine, case.header,
         dtype=np.float32)
    if save_samples and result.samples is not None:
        members = np.moveaxis(result.samples, 0, -1)  # members on the last axis
        save(out / "samples.nii.gz", members, case.affine, case.header, dtype=np.float32)


def write_region_results(case: data.Case, result: Segmentation, out: Path, save_samples: bool) -> None:
    """A region model's files: the label map, and each region's probability and variance (and members)."""
    save = data.save_nifti
    save(out / "labels.nii.gz", np.asarray(result.labels, np.uint8), case.affine, case.header, dtype=np.uint8)
    for index, region in enumerate(BRATS_REGIONS):
        for kind, values in (("probability", result.probability), ("variance", result.variance)):
            save(out / f"{kind}_{region}.nii.gz", np.asarray(values[index], np.float32), case.affine, case.header,
                 dtype=np.float32)
        if save_samples and result.samples is not None:
            members = np.moveaxis(result.samples[:, index], 0, -1)  # members on the last axis
            save(out / f"samples_{region}.nii.gz", members, case.affine, case.header, dtype=np.float32)


def _stale_outputs(result: Segmentation, save_samples: bool, has_truth: bool) -> list[str]:
    """Files an earlier run may have left in the case's folder that this run does not write."""
    regions = result.labels is not None
    stale = list(BINARY_OUTPUTS if regions else REGION_OUTPUTS)
    region_samples = [f"samples_{region}.nii.gz" for region in BRATS_REGIONS]
    stale += ["samples.nii.gz"] if regions or not save_samples else []
    stale += region_samples if not regions or not save_samples else []
    return stale + ([] if has_truth else ["metrics.json"])


def case_metrics(case: data.Case, result: Segmentation, slab: slice | None = None) -> dict:
    """Dice and HD95 against the case's truth; with --slices on a volume, over that slab only
    (the slices outside it were not segmented). A region model's per region (wt, tc, et), with the
    QU-BraTS score and the variance-vs-error AUROC of each region's variance."""
    if result.labels is not None:
        return region_case_metrics(case, result, slab)
    spacing = case.voxel_size
    mask, truth = np.asarray(result.mask), np.asarray(case.label)
    if slab is not None and case.is_volume:
        mask, truth = mask[..., slab], truth[..., slab]
    row = {
        "case": case.name,
        "dice": metrics.dice(mask, truth),
        "hd95": metrics.hd95(mask, truth, spacing=spacing),
        "num_ensemble": result.num_ensemble,
        "steps": result.steps,
        "sampler": result.sampler,
        "seed": result.seed,
    }
    if slab is not None and case.is_volume:
        row["slices"] = slice_text(slab)
    return row


def region_case_metrics(case: data.Case, result: Segmentation, slab: slice | None = None) -> dict:
    """Per region: ``dice_<region>``, ``hd95_<region>``, ``qubrats_<region>`` (the QU-BraTS score
    of the variance, true negatives counted in the brain) and ``auroc_<region>`` (variance vs
    error within 10 voxels: :func:`metrics.region_scores`); the last two are null for a single
    diffusion member (no spread to rank by). The masks scored are the label map's regions."""
    cut = slab is not None and case.is_volume

    def part(array: np.ndarray) -> np.ndarray:
        return array[..., slab] if cut else array

    truth = labels_to_regions(part(np.asarray(case.labels)))
    brain = part(case.images.any(axis=0))
    ranked = result.num_ensemble > 1 or result.sampler == ONE_PASS  # a one-pass model's p(1 - p) ranks too
    row: dict = {"case": case.name, "regions": list(BRATS_REGIONS)}
    for index, region in enumerate(BRATS_REGIONS):
        variance = part(np.asarray(result.variance[index])) if ranked else None
        scores = metrics.region_scores(part(np.asarray(result.mask[index])), truth[index], variance,
                                       spacing=case.voxel_size, brain=brain)
        row.update({f"{name}_{region}": value for name, value in scores.items()})
    row.update(num_ensemble=result.num_ensemble, steps=result.steps, sampler=result.sampler, seed=result.seed)
    if cut:
        row["slices"] = slice_text(slab)
    return row


def _write_json(path: Path, payload: dict) -> None:
    # nan (HD95 with an empty mask) is not JSON: written as null
    atomic_write(path, lambda handle: handle.write(json.dumps(json_safe(payload), indent=2)))


@guarded
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cleanup is not None and args.cleanup < 0:
        raise DiffSegError(f"--cleanup {args.cleanup}: give a size in voxels, or 0 to keep every part of the mask")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    out_dir = Path(args.out_dir)
    check_writable_folder(out_dir, setting="out_dir")
    cases = _cases(args)
    options = sampling_options_from_args(args, num_ensemble=args.num_ensemble)
    segmenter = Segmenter.load(model_path_from_args(args), device=device,
                               reference_flags=reference_flags_from_args(args), compile=args.compile)
    cleanup = int(segmenter.defaults.get("cleanup_min_voxels", 0) if args.cleanup is None else args.cleanup)
    mine = cases[rank::world]
    rows = []
    for files in mine:
        case = data.load_case(files)
        started = time.time()
        out = out_dir / case.name
        spill = disk_arrays(out_dir / f".{case.name}.partial") if case.is_volume else contextlib.nullcontext()
        with spill as allocate:
            result = _segment_case(segmenter, case, args, options, allocate)
            if cleanup and case.is_volume:
                if result.labels is not None:  # islands of the whole tumour go with their core
                    result.labels[...] = clean_labels(result.labels, cleanup)
                    result.mask[...] = labels_to_regions(result.labels)
                else:
                    result.mask[...] = remove_small_components(result.mask, cleanup)
            # An earlier run's files that this run does not write would sit beside the new ones.
            for name in _stale_outputs(result, args.save_samples, case.label is not None):
                (out / name).unlink(missing_ok=True)
            write_results(case, result, out, args.save_samples)
            row = {"case": case.name, "seconds": round(time.time() - started, 2), "steps": result.steps,
                   "num_ensemble": result.num_ensemble}
            if case.label is not None:
                row = {**case_metrics(case, result, args.slices), "seconds": row["seconds"],
                       "cleanup_min_voxels": cleanup if case.is_volume else 0}
                _write_json(out / "metrics.json", row)
        rows.append(row)
        print(f"{case.name}: wrote {out}", file=sys.stderr)
    _print_summary(rows)
    return 0


def _segment_case(segmenter: Segmenter, case: data.Case, args: argparse.Namespace, options: SamplingOptions,
                  allocate) -> Segmentation:
    slices = None
    if args.slices is not None and case.is_volume:
        wanted = slab_indices(args.slices, case.images.shape[-1], case.name)
        brain = data.brain_slices(case.images)
        slices = [z for z in brain if z in wanted]
        if not slices:
            raise DiffSegError(f"--slices {slice_text(args.slices)} holds no brain slice of {case.name} "
                               f"(its brain spans slices {brain[0]} to {brain[-1]})" if brain else
                               f"{case.name}: no slice holds any brain (all four images are zero)")
    run = segmenter.run(case.images, options, keep_samples=args.save_samples, preview_interval=None,
                        allocate=allocate, slices=slices)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(desc=case.name, unit="step", dynamic_ncols=True, leave=False)

    def advance(progress):
        if bar is not None:  # tqdm's own rate and time left come from the steps; slices beside them
            bar.total = progress.batches * progress.total
            bar.set_postfix_str(f"slices {progress.slices_done + len(progress.slices)}/{progress.slices_total}",
                                refresh=False)
            bar.update(1)

    result = run_to_end(run, advance)
    if bar is not None:
        bar.close()
    return result


def _print_summary(rows: list[dict]) -> None:
    if not rows:
        return
    if any("dice_wt" in r for r in rows):
        _print_region_summary(rows)
        return
    with_truth = [r for r in rows if "dice" in r]
    header = f"{'case':<28} {'dice':>6} {'hd95':>7} {'N':>3} {'steps':>6} {'s':>7}"
    print(header)
    for r in rows:
        dice = f"{r['dice']:.3f}" if "dice" in r else "-"
        hd = f"{r['hd95']:.1f}" if "hd95" in r and np.isfinite(r["hd95"]) else "-"
        print(f"{r['case']:<28} {dice:>6} {hd:>7} {r['num_ensemble']:>3} {r['steps']:>6} {r['seconds']:>7}")
    if with_truth:
        print(f"{'mean':<28} {np.mean([r['dice'] for r in with_truth]):>6.3f}")



def _print_region_summary(rows: list[dict]) -> None:
    """A region model's table: Dice and HD95 per region."""
    with_truth = [r for r in rows if "dice_wt" in r]
    names = [region.upper() for region in BRATS_REGIONS]
    print(f"{'case':<28} " + " ".join(f"{'dice ' + n:>8}" for n in names) + " "
          + " ".join(f"{'hd95 ' + n:>8}" for n in names) + f" {'N':>3} {'steps':>6} {'s':>7}")

    def cell(r: dict, key: str, digits: int) -> str:
        value = r.get(key)
        return f"{value:>8.{digits}f}" if value is not None and np.isfinite(value) else f"{'-':>8}"

    for r in rows:
        print(f"{r['case']:<28} " + " ".join(cell(r, f"dice_{g}", 3) for g in BRATS_REGIONS) + " "
              + " ".join(cell(r, f"hd95_{g}", 1) for g in BRATS_REGIONS)
              + f" {r['num_ensemble']:>3} {r['steps']:>6} {r['seconds']:>7}")
    if with_truth:
        print(f"{'mean':<28} " + " ".join(f"{np.mean([r[f'dice_{g}'] for r in with_truth]):>8.3f}"
                                         for g in BRATS_REGIONS))


if __name__ == "__main__":
    sys.exit(main())
