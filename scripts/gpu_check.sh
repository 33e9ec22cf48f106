#!/usr/bin/env bash
# First numbers on a GPU machine: the main pipelines on CUDA, fp32 and bf16, with time and peak
# memory per stage from each run's results.json. Says it skipped (exit 0) where no GPU is present.
#
#   scripts/gpu_check.sh [OUT_DIR] [extra Hydra overrides for every run...]
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (or no torch in $PYTHON: set PYTHON=.venv/bin/python); skipped"
  exit 0
fi
OUT=outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)
if [[ $# -gt 0 && $1 != *=* ]]; then OUT=$1; shift; fi
export DDIST_PROGRESS=0
mkdir -p "$OUT"
"$PYTHON" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
for precision in fp32 bf16; do
  for pipeline in sre2l deda rsm_cgs; do
    "$PYTHON" -m ddist pipeline=$pipeline device=cuda precision=$precision evaluate.precision=$precision logger=none \
      "paths.cache_dir=$OUT/cache" "hydra.run.dir=$OUT/${pipeline}_${precision}" "$@" \
      > "$OUT/${pipeline}_${precision}.log" 2>&1 || echo "gpu_check: $pipeline $precision failed (see its log)"
  done
done
# SRe2L's IPC slices as one stacked problem (recover.batch.parallel_groups) vs one at a time, at IPC 10:
# the recover seconds of the two runs are the GPU ratio issue 11 asks for
"$PYTHON" -m ddist pipeline=sre2l device=cuda ipc=10 recover.batch.parallel_groups=10 logger=none \
  "paths.cache_dir=$OUT/cache" "hydra.run.dir=$OUT/sre2l_ipc10_g10" "$@" > "$OUT/sre2l_ipc10_g10.log" 2>&1 \
  || echo "gpu_check: sre2l parallel_groups=10 failed (see its log)"
"$PYTHON" -m ddist pipeline=sre2l device=cuda ipc=10 logger=none \
  "paths.cache_dir=$OUT/cache" "hydra.run.dir=$OUT/sre2l_ipc10_g1" "$@" > "$OUT/sre2l_ipc10_g1.log" 2>&1 \
  || echo "gpu_check: sre2l parallel_groups=1 failed (see its log)"
# students trained together (evaluate.parallel, issue 24): K=1 vs K=8 ConvNet-3 student throughput on CUDA,
# one after another vs one cohort vs one grouped (stacked) model; then ResNet-18 on CIFAR-10 where the data is
"$PYTHON" scripts/bench_students.py --device cuda --ks 1 8 --threads 1 --epochs 20 --precisions fp32 bf16 > "$OUT/bench_students.md" 2>&1 \
  || echo "gpu_check: bench_students failed (see $OUT/bench_students.md)"
if [[ -d ../shared/data/cifar10 ]]; then
  "$PYTHON" scripts/bench_students.py --device cuda --ks 1 8 --threads 1 --epochs 5 --dataset cifar10 \
    --root ../shared/data/cifar10 --arch resnet18 --precisions fp32 bf16 >> "$OUT/bench_students.md" 2>&1 \
    || echo "gpu_check: bench_students (resnet18) failed (see $OUT/bench_students.md)"
fi
cat "$OUT/bench_students.md"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print(f"{'run':<16}{'acc':>8}  seconds / peak MB per stage")
for results in sorted(Path(sys.argv[1]).glob("*/results.json")):
    r = json.loads(results.read_text())
    acc = r["students"][0]["acc_mean"] if r["students"] else float("nan")
    stages = ", ".join(f"{k} {v:.1f}s/{r['peak_memory_mb'].get(k, 0):.0f}MB" for k, v in r["timings"].items())
    print(f"{results.parent.name:<16}{100 * acc:>7.2f}%  {stages}")
PY
