#!/usr/bin/env bash
# The method comparison on digits, sized for a 2-core CPU (well under an hour):
# every pipeline x IPC {1, 10, 50} x seeds {0, 1, 2}, then the report.
#
#   scripts/compare_digits.sh [OUT_DIR] [extra Hydra overrides for every job...]
#
# Three Hydra multiruns (recover-, diffusion- and random-based pipelines) share one
# cache, so the teacher and the diffusion model are trained once. A failed job is listed
# by the report as missing; the other jobs still run. Settings kept small for CPU:
# ConvNet-3 of width 32 as teacher and student, student epochs 200/100/40 at IPC 1/10/50
# (fewer epochs for larger sets, like the hard protocol's epoch table), 150 recover
# iterations; a [16, 32] pixel UNet trained for 800 steps (fine-tuned for 100) and
# sampled with 20 DDIM steps. Override any of them on the command line, e.g.
#   scripts/compare_digits.sh outputs/cmp evaluate.epochs=200 logger=wandb
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=outputs/compare_digits/$(date +%Y-%m-%d_%H-%M-%S)
if [[ $# -gt 0 && $1 != *=* ]]; then OUT=$1; shift; fi
PYTHON=${PYTHON:-python}
export DDIST_PROGRESS=${DDIST_PROGRESS:-0}

COMMON=(
  dataset=digits ipc=1,10,50 seed=0,1,2 logger=none
  "paths.cache_dir=$OUT/cache"
  teacher.model.width=32
  "evaluate.students=[{name:convnet,width:32}]"
  "evaluate.epochs={1:200,10:100,max:40}"
  evaluate.precision=fp32  # the README's digits tables trained their students in fp32
)

sweep() {  # sweep NAME OVERRIDES...: one multirun into $OUT/NAME
  local name=$1
  shift
  echo "== $name: $*"
  "$PYTHON" -m ddist -m "$@" "${COMMON[@]}" "hydra.sweep.dir=$OUT/$name" "${EXTRA[@]}" \
    || echo "== $name: some jobs failed (the report lists them)"
}

EXTRA=("$@")
start=$SECONDS
sweep random pipeline=random
sweep recover pipeline=sre2l,deda recover.iterations=150 ++recover.deda.reg_iterations=75
sweep diffusion pipeline=diffusion,minimax,rsm,cgs,rsm_cgs \
  "diffusion.model.unet.block_out_channels=[16,32]" diffusion.train.steps=800 diffusion.finetune.steps=100 \
  diffusion.sample.scheduler=ddim diffusion.sample.steps=20
echo "== sweeps took $((SECONDS - start)) s"

"$PYTHON" -m ddist.report "$OUT" --out "$OUT"
