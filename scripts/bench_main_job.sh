#!/usr/bin/env bash
# The README's main job (`python -m ddist`, W&B offline) timed for several versions of the code,
# alternated: each round runs every version once, fresh caches, in a rotated order, so load on a
# shared host falls on all of them alike. Per run: wall clock, CPU time (user + sys), peak memory
# (/usr/bin/time -v), the stage times and the results table's gain; then the medians per version.
#
#   scripts/bench_main_job.sh ROUNDS REV... [-- extra Hydra overrides for every run]
#
# REV: a git revision (checked out with `git archive` into the output folder) or `.` for the working
# tree as it is. E.g. `OMP_NUM_THREADS=2 scripts/bench_main_job.sh 4 2b32edb .` (the README's figures).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
[[ $# -ge 2 ]] || { echo "usage: scripts/bench_main_job.sh ROUNDS REV... [-- overrides]" >&2; exit 2; }
rounds=$1; shift
revs=()
while [[ $# -gt 0 && $1 != -- ]]; do revs+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
OUT=outputs/bench_main_job/$(date +%Y-%m-%d_%H-%M-%S)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
trees=()
for rev in "${revs[@]}"; do
  if [[ $rev == . ]]; then trees+=("$PWD"); continue; fi
  tree=$OUT/tree_$rev
  mkdir -p "$tree" && git archive "$rev" | tar -x -C "$tree"
  trees+=("$tree")
done
n=${#revs[@]}
echo "round rev wall_s cpu_s peak_MB stages gain" | tee "$OUT/runs.txt"
for round in $(seq 1 "$rounds"); do
  for j in $(seq 0 $((n - 1))); do
    i=$(((j + round - 1) % n))  # rotate the order each round
    rev=${revs[$i]} tree=${trees[$i]} run=$OUT/run_${i}_$round
    (cd "$tree" && DDIST_PROGRESS=0 PYTHONPATH=$tree /usr/bin/time -v "$PYTHON" -m ddist \
      "paths.cache_dir=$run/cache" "hydra.run.dir=$run/out" "$@" > "$run.log" 2>&1) || echo "run $rev failed: $run.log"
    rm -rf "$run/cache"
    "$PYTHON" - "$run.log" "$round" "$rev" <<'EOF' | tee -a "$OUT/runs.txt"
import re, sys
text, (round_, rev) = open(sys.argv[1]).read(), sys.argv[2:]
def grab(pattern): return re.search(pattern, text)
elapsed = grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")[1].split(":")  # [h:]m:ss
wall = sum(float(part) * 60**i for i, part in enumerate(reversed(elapsed)))
cpu = float(grab(r"User time \(seconds\): (\S+)")[1]) + float(grab(r"System time \(seconds\): (\S+)")[1])
peak = int(grab(r"Maximum resident set size \(kbytes\): (\d+)")[1]) // 1024
stages = grab(r"time: (.*)")
gain = grab(r"\s([+-]\d+\.\d+pp)")
print(round_, rev, f"{wall:.1f}", f"{cpu:.1f}", peak, (stages[1] if stages else "-").replace(" ", ""), gain[1] if gain else "-")
EOF
  done
done
"$PYTHON" - "$OUT/runs.txt" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]).read().splitlines()[1:]]
for rev in dict.fromkeys(r[1] for r in rows):
    mine = [r for r in rows if r[1] == rev]
    wall, cpu = (statistics.median(float(r[k]) for r in mine) for k in (2, 3))
    print(f"{rev}: median wall {wall:.1f} s, median CPU {cpu:.1f} s over {len(mine)} run(s)")
EOF
echo "runs and logs: $OUT"
