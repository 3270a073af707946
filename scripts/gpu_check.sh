#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go, most important first: the CUDA tests, the
# sampler benchmark on cuda, the demo model's Dice in fp32 / bf16 / fp16 and against the
# number of steps up to all 1000 (too slow on a CPU), the training benchmark, then the whole
# 1000-step paper-config chain under torch.compile with CUDA graphs. Each part has its own
# time limit, so a slow part costs only itself; about 20 minutes in all on an H200.
# Figures: benchmarks/README.md, docs/evaluation/README.md. Without an installed package:
#   PYTHONPATH=src PY=python3 OUT=runs/gpu SLICES=runs/val_slices VOLUMES=runs/demo/split/val \
#     bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu}
SLICES=${SLICES:-runs/val_slices}      # scripts/make_val_slices.py: 15 held-out slices
VOLUMES=${VOLUMES:-runs/demo/split/val} # the 3 held-out BraTS volumes
REPORTS_TO=${REPORTS_TO:-$OUT}  # where reports.tgz (every JSON and Markdown report) is kept up to date
mkdir -p "$OUT/reports" "$REPORTS_TO"
export PYTHONUNBUFFERED=1
part() {  # part NAME SECONDS command...: run, time and log one part; go on whatever happens
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  local began=$SECONDS
  timeout "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - began))s"
  tar -C "$OUT" -czf "$REPORTS_TO/reports.tgz" reports  # after every part: a later time-out loses nothing
}
evaluate() {  # evaluate NAME SECONDS args...: diffseg-eval on the GPU; keeps report.json and report.md
  local name=$1 limit=$2
  shift 2
  cp_reports() {
    cp "$OUT/eval/$name/report.json" "$OUT/reports/$name.json" && cp "$OUT/eval/$name/report.md" "$OUT/reports/$name.md"
  }
  part "$name" "$limit" "$PY" -m napari_diffseg.evaluate --device cuda --out_dir "$OUT/eval/$name" "$@"
  cp_reports && tar -C "$OUT" -czf "$REPORTS_TO/reports.tgz" reports
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
part tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
part bench_sampler 150 "$PY" benchmarks/bench_sampler.py --device cuda --steps 200 --warmup 5 \
  --json "$OUT/reports/sampler-cuda.json"
for precision in fp32 bf16 fp16; do
  evaluate "slices_$precision" 45 --data_dir "$SLICES" --precision "$precision" \
    --ensemble_sizes 1,2,5,10
done
evaluate sweep_slices 360 --data_dir "$SLICES" --precision fp32 --ensemble_sizes 1,5 \
  --sweep --sweep_steps 10,25,50,100,250,1000 --sweep_ensemble 5
part bench_train 60 "$PY" benchmarks/bench_train.py --device cuda --iters 10 --paper_iters 5 \
  --json "$OUT/reports/train-cuda.json"
part compile 180 "$PY" benchmarks/bench_sampler.py --device cuda --configs paper --widget_runs 0 \
  --modes a,b_compiled,c_compiled --steps 1000 --reference_steps 50 --warmup 5 --compile \
  --compile_mode reduce-overhead --json "$OUT/reports/sampler-cuda-compiled.json"
evaluate volumes_fp32 480 --data_dir "$VOLUMES" --precision fp32 --slices tumour --ensemble_sizes 1,2,5 \
  --sweep --sweep_steps 50,1000 --sweep_ensemble 5
