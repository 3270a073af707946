#!/usr/bin/env bash
# Cross-validation: the project's way of deciding a recipe. One call trains and scores one fold
# of one arm; run the four folds of an arm (two side by side, one core each) and then
# scripts/crossval_table.py for the table in docs/evaluation/crossval/.
#   bash scripts/crossval.sh ARM FOLD [extra diffseg-train flags]
#   e.g. bash scripts/crossval.sh recipe 0 & bash scripts/crossval.sh recipe 1 & wait
#
# The folds (fixed here before any scoring, never changed after): the 16 cases of
# ../shared/brats18 in name order, which groups them by site (2013_*, CBICA_*, TCIA01_*, ...),
# dealt out in turn: case i goes to fold i mod 4. Every fold then holds cases of several sites
# and 4 cases; a fold's model trains on the other 12 and never sees its own 4.
#
# Arms (each a set of diffseg-train flags on top of scripts/train_demo.sh's recipe; only its
# first run: no mark channels, which an automatic segmentation never feeds):
#   baseline   the same U-Net and recipe as a deterministic segmenter (Dice + BCE), one pass
#   recipe     the bundled model's recipe: x0 prediction, Dice + BCE on the x0 estimate, 70 %
#              tumour slices, cosine lr, flips, intensity and spatial augmentation
#   regions, regions_baseline: `recipe` and `baseline` trained on WT, TC and ET (--regions brats);
#              the table shows their whole tumour beside the other arms and every region apart;
#              regions_zscore_strong: `regions` with the kept whole-tumour levers (zscore_strong's),
#              regions_baseline_zscore_strong: its U-Net (regions_baseline with the same levers)
#   zscore, context, strong: `recipe` plus one lever each (the case statement below);
#   zscore_context, zscore_strong: the next lever on top of the kept zscore; zscore_context_strong both;
#   zscore_flips, baseline_flips: test-time flips (diffseg-eval --flip_members) on zscore's and
#   baseline's fold models (no training); the 3D
#              clean-up needs no training: scripts/crossval_cleanup.py ARM scores it on ARM's maps.
# Budget: STEPS optimizer steps at batch 16 (default 300), by steps and not by minutes, so that a
# busy CPU costs time but never changes a result. ARM@N is ARM at a budget of N steps (its own row,
# e.g. zscore_context_strong@1000; a sampling arm then scores ARM@N's trained arm's models).
# Each fold is scored with diffseg-eval on its 4 held-out volumes, every brain slice in 3D, 5
# members at the model's 2-step preset in bf16 (the product's defaults), seed 0; the maps are
# kept for post-processing decisions (runs/cv/ARM/foldK/eval/maps). The figures that decide are
# copied to docs/evaluation/crossval/ARM/foldK/ as each fold ends, to be committed.
# Resumable: a fold whose model is finished is not trained again, a scored fold not scored again;
# an interrupted training continues from its checkpoint.
# Environment: BRATS_DIR, STEPS, THREADS (default 1), BATCHING (chains per network call in the
# evaluation, default 20: fixed, so a timed probe on a busy CPU cannot pick a slow one), PY, CV_SRC (a copy of src/ to run from,
# so that editing the checkout does not change a run in flight; default: the installed package),
# RUNS (default runs/cv), DOCS (default docs/evaluation/crossval).
set -euo pipefail
cd "$(dirname "$0")/.."
# The whole body is one function, read before it runs: bash reads a script lazily, so editing
# this file while a fold is in flight would otherwise change or break that fold mid-way.
main() {
ARM=${1:?usage: crossval.sh ARM FOLD [flags]}
FOLD=${2:?usage: crossval.sh ARM FOLD [flags]}
shift 2
BRATS_DIR=${BRATS_DIR:-../shared/brats18}
STEPS=${STEPS:-300}
THREADS=${THREADS:-1}
BATCHING=${BATCHING:-20}
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/cv}
DOCS=${DOCS:-docs/evaluation/crossval}
if [ -n "${CV_SRC:-}" ]; then export PYTHONPATH="$(cd "$CV_SRC" && pwd)"; fi
export OMP_NUM_THREADS=$THREADS

mapfile -t CASES < <(ls -d "$BRATS_DIR"/*/ | xargs -n1 basename | LC_ALL=C sort)
[ "${#CASES[@]}" -eq 16 ] || { echo "expected 16 cases in $BRATS_DIR, found ${#CASES[@]}" >&2; exit 2; }
VAL=()
for i in "${!CASES[@]}"; do
  [ $((i % 4)) -eq "$FOLD" ] && VAL+=("${CASES[$i]}")
done

OBJECTIVE=diffusion
FLAGS=(--augment_intensity --augment_spatial)
TRAINED_AS=$ARM   # a sampling lever scores another arm's fold models: no training of its own
EVAL_FLAGS=()
LEVERS=$ARM
BUDGET=""
if [[ $ARM =~ ^(.+)@([0-9]+)$ ]]; then
  LEVERS=${BASH_REMATCH[1]}
  STEPS=${BASH_REMATCH[2]}
  BUDGET=@$STEPS
fi
case $LEVERS in
  baseline) OBJECTIVE=segmentation ;;
  recipe) ;;
  zscore) FLAGS+=(--input_norm zscore) ;;   # per-modality z-score over the volume's brain
  context) FLAGS+=(--context 2) ;;          # 2.5D: slices z-2..z+2 of every modality as condition
  strong) FLAGS+=(--augment_strong) ;;      # elastic, brightness/contrast, noise, blur, low resolution
  # Levers are added one at a time on top of the kept ones (zscore was kept: see the findings)
  zscore_context) FLAGS+=(--input_norm zscore --context 2) ;;
  zscore_strong) FLAGS+=(--input_norm zscore --augment_strong) ;;
  zscore_context_strong) FLAGS+=(--input_norm zscore --context 2 --augment_strong) ;;  # both kept levers
  zscore_flips) TRAINED_AS=zscore$BUDGET; EVAL_FLAGS=(--flip_members) ;;  # test-time flips on zscore's models
  baseline_flips) TRAINED_AS=baseline$BUDGET; EVAL_FLAGS=(--flip_members) ;;  # the U-Net's: two passes averaged
  regions) FLAGS+=(--regions brats) ;;      # the tumour's parts: WT, TC, ET as three nested masks
  regions_baseline) OBJECTIVE=segmentation; FLAGS+=(--regions brats) ;;  # their same-budget U-Net
  regions_zscore_strong) FLAGS+=(--regions brats --input_norm zscore --augment_strong) ;;  # the parts, kept levers
  regions_baseline_zscore_strong) OBJECTIVE=segmentation; FLAGS+=(--regions brats --input_norm zscore --augment_strong) ;;  # its U-Net
  *) echo "unknown arm: $LEVERS (baseline, recipe, zscore, context, strong, zscore_context, zscore_strong, zscore_context_strong, zscore_flips, baseline_flips, regions, regions_baseline, regions_zscore_strong, regions_baseline_zscore_strong; ARM@STEPS for another budget)" >&2; exit 2 ;;
esac

OUT=$RUNS/$ARM/fold$FOLD
DEST=$DOCS/$ARM/fold$FOLD
MODEL=$RUNS/$TRAINED_AS/fold$FOLD
mkdir -p "$OUT" "$DEST"
if [ "$TRAINED_AS" != "$ARM" ]; then
  [ -f "$MODEL/trained" ] || { echo "$ARM scores $TRAINED_AS's fold models: run crossval.sh $TRAINED_AS $FOLD first" >&2; exit 2; }
elif [ ! -f "$OUT/trained" ]; then
  VAL_CASES="${VAL[*]}" OUT=$OUT MINUTES=0 MARK_MINUTES=0 THREADS=$THREADS OBJECTIVE=$OBJECTIVE PY=$PY \
    bash scripts/train_demo.sh --max_steps "$STEPS" --no_progress "${FLAGS[@]}" "$@" 2>&1 | tee -a "$OUT/train.log"
  touch "$OUT/trained"
fi
if [ "$TRAINED_AS" = "$ARM" ]; then
  cp "$OUT/progress.csv" "$DEST/training_progress.csv"
  grep -v '^\s*$' "$OUT/train.log" | tail -n 20 > "$DEST/train_log_tail.txt"
fi
if [ ! -f "$OUT/eval/report.json" ]; then
  # diffseg-eval refuses nothing here: a half-written eval folder from an interrupted run is redone.
  rm -rf "$OUT/eval"
  "$PY" -m napari_diffseg.evaluate --model_path "$MODEL/model.pt" --data_dir "$MODEL/split/val" --out_dir "$OUT/eval" \
    --slices brain --precision bf16 --num_ensemble 5 --ensemble_sizes 1,5 --timestep_respacing 2 --seed 0 \
    --batching "$BATCHING" --save_maps "${EVAL_FLAGS[@]}" 2>&1 | tee "$OUT/eval.log"
fi
cp "$OUT/eval/report.json" "$OUT/eval/report.md" "$DEST/"
echo "$ARM fold $FOLD: done (${VAL[*]})"
}
main "$@"; exit
