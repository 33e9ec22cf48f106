"""Up-front checks of a composed config: ranges, devices, paths, stage inputs, memory, and the
rules between options. The schemas (ddist/config/schema.py) have already checked each value's type and
choices when the config was composed; what they cannot say is checked here.

Every check runs before any work, so a mistake costs seconds, not an hour of recover, and
every message names the option to change. Settings that run but can hardly be meant are
warned about loudly instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ddist.config.schema import RecoverConfig
from ddist.errors import ConfigError
from ddist.logging import warn
from ddist.methods import choices, finetune_method, recover_method
from ddist.methods.base import warn_large_weights
from ddist.runtime.context import how_to_get
from ddist.runtime.stages import stage as lookup_stage
from ddist.runtime.threads import thread_count


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _epochs(v: Any) -> bool:
    """An epoch count >= 1, or a table {ipc bound: epochs, max: epochs} of them."""
    if isinstance(v, DictConfig):
        return all(_int(e) and e >= 1 for e in v.values())
    return _int(v) and v >= 1


AT_LEAST_1 = (lambda v: _int(v) and v >= 1, "an integer >= 1")
AT_LEAST_0 = (lambda v: _int(v) and v >= 0, "an integer >= 0")
POSITIVE = (lambda v: _number(v) and v > 0, "a number > 0")
NON_NEGATIVE = (lambda v: _number(v) and v >= 0, "a number >= 0")
EMA_DECAY = (lambda v: _number(v) and 0 < v < 1, "a decay in (0, 1) (e.g. 0.9999), or null for no EMA")

# option -> (test, what it must be). Options absent from a config are skipped.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # torch.manual_seed takes [-2**63, 2**64 - 1], numpy's SeedSequence (group_generator) only >= 0,
    # and seed + repeat offsets must stay in torch's range: [0, 2**63 - 1] suits all of them.
    "seed": (lambda v: _int(v) and 0 <= v <= 2**63 - 1, "an integer in [0, 2**63 - 1] (e.g. seed=0)"),
    "ipc": AT_LEAST_1,
    "dataset.num_classes": AT_LEAST_1,
    "dataset.channels": AT_LEAST_1,
    "dataset.resolution": AT_LEAST_1,
    "teacher.epochs": (AT_LEAST_0[0], "an integer >= 0 (0 keeps the model's initial weights)"),
    "teacher.batch_size": AT_LEAST_1,
    "teacher.lr": POSITIVE,
    "recover.iterations": AT_LEAST_1,
    "recover.lr": POSITIVE,
    "recover.batch.size": (AT_LEAST_1[0], "an integer >= 1 (images per batch), or null for one batch"),
    "recover.batch.parallel_groups": AT_LEAST_1,
    "recover.class_stats.images_per_class": (AT_LEAST_1[0], "an integer >= 1 (real images per class), or null for all"),
    "recover.class_stats.batch_size": AT_LEAST_1,
    "dataset.val_per_class": (AT_LEAST_0[0], "an integer >= 0 (images per class carved from train), or null"),
    "checkpoint_interval": (NON_NEGATIVE[0], "a number of seconds >= 0 (0: a checkpoint every epoch)"),
    "shard.count": AT_LEAST_1,
    "shard.index": AT_LEAST_0,
    "diffusion.train.checkpoint_every": AT_LEAST_1,
    "diffusion.finetune.checkpoint_every": AT_LEAST_1,
    "diffusion.train.log_every": AT_LEAST_1,
    "diffusion.finetune.log_every": AT_LEAST_1,
    "diffusion.train.warmup_steps": AT_LEAST_0,
    "diffusion.finetune.warmup_steps": AT_LEAST_0,
    "evaluate.epochs": (_epochs, "an integer >= 1 or a table {ipc bound: epochs, max: epochs} of them"),
    "evaluate.batch_size": AT_LEAST_1,
    "evaluate.test_batch_size": AT_LEAST_1,
    "evaluate.repeats": AT_LEAST_1,
    "evaluate.parallel": (lambda v: v == "auto" or (_int(v) and v >= 1), "auto or an integer >= 1 (students at once)"),
    "evaluate.lr": POSITIVE,
    "evaluate.temperature": (POSITIVE[0], "a number > 0 (the soft labels are softmax(logits / temperature))"),
    "evaluate.eval_every": (AT_LEAST_0[0], "an integer >= 0 (epochs between logged test accuracies; 0: only the last)"),
    "teacher.eval_every": (AT_LEAST_0[0], "an integer >= 0 (epochs between logged test accuracies; 0: only the last)"),
    "diffusion.train.steps": AT_LEAST_0,
    "diffusion.train.batch_size": AT_LEAST_1,
    "diffusion.finetune.batch_size": AT_LEAST_1,
    "diffusion.sample.steps": AT_LEAST_1,
    "diffusion.sample.batch_size": AT_LEAST_1,
    "diffusion.sample.guidance_scale": NON_NEGATIVE,
    "diffusion.sample.cgs.start": (lambda v: _number(v) and 0 <= v < 1, "a fraction in [0, 1) of the sampling steps"),
    "diffusion.sample.cgs.end": (lambda v: _number(v) and 0 < v <= 1, "a fraction in (0, 1] of the sampling steps"),
    "diffusion.sample.cgs.max_step": (POSITIVE[0], "a number > 0 (the largest ||dz_dpp|| / ||z|| of a step)"),
    "diffusion.sample.guidance_channels": (AT_LEAST_1[0], "null (all channels) or an integer >= 1"),
    "diffusion.train.ema": EMA_DECAY,
    "diffusion.finetune.ema": EMA_DECAY,
    "analyse.real_samples_per_class": AT_LEAST_1,
}

DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# Loss weights of the shared loops (a method warns about its own: ddist/methods/) that cannot be meant
# above WEIGHT_LIMIT.
WEIGHTS = (
    "recover.ce_weight",
    "diffusion.finetune.rsm.lambda",
    "diffusion.sample.cgs.eta_dpp",
    "diffusion.sample.cgs.mu_dm",
)


def _mps_available() -> bool:
    import torch

    return torch.backends.mps.is_available()


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first option that cannot run; warn on those that cannot be meant."""
    for key, (test, what) in RULES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not test(value):
            raise ConfigError(f"{key} must be {what} (got {value!r}). Set {key}=... accordingly.")
    if not DEVICE.fullmatch(str(cfg.device)):
        raise ConfigError(f"device={cfg.device!r} is not a device. Set device=auto, cpu, cuda or cuda:N.")
    if str(cfg.device) == "mps" and not _mps_available():
        raise ConfigError(
            "device=mps but this torch has no usable MPS backend (Apple-silicon GPUs "
            "on macOS only). Set device=auto or device=cpu."
        )
    thread_count(cfg.threads)
    check_stage_inputs(cfg)
    check_shard(cfg)
    check_students(cfg)
    if not cfg.dry_run:  # a dry run checked the real teacher before it dropped pretrained weights (dry_run.py)
        check_teacher_trains(cfg)
    recover_method(cfg.recover.objective)  # a name no method has fails whatever runs (as a schema choice would)
    if "recover" in cfg.pipeline.stages:
        check_recover(cfg)
    check_cache_dir(Path(cfg.paths.cache_dir))
    check_set_fits_memory(cfg)
    check_evidence_options(cfg)
    check_cgs_window(cfg)
    check_diffusion(cfg)
    if (
        "random" in cfg.pipeline.stages
        or OmegaConf.select(cfg, "recover.init") == "real"
        or ("evaluate" in cfg.pipeline.stages and OmegaConf.select(cfg, "evaluate.baseline") == "random")
    ):
        check_real_images_per_class(cfg)
    warn_large_weights(cfg, WEIGHTS)
    if _num_classes(cfg) == 1:
        warn("dataset.num_classes is 1: cross-entropy and soft labels carry no information with one class.")


def check_stage_inputs(cfg: DictConfig) -> None:
    """Every entry of pipeline.stages names a stage (ddist/runtime/stages.py reads each one's STAGE), and
    every stage finds what it needs: made by an earlier stage, or given as an option."""
    stages = [lookup_stage(name, f"pipeline.stages[{i}]") for i, name in enumerate(cfg.pipeline.stages)]
    have = {"distilled"} if OmegaConf.select(cfg, "evaluate.distilled") else set()
    for stage in stages:
        missing = stage.needs - have
        if missing:
            need = min(missing)
            raise ConfigError(
                f"pipeline.stages runs {stage.name} before any stage makes the {need} it needs "
                f"(pipeline.stages={list(cfg.pipeline.stages)}): {how_to_get(need)}."
            )
        have |= stage.makes


# the stages that split their parts (recover groups, sampled classes) among shards: ddist/runtime/workdir.py
SHARDED_STAGES = ("recover", "diffusion")


def check_shard(cfg: DictConfig) -> None:
    """shard.index names one of the shard.count jobs, and the pipeline has parts to split among them
    (RULES check each option's range)."""
    index, count = cfg.shard.index, cfg.shard.count
    if index >= count:
        raise ConfigError(
            f"shard.index={index} must be below shard.count={count} (the jobs are numbered 0 to "
            f"{count - 1}); set shard.index to one of them, or shard.count to the number of jobs."
        )
    if count > 1 and not any(s in cfg.pipeline.stages for s in SHARDED_STAGES):
        raise ConfigError(
            f"shard.count={count} splits the parts of {' or '.join(SHARDED_STAGES)}, which pipeline.stages="
            f"{list(cfg.pipeline.stages)} does not run: every shard job would redo the whole run. "
            "Set shard.count=1 (and shard.index=0)."
        )


def check_students(cfg: DictConfig) -> None:
    """evaluate trains at least one student: with evaluate.students=[] it would run and report nothing."""
    if "evaluate" in cfg.pipeline.stages and len(cfg.evaluate.students) == 0:
        raise ConfigError(
            "evaluate.students is empty, so evaluate would train no student and report nothing: name at least "
            "one (e.g. evaluate.students=[convnet]), or leave evaluate out of pipeline.stages."
        )


def check_teacher_trains(cfg: DictConfig) -> None:
    """teacher.epochs=0 keeps the model's initial weights: meant with pretrained weights (teacher.model.pretrained)
    or a given teacher.checkpoint, never for a randomly initialised teacher that squeeze would cache and use."""
    if "squeeze" not in cfg.pipeline.stages or cfg.teacher.epochs != 0 or cfg.teacher.checkpoint is not None:
        return
    if OmegaConf.select(cfg, "teacher.model.pretrained", default=False):
        return
    raise ConfigError(
        "teacher.epochs=0 keeps the teacher's initial weights, and this teacher has no pretrained weights "
        "(teacher.model.pretrained) or teacher.checkpoint: squeeze would cache and use an untrained teacher. "
        "Set teacher.epochs >= 1, teacher.checkpoint=PATH, or teacher.model.pretrained=true where the model has it."
    )


def check_evidence_options(cfg: DictConfig) -> None:
    """What the evidence options ask of each other (the schema checks each one alone)."""
    if cfg.evaluate.split == "val" and not cfg.dataset.val_per_class:
        raise ConfigError(
            "evaluate.split=val scores students on the validation split, which dataset.val_per_class carves "
            "from train; set dataset.val_per_class (e.g. 10) or evaluate.split=test."
        )
    metric = cfg.objective_metric
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise ConfigError(f"objective_metric={metric!r} must name a value of results.json, e.g. students.0.acc_mean.")


def check_cgs_window(cfg: DictConfig) -> None:
    """CGS's guidance window [start, end) holds at least part of the trajectory (RULES check each end)."""
    start = OmegaConf.select(cfg, "diffusion.sample.cgs.start", default=None)
    end = OmegaConf.select(cfg, "diffusion.sample.cgs.end", default=None)
    if start is not None and end is not None and not start < end:
        raise ConfigError(
            f"diffusion.sample.cgs.start={start} must be below diffusion.sample.cgs.end={end}: guidance acts "
            "on the steps i with start <= i / steps < end (0 and 1: every step)."
        )


def check_diffusion(cfg: DictConfig) -> None:
    """The diffusion options that would otherwise fail only once the teacher and the denoiser have trained:
    the fine-tuning method, the channels classifier-free guidance acts on, CGS's teacher kernel."""
    dcfg = cfg.diffusion
    objective = dcfg.finetune.objective
    if objective != "none" and objective not in choices("finetune"):
        raise ConfigError(
            f"diffusion.finetune.objective={objective} is not a fine-tuning method; choose none or one of "
            f"{', '.join(choices('finetune'))} (each a module of ddist/methods/)."
        )
    # its own settings node (diffusion.finetune.<name>, typed by its descriptor's schema) set by the option file
    if (
        objective != "none"
        and finetune_method(objective).settings is not None
        and OmegaConf.is_missing(dcfg.finetune, str(objective))
    ):
        raise ConfigError(
            f"diffusion.finetune.objective={objective} needs its settings diffusion.finetune.{objective}, which "
            f"this diffusion option file does not set: add them to it (as conf/diffusion/pixel.yaml does)."
        )
    if objective != "none":
        finetune_method(objective).check(cfg)  # the method's own rules between its options
    stages = list(cfg.pipeline.stages)
    if "diffusion" not in stages:
        return
    sample = dcfg.sample
    channels = denoiser_channels(cfg)
    if sample.guidance_channels is not None and channels is not None and sample.guidance_channels > channels:
        raise ConfigError(
            f"diffusion.sample.guidance_channels must be null (all) or an integer in [1, {channels}] (the model's "
            f"channels); got {sample.guidance_channels!r}."
        )
    teacher_first = any("teacher" in lookup_stage(s).makes for s in stages[: stages.index("diffusion")])
    if sample.method == "cgs" and sample.cgs.kernel == "teacher" and not teacher_first:
        raise ConfigError(
            "diffusion.sample.cgs.kernel=teacher needs the teacher: put squeeze before diffusion in "
            "pipeline.stages, or set diffusion.sample.cgs.kernel to zt or x0_hat."
        )


def denoiser_channels(cfg: DictConfig) -> int | None:
    """The channels of the denoiser's input (the image's, or the VAE latent's) from the config, or from the
    config.json of saved weights on this machine; None where only a download would say."""
    model = cfg.diffusion.model
    if model.pretrained is not None and not model.random_weights:
        saved = _saved_config(model.pretrained, model.subfolder)
        return None if saved is None else saved.get("in_channels")
    if cfg.diffusion.backbone == "pixel":
        return int(cfg.dataset.channels)
    if model.vae_decode is None or model.random_weights:
        return int(model.vae_config.get("latent_channels", 4))  # AutoencoderKL's default
    saved = _saved_config(model.vae_decode, model.vae_subfolder)
    return None if saved is None else saved.get("latent_channels", 4)


def _saved_config(path: str, subfolder: str | None) -> dict | None:
    """The config.json that diffusers' from_pretrained(path, subfolder=...) reads, when it is on this machine."""
    name = f"{subfolder}/config.json" if subfolder else "config.json"
    local = Path(path).expanduser()
    if local.is_dir():
        file: str | Path | None = local / name if (local / name).is_file() else None
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(path, name)
        except ValueError:  # not a hub id
            found = None
        file = found if isinstance(found, str) else None
    return None if file is None else json.loads(Path(file).read_text())


def check_recover(cfg: DictConfig) -> None:
    """What the recover method (recover.objective, ddist/methods/) asks of the other options: its own
    settings present, what its needs imply, then its own checks."""
    rcfg = cfg.recover
    method = recover_method(rcfg.objective)
    if method.settings is not None:
        shared = {f.name for f in dataclasses.fields(RecoverConfig)}
        own = {f.name for f in dataclasses.fields(method.settings)} - shared
        if not own <= set(rcfg):
            raise ConfigError(
                f"recover.objective={method.name} needs the recover.{'/'.join(sorted(own))} settings: "
                f"set recover={method.name} instead."
            )
    if "whole_class_batches" in method.needs and rcfg.batch.mode != "whole_class":
        raise ConfigError(
            f"recover.objective={method.name} takes statistics per class, so every class needs all its images "
            "in one batch: set recover.batch.mode=whole_class."
        )
    if rcfg.batch.parallel_groups > 1 and not method.stacks:
        stacking = ", ".join(n for n in choices("recover") if recover_method(n).stacks)
        raise ConfigError(
            f"recover.batch.parallel_groups={rcfg.batch.parallel_groups} stacks independent batches, which only "
            f"recover.objective={stacking} supports (not {method.name}): set recover.batch.parallel_groups=1."
        )
    norm = OmegaConf.select(cfg, "teacher.model.norm", default="batch")  # torchvision's ResNets: always batch
    if "bn_hooks" in method.needs and norm != "batch":
        raise ConfigError(
            f"recover.objective={method.name} matches the teacher's BatchNorm statistics, but teacher.model.norm="
            f"{norm} gives it no BatchNorm layer; set teacher.model.norm=batch (or recover=deda)."
        )
    if "class_stats" in method.needs:
        from ddist.data import dataset_spec  # heavy: the teacher's architecture (on the meta device)
        from ddist.training.class_stats import class_stats_layers
        from ddist.training.teacher import teacher_feature_names

        class_stats_layers(cfg, teacher_feature_names(cfg, dataset_spec(cfg.dataset)))
    method.check(cfg)


def check_real_images_per_class(cfg: DictConfig) -> None:
    """Stages that draw IPC real images per class find them in every class (before the teacher
    trains for an hour): the message names the smallest class and the largest valid ipc."""
    from ddist.data import dataset_spec, load_split  # heavy; only these pipelines need the data here
    from ddist.data.subsets import check_classes_hold

    targets = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir)).targets
    num_classes = dataset_spec(cfg.dataset).num_classes  # after dataset.subset, if any
    check_classes_hold(cfg.ipc, targets.bincount(minlength=num_classes).tolist())


def check_cache_dir(path: Path) -> None:
    """paths.cache_dir is a directory this user can write, or can create; or an existing one it can only
    read (a lab's shared teachers): that serves the entries it holds, and an entry that must be built
    there fails naming it and paths.cache_dir (ddist/runtime/store.py)."""
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(f"paths.cache_dir={path} cannot be read by this user. Set paths.cache_dir to another.")
        return
    check_writable_dir(path, "paths.cache_dir")


def check_writable_dir(path: Path, option: str) -> None:
    """`path` is (or can become) a directory this user can write."""
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise ConfigError(
            f"{option}={path} lies under {existing}, which is a file, not a directory. Set {option} to a directory."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{option}={path} is not writable ({existing} is read-only for this user). "
            f"Set {option} to a writable directory."
        )


class OutputDirCheck(Callback):
    """Checks Hydra's run or sweep directory before Hydra creates it and opens its log file there,
    where a file in the way or a read-only parent would end in a traceback from Hydra's logging."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_error(check_writable_dir, Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_on_error(check_writable_dir, Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def _exit_on_error(check: Callable[..., None], *args: Any) -> None:
    try:
        check(*args)
    except ConfigError as err:
        print(f"ddist: error: {err}", file=sys.stderr)
        sys.exit(2)


def _num_classes(cfg: DictConfig) -> int | None:
    """dataset.num_classes; where the config leaves it to the data (dataset=folder), the class folders'
    count, read by dataset_spec as the loaders read it (so the two cannot disagree; listing train/ decodes
    nothing). None for a dry run without its data (it stands synthetic images in: ddist/config/dry_run.py)."""
    if cfg.dataset.num_classes is not None:
        return int(cfg.dataset.num_classes)
    from ddist.data import dataset_spec  # heavy: torch
    from ddist.data.spec import data_present

    if cfg.dry_run and not data_present(cfg.dataset):
        return None
    return dataset_spec(cfg.dataset).num_classes  # a missing or empty root: its ConfigError


def check_set_fits_memory(cfg: DictConfig) -> None:
    """The distilled set (float32, [classes x ipc, C, H, W]) must fit in the memory available."""
    d = cfg.dataset
    num_classes = _num_classes(cfg)
    if num_classes is None:
        return
    nbytes = num_classes * cfg.ipc * d.channels * d.resolution**2 * 4
    available = _available_memory()
    if available is not None and nbytes > available:
        raise ConfigError(
            f"ipc={cfg.ipc} makes a set of {nbytes / 2**30:.1f} GiB ({num_classes} classes x "
            f"{d.channels}x{d.resolution}x{d.resolution} float32), more than the "
            f"{available / 2**30:.1f} GiB of memory available. Lower ipc."
        )


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
