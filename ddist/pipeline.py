"""Run cfg.pipeline.stages in order, passing the artifacts made so far in a RunContext (ddist/runtime/context.py).

At the end: results.json in the run directory, the same table on the console and in W&B.
A stage that sets ctx.stop (a shard that made its share of a set other shards finish,
ddist/runtime/workdir.py) ends the run there: shard.json says what it did, no later stage runs.
`dry_run=true` first cuts the configuration down to one step of everything (ddist/config/dry_run.py).
Under torchrun every rank runs this; ddist/runtime/distributed.py says who does what.
"""

from __future__ import annotations

import dataclasses
import resource
import threading
import time
from pathlib import Path
from typing import Any, Self

import torch
from omegaconf import DictConfig

from ddist.config import dry_run
from ddist.config.checks import check_config
from ddist.data import dataset_spec
from ddist.errors import ConfigError
from ddist.logging import RunLogger, hydra_overrides, info
from ddist.models import student_config
from ddist.runtime import distributed
from ddist.runtime.allocator import configure_allocator
from ddist.runtime.artifacts import atomic_write_text, strict_json
from ddist.runtime.context import RunContext
from ddist.runtime.stages import module_of, stage
from ddist.runtime.threads import configure_threads
from ddist.training.loop import resolve_device, seed_everything

# what a stage that rank 0 ran alone leaves the other ranks: ctx without this process's own objects
_OWN = ("logger", "device")


def validate(cfg: DictConfig) -> None:
    """Fail before any work on options that cannot run (ddist.config.checks: a stage name in pipeline.stages
    among them); the schemas have already checked each value's type when the config was composed."""
    check_config(cfg)
    for entry in cfg.evaluate.students:  # a bad name fails now, not after hours of distillation
        student_config(entry)


def run(cfg: DictConfig) -> dict:
    if cfg.dry_run:
        cfg = dry_run.prepare(cfg)
    validate(cfg)
    configure_threads(cfg.threads)
    configure_allocator(cfg.cpu_allocator)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: let cuDNN pick its kernels
    main = distributed.is_main()  # the only rank that writes results and logs to W&B
    logger = RunLogger.from_config(cfg, run_dir, job_type=cfg.pipeline.name) if main else RunLogger(None)
    ctx = RunContext(run_dir=run_dir, device=device, spec=dataset_spec(cfg.dataset), logger=logger)
    exit_code = 1
    try:
        for name in cfg.pipeline.stages:
            info(f"stage {name}")
            ctx.stage = name
            with PeakMemory() as peak:
                start = time.perf_counter()
                ctx = run_stage(name, cfg, ctx)
                ctx.timings[name] = round(time.perf_counter() - start, 3)
            ctx.peak_memory_mb[name] = peak.mb
            logger.log({f"{name}/seconds": ctx.timings[name], f"{name}/peak_memory_mb": peak.mb})
            if ctx.stop:  # a shard that did its share of the parts; another assembles the set
                if main:
                    atomic_write_text(run_dir / "shard.json", strict_json({**ctx.stop, "timings": ctx.timings}))
                info(f"this job's share is done (see {run_dir / 'shard.json'}); the later stages run where the set is")
                exit_code = 0
                return {"shard": ctx.stop}
        results = collect_results(cfg, ctx)
        if main:
            # a dry run's numbers mean nothing: another name keeps them out of reports
            atomic_write_text(run_dir / ("dry_run.json" if cfg.dry_run else "results.json"), strict_json(results))
            print(format_table(results) + f"\n  run directory: {run_dir}")
            report_to_logger(logger, results, ctx)
        exit_code = 0
        return results
    except KeyboardInterrupt:
        exit_code = 130  # Ctrl-C: the W&B run ends as interrupted (a rerun of the command continues it)
        raise
    finally:
        logger.finish(exit_code)
        if cfg.dry_run and main:
            dry_run.cleanup(cfg)


def run_stage(name: str, cfg: DictConfig, ctx: RunContext) -> RunContext:
    """One stage: on every rank when its work is shared (its STAGE says), else on rank 0 alone, whose ctx
    the others take. The stage's module is imported only now (diffusion pulls in diffusers)."""
    module = module_of(name)
    if stage(name).shared or not distributed.active():
        return module.run(cfg, ctx)
    own = {k: getattr(ctx, k) for k in _OWN}

    def alone() -> dict:
        with distributed.alone():
            done = module.run(cfg, ctx)
            return {f.name: getattr(done, f.name) for f in dataclasses.fields(done) if f.name not in _OWN}

    return RunContext(**distributed.from_main(alone), **own)


def collect_results(cfg: DictConfig, ctx: RunContext) -> dict:
    return {
        "method": ctx.method or cfg.pipeline.name,  # named once: as the set's meta.json
        "dry_run": bool(cfg.dry_run),
        "dataset": cfg.dataset.name,
        "ipc": cfg.ipc,
        "seed": cfg.seed,
        "teacher_acc": ctx.teacher_acc,
        # where students were scored: "val" marks a run that chose settings (report test only for the chosen one)
        "evaluate_split": cfg.evaluate.split,
        "students": ctx.results.get("students", []),
        "timings": ctx.timings,
        "peak_memory_mb": ctx.peak_memory_mb,
        "distilled": str(ctx.distilled) if ctx.distilled else None,
        **{k: v for k, v in ctx.results.items() if k != "students"},
        "overrides": hydra_overrides(),
    }


def format_table(results: dict) -> str:
    """The console table: per student the accuracy, the random-real baseline under the same
    protocol, the gain in points and DD-Ranking's IOR (ddist.training.baseline); "-" without a baseline."""
    split = results.get("evaluate_split", "test")
    head = (
        f"{'dry run: ' if results.get('dry_run') else ''}{results['method']} on {results['dataset']}, "
        f"IPC {results['ipc']}, seed {results['seed']}"
        + (
            ", scored on the validation split (choosing settings: report test accuracy only for the chosen one)"
            if split == "val"
            else ""
        )
    )
    teacher = results["teacher_acc"]
    compared = any("gain_pp" in s for s in results["students"])  # evaluate.baseline=none: no baseline columns
    lines = [
        head,
        f"  teacher (full real data): {100 * teacher:.2f}%" if teacher is not None else "  teacher: -",
        f"  {'student':<16}{'protocol':<10}{'acc mean':>10}{'std':>8}  runs"
        + (f"{'random real':>13}{'gain':>9}{'IOR':>8}" if compared else ""),
    ]
    for s in results["students"]:
        if "gain_pp" in s:
            base = f"{100 * s['baseline_acc_mean']:>12.2f}%{s['gain_pp']:>+7.2f}pp{s['ior']:>+8.3f}"
        else:
            base = f"{'-':>13}{'-':>9}{'-':>8}" if compared else ""
        std = f"{100 * s['acc_std']:>7.2f}%" if len(s["accs"]) > 1 else f"{'-':>8}"  # one run: no spread
        lines.append(
            f"  {s['name']:<16}{s['protocol']:<10}{100 * s['acc_mean']:>9.2f}%{std}  {len(s['accs']):>4}{base}"
        )
    baseline = results.get("baseline")
    if baseline is not None:
        what = "the set itself" if baseline.get("same_as_set") else "same IPC, seed, students and label protocol"
        lines.append(f"  random real: {what}; gain = acc - random real, in points = 100 IOR (DD-Ranking)")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in results["timings"].items())
    lines.append(f"  time: {timings}")
    return "\n".join(lines)


def report_to_logger(logger: RunLogger, results: dict, ctx: RunContext) -> None:
    rows = [
        [
            results["method"],
            results["dataset"],
            results["ipc"],
            results["seed"],
            s["name"],
            s["protocol"],
            results.get("evaluate_split", "test"),
            s["acc_mean"],
            s["acc_std"],
            s.get("baseline_acc_mean"),
            s.get("gain_pp"),
            s.get("ior"),
        ]
        for s in results["students"]
    ]
    logger.log_table(
        "results",
        [
            "method",
            "dataset",
            "ipc",
            "seed",
            "student",
            "protocol",
            "split",
            "acc_mean",
            "acc_std",
            "random_acc_mean",
            "gain_pp",
            "ior",
        ],
        rows,
    )
    summary: dict = {"teacher_acc": results["teacher_acc"]}
    for s in results["students"]:
        key = f"acc/{s['name']}/{s['protocol']}"
        summary[key] = s["acc_mean"]
        if "gain_pp" in s:
            summary |= {f"{key}/random": s["baseline_acc_mean"], f"{key}/gain_pp": s["gain_pp"], f"{key}/ior": s["ior"]}
    logger.summary(summary)
    if ctx.distilled:
        logger.log_artifact(
            ctx.distilled, f"distilled-{results['method']}-{results['dataset']}-ipc{results['ipc']}", "distilled_set"
        )


def objective(cfg: DictConfig, results: dict) -> float | None:
    """The value `objective_metric` names in results (a dotted path, list items by index), which the
    Hydra entry point returns to a sweeper that optimises (hydra/sweeper=optuna_tpe); None when unset."""
    path = cfg.objective_metric
    if not path:
        return None
    value: Any = results
    for part in str(path).split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise ConfigError(
                f"objective_metric={path} names no value of results.json (no {part!r}); "
                "use a dotted path such as students.0.acc_mean or students.0.gain_pp."
            )
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"objective_metric={path} names {value!r}, not a number; point it at one.")
    return float(value)


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
