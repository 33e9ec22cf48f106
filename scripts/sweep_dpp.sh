#!/usr/bin/env bash
# The seed's Figure 3 claim, measured: CGS's DPP weight eta_dpp (0 and four larger values)
# against within-class SSIM (lower = more diverse) and accuracy, for each DPP kernel
# (zt: the noisy latents, x0_hat: their clean estimates, teacher: the teacher's features of those).
#
#   scripts/sweep_dpp.sh DATASET [OUT_DIR] [extra Hydra overrides for every job...]
#   e.g. scripts/sweep_dpp.sh digits
#        scripts/sweep_dpp.sh cifar10 outputs/sweep_dpp_cifar10 dataset.format=folder dataset.root=/data/cifar10
#
# DATASET selects experiment=cgs/<DATASET>_ipc10 (the pixel UNet of its experiment file, trained
# once and cached; mu_dm and the rest of CGS at their defaults). One Hydra multirun per kernel over
# its eta grid (ETA_ZT, ETA_X0, ETA_TEACHER: the kernels' vectors have different scales, so each
# has its own grid; the defaults span "no effect" to "broken samples" on digits, about 70 s of
# sampling per job there), stages squeeze, diffusion, relabel, evaluate, analyse (no figures); then
# `python -m ddist.report OUT --sweep diffusion.sample.cgs.eta_dpp diffusion.sample.cgs.kernel`
# writes OUT/report.md and OUT/sweep_<dataset>.png (SSIM, spectrum slope, student accuracy and the
# teacher's accuracy on the samples against eta_dpp, one line per kernel).
set -uo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 DATASET [OUT_DIR] [overrides...]   (DATASET: digits | cifar10)" >&2
  exit 2
fi
DATASET=$1
shift
cd "$(dirname "$0")/.."
if [[ ! -f conf/experiment/cgs/${DATASET}_ipc10.yaml ]]; then
  echo "no conf/experiment/cgs/${DATASET}_ipc10.yaml; DATASET is one of:" \
    "$(cd conf/experiment/cgs && ls *_ipc10.yaml | sed 's/_ipc10\.yaml$//' | paste -sd' ' -)" >&2
  exit 2
fi
OUT=outputs/sweep_dpp/${DATASET}_$(date +%Y-%m-%d_%H-%M-%S)
if [[ $# -gt 0 && $1 != *=* ]]; then OUT=$1; shift; fi
PYTHON=${PYTHON:-python}
export DDIST_PROGRESS=${DDIST_PROGRESS:-0}
ETA_ZT=${ETA_ZT:-0,0.3,1,3,10}
ETA_X0=${ETA_X0:-0,0.03,0.1,0.3,1}
ETA_TEACHER=${ETA_TEACHER:-0,0.01,0.03,0.1,0.3}

start=$SECONDS
for kernel in zt x0_hat teacher; do
  case $kernel in zt) grid=$ETA_ZT ;; x0_hat) grid=$ETA_X0 ;; teacher) grid=$ETA_TEACHER ;; esac
  echo "== kernel $kernel: eta_dpp in {$grid}"
  "$PYTHON" -m ddist -m "experiment=cgs/${DATASET}_ipc10" logger=none analyse.figures=false \
    "paths.cache_dir=${CACHE_DIR:-outputs/cache}" \
    "diffusion.sample.cgs.kernel=$kernel" "diffusion.sample.cgs.eta_dpp=$grid" \
    "hydra.sweep.dir=$OUT/$kernel" "$@" \
    || echo "== kernel $kernel: some jobs failed (the report lists them)"
done
echo "== sweeps took $((SECONDS - start)) s"
"$PYTHON" -m ddist.report "$OUT" --out "$OUT" --sweep diffusion.sample.cgs.eta_dpp diffusion.sample.cgs.kernel
