"""The cross-validation tools: the fold rule, the clean-up learned on the other folds, the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


def _fake_crossval(tmp_path):
    """crossval.sh's environment on 16 empty case folders, with a stand-in for the Python that
    runs diffseg-train (arguments appended to train_args; a progress CSV and a model written) and
    diffseg-eval (arguments in eval_args; a report written). Returns (env, runs, docs, script)."""
    brats = tmp_path / "brats"
    for i in range(16):
        (brats / f"Brats18_case_{i:02d}").mkdir(parents=True)
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    fake = tmp_path / "fake_python"
    fake.write_text("#!/usr/bin/env bash\n"
                    'while [ $# -gt 0 ]; do [ "$1" = --out_dir ] && out=$2; args+=("$1"); shift; done\n'
                    'mkdir -p "$out"\n'
                    f'if [ "${{args[1]}}" = napari_diffseg.train ]; then echo "${{args[@]}}" >> {tmp_path / "train_args"}; '
                    'echo trained; echo step > "$out/progress.csv"; touch "$out/model.pt"\n'
                    f'else echo "${{args[@]}}" > {tmp_path / "eval_args"}; '
                    'echo "{}" > "$out/report.json"; echo report > "$out/report.md"; fi\n')
    fake.chmod(0o755)
    env = {**os.environ, "BRATS_DIR": str(brats), "RUNS": str(runs), "DOCS": str(docs), "PY": str(fake)}
    return env, runs, docs, str(ROOT / "scripts" / "crossval.sh")


def test_a_sampling_arm_scores_another_arms_fold_models_with_its_flags(tmp_path):
    """zscore_flips trains nothing: it scores zscore's fold model on that fold's held-out cases
    with --flip_members, and says which fold to run first where that model is missing."""
    env, runs, docs, script = _fake_crossval(tmp_path)
    trained = runs / "zscore" / "fold0"
    (trained / "split" / "val").mkdir(parents=True)
    (trained / "trained").touch()
    (trained / "model.pt").touch()
    done = subprocess.run(["bash", script, "zscore_flips", "0"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "train_args").exists()
    args = (tmp_path / "eval_args").read_text().split()
    assert "--flip_members" in args
    assert args[args.index("--model_path") + 1] == str(trained / "model.pt")
    assert args[args.index("--data_dir") + 1] == str(trained / "split" / "val")
    assert args[args.index("--out_dir") + 1] == str(runs / "zscore_flips" / "fold0" / "eval")
    assert (docs / "zscore_flips" / "fold0" / "report.json").is_file()
    assert not (runs / "zscore_flips" / "fold0" / "model.pt").exists()  # nothing trained
    missing = subprocess.run(["bash", script, "zscore_flips", "1"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "run crossval.sh zscore 1 first" in missing.stderr


def test_an_arm_at_another_budget_trains_that_many_steps_in_its_own_folder(tmp_path):
    """ARM@N trains ARM's levers for N steps into runs/ARM@N (its own table row); ARM's sampling
    arm at that budget scores those models."""
    env, runs, docs, script = _fake_crossval(tmp_path)
    done = subprocess.run(["bash", script, "zscore@1000", "2"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    train = (tmp_path / "train_args").read_text().split()
    assert train.count("--max_steps") == 1 and train[train.index("--max_steps") + 1] == "1000"
    assert train[train.index("--input_norm") + 1] == "zscore"
    assert train[train.index("--out_dir") + 1] == str(runs / "zscore@1000" / "fold2")
    assert (docs / "zscore@1000" / "fold2" / "report.json").is_file()
    done = subprocess.run(["bash", script, "zscore_flips@1000", "2"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    scored = (tmp_path / "eval_args").read_text().split()
    assert scored[scored.index("--model_path") + 1] == str(runs / "zscore@1000" / "fold2" / "model.pt")
    assert "--flip_members" in scored
    unknown = subprocess.run(["bash", script, "nonsense@1000", "2"], env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown arm: nonsense" in unknown.stderr


@pytest.mark.parametrize("arm, objective, flags", [
    ("regions", "diffusion", {"--regions": "brats"}),
    ("regions_baseline", "segmentation", {"--regions": "brats"}),
    ("regions_zscore_strong", "diffusion", {"--regions": "brats", "--input_norm": "zscore", "--augment_strong": None}),
    ("regions_baseline_zscore_strong", "segmentation",
     {"--regions": "brats", "--input_norm": "zscore", "--augment_strong": None}),
])
def test_a_region_arm_trains_the_parts_with_its_levers(tmp_path, arm, objective, flags):
    env, runs, docs, script = _fake_crossval(tmp_path)
    done = subprocess.run(["bash", script, arm, "1"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    train = (tmp_path / "train_args").read_text().split()
    assert train[train.index("--objective") + 1] == objective
    for flag, value in flags.items():
        assert flag in train, flag
        if value is not None:
            assert train[train.index(flag) + 1] == value
    assert ("--input_norm" in train) == ("--input_norm" in flags)
    assert train[train.index("--out_dir") + 1] == str(runs / arm / "fold1")


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
        report = json.dumps({"settings": {"data_dir": str(val)}, "cases": rows})
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


def test_a_region_arm_shows_its_whole_tumour_beside_the_others_and_each_region_apart(tmp_path, monkeypatch):
    from napari_diffseg.evaluate import score_regions

    rng = np.random.default_rng(0)
    labels = np.zeros((24, 24, 4), np.uint8)
    labels[4:20, 4:20] = 2
    labels[8:16, 8:16] = 1
    labels[10:14, 10:14] = 4
    truth = np.stack([np.isin(labels, (1, 2, 4)), np.isin(labels, (1, 4)), labels == 4]).astype(np.float32)
    for fold in range(4):
        rows = []
        for i in range(2):
            members = np.clip(truth[None] * 0.9 + rng.random((3, *truth.shape), np.float32) * 0.2, 0, 1)
            if fold == 0 and i == 0:
                members[:, 2] = 0.0  # one case misses its enhancing tumour
            rows.append({"case": f"case{fold}{i}", "seconds": 2.0, **score_regions(members, labels)})
        (tmp_path / "regions" / f"fold{fold}").mkdir(parents=True)
        (tmp_path / "regions" / f"fold{fold}" / "report.json").write_text(json.dumps({"cases": rows}))
    monkeypatch.setattr(sys, "argv", ["crossval_table.py", "--docs", str(tmp_path)])
    crossval_table.main()
    table = json.loads((tmp_path / "table.json").read_text())["regions"]
    assert table["summary"]["dice_ensemble"]["mean"] == pytest.approx(table["regions"]["wt"]["dice_ensemble"]["mean"])
    assert table["regions"]["wt"]["dice_ensemble"]["mean"] > 0.95
    assert table["regions"]["et"]["worst_case"] == "case00" and table["regions"]["et"]["min_dice"] == 0.0
    assert set(table["cases"]["case10"]) == {"wt", "tc", "et"}
    text = (tmp_path / "table.md").read_text()
    assert "| regions | ET |" in text and "## Per region" in text
