#!/usr/bin/env bash
# The README's main job (`python -m ddist`, digits, cold cache) on an idle machine and beside one
# CPU-bound process, with today's thread control ("after": threads=auto, OMP_WAIT_POLICY=PASSIVE
# set by ddist) and with the old behaviour ("before": threads=2, the wait policy left to OpenMP's
# own default, i.e. spinning for a while at every barrier).
#
#   scripts/bench_busy.sh [REPEATS]        (default 3; run it on an otherwise idle machine)
#
# The four cases are interleaved repeat by repeat, so a drift in the machine's load hits them alike.
# Each run gets a fresh cache directory (cold: teacher training included) and no logger. Prints
# one line per run (wall seconds from /usr/bin/time, the 1-min load average before it) and the
# median per case with its ratio busy / idle.
#
# Measured 2026-12-03 on the 2-core development box (REPEATS=2, medians): after 88.1 s idle, 132.0 s
# busy (1.50x); before 83.2 s idle, 228.8 s busy (2.75x). The passive wait costs ~6% idle and saves
# 42% beside a busy neighbour.
set -euo pipefail
REPEATS=${1:-3}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'kill "${BUSY:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

run_job() {  # run_job CASE  -> appends "CASE seconds" to $WORK/times
  local case=$1 env_args=() opts=()
  if [[ $case == before* ]]; then
    env_args=(OMP_WAIT_POLICY=)  # set but empty: ddist leaves it alone; libgomp warns and uses its default
    opts=(threads=2)
  fi
  local load job seconds
  load=$(cut -d' ' -f1 /proc/loadavg)
  job=$(mktemp -d -p "$WORK")  # its own cache (cold) and run directory
  env "${env_args[@]}" DDIST_PROGRESS=0 /usr/bin/time -f "%e" -o "$job/seconds" \
    "$PYTHON" -m ddist logger=none "paths.cache_dir=$job/cache" "hydra.run.dir=$job/run" "${opts[@]}" \
    >"$job/log" 2>&1 || { echo "the job failed ($case):"; tail -20 "$job/log"; exit 1; }
  seconds=$(<"$job/seconds")
  printf '%-12s %7.1f s   load %s\n' "$case" "$seconds" "$load"
  echo "$case $seconds" >>"$WORK/times"
}

for ((r = 1; r <= REPEATS; r++)); do
  for mode in after before; do
    run_job "$mode-idle"
    "$PYTHON" -c 'while True: pass' &  # one CPU-bound neighbour
    BUSY=$!
    run_job "$mode-busy"
    kill "$BUSY"
    wait "$BUSY" 2>/dev/null || true
  done
done

"$PYTHON" - "$WORK/times" <<'EOF'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    case, seconds = line.split()
    times.setdefault(case, []).append(float(seconds))
median = {case: statistics.median(v) for case, v in times.items()}
print("\ncase         median s   busy/idle")
for mode in ("after", "before"):
    for load in ("idle", "busy"):
        case = f"{mode}-{load}"
        ratio = median[case] / median[f"{mode}-idle"]
        print(f"{case:<12} {median[case]:8.1f}   {ratio:.2f}x")
EOF
