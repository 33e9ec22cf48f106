"""Recover benchmarks: throughput and memory of SRe2L and DEDA, batched vs per-class statistics.

    python scripts/bench_recover.py                       # digits and CIFAR-10
    python scripts/bench_recover.py --datasets digits --iterations 20 --threads 2

Three tables, on the ConvNet-3 teacher of each dataset (digits 1x16x16; CIFAR-10 3x32x32
from ../shared/data/cifar10 as format=folder):
1. recover throughput (image-iterations/s: images in a batch x optimiser steps per second)
   and peak RSS of the loop, each objective in its own batch layout (SRe2L one image per
   class, DEDA whole classes), one fresh subprocess per case, RSS sampled every millisecond;
2. DEDA's loss with one batched teacher forward and per-class reductions versus one forward
   per class, at 10 classes x IPC 10: time per iteration (forward + backward), the speedup,
   and the difference of the losses and gradients;
3. memory of DEDA's pooled-feature statistics versus SRe2L's BN hooks on the same teacher
   and the same batch (10 classes x IPC 10): tensors saved for backward (exact, deduplicated
   by storage) and the peak RSS growth of one forward + backward, each in a fresh subprocess.

Timing does not depend on the teacher's weights or on the values of the real class
statistics, so the teacher is freshly initialised and DEDA's real statistics are random
(with the right shapes); no data is read. Numbers are wall-clock on this machine's CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ddist.data import dataset_spec
from ddist.data.augment import apply, sample_params
from ddist.methods import recover_method
from ddist.models import build_model
from ddist.training.recover import Group, PixelSpace, batch_groups, optimise_groups, pixel_bounds

REPO = Path(__file__).resolve().parents[1]
DATASETS = {
    "digits": ["dataset=digits"],
    "cifar10": ["dataset=cifar10", "dataset.format=folder", f"dataset.root={REPO.parent / 'shared/data/cifar10'}"],
}
WARMUP = 3


# ----------------------------------------------------------------------------- setup


def compose_cfg(dataset: str, objective: str, ipc: int):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*DATASETS[dataset], f"recover={objective}", f"ipc={ipc}", "logger=none"])


def make_teacher(cfg, spec) -> torch.nn.Module:
    teacher = build_model(cfg.teacher.model, spec.num_classes, spec.channels, spec.resolution)
    return teacher.requires_grad_(False).eval()


def random_real_stats(teacher, spec, generator: torch.Generator) -> dict:
    """Per-class means and PSD covariances of the right shapes for every stage of the teacher."""
    with torch.no_grad():
        _, feats = teacher.forward_features(torch.zeros(2, spec.channels, spec.resolution, spec.resolution))
    stats = {}
    for key in (k for k in feats if k.startswith("stage")):
        d = feats[key].shape[1]
        a = torch.randn(spec.num_classes, d, d, generator=generator) / d
        stats[key] = (torch.randn(spec.num_classes, d, generator=generator), a @ a.transpose(1, 2))
    return stats


def make_objective(cfg, teacher, spec, ipc: int):
    """The recover method's objective from its own builder (ddist/methods/), given random real class
    statistics of the right shapes where it needs them."""
    method = recover_method(cfg.recover.objective)
    inputs: dict = {"teacher": teacher}
    if "class_stats" in method.needs:
        inputs["class_stats"] = random_real_stats(teacher, spec, torch.Generator().manual_seed(0))
    if "whole_class_batches" in method.needs:
        inputs["ipc"] = ipc
    return method.build(cfg.recover, **inputs)


def rss_mb() -> float:
    """The current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Peak RSS growth (MB) over the RSS at entry while a block runs, sampled every millisecond
    (ru_maxrss cannot serve: importing the stack peaks higher than the work measured here)."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth_mb(self) -> float:
        return self.peak - self.start


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- 1. throughput


def throughput_case(dataset: str, objective: str, ipc: int, iterations: int) -> dict:
    """One recover batch in the objective's own layout: image-iterations/s and the loop's peak RSS."""
    cfg = compose_cfg(dataset, objective, ipc)
    spec = dataset_spec(cfg.dataset)
    teacher = make_teacher(cfg, spec)
    obj = make_objective(cfg, teacher, spec, ipc)
    idx = batch_groups(spec.num_classes, ipc, cfg.recover.batch.mode, cfg.recover.batch.size)[0]
    labels = torch.arange(spec.num_classes).repeat_interleave(ipc)[idx]
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(idx), spec.channels, spec.resolution, spec.resolution, generator=generator)
    augment = OmegaConf.to_container(cfg.dataset.augment.recover, resolve=True)
    bounds = pixel_bounds(spec, torch.device("cpu"))

    def steps(n: int) -> float:
        rcfg = OmegaConf.merge(cfg.recover, {"iterations": n})
        start = time.perf_counter()
        space = PixelSpace(augment, spec.resolution, bounds)
        optimise_groups(obj, [Group(x0, labels, generator)], rcfg, space, lambda *a: None)
        return time.perf_counter() - start

    with PeakRSS() as peak:
        steps(WARMUP)
        seconds = steps(iterations)
    return {
        "dataset": dataset,
        "objective": objective,
        "batch": len(idx),
        "iterations": iterations,
        "ms_per_iteration": 1000 * seconds / iterations,
        "image_iterations_per_s": len(idx) * iterations / seconds,
        "batches_for_the_set": len(batch_groups(spec.num_classes, ipc, cfg.recover.batch.mode, cfg.recover.batch.size)),
        "rss_mb": peak.start,
        "loop_rss_growth_mb": peak.growth_mb,
    }


# ----------------------------------------------------------------------------- 2. batched vs loop


def batched_vs_loop(dataset: str, ipc: int, repeats: int) -> dict:
    """DEDA at 10 classes x IPC: one forward for all classes vs one forward per class."""
    cfg = compose_cfg(dataset, "deda", ipc)
    spec = dataset_spec(cfg.dataset)
    teacher = make_teacher(cfg, spec)
    obj = make_objective(cfg, teacher, spec, ipc)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(
        spec.num_classes * ipc, spec.channels, spec.resolution, spec.resolution, generator=generator
    ).requires_grad_(True)
    labels = torch.arange(spec.num_classes).repeat_interleave(ipc)
    x_aug = apply(x, sample_params(len(labels), cfg.dataset.augment.recover, spec.resolution, generator))
    it = total = 10  # the last iteration: every term (with the regulariser) is on

    def batched() -> torch.Tensor:
        loss, _ = obj(x_aug, labels, it - 1, total)
        loss.backward(retain_graph=True)
        return loss.detach()

    def per_class() -> torch.Tensor:
        # mean over classes of each class's loss = the batched loss (equal class sizes, mean reduction)
        loss = torch.zeros(())
        for c in range(spec.num_classes):
            sl = slice(c * ipc, (c + 1) * ipc)
            loss_c, _ = obj(x_aug[sl], labels[sl], it - 1, total)
            (loss_c / spec.num_classes).backward(retain_graph=True)
            loss = loss + loss_c.detach() / spec.num_classes
        return loss

    # interleaved repeats, medians: drifting load on a shared machine hits both alike
    times: dict[str, list[float]] = {"batched": [], "per_class": []}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, fn in (("batched", batched), ("per_class", per_class)):
            x.grad = None
            start = time.perf_counter()
            loss = fn()
            if repeat:
                times[name].append(time.perf_counter() - start)
            if name == "batched":
                lb, gb = loss, x.grad.clone()
            else:
                ll, gl = loss, x.grad.clone()
    tb, tl = (sorted(t)[len(t) // 2] for t in (times["batched"], times["per_class"]))
    return {
        "dataset": dataset,
        "classes": spec.num_classes,
        "ipc": ipc,
        "batched_ms": 1000 * tb,
        "per_class_ms": 1000 * tl,
        "speedup": tl / tb,
        "loss_batched": lb.item(),
        "loss_per_class": ll.item(),
        "loss_abs_diff": (lb - ll).abs().item(),
        "grad_max_abs_diff": (gb - gl).abs().max().item(),
        "grad_max_abs": gb.abs().max().item(),
    }


# ----------------------------------------------------------------------------- 3. memory


def saved_bytes(fn) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def memory_case(dataset: str, objective: str, ipc: int) -> dict:
    """One forward + backward of `objective` ("ce" = the teacher with CE only) on 10 classes x IPC."""
    cfg = compose_cfg(dataset, "deda" if objective == "ce" else objective, ipc)
    spec = dataset_spec(cfg.dataset)
    teacher = make_teacher(cfg, spec)
    obj = None if objective == "ce" else make_objective(cfg, teacher, spec, ipc)
    x = torch.randn(spec.num_classes * ipc, spec.channels, spec.resolution, spec.resolution).requires_grad_(True)
    labels = torch.arange(spec.num_classes).repeat_interleave(ipc)

    def loss() -> torch.Tensor:
        if obj is None:
            return F.cross_entropy(teacher(x), labels)
        return obj(x, labels, 9, 10)[0]

    with PeakRSS() as peak:
        nbytes, value = saved_bytes(loss)
        value.backward()
    return {
        "dataset": dataset,
        "objective": objective,
        "batch": len(labels),
        "saved_for_backward_mb": nbytes / 2**20,
        "rss_growth_mb": peak.growth_mb,
    }


# ----------------------------------------------------------------------------- report


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = "  ".join(f"{title:>{len(title) if i == 0 else 12}}" for i, (title, _, _) in enumerate(columns))
    lines = [head]
    for row in rows:
        cells = []
        for i, (title, key, fmt) in enumerate(columns):
            cells.append(f"{format(row[key], fmt):>{len(title) if i == 0 else 12}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "cifar10"], choices=list(DATASETS))
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=30, help="timed recover iterations per case")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats of batched vs per-class")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in every case")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.child:  # one isolated case, printed as JSON for the parent
        kind, *rest = args.child
        if kind == "throughput":
            print(json.dumps(throughput_case(rest[0], rest[1], args.ipc, args.iterations)))
        else:
            print(json.dumps(memory_case(rest[0], rest[1], args.ipc)))
        return

    common = ["--ipc", str(args.ipc), "--iterations", str(args.iterations), "--threads", str(args.threads)]
    print(f"# {torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.1f}, IPC {args.ipc}")
    rows = [run_child(*common, "--child", "throughput", ds, obj) for ds in args.datasets for obj in ("sre2l", "deda")]
    print("\n1. recover throughput (one batch in each objective's layout; random-init ConvNet-3 teacher)")
    print(
        table(
            rows,
            [
                ("dataset", "dataset", ""),
                ("objective", "objective", ""),
                ("batch", "batch", "d"),
                ("ms/iter", "ms_per_iteration", ".1f"),
                ("img-iter/s", "image_iterations_per_s", ".0f"),
                ("RSS MB", "rss_mb", ".0f"),
                ("loop +RSS MB", "loop_rss_growth_mb", ".1f"),
            ],
        )
    )

    rows = [batched_vs_loop(ds, args.ipc, args.repeats) for ds in args.datasets]
    print(f"\n2. DEDA: one batched forward vs one forward per class (10 classes x IPC {args.ipc}, forward + backward)")
    print(
        table(
            rows,
            [
                ("dataset", "dataset", ""),
                ("batched ms", "batched_ms", ".1f"),
                ("per-class ms", "per_class_ms", ".1f"),
                ("speedup", "speedup", ".2f"),
                ("loss", "loss_batched", ".5f"),
                ("|loss diff|", "loss_abs_diff", ".1e"),
                ("max|grad diff|", "grad_max_abs_diff", ".1e"),
                ("max|grad|", "grad_max_abs", ".1e"),
            ],
        )
    )

    rows = [run_child(*common, "--child", "memory", ds, obj) for ds in args.datasets for obj in ("ce", "sre2l", "deda")]
    print(
        f"\n3. memory of one forward + backward on the same teacher and batch (10 classes x IPC {args.ipc}); "
        "ce = the teacher with CE alone"
    )
    print(
        table(
            rows,
            [
                ("dataset", "dataset", ""),
                ("objective", "objective", ""),
                ("batch", "batch", "d"),
                ("saved MB", "saved_for_backward_mb", ".2f"),
                ("+RSS MB", "rss_growth_mb", ".1f"),
            ],
        )
    )


if __name__ == "__main__":
    main()
