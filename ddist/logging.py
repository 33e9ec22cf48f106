"""Console progress and the W&B run wrapper.

One RunLogger per job. With `logger=none` (or `logger.mode=disabled`) every call is a
no-op, so stages log unconditionally. Metric keys are "<stage>/<name>".
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

log = logging.getLogger("ddist")


def info(msg: str) -> None:
    log.info(msg)


def warn(msg: str) -> None:
    log.warning(msg)


# Seconds between progress lines when stderr is not a terminal (a log file, CI, a SLURM job).
LOG_INTERVAL = 30.0


class _ProgressLines(tqdm):
    """A tqdm that logs one plain line at most every `mininterval` seconds instead of redrawing
    a bar with carriage returns (which fill a log file with thousands of frames)."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg != "":  # close() with leave=False asks to erase the bar: nothing to erase
            log.info(msg or self.format_meter(**self.format_dict))
        return True


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None, **kwargs) -> tqdm:
    """A progress bar on a terminal, a line every LOG_INTERVAL seconds in a log; silent with DDIST_PROGRESS=0."""
    if os.environ.get("DDIST_PROGRESS", "1") == "0":
        return tqdm(iterable, desc=desc, total=total, disable=True, **kwargs)
    if not sys.stderr.isatty():
        # the lines go to the log; tqdm's own writes (a closing carriage return) go nowhere
        return _ProgressLines(
            iterable,
            desc=desc,
            total=total,
            mininterval=LOG_INTERVAL,
            leave=False,
            ascii=True,
            file=io.StringIO(),
            **kwargs,
        )
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False, **kwargs)


class RunLogger:
    """Thin wrapper over a wandb run; `run` is None when logging is off."""

    def __init__(self, run=None):
        self.run = run
        self._steps: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg: DictConfig, run_dir: Path, job_type: str) -> RunLogger:
        lcfg = cfg.logger
        if lcfg.name == "none" or lcfg.get("mode") == "disabled":
            return cls(None)
        import wandb  # imported lazily: it is slow to import and unused with logger=none

        method, dataset = cfg.pipeline.name, cfg.dataset.name
        config = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        config["overrides"] = hydra_overrides()
        run = wandb.init(
            project=lcfg.project,
            entity=lcfg.entity,
            mode=lcfg.mode,
            dir=str(run_dir),
            group=lcfg.group or _sweep_group(run_dir),
            job_type=job_type,
            name=f"{method}-{dataset}-ipc{cfg.ipc}-s{cfg.seed}{_trial_suffix(cfg)}",
            tags=[method, dataset, f"ipc{cfg.ipc}", f"pipeline:{cfg.pipeline.name}", *_search_tags(cfg), *lcfg.tags],
            reinit="finish_previous",
            # a rerun of the same command (an interrupted job) continues this W&B run, not a new one
            id=run_id(cfg),
            resume="allow",
            config=config,
        )
        # one x axis per stage: a stage's curves are plotted against its own steps; the baselines'
        # students log under their own namespace, not into the set's students' keys
        for stage in [*cfg.pipeline.stages, "baseline"]:
            run.define_metric(f"{stage}/step", hidden=True)
            run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        return cls(run)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log metrics keyed "<stage>/<name>" against that stage's step: `step` when given
        (an iteration or epoch), else the count of this stage's earlier log calls."""
        if self.run is None:
            return
        stage = next(iter(metrics)).split("/", 1)[0]
        self._steps[stage] = self._steps.get(stage, -1) + 1 if step is None else step
        self.run.log({**metrics, f"{stage}/step": self._steps[stage]})

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def log_image(self, key: str, image: str | Path | torch.Tensor, caption: str | None = None) -> None:
        if self.run is not None:
            import wandb

            data = str(image) if isinstance(image, (str, Path)) else image.detach().cpu()
            self.run.log({key: wandb.Image(data, caption=caption)})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            # wandb annotates columns as list[str | int], which an (invariant) list[str] is not
            self.run.log({key: wandb.Table(columns=columns, data=rows)})  # type: ignore[arg-type]

    def log_artifact(self, path: str | Path, name: str, type: str) -> None:
        if self.run is not None:
            import wandb

            artifact = wandb.Artifact(_artifact_name(name), type=type)
            artifact.add_dir(str(path)) if Path(path).is_dir() else artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


# Not part of a run's identity: where it writes (a rerun makes a new run directory) and how it is logged.
_NOT_IDENTITY = ("paths", "logger")


def run_id(cfg: DictConfig) -> str:
    """The W&B run id of this config: a hash of the composed config less its paths and logger settings,
    so the same command run again (after Ctrl-C) names the same W&B run and a different config another."""
    container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    identity = {k: v for k, v in cast("dict[str, Any]", container).items() if k not in _NOT_IDENTITY}
    digest = hashlib.sha256(json.dumps(_str_keys(identity), sort_keys=True, default=str).encode()).hexdigest()
    return f"{cfg.pipeline.name}-{cfg.dataset.name}-{digest[:16]}"


def _str_keys(value: Any) -> Any:
    """`value` with every mapping's keys as strings (json sorts them; some config keys are ints)."""
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    return [_str_keys(v) for v in value] if isinstance(value, list) else value


def _sweep_group(run_dir: Path) -> str | None:
    """The jobs of one multirun share its sweep directory (whatever hydra.sweep.dir is): its
    last two path parts name their group. A single run has no group."""
    from ddist.runtime.multirun import in_multirun

    if not in_multirun():
        return None
    sweep_dir = run_dir.parent  # job directories are one level below the sweep directory
    return f"{sweep_dir.parent.name}_{sweep_dir.name}"


def _trial(cfg: DictConfig) -> int | None:
    """The trial number of a job of an optimising sweep (objective_metric set, under -m), else None."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("objective_metric") is None:
        return None
    try:
        return int(HydraConfig.get().job.num)
    except (ValueError, TypeError, AttributeError):
        return None


def _trial_suffix(cfg: DictConfig) -> str:
    """ "-t<n>" for trial n of a search: its trials would otherwise share one W&B run name."""
    trial = _trial(cfg)
    return "" if trial is None else f"-t{trial}"


def _search_tags(cfg: DictConfig) -> list[str]:
    """A search's trials are tagged "search" (and "val" when scored on the validation split)."""
    if _trial(cfg) is None:
        return []
    return ["search", *(["val"] if OmegaConf.select(cfg, "evaluate.split") == "val" else [])]


def hydra_overrides() -> list[str]:
    """The command line's overrides of this job ([] outside @hydra.main)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _artifact_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
