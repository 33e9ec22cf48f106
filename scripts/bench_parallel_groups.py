"""Benchmark recover.batch.parallel_groups: SRe2L's ipc_slice batches one at a time vs G stacked.

    python scripts/bench_parallel_groups.py                                   # digits and CIFAR-10, IPC 10
    python scripts/bench_parallel_groups.py --datasets digits --iterations 20 --rounds 5 --threads 1 2 --groups 2 10

For each dataset: the ConvNet-3 teacher of the dataset's config (freshly initialised: timing does not
depend on its weights, so no data is read and nothing is cached), SRe2L's objective, the ipc_slice
groups of 10 classes x IPC (IPC groups of one image per class). Per case the same G groups are
optimised for `iterations` steps each, either one after another (optimise_batch, parallel_groups=1)
or in stacks of G (optimise_groups, parallel_groups=G; default G = IPC: all at once). The cases of
all thread counts are interleaved round by round in this one process, so a drift in the machine's
load hits them alike; the table gives the median group-iterations/s per case, the ratio over one at
a time, and the load average (uptime) before and after. Numbers are wall-clock on this machine's CPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ddist.data import dataset_spec
from ddist.models import build_model
from ddist.objectives import SRe2LObjective
from ddist.stages import recover

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
    loop = (cfg.recover, augment, spec.resolution, recover.pixel_bounds(spec, torch.device("cpu")))
    return objective, x0, [labels[idx] for idx in groups], loop, cfg.teacher.model.width


def one_at_a_time(objective, x0, labels, loop) -> None:
    for g, (x, y) in enumerate(zip(x0, labels, strict=True)):
        recover.optimise_batch(objective, x, y, *loop, recover.group_generator(1, g), lambda *a: None)


def stacked(objective, x0, labels, loop, most: int) -> None:
    """The groups in stacks of `most` (parallel_groups=most)."""
    for start in range(0, len(x0), most):
        part = range(start, min(start + most, len(x0)))
        generators = [recover.group_generator(1, g) for g in part]
        xs, ys = [x0[g] for g in part], [labels[g] for g in part]
        recover.optimise_groups(objective, xs, ys, *loop, generators, lambda *a: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20, help="optimiser steps per group and case")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--groups", type=int, nargs="+", default=None, help="parallel_groups G (default: IPC)")
    parser.add_argument("--width", type=int, default=None, help="teacher width (default: the dataset's config)")
    args = parser.parse_args()
    recover.warn_if_stuck = lambda *a: []  # few random-teacher iterations: the warnings say nothing here

    print(f"load average before: {load_average()} (cores: {os.cpu_count()})")
    for dataset in args.datasets:
        objective, x0, labels, loop, width = setup(dataset, args.ipc, args.iterations, args.width)
        stacks = args.groups or [len(x0)]
        cases = [(t, "G=1", one_at_a_time) for t in args.threads]
        cases += [(t, f"G={g}", partial(stacked, most=g)) for t in args.threads for g in stacks]
        cases.sort(key=lambda case: case[0])  # per round: each thread count's cases one after another
        seconds: dict[tuple[int, str], list[float]] = {(t, name): [] for t, name, _ in cases}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for threads, name, fn in cases:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                fn(objective, x0, labels, loop)
                if round_:
                    seconds[threads, name].append(time.perf_counter() - start)
        objective.close()
        work = len(x0) * args.iterations  # group-iterations per case
        print(
            f"\n{dataset}: ConvNet-3 width {width}, {len(x0)} groups of {len(labels[0])} images (G = {len(x0)}), "
            f"{args.iterations} iterations each, {args.rounds} rounds; load average now {load_average()}"
        )
        print("group-iterations/s (median of the rounds; ratio: over G=1 at the same threads)")
        for threads in args.threads:
            one = work / statistics.median(seconds[threads, "G=1"])
            cells = [f"G=1: {one:.1f} it/s"]
            for g in stacks:
                rate = work / statistics.median(seconds[threads, f"G={g}"])
                cells.append(f"G={g}: {rate:.1f} it/s ({rate / one:.2f}x)")
            print(f"  threads {threads}: " + " | ".join(cells))
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
