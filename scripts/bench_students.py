"""Students trained together (evaluate.parallel) against one after another: throughput per mode.

    python scripts/bench_students.py                                  # digits ConvNet-3, K = 1 2 4 8, 1 and 2 threads
    python scripts/bench_students.py --dataset cifar10 --root ../shared/data/cifar10 --epochs 2
    python scripts/bench_students.py --dataset cifar10 --root ../shared/data/cifar10 --arch resnet18 --ks 1 2 4
    python scripts/bench_students.py --device cuda --ks 1 8 --threads 1          # scripts/gpu_check.sh

K students (soft protocol, online teacher labels: the evaluate default) on two sets of IPC 10 random
real images, half on each (the set and its random-real baseline; K/2 repeats each), for `--epochs`
epochs of evaluate's batch plan, three ways:
    sequential   evaluate.parallel=1: one student after another (today's path)
    cohort       one loop, each student its own forward (evaluate.stacking=none), sharing each
                 set's augmented batch and teacher logits and one optimiser update
    grouped      the same with same-architecture students as one stacked model (stacking=grouped)
each in every `--layouts` (nchw and/or channels_last: evaluate.channels_last) and `--precisions` (fp32
and/or bf16: evaluate.precision), or as listed in `--variants`. Rounds are interleaved (every variant
once per round), the median round is reported, with the load average beside it. The figure is
student-steps per second and its ratio to the baseline: sequential in the first layout and precision
given, or the first of `--variants` (sequential@nchw@fp32 is the path before students were trained
together). Nothing is cached: students train from scratch in memory (no store entries). The teacher
is the architecture's fresh initialisation (its cost, not its accuracy, matters here).

Measured on the 2-core CPU machine (no GPU), see the README's "Students trained together":
the numbers are in the closing notes and the README, not here, because they depend on the load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import ddist  # noqa: F401  (registers the schemas before composing)
from ddist.data import dataset_spec, load_split
from ddist.data.subsets import save_random_real
from ddist.runtime.artifacts import load_distilled
from ddist.runtime.context import RunContext
from ddist.training.cohort import Member, Shared, Source, train_cohort
from ddist.training.teacher import frozen_teacher, load_teacher

REPO = Path(__file__).resolve().parents[1]
MODES = ("sequential", "cohort", "grouped")


def compose(overrides: list[str], tmp: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(
            "config",
            overrides=[*overrides, "logger=none", f"paths.root_dir={tmp}", f"paths.output_dir={tmp}"],
        )


def setup(args, tmp: Path):
    """The config, a context with a fresh teacher checkpoint, the two sets and the test split."""
    from ddist.stages import squeeze

    data = [f"dataset={args.dataset}"]
    if args.root:
        data += ["dataset.format=folder", f"dataset.root={args.root}"]
    cfg = compose(
        [
            *data,
            f"device={args.device}",
            "teacher.epochs=0",
            f"evaluate.epochs={args.epochs}",
            f"paths.cache_dir={args.cache_dir}",
        ],
        tmp,
    )
    ctx = RunContext(run_dir=tmp, device=torch.device(args.device), spec=dataset_spec(cfg.dataset))
    ctx = squeeze.run(cfg, ctx)
    train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
    sets = [Source(load_distilled(save_random_real(tmp / f"set{s}", train, ctx.spec, 10, s), ctx.spec)) for s in (0, 1)]
    test = load_split(cfg.dataset, "test", Path(cfg.paths.cache_dir))
    return cfg, ctx, sets, test


def run_mode(mode: str, k: int, arch: dict, env) -> float:
    """Seconds to train k students (half on each set) in `mode` ("sequential", "cohort" or "grouped",
    then "@" the layout, nchw or channels_last, and "@" the precision, fp32 or bf16)."""
    cfg, ctx, sets, test, teacher = env
    mode, layout, precision = mode.split("@")
    ev = cfg.evaluate.copy()
    ev.channels_last = layout == "channels_last"
    ev.precision = precision
    members = [Member(arch, r // 2, r % 2, None, f"bench/s{r}") for r in range(k)]
    shared = Shared(ev, teacher, test, grouped=mode == "grouped")
    start = time.perf_counter()
    if mode == "sequential":
        for m in members:
            train_cohort(cfg, ctx, shared, [sets[m.source]], [Member(arch, m.repeat, 0, None, m.key)])
    else:
        train_cohort(cfg, ctx, shared, sets if k > 1 else sets[:1], members if k > 1 else members[:1])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--root", default=None, help="an image-folder dataset root (CIFAR-10: ../shared/data/cifar10)")
    parser.add_argument("--arch", default="convnet", help="convnet (ConvNet-3, width 128) or resnet18 (CIFAR stem)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of 100 images (2 steps of 64) per student")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (scripts/gpu_check.sh: K=1 vs K=8 there)")
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--layouts", nargs="+", default=["channels_last"], help="nchw and/or channels_last")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], help="fp32 and/or bf16 (evaluate.precision)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="MODE@LAYOUT@PRECISION each, instead of every mode x layout x precision; the first is the baseline",
    )
    parser.add_argument("--cache-dir", default=os.environ.get("DDIST_BENCH_CACHE", "/tmp/ddist_bench_cache"))
    args = parser.parse_args()
    arch = {"name": "convnet"} if args.arch == "convnet" else {"name": "resnet18", "stem": "cifar"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg, ctx, sets, test = setup(args, Path(tmp))
        teacher = frozen_teacher(cfg, load_teacher(cfg, ctx))
        env = (cfg, ctx, sets, test, teacher)
        steps = args.epochs * 2
        print(f"{args.dataset}, {args.arch}, soft protocol, {steps} steps of 64 per student; {args.rounds} rounds")
        print("| threads | K | mode | s | student-steps/s | vs baseline | load (1 min) |")
        print("|---|---|---|---|---|---|---|")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for k in args.ks:
                modes = args.variants or [
                    f"{m}@{lay}@{p}" for p in args.precisions for lay in args.layouts for m in args.modes
                ]
                times: dict[str, list[float]] = {m: [] for m in modes}
                loads: list[float] = []
                for _ in range(args.rounds):
                    for mode in modes:
                        times[mode].append(run_mode(mode, k, arch, env))
                    loads.append(os.getloadavg()[0])
                first = modes[0] if args.variants else f"sequential@{args.layouts[0]}@{args.precisions[0]}"
                base = statistics.median(times[first]) if first in times else None
                for mode in modes:
                    t = statistics.median(times[mode])
                    ratio = f"{base / t:.2f}x" if base else "-"
                    load = statistics.median(loads)
                    print(f"| {threads} | {k} | {mode} | {t:.2f} | {k * steps / t:.1f} | {ratio} | {load:.1f} |")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
