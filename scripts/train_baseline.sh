#!/usr/bin/env bash
# The comparison baseline: the demo model's U-Net and recipe (same cases, split, size, batch,
# precision, wall time), trained as a deterministic segmenter with Dice + BCE.
#   bash scripts/train_baseline.sh        # writes runs/baseline/model.pt
# The baseline in docs/evaluation trained with THREADS=1 (100 minutes, 1,210 steps, side by side
# with the third demo model); at 20 minutes it had scored as well (docs/evaluation/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/baseline} OBJECTIVE=segmentation exec bash scripts/train_demo.sh "$@"
