#!/usr/bin/env bash
# The recipe's ablation at equal budget: the demo architecture and the 9 training cases, one
# lever at a time against the previous demo recipe, the full recipe, and the U-Net baseline
# with the full recipe; each row trains MINUTES of wall time on one thread, two rows side by
# side (one per core), then is scored on the 15 validation slices (5 members, its preset).
#   bash scripts/ablation.sh [row ...]      rows: see ROWS below (default: all)
#   MINUTES=20 OUT=runs/ablation bash scripts/ablation.sh
# Resumable: a row whose model.pt has trained its budget is only re-scored.
# Summary table: python scripts/ablation_table.py runs/ablation
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-20}
# A 20-minute row trains about 280 steps at batch 16 on one thread: the full recipe's 200-step
# warm-up would take most of it, so every row warms up over WARMUP steps instead.
WARMUP=${WARMUP:-50}
OUT=${OUT:-runs/ablation}
PY=${PY:-.venv/bin/python}
# The previous demo recipe (epsilon, constant lr 3e-4, uniform batches of 12, 50 steps), as flags
# over scripts/train_demo.sh's current defaults.
OLD=(--predict_xstart False --x0_loss_weight 0 --lr 3e-4 --lr_schedule constant --warmup_steps 0 --grad_clip 0 --tumour_fraction 0
     --batch_size 12 --sample_respacing 50)
declare -A ROWS=(
  [old_recipe]="${OLD[*]}"
  [tumour_fraction]="${OLD[*]} --tumour_fraction 0.7"
  [cosine_lr]="${OLD[*]} --lr 1e-3 --lr_schedule cosine --warmup_steps $WARMUP --grad_clip 1.0"
  [x0]="${OLD[*]} --predict_xstart True --sample_respacing 10"
  [recipe]="--warmup_steps $WARMUP --x0_loss_weight 0"
  [recipe_x0_loss]="--warmup_steps $WARMUP --x0_loss_weight 1.0"
  [recipe_self_condition]="--warmup_steps $WARMUP --x0_loss_weight 0 --self_condition"
  [baseline]="BASELINE --warmup_steps $WARMUP"
)
NAMES=(${*:-old_recipe tumour_fraction cosine_lr x0 recipe recipe_x0_loss recipe_self_condition baseline})
[ -d runs/val_slices ] || "$PY" scripts/make_val_slices.py --out runs/val_slices

train_row() {
  local name=$1 flags=${ROWS[$1]}
  if [[ "$flags" == BASELINE* ]]; then
    # shellcheck disable=SC2086
    OUT="$OUT/$name" MINUTES=$MINUTES THREADS=1 bash scripts/train_baseline.sh ${flags#BASELINE} > "$OUT/$name.log" 2>&1
  else
    # shellcheck disable=SC2086
    OUT="$OUT/$name" MINUTES=$MINUTES MARK_MINUTES=0 AUG_MINUTES=0 THREADS=1 bash scripts/train_demo.sh $flags > "$OUT/$name.log" 2>&1
  fi
}

mkdir -p "$OUT"
for ((i = 0; i < ${#NAMES[@]}; i += 2)); do
  pids=()
  for name in "${NAMES[@]:i:2}"; do
    [ -n "${ROWS[$name]+x}" ] || { echo "unknown row: $name" >&2; exit 2; }
    train_row "$name" & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
done
for name in "${NAMES[@]}"; do
  "$PY" -m napari_diffseg.evaluate --model_path "$OUT/$name/model.pt" --data_dir runs/val_slices \
    --out_dir "$OUT/$name/eval_slices" --precision auto --ensemble_sizes 1,5 > "$OUT/$name/eval.log" 2>&1
done
"$PY" scripts/ablation_table.py "$OUT"
