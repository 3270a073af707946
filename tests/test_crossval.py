"""The cross-validation tools: the fold rule, the clean-up learned on the other folds, the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import crossval_cleanup  # noqa: E402
import crossval_table  # noqa: E402

from napari_diffseg import synthetic  # noqa: E402
from napari_diffseg import data  # noqa: E402
from napari_diffseg.evaluate import save_maps, score_case  # noqa: E402


def test_the_folds_are_four_of_four_and_mix_sites(tmp_path):
    """crossval.sh's rule, run on the real case names (folders faked): each fold 4 cases, every
    case in one fold, and no fold from a single site."""
    names = ["Brats18_2013_11_1", "Brats18_2013_20_1", "Brats18_2013_2_1", "Brats18_2013_3_1", "Brats18_CBICA_ABM_1",
             "Brats18_CBICA_ALU_1", "Brats18_CBICA_AME_1", "Brats18_TCIA01_201_1", "Brats18_TCIA01_378_1",
             "Brats18_TCIA01_425_1", "Brats18_TCIA02_135_1", "Brats18_TCIA02_370_1", "Brats18_TCIA02_606_1",
             "Brats18_TCIA03_265_1", "Brats18_TCIA10_628_1", "Brats18_TCIA10_637_1"]
    for name in names:
        (tmp_path / "brats" / name).mkdir(parents=True)
    folds = []
    for fold in range(4):
        # the script's own fold lines, run alone (no training)
        script = (ROOT / "scripts" / "crossval.sh").read_text()
        rule = script[script.index("mapfile"): script.index("OBJECTIVE=diffusion")]
        out = subprocess.run(["bash", "-c", f"set -euo pipefail; FOLD={fold}; BRATS_DIR={tmp_path / 'brats'}\n"
                              f"{rule}\necho \"${{VAL[@]}}\""], capture_output=True, text=True, check=True)
        folds.append(out.stdout.split())
    assert all(len(f) == 4 for f in folds)
    assert sorted(sum(folds, [])) == sorted(names)
    for fold in folds:
        sites = {name.split("_")[1] for name in fold}
        assert len(sites) >= 3, fold
    assert folds[1] == ["Brats18_2013_20_1", "Brats18_CBICA_ALU_1", "Brats18_TCIA01_425_1", "Brats18_TCIA03_265_1"]


def test_best_size_takes_the_highest_mean_and_the_smaller_on_a_tie():
    assert crossval_cleanup.best_size({0: [0.8, 0.9], 100: [0.85, 0.9], 500: [0.85, 0.9]}) == 100
    assert crossval_cleanup.best_size({0: [0.9], 100: [0.8]}) == 0


def _fake_arm(root: Path, cases: list[Path], with_speck: bool) -> None:
    """Four folds of maps and reports: each case's truth at p = 0.9, plus (optionally) a far
    false-positive speck at p = 0.8."""
    for fold in range(4):
        val = root / "runs" / "arm" / f"fold{fold}" / "split" / "val"
        val.mkdir(parents=True)
        rows = []
        for case_dir in cases[fold::4]:
            os.symlink(case_dir, val / case_dir.name)
            case = data.load_case(data.find_cases(val / case_dir.name)[0])
            truth = case.label.astype(bool)
            probability = truth * np.float32(0.9)
            if with_speck:
                probability[1:3, 1:3] = 0.8
            variance = np.full(truth.shape, 0.01, np.float32)
            save_maps(root / "runs" / "arm" / f"fold{fold}" / "eval" / "maps" / f"{case_dir.name}.npz",
                      probability, variance)
            rows.append({"case": case_dir.name, "seconds": 1.0,
                         **score_case(probability[None], truth, uncertainty=variance, brain=case.images.any(0))})
        report = json.dumps({"cases": rows})
        (root / "runs" / "arm" / f"fold{fold}" / "eval" / "report.json").write_text(report)
        (root / "docs" / "arm" / f"fold{fold}").mkdir(parents=True)
        (root / "docs" / "arm" / f"fold{fold}" / "report.json").write_text(report)


def test_cleanup_learns_its_size_on_other_folds_and_the_table_shows_both_arms(tmp_path, monkeypatch):
    cases = sorted(synthetic.write_phantoms(tmp_path / "phantoms", n=8, seed=3, size=64))
    _fake_arm(tmp_path, cases, with_speck=True)
    monkeypatch.setattr(sys, "argv", ["crossval_cleanup.py", "arm", "--runs", str(tmp_path / "runs"),
                                      "--docs", str(tmp_path / "docs")])
    crossval_cleanup.main()
    sizes = json.loads((tmp_path / "docs" / "arm+cleanup" / "sizes.json").read_text())
    assert all(size > 0 for size in sizes["chosen_per_fold"].values())  # the speck costs Dice: removing it wins
    monkeypatch.setattr(sys, "argv", ["crossval_table.py", "--docs", str(tmp_path / "docs")])
    crossval_table.main()
    table = json.loads((tmp_path / "docs" / "table.json").read_text())
    assert set(table) == {"arm", "arm+cleanup"}
    assert table["arm"]["folds"] == [0, 1, 2, 3] and table["arm"]["summary"]["cases"] == 8
    assert table["arm+cleanup"]["summary"]["dice_ensemble"]["mean"] > table["arm"]["summary"]["dice_ensemble"]["mean"]
    assert "| arm+cleanup | 0,1,2,3 |" in (tmp_path / "docs" / "table.md").read_text()
