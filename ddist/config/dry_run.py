"""`dry_run=true`: every model a configuration names is built and every stage runs once, in minutes.

`prepare(cfg)` (applied by pipeline.run) cuts the configuration down without changing its kind:

- data: the first CLASSES classes with PER_CLASS images each (dataset.subset), at the dataset's
  own resolution (one more per class when dataset.val_per_class carves a validation split);
  random images (dataset.format=synthetic) when the data is not on this machine;
- ipc <= PER_CLASS, and every loop one step: teacher epochs (0 stays 0), recover iterations (and
  the recover method's own, by its descriptor's dry-run cut: ddist/methods/),
  student epochs and repeats, relabel epochs, diffusion train / fine-tune / sampling steps;
- weights: pretrained diffusion models and VAEs that are neither local directories nor in the
  Hugging Face cache are built from their architecture (diffusion.model.dit / vae_config / unet)
  with random weights; a classifier never loads torchvision's ImageNet-1k weights, whose
  1000-class head does not fit CLASSES classes (a missing file still stops a real run in its
  first stage); teacher.checkpoint and evaluate.distilled must exist and are then left out;
- shards: shard.index / shard.count are checked, then one job makes every part and runs every stage;
- outputs: caches in <run_dir>/dry_run_cache (a real cache entry is never written; paths.cache_dir is
  checked as the real run checks it), deleted by `cleanup(cfg)` when the run ends (a full-size cell's
  fine-tuned DiT alone is 3 GB, and nothing reuses it), the result
  in <run_dir>/dry_run.json (not results.json, so reports never count it), no W&B run.

Everything else is the real configuration: the teacher, every student and the diffusion
backbone are built as configured, with their objectives, batch layouts and resolutions.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ddist.config.checks import check_cache_dir, check_shard, check_teacher_trains
from ddist.data import dataset_spec
from ddist.data.spec import data_present
from ddist.errors import ConfigError
from ddist.logging import info, warn
from ddist.methods import finetune_method, recover_method

CACHE_DIR = "dry_run_cache"  # the dry run's private cache, under its run directory
CLASSES = 2  # classes kept (fewer when the dataset has fewer)
PER_CLASS = 2  # real (or synthetic) images per class in each split; also the largest ipc


def prepare(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` cut down for a dry run (see the module docstring)."""
    # what the cut below replaces is checked as the real run would check it first
    check_cache_dir(Path(cfg.paths.cache_dir))
    check_shard(cfg)
    check_teacher_trains(cfg)
    cfg = copy.deepcopy(cfg)
    cfg.paths.cache_dir = str(Path(cfg.paths.output_dir) / CACHE_DIR)
    if cfg.shard.count > 1:  # a shard would stop after its share of recover / diffusion: run every part
        warn(
            f"dry run: shard.index={cfg.shard.index} shard.count={cfg.shard.count} -> one job makes every part "
            "and runs every stage (shards stop after their share)"
        )
        cfg.shard.index, cfg.shard.count = 0, 1
    if "mode" in cfg.logger:
        cfg.logger.mode = "disabled"
    classes = _cut_data(cfg)
    cfg.ipc = min(cfg.ipc, PER_CLASS)
    _one_step(cfg)
    _drop_given_artifacts(cfg)
    if "pretrained" in cfg.teacher.model and cfg.teacher.model.pretrained:  # ResNets have the option
        info(
            f"dry run: teacher.model.pretrained={cfg.teacher.model.pretrained} -> random weights "
            f"(the ImageNet-1k head does not fit {classes} classes)"
        )
        cfg.teacher.model.pretrained = False
    if "diffusion" in cfg.pipeline.stages:
        _cut_diffusion(cfg, classes)
    return cfg


def cleanup(cfg: DictConfig) -> None:
    """Delete the private cache of a dry run prepared by `prepare` (teacher, fine-tuned DiT, samples:
    gigabytes nothing reuses); its dry_run.json and logs stay in the run directory."""
    cache = Path(cfg.paths.output_dir) / CACHE_DIR
    if Path(cfg.paths.cache_dir) != cache or not cache.is_dir():
        return
    shutil.rmtree(cache, ignore_errors=True)
    info(f"dry run: deleted its cache {cache}")


def _cut_data(cfg: DictConfig) -> int:
    """dataset.subset (and synthetic images when the data is absent); returns the classes kept."""
    ds = cfg.dataset
    if not data_present(ds):
        info(f"dry run: no {ds.name} data at dataset.root={ds.root} -> synthetic images")
        ds.format = "synthetic"
        if ds.num_classes is None and ds.classes is None:  # e.g. dataset=folder: classes come from disk
            ds.num_classes = CLASSES
    total = dataset_spec(ds).num_classes
    classes = min(CLASSES, total)
    ds.merge_with({"subset": {"classes": classes, "per_class": PER_CLASS}})  # a typed node takes a merge
    if ds.val_per_class:  # one validation image per class, carved on top of the PER_CLASS train images
        ds.val_per_class = 1
        ds.subset.per_class = PER_CLASS + 1
    if "imagenet_ids" in ds:  # ImageNet subsets: per-label lists outside the spec follow the cut
        ds.imagenet_ids = list(ds.imagenet_ids)[:classes]
    return classes


def _one_step(cfg: DictConfig) -> None:
    cfg.teacher.epochs = min(cfg.teacher.epochs, 1)
    cfg.recover.iterations = 1
    recover_method(cfg.recover.objective).dry_run(cfg)  # the method's own loops (DEDA's reg_iterations)
    cfg.evaluate.epochs = 1
    cfg.evaluate.repeats = 1
    if "epochs" in cfg.relabel:
        cfg.relabel.epochs = 1
    cfg.analyse.real_samples_per_class = PER_CLASS
    cfg.analyse.hard.epochs = 1  # DD-Ranking's hard-label baselines (analyse.robust_scores)
    for phase in ("train", "finetune", "sample"):
        cfg.diffusion[phase].steps = 1


def _drop_given_artifacts(cfg: DictConfig) -> None:
    """A given teacher or distilled set must exist; then the dry run makes its own (they fit fewer classes)."""
    for option in ("teacher.checkpoint", "evaluate.distilled"):
        path = OmegaConf.select(cfg, option)
        if path is None:
            continue
        if not Path(path).exists():
            raise ConfigError(f"{option}={path} does not exist; point it at the file or set {option}=null.")
        info(f"dry run: {option}={path} exists; the dry run makes its own")
        OmegaConf.update(cfg, option, None)


def _cut_diffusion(cfg: DictConfig, classes: int) -> None:
    if cfg.diffusion.finetune.objective != "none":
        finetune_method(cfg.diffusion.finetune.objective).dry_run(cfg)  # the method's own loops, if any
    model = cfg.diffusion.model
    ids = model.class_ids
    if not OmegaConf.is_interpolation(model, "class_ids") and ids is not None:
        model.class_ids = list(ids)[:classes]
    subfolders = {"pretrained": model.subfolder}  # weights to look for, and the subfolder of each
    if cfg.diffusion.backbone == "latent":
        subfolders |= {"vae": model.vae_subfolder, "vae_decode": model.vae_subfolder}
    names = list(subfolders)
    absent = [n for n in names if model[n] is not None and not _weights_present(model[n], subfolders[n])]
    if absent and not model.random_weights:
        info(
            f"dry run: {', '.join(f'diffusion.model.{n}={model[n]}' for n in absent)} not on this machine "
            "-> random weights from the configured architecture"
        )
        model.random_weights = True


def _weights_present(path: str, subfolder: str | None) -> bool:
    """Whether diffusers' from_pretrained(path, subfolder=...) finds the model without a download."""
    config = f"{subfolder}/config.json" if subfolder else "config.json"
    local = Path(path).expanduser()
    if local.is_dir():
        return (local / config).is_file()
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(path, config), str)
    except ValueError:  # not a hub id (e.g. a directory that does not exist)
        return False
