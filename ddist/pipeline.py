"""Run cfg.pipeline.stages in order, passing the artifacts made so far in `ctx`.

At the end: results.json in the run directory, the same table on the console and in W&B.
`dry_run=true` first cuts the configuration down to one step of everything (ddist/dry_run.py).
"""

from __future__ import annotations

import importlib
import resource
import threading
import time
from pathlib import Path
from typing import Self

import torch
from omegaconf import DictConfig

from ddist import dry_run
from ddist.artifacts import atomic_write_text, strict_json
from ddist.checks import check_config
from ddist.data import dataset_spec
from ddist.logging import RunLogger, hydra_overrides, info
from ddist.models import student_config
from ddist.threads import configure_threads
from ddist.train import resolve_device, seed_everything

# stage name -> module with run(cfg, ctx) -> ctx (imported lazily: diffusion pulls in diffusers)
STAGES = {
    name: f"ddist.stages.{name}"
    for name in ("squeeze", "random", "recover", "relabel", "evaluate", "analyse", "diffusion")
}


def validate(cfg: DictConfig) -> None:
    """Fail before any work on options that cannot run (ddist.checks); the schemas have already
    checked each value (a stage name in pipeline.stages, say) when the config was composed."""
    check_config(cfg)
    for entry in cfg.evaluate.students:  # a bad name fails now, not after hours of distillation
        student_config(entry)


def run(cfg: DictConfig) -> dict:
    if cfg.dry_run:
        cfg = dry_run.prepare(cfg)
    validate(cfg)
    configure_threads(cfg.threads)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: let cuDNN pick its kernels
    ctx = {
        "run_dir": run_dir,
        "device": device,
        "spec": dataset_spec(cfg.dataset),
        "results": {},
        "timings": {},
        "peak_memory_mb": {},
    }
    ctx["logger"] = logger = RunLogger.from_config(cfg, run_dir, job_type=cfg.pipeline.name)
    exit_code = 1
    try:
        for name in cfg.pipeline.stages:
            info(f"stage {name}")
            with PeakMemory() as peak:
                start = time.perf_counter()
                ctx = importlib.import_module(STAGES[name]).run(cfg, ctx)
                ctx["timings"][name] = round(time.perf_counter() - start, 3)
            ctx["peak_memory_mb"][name] = peak.mb
            logger.log({f"{name}/seconds": ctx["timings"][name], f"{name}/peak_memory_mb": peak.mb})
        results = collect_results(cfg, ctx)
        # a dry run's numbers mean nothing: another name keeps them out of reports
        atomic_write_text(run_dir / ("dry_run.json" if cfg.dry_run else "results.json"), strict_json(results))
        print(format_table(results) + f"\n  run directory: {run_dir}")
        report_to_logger(logger, results, ctx)
        exit_code = 0
        return results
    finally:
        logger.finish(exit_code)


def collect_results(cfg: DictConfig, ctx: dict) -> dict:
    return {
        "method": cfg.pipeline.name,
        "dry_run": bool(cfg.dry_run),
        "dataset": cfg.dataset.name,
        "ipc": cfg.ipc,
        "seed": cfg.seed,
        "teacher_acc": ctx.get("teacher_acc"),
        "students": ctx["results"].get("students", []),
        "timings": ctx["timings"],
        "peak_memory_mb": ctx["peak_memory_mb"],
        "distilled": str(ctx["distilled"]) if ctx.get("distilled") else None,
        **{k: v for k, v in ctx["results"].items() if k != "students"},
        "overrides": hydra_overrides(),
    }


def format_table(results: dict) -> str:
    head = (
        f"{'dry run: ' if results.get('dry_run') else ''}{results['method']} on {results['dataset']}, "
        f"IPC {results['ipc']}, seed {results['seed']}"
    )
    teacher = results["teacher_acc"]
    lines = [
        head,
        f"  teacher (full real data): {100 * teacher:.2f}%" if teacher is not None else "  teacher: -",
        f"  {'student':<16}{'protocol':<10}{'acc mean':>10}{'std':>8}  runs",
    ]
    for s in results["students"]:
        lines.append(
            f"  {s['name']:<16}{s['protocol']:<10}{100 * s['acc_mean']:>9.2f}%{100 * s['acc_std']:>7.2f}%"
            f"  {len(s['accs'])}"
        )
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in results["timings"].items())
    lines.append(f"  time: {timings}")
    return "\n".join(lines)


def report_to_logger(logger: RunLogger, results: dict, ctx: dict) -> None:
    rows = [
        [
            results["method"],
            results["dataset"],
            results["ipc"],
            results["seed"],
            s["name"],
            s["protocol"],
            s["acc_mean"],
            s["acc_std"],
        ]
        for s in results["students"]
    ]
    logger.log_table(
        "results", ["method", "dataset", "ipc", "seed", "student", "protocol", "acc_mean", "acc_std"], rows
    )
    logger.summary(
        {f"acc/{s['name']}/{s['protocol']}": s["acc_mean"] for s in results["students"]}
        | {"teacher_acc": results["teacher_acc"]}
    )
    if ctx.get("distilled"):
        logger.log_artifact(
            ctx["distilled"], f"distilled-{results['method']}-{results['dataset']}-ipc{results['ipc']}", "distilled_set"
        )


class PeakMemory:
    """Peak resident memory (MB) while a stage runs: sampled RSS on CPU, the allocator's peak on CUDA."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.mb = interval, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> Self:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if torch.cuda.is_available():
            self.mb = max(self.mb, torch.cuda.max_memory_allocated() / 2**20)
        self.mb = round(self.mb, 1)

    def _sample(self) -> None:
        while True:
            self.mb = max(self.mb, _rss_mb())
            if self._stop.wait(self.interval):
                return


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # not Linux: the process high-water mark is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
