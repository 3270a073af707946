#!/usr/bin/env bash
# The comparison baseline: the demo model's U-Net and recipe (same cases, split, size, batch,
# precision, wall time), trained as a deterministic segmenter with Dice + BCE.
#   bash scripts/train_baseline.sh        # writes runs/baseline/model.pt
# The baseline in docs/evaluation was trained before the demo recipe changed, with
# MINUTES=80 NORM_GROUPS=32 THREADS=1 (1,650 steps); the demo model had 50 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/baseline} OBJECTIVE=segmentation exec bash scripts/train_demo.sh "$@"
