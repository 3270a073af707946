"""Make the plugin's bundled BraTS sample data (src/napari_diffseg/sample_data/).

From one held-out BraTS 2018 case (not used to train the demo model) it writes

* ``<case>_z<k>_<modality>.nii.gz``: the axial slice k with the most tumour, 240x240, float32;
* ``<case>_z<a>-<b>_<modality>.nii.gz``: 16 slices around it, stored as uint16 with a NIfTI
  scale factor (reads back as floats within 1e-5 of the float32 values, at 2/3 of the size);

each with ``..._seg.nii.gz`` (BraTS labels 0/1/2/4, uint8). Intensities are normalised with
``data.normalise_intensity`` over the WHOLE volume before cutting, exactly what the model sees
when the full case is loaded; the affine keeps the slices' true position in the scanner.

    python scripts/make_sample_data.py [--brats ../shared/brats18] [--case Brats18_TCIA10_637_1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_diffseg import MODALITIES
from napari_diffseg.data import find_case_files, load_nifti, normalise_intensity, save_nifti

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "napari_diffseg" / "sample_data"
VOLUME_SLICES = 16


def _shifted(affine: np.ndarray, z: int) -> np.ndarray:
    """The affine of a sub-volume that starts at slice z of the original grid."""
    shift = np.eye(4)
    shift[2, 3] = z
    return affine @ shift


def _save_uint16_scaled(path: Path, values: np.ndarray, affine: np.ndarray, header) -> None:
    """[0, 1] floats as uint16 * slope; the slope is rounded down so nothing reads back above 1."""
    slope = np.nextafter(np.float32(1.0 / 65535), np.float32(0))
    quantised = np.clip(np.round(values / np.float64(slope)), 0, 65535).astype(np.uint16)
    new_header = header.copy()
    new_header["cal_min"] = 0
    new_header["cal_max"] = 0
    image = nib.Nifti1Image(quantised, affine, header=new_header)
    image.set_data_dtype(np.uint16)
    image.header.set_slope_inter(float(slope), 0.0)
    nib.save(image, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brats", default=str(ROOT.parent / "shared" / "brats18"))
    parser.add_argument("--case", default="Brats18_TCIA10_637_1", help="a case NOT used to train the demo model")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)

    files = find_case_files(Path(args.brats) / args.case)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seg, affine, header = load_nifti(files.seg)
    tumour_per_slice = (seg > 0).sum(axis=(0, 1))
    z = int(np.argmax(tumour_per_slice))
    start = int(np.clip(z - VOLUME_SLICES // 2, 0, seg.shape[-1] - VOLUME_SLICES))
    stop = start + VOLUME_SLICES
    slice_stem = f"{args.case}_z{z:03d}"
    volume_stem = f"{args.case}_z{start:03d}-{stop - 1:03d}"

    for modality in MODALITIES:
        data, image_affine, image_header = load_nifti(files.images[modality])
        normalised = normalise_intensity(data)  # over the whole volume, as load_case does
        save_nifti(out / f"{slice_stem}_{modality}.nii.gz", normalised[..., z], _shifted(image_affine, z),
                   header=image_header, dtype=np.float32)
        _save_uint16_scaled(out / f"{volume_stem}_{modality}.nii.gz", normalised[..., start:stop],
                            _shifted(image_affine, start), image_header)
    labels = np.rint(seg).astype(np.uint8)
    save_nifti(out / f"{slice_stem}_seg.nii.gz", labels[..., z], _shifted(affine, z), header=header, dtype=np.uint8)
    save_nifti(out / f"{volume_stem}_seg.nii.gz", labels[..., start:stop], _shifted(affine, start), header=header,
               dtype=np.uint8)
    total = sum(path.stat().st_size for path in out.glob("*.nii.gz"))
    print(f"{args.case}: slice z={z} ({int(tumour_per_slice[z])} tumour voxels), volume z={start}..{stop - 1}; "
          f"{total / 1e6:.2f} MB in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
