#!/usr/bin/env bash
# The seed's Figure 1 claim, measured: RSM fine-tuning steepens the decay of the samples' feature
# spectrum (teacher penultimate features) against plain fine-tuning, for each L1 reduction
# (diffusion.finetune.rsm.reduction: mean | sum) at the seed's Table 1 lambdas, with sample quality
# read as the teacher's accuracy on the samples (and the student's accuracy).
#
#   scripts/sweep_rsm.sh DATASET [OUT_DIR] [extra Hydra overrides for every job...]
#   e.g. scripts/sweep_rsm.sh digits
#        scripts/sweep_rsm.sh cifar10 outputs/sweep_rsm_cifar10 dataset.format=folder dataset.root=/data/cifar10
#
# DATASET selects experiment=rsm/<DATASET>_ipc10 (the pixel UNet of its experiment file, trained
# once and cached), sampled independently at IPC (default 50: the spectrum of 10 x 50 samples).
# Two Hydra multiruns, plain fine-tuning and RSM over reduction x LAMBDAS (default the seed's
# 3e-3,1e-2), each fine-tuned from the same cached base model with the same steps; then
# `python -m ddist.report OUT --sweep diffusion.finetune.rsm.lambda ...` writes OUT/report.md and
# OUT/sweep_<dataset>.png.
set -uo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 DATASET [OUT_DIR] [overrides...]   (DATASET: digits | cifar10)" >&2
  exit 2
fi
DATASET=$1
shift
cd "$(dirname "$0")/.."
if [[ ! -f conf/experiment/rsm/${DATASET}_ipc10.yaml ]]; then
  echo "no conf/experiment/rsm/${DATASET}_ipc10.yaml; DATASET is one of:" \
    "$(cd conf/experiment/rsm && ls *_ipc10.yaml | sed 's/_ipc10\.yaml$//' | paste -sd' ' -)" >&2
  exit 2
fi
OUT=outputs/sweep_rsm/${DATASET}_$(date +%Y-%m-%d_%H-%M-%S)
if [[ $# -gt 0 && $1 != *=* ]]; then OUT=$1; shift; fi
PYTHON=${PYTHON:-python}
export DDIST_PROGRESS=${DDIST_PROGRESS:-0}
LAMBDAS=${LAMBDAS:-3e-3,1e-2}
COMMON=("experiment=rsm/${DATASET}_ipc10" "ipc=${IPC:-50}" logger=none analyse.figures=false
        "paths.cache_dir=${CACHE_DIR:-outputs/cache}")

start=$SECONDS
"$PYTHON" -m ddist -m "${COMMON[@]}" diffusion.finetune.objective=plain "hydra.sweep.dir=$OUT/plain" "$@" \
  || echo "== plain: some jobs failed (the report lists them)"
"$PYTHON" -m ddist -m "${COMMON[@]}" diffusion.finetune.objective=rsm diffusion.finetune.rsm.reduction=mean,sum \
  "diffusion.finetune.rsm.lambda=$LAMBDAS" "hydra.sweep.dir=$OUT/rsm" "$@" \
  || echo "== rsm: some jobs failed (the report lists them)"
echo "== sweeps took $((SECONDS - start)) s"
"$PYTHON" -m ddist.report "$OUT" --out "$OUT" \
  --sweep diffusion.finetune.rsm.lambda diffusion.finetune.rsm.reduction diffusion.finetune.objective
