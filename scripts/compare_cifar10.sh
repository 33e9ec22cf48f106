#!/usr/bin/env bash
# CIFAR-10 comparison: random, SRe2L, DEDA and the diffusion pipelines (small pixel-space
# UNet trained from scratch) at IPC {10, 50}, seeds {0, 1, 2}, ConvNet-3 teacher and
# student, on an image-folder copy of CIFAR-10 (DATA_ROOT/train/<class>/*.jpg, .../test/...).
#
#   scripts/compare_cifar10.sh DATA_ROOT [OUT_DIR] [extra Hydra overrides for every job...]
#   e.g. scripts/compare_cifar10.sh ../shared/data/cifar10
#
# On a CPU this takes hours; the report is rebuilt after each sweep, so whatever has
# finished is in OUT_DIR/report.md (unfinished cells are listed as missing). Cheaper
# settings: append e.g. evaluate.epochs=100 seed=0. The runs use the dataset's protocol
# (conf/dataset/cifar10.yaml) and the recover/diffusion defaults, not the paper budgets
# (those are scripts/paper_*.sh). DIFFUSION picks the pixel UNet: pixel (default, 0.7M parameters,
# CPU-sized) or pixel_cifar (6.5M, 20000 steps: the GPU job), e.g.
#   DIFFUSION=pixel_cifar scripts/compare_cifar10.sh ../shared/data/cifar10
set -uo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 DATA_ROOT [OUT_DIR] [overrides...]" >&2
  exit 2
fi
DATA_ROOT=$(cd "$1" && pwd) || { echo "no directory $1" >&2; exit 2; }
shift
cd "$(dirname "$0")/.."
OUT=outputs/compare_cifar10/$(date +%Y-%m-%d_%H-%M-%S)
if [[ $# -gt 0 && $1 != *=* ]]; then OUT=$1; shift; fi
PYTHON=${PYTHON:-python}
export DDIST_PROGRESS=${DDIST_PROGRESS:-0}
EXTRA=("$@")

COMMON=(
  dataset=cifar10 dataset.format=folder "dataset.root=$DATA_ROOT"
  model@teacher.model=convnet "evaluate.students=[convnet]"
  ipc=10,50 seed=0,1,2 logger=none "paths.cache_dir=$OUT/cache"
)

sweep() {  # sweep NAME OVERRIDES...: one multirun into $OUT/NAME, then refresh the report
  local name=$1
  shift
  echo "== $name: $*"
  "$PYTHON" -m ddist -m "$@" "${COMMON[@]}" "hydra.sweep.dir=$OUT/$name" "${EXTRA[@]}" \
    || echo "== $name: some jobs failed (the report lists them)"
  "$PYTHON" -m ddist.report "$OUT" --out "$OUT"
}

start=$SECONDS
sweep random pipeline=random
sweep recover pipeline=sre2l,deda
sweep diffusion pipeline=diffusion,minimax,rsm,cgs,rsm_cgs "diffusion=${DIFFUSION:-pixel}"
echo "== all sweeps took $((SECONDS - start)) s"
