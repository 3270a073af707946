"""Cut 2D evaluation slices from the held-out BraTS 2018 cases (not used to train the demo model).

For each case, the axial slices at 10 %, 30 %, 50 %, 70 % and 90 % of the tumour's extent
(the slices holding tumour in the expert segmentation) are written as 240x240 float32 NIfTI
files ``<case>_z<k>/<case>_z<k>_<modality>.nii.gz`` with ``..._seg.nii.gz``, intensities normalised over
the whole volume first (what the model sees on the full case). The step-count sweep and the
precision comparison run on these: a 1000-step ensemble of a whole volume takes hours here.

    python scripts/make_val_slices.py [--brats ../shared/brats18] [--out runs/val_slices]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from make_sample_data import ROOT, _shifted  # same folder
from napari_diffseg import MODALITIES
from napari_diffseg.data import find_case_files, load_nifti, normalise_intensity, save_nifti

VAL_CASES = ("Brats18_CBICA_ABM_1", "Brats18_TCIA02_135_1", "Brats18_TCIA10_637_1")  # as scripts/train_demo.sh
FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brats", default=str(ROOT.parent / "shared" / "brats18"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "val_slices"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in VAL_CASES:
        files = find_case_files(Path(args.brats) / case)
        seg, affine, header = load_nifti(files.seg)
        with_tumour = np.flatnonzero((seg > 0).any(axis=(0, 1)))
        chosen = sorted({int(with_tumour[int(round(f * (len(with_tumour) - 1)))]) for f in FRACTIONS})
        volumes = {m: load_nifti(files.images[m]) for m in MODALITIES}
        normalised = {m: normalise_intensity(v[0]) for m, v in volumes.items()}
        for z in chosen:
            stem = f"{case}_z{z:03d}"
            folder = out / stem
            folder.mkdir(exist_ok=True)
            for m in MODALITIES:
                save_nifti(folder / f"{stem}_{m}.nii.gz", normalised[m][..., z], _shifted(volumes[m][1], z),
                           header=volumes[m][2], dtype=np.float32)
            save_nifti(folder / f"{stem}_seg.nii.gz", np.rint(seg[..., z]).astype(np.uint8), _shifted(affine, z),
                       header=header, dtype=np.uint8)
        print(f"{case}: slices {chosen}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
