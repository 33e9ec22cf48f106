"""Benchmark recover.batch.parallel_groups: SRe2L's ipc_slice batches one at a time vs G stacked.

    python scripts/bench_parallel_groups.py                                   # digits and CIFAR-10, IPC 10
    python scripts/bench_parallel_groups.py --datasets digits --iterations 20 --rounds 5 --threads 1 2 --groups 2 10
    python scripts/bench_parallel_groups.py --datasets cifar10 --threads 2 --layouts nchw channels_last \
        --allocators system cache                         # the teacher's layout and cpu_allocator too

For each dataset: the ConvNet-3 teacher of the dataset's config (freshly initialised: timing does not
depend on its weights, so no data is read and nothing is cached), SRe2L's objective, the ipc_slice
groups of 10 classes x IPC (IPC groups of one image per class). Per case the same G groups are
optimised for `iterations` steps each, either one after another (one group a stack, parallel_groups=1)
or in stacks of G (parallel_groups=G; default G = IPC: all at once), with the
teacher in each of `--layouts` (teacher.channels_last). A round runs every case once (after a warm-up
pass) in a fresh process per `--allocators` setting (cpu_allocator is process-wide, and a heap grown
under `cache` would slow `system` down in the same process); rounds alternate the allocators, so a
drift in the machine's load hits all cases alike. The table gives the median group-iterations/s per
case and its ratio over G=1 with the first allocator and layout given, at the same threads, and the
load average (uptime) before and after. Numbers are wall-clock on this machine's CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ddist.data import dataset_spec
from ddist.models import build_model
from ddist.objectives import SRe2LObjective
from ddist.runtime.allocator import configure_allocator
from ddist.training import recover

REPO = Path(__file__).resolve().parents[1]
DATASETS = {
    "digits": ["dataset=digits"],
    "cifar10": ["dataset=cifar10", "dataset.format=folder", f"dataset.root={REPO.parent / 'shared/data/cifar10'}"],
}


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def setup(dataset: str, ipc: int, iterations: int, width: int | None):
    """(objective, the G groups' starting pixels, labels and a generator maker, the loop's settings)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        overrides = [*DATASETS[dataset], "recover=sre2l", f"ipc={ipc}", f"recover.iterations={iterations}"]
        cfg = compose(
            "config", overrides=[*overrides, "logger=none", *([f"teacher.model.width={width}"] * bool(width))]
        )
    spec = dataset_spec(cfg.dataset)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher.model, spec.num_classes, spec.channels, spec.resolution)
    objective = SRe2LObjective(
        teacher.requires_grad_(False).eval(), ce_weight=cfg.recover.ce_weight, **cfg.recover.bn_matching
    )
    labels = torch.arange(spec.num_classes).repeat_interleave(ipc)
    groups = recover.batch_groups(spec.num_classes, ipc, "ipc_slice", None)
    x0 = [recover.initial_images(spec, len(idx), recover.group_generator(0, g)) for g, idx in enumerate(groups)]
    augment = OmegaConf.to_container(cfg.dataset.augment.recover, resolve=True)
    loop = (cfg.recover, recover.PixelSpace(augment, spec.resolution, recover.pixel_bounds(spec, torch.device("cpu"))))
    return objective, x0, [labels[idx] for idx in groups], loop


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def one_at_a_time(objective, x0, labels, loop) -> None:
    for g, (x, y) in enumerate(zip(x0, labels, strict=True)):
        recover.optimise_groups(objective, [recover.Group(x, y, recover.group_generator(1, g))], *loop, lambda *a: None)


def stacked(objective, x0, labels, loop, most: int) -> None:
    """The groups in stacks of `most` (parallel_groups=most)."""
    for start in range(0, len(x0), most):
        part = range(start, min(start + most, len(x0)))
        starts = [recover.Group(x0[g], labels[g], recover.group_generator(1, g)) for g in part]
        recover.optimise_groups(objective, starts, *loop, lambda *a: None)


def measure_once(dataset: str, args) -> dict[str, float]:
    """One warm-up and one timed pass of every (threads, layout, G) case in this process, under the
    cpu_allocator it was started with: {case: seconds}."""
    objective, x0, labels, loop = setup(dataset, args.ipc, args.iterations, args.width)
    stacks = args.groups or [len(x0)]  # default: every group in one stack
    cases = [(t, lay, g) for t in args.threads for lay in args.layouts for g in [1, *stacks]]
    seconds = {}
    for timed in (False, True):
        for threads, layout, g in cases:
            torch.set_num_threads(threads)
            objective.teacher.to(memory_format=LAYOUTS[layout])
            start = time.perf_counter()
            one_at_a_time(objective, x0, labels, loop) if g == 1 else stacked(objective, x0, labels, loop, g)
            if timed:
                seconds[json.dumps([threads, layout, g])] = time.perf_counter() - start
    objective.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20, help="optimiser steps per group and case")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each after a warm-up pass)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--groups", type=int, nargs="+", default=None, help="parallel_groups G (default: IPC)")
    parser.add_argument("--width", type=int, default=None, help="teacher width (default: the dataset's config)")
    parser.add_argument("--layouts", nargs="+", default=["channels_last"], choices=list(LAYOUTS))
    parser.add_argument("--allocators", nargs="+", default=["cache"], choices=["cache", "system"])
    parser.add_argument("--child", help=argparse.SUPPRESS)  # dataset,allocator: one round in this process
    args = parser.parse_args()
    recover.warn_if_stuck = lambda *a: []  # few random-teacher iterations: the warnings say nothing here
    if args.child:
        dataset, allocator = args.child.split(",")
        configure_allocator(allocator)
        print(json.dumps(measure_once(dataset, args)))
        return

    print(f"load average before: {load_average()} (cores: {os.cpu_count()})")
    for dataset in args.datasets:
        # every round and allocator in a fresh process: glibc's heap, once grown under `cache`, would
        # penalise `system` in the same process (and a process-wide setting cannot be undone cleanly)
        seconds: dict[tuple, list[float]] = {}
        for _ in range(args.rounds):
            for allocator in args.allocators:
                child = [sys.executable, __file__, *sys.argv[1:], "--child", f"{dataset},{allocator}"]
                out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
                for case, secs in json.loads(out.strip().splitlines()[-1]).items():
                    seconds.setdefault((allocator, *json.loads(case)), []).append(secs)
        groups = sorted({key[3] for key in seconds})
        work = args.ipc * args.iterations  # group-iterations per case (ipc_slice: IPC groups)
        print(
            f"\n{dataset}: ConvNet-3, {args.ipc} groups of one image per class, {args.iterations} iterations each, "
            f"{args.rounds} rounds; load average now {load_average()}"
        )
        first = (args.allocators[0], args.layouts[0])
        print(f"group-iterations/s (median of the rounds; ratio: over G=1, cpu_allocator={first[0]}, {first[1]})")
        for threads in args.threads:
            base = work / statistics.median(seconds[first[0], threads, first[1], 1])
            for allocator in args.allocators:
                for layout in args.layouts:
                    cells = []
                    for g in groups:
                        rate = work / statistics.median(seconds[allocator, threads, layout, g])
                        cells.append(f"G={g}: {rate:.1f} it/s ({rate / base:.2f}x)")
                    print(f"  threads {threads}, {allocator}, {layout}: " + " | ".join(cells))
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
