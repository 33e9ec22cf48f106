"""Peak resident memory of the recover stage against the size of the set it makes.

    python scripts/measure_recover_memory.py                       # digits, IPC 10 / 50 / 150
    python scripts/measure_recover_memory.py --ipcs 10 50 --iterations 5 --mode whole_class

Recover streams: each finished batch group goes to disk as soon as it is done and the
DistilledSet is assembled from the parts a chunk at a time (ddist/runtime/workdir.py), so the
memory it needs beyond the process's fixed cost (torch, the teacher, the data split) is
one group's pixels and optimiser state plus one assembly chunk, whatever the IPC. Each
case runs the real stage (recover.run, a randomly initialised digits teacher: memory does
not depend on its weights) in a fresh subprocess, with the resident set size sampled every
millisecond; the table gives the RSS before the stage, its peak during it, the growth, and
what the whole set would take as float32 for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one_case(ipc: int, iterations: int, mode: str, size: int | None) -> dict:
    """Run recover once in this process; returns the memory figures."""
    import torch
    from hydra import compose, initialize_config_dir

    from ddist.data import dataset_spec
    from ddist.models import build_model
    from ddist.runtime.artifacts import save_checkpoint
    from ddist.runtime.context import RunContext
    from ddist.stages import recover  # its public run only: the helpers come from the library
    from ddist.training.recover import batch_groups

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    overrides = [
        "pipeline=sre2l",
        f"ipc={ipc}",
        f"recover.iterations={iterations}",
        f"recover.batch.mode={mode}",
        f"recover.batch.size={'null' if size is None else size}",
        f"paths.root_dir={tmp}",
        f"paths.output_dir={tmp / 'run'}",
        f"paths.cache_dir={tmp / 'cache'}",
        "logger=none",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    spec = dataset_spec(cfg.dataset)
    teacher = build_model(cfg.teacher.model, spec.num_classes, spec.channels, spec.resolution)
    save_checkpoint(tmp / "teacher.pt", teacher)
    ctx = RunContext(run_dir=tmp / "run", device=torch.device("cpu"), spec=spec, teacher=tmp / "teacher.pt")
    groups = batch_groups(spec.num_classes, ipc, mode, size)
    before = rss_mb()
    peak, stop = [before], threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            peak[0] = max(peak[0], rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    recover.run(cfg, ctx)
    stop.set()
    thread.join()
    n = spec.num_classes * ipc
    return {
        "ipc": ipc,
        "images": n,
        "groups": len(groups),
        "group_images": max(len(g) for g in groups),
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(peak[0], 1),
        "growth_mb": round(peak[0] - before, 1),
        "set_float32_mb": round(n * spec.channels * spec.resolution**2 * 4 / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ipcs", type=int, nargs="+", default=[10, 50, 150])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--mode", default="ipc_slice", choices=["ipc_slice", "whole_class"])
    parser.add_argument("--size", type=int, default=None, help="recover.batch.size (default: null)")
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)  # one subprocess's IPC
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(one_case(args.case, args.iterations, args.mode, args.size)))
        return
    rows = []
    for ipc in args.ipcs:
        cmd = [sys.executable, __file__, "--case", str(ipc), "--iterations", str(args.iterations), "--mode", args.mode]
        if args.size is not None:
            cmd += ["--size", str(args.size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"recover peak RSS on digits ({args.mode}, batch.size {args.size}, {args.iterations} iterations)")
    print(
        f"{'ipc':>5}{'images':>8}{'groups':>8}{'per grp':>9}{'before MB':>11}{'peak MB':>9}{'growth':>8}{'set f32':>9}"
    )
    for r in rows:
        print(
            f"{r['ipc']:>5}{r['images']:>8}{r['groups']:>8}{r['group_images']:>9}{r['rss_before_mb']:>11}"
            f"{r['rss_peak_mb']:>9}{r['growth_mb']:>8}{r['set_float32_mb']:>9}"
        )


if __name__ == "__main__":
    main()
