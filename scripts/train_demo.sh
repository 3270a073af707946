#!/usr/bin/env bash
# Train the bundled demo model on the 12 BraTS 2018 cases in ../shared/brats18 (or $BRATS_DIR),
# on the CPU. Re-runnable; resumes if interrupted. Evaluate with scripts/evaluate_demo.sh.
#   bash scripts/train_demo.sh            # 50 min of training on 2 cores (the bundled model: THREADS=2)
# Environment: BRATS_DIR, OUT (default runs/demo), MINUTES (training wall time, default 50),
# OBJECTIVE (diffusion, or segmentation for the U-Net baseline: scripts/train_baseline.sh),
# THREADS (CPU threads, default: torch's choice), NORM_GROUPS (GroupNorm groups, default 8: with
# the reference's 32 at 32 channels the network cannot see a uniform offset of the noisy mask,
# and chains drift to all-tumour; see docs/evaluation/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BRATS_DIR=${BRATS_DIR:-../shared/brats18}
OUT=${OUT:-runs/demo}
MINUTES=${MINUTES:-50}
OBJECTIVE=${OBJECTIVE:-diffusion}
THREADS=${THREADS:-0}
NORM_GROUPS=${NORM_GROUPS:-8}
PY=${PY:-.venv/bin/python}
# Held out: every fourth case in name order; no training step sees them.
VAL_CASES="Brats18_CBICA_ABM_1 Brats18_TCIA02_135_1 Brats18_TCIA10_637_1"
mkdir -p "$OUT/split/train" "$OUT/split/val"
for case in "$BRATS_DIR"/*/; do
  name=$(basename "$case")
  if [[ " $VAL_CASES " == *" $name "* ]]; then dest="$OUT/split/val"; else dest="$OUT/split/train"; fi
  ln -sfn "$(cd "$case" && pwd)" "$dest/$name"
done
RESUME=()
[ -f "$OUT/checkpoint.pt" ] && RESUME=(--resume "$OUT/checkpoint.pt")
# 128x128 (the slice is resampled in and out transparently), 3.7 M parameters, bf16 + channels-last.
"$PY" -m napari_diffseg.train \
  --data_dir "$OUT/split/train" --val_dir "$OUT/split/val" --out_dir "$OUT" \
  --image_size 128 --channel_mult 1,2,3,4 --num_channels 32 --num_res_blocks 1 --num_heads 1 \
  --attention_resolutions 16 --learn_sigma True --use_scale_shift_norm False \
  --diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False \
  --crop_border 0 --resize_to 128 --batch_size 12 --lr 3e-4 --ema_rate 0.999 \
  --precision bf16 --channels_last --augment --seed 0 \
  --save_interval 250 --log_interval 25 --max_minutes "$MINUTES" --sample_respacing 50 \
  --objective "$OBJECTIVE" --threads "$THREADS" --norm_groups "$NORM_GROUPS" "${RESUME[@]}"
