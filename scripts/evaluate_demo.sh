#!/usr/bin/env bash
# Evaluate a diffusion model and the U-Net baseline on the held-out cases; the reports behind
# the README's numbers (docs/evaluation/). Needs runs/demo/split (scripts/train_demo.sh) and,
# for the baseline, runs/baseline/model.pt (scripts/train_baseline.sh).
#   bash scripts/evaluate_demo.sh [part ...]   parts: slices volumes sweep baseline phantoms fp32
# MODEL (default runs/demo/model.pt) and BASELINE (runs/baseline/model.pt) pick the checkpoints;
# OUT (default runs/eval) the report folder. Each part is one diffseg-eval run; THREADS (default:
# torch's choice) lets two parts run side by side, one core each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/eval}
VAL=${VAL:-runs/demo/split/val}
MODEL=${MODEL:-runs/demo/model.pt}
BASELINE=${BASELINE:-runs/baseline/model.pt}
SLICES=runs/val_slices
SWEEP_STEPS=${SWEEP_STEPS:-2,5,10,20,50,1000}
PARTS=${*:-slices volumes sweep baseline phantoms}
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
[ -d "$SLICES" ] || "$PY" scripts/make_val_slices.py --out "$SLICES"
eval_cmd() { "$PY" -m napari_diffseg.evaluate "$@"; }
for part in $PARTS; do
  case $part in
    slices)  # 15 held-out slices, ensembles of 1, 2, 5, 10 from one run of 10 members, the model's preset steps
      eval_cmd --model_path "$MODEL" --data_dir "$SLICES" --out_dir "$OUT/slices" --precision auto \
        --ensemble_sizes 1,2,5,10 ;;
    volumes)  # the 3 held-out volumes, every brain slice sampled and scored in 3D (false positives anywhere count)
      eval_cmd --model_path "$MODEL" --data_dir "$VAL" --out_dir "$OUT/volumes" --precision auto --slices brain \
        --ensemble_sizes 1,2,5 ;;
    fp32)  # the price of bf16: the same slices, members and seed in fp32
      eval_cmd --model_path "$MODEL" --data_dir "$SLICES" --out_dir "$OUT/slices_fp32" --precision fp32 \
        --ensemble_sizes 1,2,5,10 ;;
    sweep)  # Dice against the number of steps, on the middle tumour slice of each case (1000 steps: 15 slices take hours)
      mkdir -p "$OUT/mid_slices"
      for case in $(ls "$SLICES" | sed 's/_z[0-9]*$//' | sort -u); do
        mid=$(ls -d "$SLICES/${case}"_z* | sed -n 3p)  # the 3rd of 5: the middle of the tumour
        ln -sfn "$(cd "$mid" && pwd)" "$OUT/mid_slices/$(basename "$mid")"
      done
      eval_cmd --model_path "$MODEL" --data_dir "$OUT/mid_slices" --out_dir "$OUT/sweep" --precision auto \
        --ensemble_sizes 1,5 --sweep --sweep_steps "$SWEEP_STEPS" ;;
    baseline)
      eval_cmd --model_path "$BASELINE" --data_dir "$VAL" --out_dir "$OUT/baseline_volumes" --slices brain
      eval_cmd --model_path "$BASELINE" --data_dir "$SLICES" --out_dir "$OUT/baseline_slices" ;;
    phantoms)  # seed 7: no training step saw these (the demo model saw no phantoms at all)
      "$PY" -m napari_diffseg.synthetic --out_dir "$OUT/phantom_cases" --n 16 --seed 7
      eval_cmd --model_path "$MODEL" --data_dir "$OUT/phantom_cases" --out_dir "$OUT/phantoms" --precision auto \
        --ensemble_sizes 1,5 ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
