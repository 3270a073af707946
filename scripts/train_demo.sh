#!/usr/bin/env bash
# Train a demo model on the 9 training cases of ../shared/brats18 (or $BRATS_DIR), on the CPU;
# the 3 validation cases are held out. Re-runnable; resumes if interrupted (the wall-time budget
# and the cosine schedule continue where they stopped). The recipe that cross-validation and the
# U-Net baseline build on; scripts/train_bundled.sh runs it with the levers the cross-validation
# kept, on every case.
#   bash scripts/train_demo.sh            # 100 + 60 min on both CPU threads, then 75 min on one: the bundled (sixth) model
# Environment: BRATS_DIR, VAL_CASES (held-out case names, space-separated; "" trains on every case),
# OUT (default runs/demo), MINUTES (training wall time, default 100), STEPS (or a budget in optimizer
# steps: give MINUTES=0 with it, so that a busy CPU costs time but never changes the model),
# OBJECTIVE (diffusion, or segmentation for the U-Net baseline: scripts/train_baseline.sh),
# THREADS (CPU threads, default 2: the fourth bundled model had the whole 2-core CPU; the third
# and its baseline trained side by side with THREADS=1), NORM_GROUPS (GroupNorm groups,
# default 8: with the reference's 32 at 32 channels the network cannot see a uniform offset of
# the noisy mask; docs/evaluation).
# The recipe (docs/evaluation/README.md): the network predicts x0, Dice + BCE on its x0
# estimate beside the diffusion loss (diffusion only), 70 % of each batch from tumour slices,
# lr 1e-3 with a 200-step warm-up and cosine decay to zero, gradient norm clipped to 1, batch
# 16. Flags given to this script come last and override these (scripts/ablation.sh changes one
# lever at a time that way).
# Then (diffusion only, MARK_MINUTES > 0, default 60) a second run in $OUT/marks starts from that
# model and learns to read the user's marks: half the slices come with simulated marks
# (--click_fraction 0.5) in two new input channels, lr 3e-4 with a 50-step warm-up and cosine
# decay. MARK_STEPS budgets it in steps instead (with MARK_MINUTES=0).
# Then (MARK_MINUTES and AUG_MINUTES > 0, default 75) a third run in $OUT/augment goes on from the
# marks run's model with the same flags plus intensity and spatial augmentation
# (--augment_intensity --augment_spatial), on AUG_THREADS threads (default 1: the bundled model's
# third run had one core, its control run without augmentation the other; docs/evaluation). Its
# model.pt is the bundled (sixth) model (scripts/export_demo_model.py --respacing 2 --cases 9).
set -euo pipefail
cd "$(dirname "$0")/.."
BRATS_DIR=${BRATS_DIR:-../shared/brats18}
OUT=${OUT:-runs/demo}
MINUTES=${MINUTES:-100}
MARK_MINUTES=${MARK_MINUTES:-60}
STEPS=${STEPS:-}
MARK_STEPS=${MARK_STEPS:-}
AUG_MINUTES=${AUG_MINUTES:-75}
AUG_THREADS=${AUG_THREADS:-1}
OBJECTIVE=${OBJECTIVE:-diffusion}
THREADS=${THREADS:-2}
NORM_GROUPS=${NORM_GROUPS:-8}
PY=${PY:-.venv/bin/python}
# Held out: every fourth case in name order of the first 12; no training step sees them.
# scripts/crossval.sh gives each fold's held-out cases here (VAL_CASES, space-separated).
VAL_CASES=${VAL_CASES-"Brats18_CBICA_ABM_1 Brats18_TCIA02_135_1 Brats18_TCIA10_637_1"}
mkdir -p "$OUT/split/train" "$OUT/split/val"
for case in "$BRATS_DIR"/*/; do
  name=$(basename "$case")
  if [[ " $VAL_CASES " == *" $name "* ]]; then dest="$OUT/split/val"; else dest="$OUT/split/train"; fi
  ln -sfn "$(cd "$case" && pwd)" "$dest/$name"
done
# VAL_CASES="" trains on every case (the final model): no validation loss then
VAL=()
[ -n "$(ls -A "$OUT/split/val")" ] && VAL=(--val_dir "$OUT/split/val")
RESUME=()
X0_LOSS=()
[ "$OBJECTIVE" = diffusion ] && X0_LOSS=(--x0_loss_weight 1)
[ -f "$OUT/checkpoint.pt" ] && RESUME=(--resume "$OUT/checkpoint.pt")
# 128x128 (the slice is resampled in and out transparently), 3.7 M parameters, bf16 + channels-last.
# --predict_xstart is a model flag: it is stored in model.pt, and sampling follows it.
train() {
"$PY" -m napari_diffseg.train \
  --data_dir "$OUT/split/train" "${VAL[@]}" \
  --image_size 128 --channel_mult 1,2,3,4 --num_channels 32 --num_res_blocks 1 --num_heads 1 \
  --attention_resolutions 16 --learn_sigma True --use_scale_shift_norm False \
  --diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False \
  --predict_xstart True "${X0_LOSS[@]}" \
  --crop_border 0 --resize_to 128 --batch_size 16 --lr 1e-3 --ema_rate 0.999 \
  --lr_schedule cosine --warmup_steps 200 --grad_clip 1.0 --tumour_fraction 0.7 \
  --precision bf16 --channels_last --augment --seed 0 \
  --save_interval 250 --log_interval 25 --max_minutes "$MINUTES" --sample_respacing 10 \
  --objective "$OBJECTIVE" --threads "$THREADS" --norm_groups "$NORM_GROUPS" "$@"
}
FIRST_STEPS=()
[ -n "$STEPS" ] && FIRST_STEPS=(--max_steps "$STEPS")
train --out_dir "$OUT" "${FIRST_STEPS[@]}" "${RESUME[@]}" "$@"
MARK_BUDGET=()
[ -n "$MARK_STEPS" ] && MARK_BUDGET=(--max_steps "$MARK_STEPS")
if [ "$OBJECTIVE" = diffusion ] && { [ "$MARK_MINUTES" != 0 ] || [ -n "$MARK_STEPS" ]; }; then
  RESUME=()
  [ -f "$OUT/marks/checkpoint.pt" ] && RESUME=(--resume "$OUT/marks/checkpoint.pt")
  train --out_dir "$OUT/marks" --max_minutes "$MARK_MINUTES" --init_from "$OUT/model.pt" --click_fraction 0.5 \
    --lr 3e-4 --warmup_steps 50 "${MARK_BUDGET[@]}" "${RESUME[@]}" "$@"
  if [ "$AUG_MINUTES" != 0 ]; then
    RESUME=()
    [ -f "$OUT/augment/checkpoint.pt" ] && RESUME=(--resume "$OUT/augment/checkpoint.pt")
    train --out_dir "$OUT/augment" --max_minutes "$AUG_MINUTES" --init_from "$OUT/marks/model.pt" \
      --click_fraction 0.5 --lr 3e-4 --warmup_steps 50 --augment_intensity --augment_spatial \
      --threads "$AUG_THREADS" "${RESUME[@]}" "$@"
  fi
fi
