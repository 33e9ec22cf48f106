"""Schemas of the config tree (conf/): every key's type, every choice a Literal.

Each option file of a group lists its schema first in its defaults list (`defaults: [schema,
_self_]`), and conf/config.yaml lists `config_schema`, so Hydra composes every YAML file onto a
typed node: an unknown key, a value of the wrong type or a choice outside its Literal fails
when the config is composed, with OmegaConf's message naming the key. The values (and their
comments) stay in the YAML files: a schema field is MISSING unless the YAML may leave it out.

Adding an option: one field here, one line (value and comment) in the YAML file.

OmegaConf 2.3 validates Enums but not Literals, so at import every schema below is rebuilt for
OmegaConf with each Literal turned into a StrEnum of its values (`for_omegaconf`, ddist/config/compat.py). A StrEnum
member is a str (it compares, hashes, formats and JSON-encodes as its value), so code reads
`cfg.recover.objective == "deda"` as before. A field named after a Python keyword (rsm's
`lambda`) is declared with a trailing underscore. Importing ddist registers the schemas.

Two things OmegaConf asks of code that changes a composed config: a typed node takes a dict by
merge (`node.merge_with({...})`), not by assignment; and OmegaConf.to_container(...,
enum_to_str=True) gives plain strings.

ConfigStore names: `config_schema` (the whole config), `<group>/schema` for a group with one
schema, `<group>/<kind>_schema` for a group whose options differ in keys (model: convnet, resnet,
resnet_ap; dataset: imagenet_subset; relabel: online, stored; diffusion: pixel, latent; logger:
none, wandb). A method's own settings are a schema beside its code (ddist/methods/), which its
descriptor registers: a recover method's (recover.deda) as `<group>/<name>_schema`, a fine-tuning
method's (diffusion.finetune.rsm) as a field of FinetuneConfig (`add_finetune_settings`); the choice
of a method (recover.objective) is checked against the registry of methods by validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from ddist.config.compat import extend, for_omegaconf

# ----------------------------------------------------------------------------- top level


@dataclass
class ShardConfig:
    index: int = MISSING
    count: int = MISSING


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    cache_dir: str = MISSING
    # Hydra's runtime.output_dir: None where no run is made (`ddist --cfg job --resolve`), a directory in a run
    output_dir: str | None = MISSING


# ----------------------------------------------------------------------------- dataset


@dataclass
class AugmentConfig:
    crop_scale: list[float] | None = MISSING
    flip: bool = MISSING
    crop_draw: Literal["per_image", "per_batch"] = MISSING  # one crop box and flip per image, or per batch
    roll: int = MISSING
    roll_mode: Literal["sre2l", "symmetric"] = MISSING


@dataclass
class DatasetAugment:
    student: AugmentConfig = MISSING
    recover: AugmentConfig = MISSING


@dataclass
class SubsetConfig:
    classes: int | None = None
    per_class: int | None = None


@dataclass
class ProtocolConfig:
    teacher_epochs: int = MISSING
    teacher_lr: float = MISSING
    student_epochs: int = MISSING
    temperature: float = MISSING
    batch_size: int = MISSING
    hard_epochs: dict[Any, int] = MISSING  # {ipc bound: epochs, ..., max: epochs}
    recover_iterations: int = MISSING
    recover_lr: float = MISSING
    r_bn: float = MISSING
    deda_reg_iterations: int = MISSING


@dataclass
class DatasetConfig:
    name: str = MISSING
    format: Literal["torchvision", "folder", "digits", "tiny_imagenet", "imagenet", "imagenet_subset", "synthetic"] = (
        MISSING
    )
    root: str | None = MISSING
    download: bool = MISSING
    num_classes: int | None = MISSING
    classes: list[str] | None = MISSING
    wnids: list[str] | None = MISSING
    channels: int = MISSING
    resolution: int = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    in_memory: bool = MISSING
    subset: SubsetConfig | None = MISSING
    val_per_class: int | None = MISSING  # images per class carved from train as a validation split
    augment: DatasetAugment = MISSING
    protocol: ProtocolConfig = MISSING


@dataclass
class ImagenetSubsetConfig(DatasetConfig):
    imagenet_ids: list[int] = MISSING  # ImageNet-1k class index of each label


# ----------------------------------------------------------------------------- model (conf/model)


@dataclass
class ModelConfig:
    name: Literal["convnet", "resnet18", "resnet50", "resnet_ap10"] = MISSING


@dataclass
class ConvNetConfig(ModelConfig):
    name: Literal["convnet"] = MISSING
    depth: int = MISSING
    width: int = MISSING
    norm: Literal["batch", "instance", "none"] = MISSING


@dataclass
class ResNetConfig(ModelConfig):
    name: Literal["resnet18", "resnet50"] = MISSING
    stem: Literal["auto", "cifar", "imagenet"] = MISSING
    pretrained: Any = MISSING  # false | true (torchvision's DEFAULT weights) | a weights enum name


@dataclass
class ResNetAPConfig(ModelConfig):
    name: Literal["resnet_ap10"] = MISSING
    stem: Literal["auto", "cifar", "imagenet"] = MISSING
    norm: Literal["batch", "instance", "none"] = MISSING


# ----------------------------------------------------------------------------- teacher


@dataclass
class TeacherConfig:
    model: ModelConfig = MISSING
    checkpoint: str | None = MISSING
    seed: int = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    optimizer: Literal["sgd", "adamw"] = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    schedule: Literal["cosine", "constant"] = MISSING
    clip_grad_norm: float | None = MISSING
    num_workers: int = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING  # epochs between logged test accuracies (0: only the final one)
    fold_bn: bool = MISSING  # fold eval-mode BatchNorm into the convolutions wherever the teacher is frozen
    channels_last: bool = MISSING  # the frozen teacher's weights (so its activations) in channels_last layout


# ----------------------------------------------------------------------------- recover


@dataclass
class RecoverBatch:
    mode: Literal["ipc_slice", "whole_class"] = MISSING
    size: int | None = MISSING
    parallel_groups: int = MISSING


@dataclass
class BNMatchingConfig:
    r_bn: float = MISSING
    first_bn_multiplier: float = MISSING


@dataclass
class ClassStatsConfig:
    layers: list[str] | None = MISSING  # teacher feature keys; null: every pooled stage
    batch_size: int = MISSING
    images_per_class: int | None = MISSING  # null: all real images


@dataclass
class RecoverConfig:
    objective: str = MISSING  # a recover method of ddist/methods/ (checked by validation)
    iterations: int = MISSING
    lr: float = MISSING
    betas: list[float] = MISSING
    schedule: Literal["cosine", "constant"] = MISSING
    init: Literal["noise", "real"] = MISSING
    ce_weight: float = MISSING
    batch: RecoverBatch = MISSING
    log_every: int = MISSING
    bn_matching: BNMatchingConfig | None = MISSING
    class_stats: ClassStatsConfig = MISSING  # the real class statistics, for methods that need them


# ----------------------------------------------------------------------------- relabel


@dataclass
class RelabelConfig:
    mode: Literal["online", "stored"] = MISSING


@dataclass
class OnlineRelabelConfig(RelabelConfig):
    mode: Literal["online"] = MISSING


@dataclass
class StoredRelabelConfig(RelabelConfig):
    mode: Literal["stored"] = MISSING
    epochs: Any = MISSING  # as evaluate.epochs: a count or a table by IPC
    top_k: int | None = MISSING


# ----------------------------------------------------------------------------- evaluate


@dataclass
class EvaluateConfig:
    protocol: Literal["soft", "hard"] = MISSING
    split: Literal["test", "val"] = MISSING
    baseline: Literal["random", "none"] = MISSING
    distilled: str | None = MISSING
    students: list[Any] = MISSING  # preset names or {name: <preset>, <field>: <value>} (ddist.models.student_config)
    repeats: int = MISSING
    epochs: Any = MISSING  # an epoch count or a table {ipc bound: epochs, max: epochs}
    batch_size: int = MISSING
    optimizer: Literal["sgd", "adamw"] = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    momentum: float = MISSING
    schedule: Literal["cosine", "multistep", "constant"] = MISSING
    milestones: list[float] = MISSING
    gamma: float = MISSING
    temperature: float = MISSING
    mix: Literal["cutmix", "mixup", "none"] = MISSING
    mix_alpha: float = MISSING
    augment: AugmentConfig = MISSING
    test_batch_size: int = MISSING
    clip_grad_norm: float | None = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING  # epochs between logged test accuracies (0: only the final one)
    parallel: Any = MISSING  # students trained at once in one loop: an int >= 1 or "auto" (ddist.training.cohort)
    stacking: Literal["auto", "grouped", "none"] = MISSING  # how a cohort's same-architecture copies run
    channels_last: bool = MISSING  # the students' weights and inputs in channels_last layout
    precision: Literal["auto", "fp32", "bf16", "fp16"] = MISSING  # the students' autocast (auto: by the device)


# ----------------------------------------------------------------------------- diffusion


@dataclass
class DiffusionModelConfig:
    pretrained: str | None = MISSING
    subfolder: str | None = MISSING
    class_ids: list[int] | None = MISSING
    random_weights: bool = MISSING


@dataclass
class PixelModelConfig(DiffusionModelConfig):
    unet: dict[str, Any] = MISSING  # diffusers UNet2DModel keyword arguments


@dataclass
class LatentModelConfig(DiffusionModelConfig):
    vae: str | None = MISSING
    vae_decode: str | None = MISSING
    vae_subfolder: str | None = MISSING
    vae_config: dict[str, Any] = MISSING  # diffusers AutoencoderKL keyword arguments
    dit: dict[str, Any] = MISSING  # diffusers DiTTransformer2DModel keyword arguments
    image_size: int = MISSING


@dataclass
class NoiseScheduleConfig:
    num_train_timesteps: int = MISSING
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = MISSING
    beta_start: float = MISSING
    beta_end: float = MISSING


@dataclass
class DiffusionTrainConfig:
    steps: int | None = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    label_dropout: float = MISSING
    seed: int = MISSING
    ema: float | None = MISSING  # EMA decay of the weights; null = off
    ema_schedule: Literal["warmup", "fixed"] = MISSING  # diffusers' EMAModel warm-up | DiT's fixed decay
    checkpoint_every: int = MISSING
    clip_grad_norm: float | None = None  # clip the gradients' global norm to this; null = off
    schedule: Literal["constant", "cosine"] = "constant"  # per-step lr, after the warm-up
    warmup_steps: int = 0  # linear lr warm-up steps; 0 = none
    log_every: int = 100  # steps between logged losses


@dataclass
class FinetuneConfig(DiffusionTrainConfig):
    objective: str = MISSING  # none | a fine-tuning method of ddist/methods/ (checked by validation)
    params: Literal["all", "difffit"] = MISSING
    epochs: int = MISSING
    # and, as OmegaConf sees it, one node per fine-tuning method with settings of its own (rsm, minimax):
    # diffusion.finetune.<name>, typed by its descriptor's schema (`add_finetune_settings`)


@dataclass
class CGSConfig:
    eta_dpp: float = MISSING
    mu_dm: float = MISSING
    eps: float = MISSING
    kernel: Literal["zt", "x0_hat", "teacher"] = MISSING
    step_norm: Literal["none", "noise_std", "cap"] = MISSING  # how the DPP step is sized (ddist.objectives.cgs)
    max_step: float = MISSING  # step_norm cap: the largest ||dz_dpp|| / ||z|| per latent and step
    start: float = MISSING  # guidance window [start, end), fractions of the sampling steps
    end: float = MISSING


@dataclass
class SampleConfig:
    method: Literal["independent", "cgs"] = MISSING
    scheduler: Literal["ddpm", "ddim"] = MISSING
    steps: int = MISSING
    guidance_scale: float = MISSING
    guidance_channels: int | None = MISSING
    ddim_eta: float = MISSING
    batch_size: int = MISSING
    cgs: CGSConfig = MISSING


@dataclass
class DiffusionConfig:
    backbone: Literal["pixel", "latent"] = MISSING
    model: DiffusionModelConfig = MISSING
    schedule: NoiseScheduleConfig = MISSING
    train: DiffusionTrainConfig = MISSING
    finetune: FinetuneConfig = MISSING
    sample: SampleConfig = MISSING


@dataclass
class PixelDiffusionConfig(DiffusionConfig):
    backbone: Literal["pixel"] = MISSING
    model: PixelModelConfig = MISSING


@dataclass
class LatentDiffusionConfig(DiffusionConfig):
    backbone: Literal["latent"] = MISSING
    model: LatentModelConfig = MISSING


# ----------------------------------------------------------------------------- analyse, pipeline, logger


@dataclass
class FidConfig:
    weights: str | None = MISSING


@dataclass
class AnalyseConfig:
    enabled: bool = MISSING
    real_samples_per_class: int = MISSING
    figures: bool = MISSING
    fid: FidConfig = MISSING
    robust_scores: bool = MISSING
    lrs_weight: float = MISSING
    ars_weight: float = MISSING
    real_hard_acc: float | None = MISSING
    hard: EvaluateConfig = MISSING  # the hard-label protocol of DD-Ranking's baselines


@dataclass
class PipelineConfig:
    name: str = MISSING
    # each a stage module of ddist/stages/: validation checks the names against their STAGE declarations
    # (ddist/runtime/stages.py), so a new stage is listed nowhere else
    stages: list[str] = MISSING


@dataclass
class LoggerConfig:
    name: Literal["none", "wandb"] = MISSING


@dataclass
class NoLoggerConfig(LoggerConfig):
    name: Literal["none"] = MISSING


@dataclass
class WandbLoggerConfig(LoggerConfig):
    name: Literal["wandb"] = MISSING
    mode: Literal["offline", "online", "disabled"] = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING


# ----------------------------------------------------------------------------- the whole config


@dataclass
class Config:
    dataset: DatasetConfig = MISSING
    teacher: TeacherConfig = MISSING
    recover: RecoverConfig = MISSING
    relabel: RelabelConfig = MISSING
    evaluate: EvaluateConfig = MISSING
    diffusion: Any = MISSING  # typed by the option's schema: OmegaConf cannot narrow diffusion.model in a merge
    analyse: AnalyseConfig = MISSING
    pipeline: PipelineConfig = MISSING
    logger: LoggerConfig = MISSING
    ipc: int = MISSING
    seed: int = MISSING
    device: str = MISSING  # auto | cpu | mps | cuda | cuda:N (checked in ddist.config.checks)
    precision: Literal["fp32", "bf16", "fp16"] = MISSING
    compile: bool = MISSING
    threads: Any = MISSING  # auto or a count (checked in ddist.runtime.threads)
    cpu_allocator: Literal["cache", "system"] = MISSING  # ddist.runtime.allocator
    checkpoint_interval: float = MISSING  # seconds at least between the teacher's or students' checkpoints
    dry_run: bool = MISSING
    objective_metric: str | None = MISSING  # the results value a job returns to an optimising sweeper
    shard: ShardConfig = MISSING
    paths: PathsConfig = MISSING


# A composed config as a service takes it while callers move to typed configs: a stage holds `Config`
# (the DictConfig validated against it, which answers the same attribute reads, so mypy checks each
# read against the schema); a caller not yet typed hands the DictConfig itself.
AnyConfig = Config | DictConfig


def as_node(cfg: object) -> DictConfig:
    """The DictConfig a typed config (or node of one) is, for a callee that still takes a DictConfig or a Mapping."""
    assert isinstance(cfg, DictConfig), f"a composed config, not {type(cfg).__name__}"
    return cfg


# ConfigStore entries: (group, name, schema). The option files name these in their defaults lists.
SCHEMAS: list[tuple[str | None, str, type]] = [
    (None, "config_schema", Config),
    ("dataset", "schema", DatasetConfig),
    ("dataset", "imagenet_subset_schema", ImagenetSubsetConfig),
    ("model", "convnet_schema", ConvNetConfig),
    ("model", "resnet_schema", ResNetConfig),
    ("model", "resnet_ap_schema", ResNetAPConfig),
    ("recover", "schema", RecoverConfig),
    ("relabel", "online_schema", OnlineRelabelConfig),
    ("relabel", "stored_schema", StoredRelabelConfig),
    ("evaluate", "schema", EvaluateConfig),
    ("diffusion", "pixel_schema", PixelDiffusionConfig),
    ("diffusion", "latent_schema", LatentDiffusionConfig),
    ("analyse", "schema", AnalyseConfig),
    ("logger", "none_schema", NoLoggerConfig),
    ("logger", "wandb_schema", WandbLoggerConfig),
]


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; importing ddist does it)."""
    store = ConfigStore.instance()
    for group, name, schema in SCHEMAS:
        store.store(group=group, name=name, node=for_omegaconf(schema))


# The fine-tuning methods' settings nodes (name -> schema), added by their descriptors (ddist/methods/), and
# their order in a composed config: rsm and minimax as this module declared them before they moved to their
# methods (meta.json holds the diffusion config unsorted, so its bytes keep that order), then the others by name.
_FINETUNE_SETTINGS: dict[str, type] = {}
_FINETUNE_ORDER = ("rsm", "minimax")


def add_finetune_settings(name: str, settings: type) -> None:
    """Type diffusion.finetune.<name> by the fine-tuning method `name`'s own settings schema (its descriptor's,
    ddist/methods/, which this module cannot import): FinetuneConfig gains the field as for_omegaconf rebuilds
    it, and the diffusion schemas that hold it are stored again, so a composed config is checked against it."""
    _FINETUNE_SETTINGS[name] = settings
    order = sorted(_FINETUNE_SETTINGS, key=lambda n: (_FINETUNE_ORDER.index(n) if n in _FINETUNE_ORDER else 2, n))
    extend(FinetuneConfig, {n: _FINETUNE_SETTINGS[n] for n in order})
    register()


register()
