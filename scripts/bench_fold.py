"""The BN-folded frozen teacher (teacher.fold_bn) against the unfolded one, interleaved in one run.

    OMP_NUM_THREADS=1 python scripts/bench_fold.py                      # CIFAR-10 shapes, ConvNet-3
    OMP_NUM_THREADS=1 python scripts/bench_fold.py --model resnet18 --rounds 3

Two timings per round, each for the unfolded teacher (teacher.fold_bn=false, the old path)
and then the folded one (the default), so load changes on a shared machine hit both alike:
1. DEDA recover: iterations/s of `optimise_groups` (one group) (augment, forward, backward, Adam step) on
   one whole-class batch (10 classes x IPC 10, CIFAR-10's shapes, 3x32x32);
2. the real-class-statistics pass (`real_class_stats`): images/s over `--stats-batches`
   batches of 256 random images, the folded teacher in channels_last as recover runs it.
The medians over rounds, their ratio (folded / unfolded), and `uptime` before and after are
printed. Timing does not depend on the weights, so the teacher is freshly initialised and
the real statistics are random with the right shapes; no data is read.

measured (2-core shared CPU, one thread, ConvNet-3 width 128, --rounds 3 --iterations 10 --stats-batches 4,
load 1.4-2.7): recover 0.931 -> 1.143 it/s (1.23x), statistics 172 -> 374 images/s (2.18x); under load 12
(--rounds 3 --iterations 5 --stats-batches 2): 1.41x and 2.71x.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ddist.data import dataset_spec
from ddist.methods import deda as deda_method
from ddist.models import build_model
from ddist.models.fold import fold_batchnorm
from ddist.objectives import DEDAObjective
from ddist.training.class_stats import real_class_stats
from ddist.training.recover import Group, PixelSpace, optimise_groups, pixel_bounds

REPO = Path(__file__).resolve().parents[1]
CIFAR = ["dataset=cifar10", "dataset.format=folder", f"dataset.root={REPO.parent / 'shared/data/cifar10'}"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def deda_objective(cfg, teacher, layers, ipc: int, generator: torch.Generator) -> DEDAObjective:
    """DEDA with random real statistics of the right shapes (timing does not depend on their values)."""
    real = {}
    with torch.no_grad():
        feats = teacher.features(torch.zeros(2, 3, 32, 32))
    for key in layers:
        d = feats[key].shape[1]
        a = torch.randn(10, d, d, generator=generator) / d
        real[key] = (torch.randn(10, d, generator=generator), a @ a.transpose(1, 2))
    return DEDAObjective(teacher, real, ipc, deda_method.weights(cfg.recover))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnet", help="a conf/model preset (the teacher)")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20, help="recover iterations timed per round")
    parser.add_argument("--stats-batches", type=int, default=8, help="256-image batches of the statistics pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[*CIFAR, "recover=deda", f"ipc={args.ipc}", f"model@teacher.model={args.model}", "logger=none"],
        )
    spec = dataset_spec(cfg.dataset)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher.model, spec.num_classes, spec.channels, spec.resolution)
    teacher = teacher.requires_grad_(False).eval()
    layers = [n for n in teacher.feature_names if n.startswith("stage")]
    variants = {
        "unfolded": (teacher, teacher),
        "folded": (fold_batchnorm(teacher), fold_batchnorm(teacher, channels_last=True)),
    }
    generator = torch.Generator().manual_seed(0)
    objectives = {name: deda_objective(cfg, pair[0], layers, args.ipc, generator) for name, pair in variants.items()}
    labels = torch.arange(spec.num_classes).repeat_interleave(args.ipc)
    x0 = torch.randn(len(labels), spec.channels, spec.resolution, spec.resolution, generator=generator)
    augment = OmegaConf.to_container(cfg.dataset.augment.recover, resolve=True)
    bounds = pixel_bounds(spec, torch.device("cpu"))
    rcfg = OmegaConf.merge(cfg.recover, {"iterations": args.iterations})
    real_x = torch.randn(256 * args.stats_batches, spec.channels, spec.resolution, spec.resolution, generator=generator)
    real_y = torch.arange(spec.num_classes).repeat_interleave(len(real_x) // spec.num_classes + 1)[: len(real_x)]
    batches = [(real_x[i : i + 256], real_y[i : i + 256]) for i in range(0, len(real_x), 256)]

    def recover_rate(name: str) -> float:
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(1)
        space = PixelSpace(augment, spec.resolution, bounds)
        optimise_groups(objectives[name], [Group(x0, labels, gen)], rcfg, space, lambda *a: None)
        return args.iterations / (time.perf_counter() - start)

    def stats_rate(name: str) -> float:
        start = time.perf_counter()
        real_class_stats(variants[name][1], batches, spec.num_classes, layers, torch.device("cpu"))
        return len(real_x) / (time.perf_counter() - start)

    print(f"before: {uptime()}")
    for name in variants:  # warm-up: allocator, oneDNN kernels
        recover_rate(name)
        stats_rate(name)
    rates: dict[str, dict[str, list[float]]] = {"recover it/s": {}, "stats images/s": {}}
    for r in range(args.rounds):
        for name in variants:
            rates["recover it/s"].setdefault(name, []).append(recover_rate(name))
            rates["stats images/s"].setdefault(name, []).append(stats_rate(name))
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v['folded'][-1] / v['unfolded'][-1]:.2f}x" for k, v in rates.items())
        )
    print(f"after:  {uptime()}")
    print(
        f"model={args.model} ipc={args.ipc} batch={len(labels)} threads={args.threads} rounds={args.rounds} "
        f"(medians; ratio = folded / unfolded)"
    )
    for what, by_name in rates.items():
        unfolded, folded = statistics.median(by_name["unfolded"]), statistics.median(by_name["folded"])
        print(f"{what:>16}: unfolded {unfolded:9.3f}  folded {folded:9.3f}  ratio {folded / unfolded:.2f}x")


if __name__ == "__main__":
    main()
