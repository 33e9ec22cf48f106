"""Cache keys of the diffusion stage's artifacts: exactly the config that made each (the data,
the base model, its fine-tuning, the sampling settings). Each holds every field of the nodes it
names, always, but the fields declared here not to change the artifact (the store's rule,
ddist/runtime/store.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from omegaconf import OmegaConf

from ddist.config.schema import AnyConfig, DiffusionConfig, DiffusionTrainConfig
from ddist.methods import diffusion_method
from ddist.runtime.artifacts import to_plain
from ddist.training.teacher import teacher_identity

# dataset keys that do not change what a diffusion model learns
_NOT_DATA_KEYS = ("protocol", "download", "augment")
# training keys that do not change the trained weights
_NOT_WEIGHT_KEYS = ("checkpoint_every", "log_every")
# options added after models were cached: left out of the key at these values (which train as before)
_DEFAULTS = {"clip_grad_norm": None, "schedule": "constant", "warmup_steps": 0}


def sample_key(cfg: AnyConfig, dcfg: DiffusionConfig) -> dict:
    """Exactly what determines the sampled set: the model (base and fine-tuning), the sampling
    settings, ipc, seed, the method's name (meta.json's, under the key "pipeline" it had when the
    pipeline's name was the method's) and, for CGS's teacher kernel, the teacher."""
    model: dict[str, Any] = {"base": base_key(cfg, dcfg)}
    finetune, sample = dcfg.finetune, dcfg.sample
    if finetune.objective != "none":
        model["finetune"] = training_key(finetune)
    key = {"model": model, "sample": to_plain(sample), "ipc": int(cfg.ipc), "seed": int(cfg.seed)}
    key["pipeline"] = diffusion_method(finetune.objective, sample.method)  # meta.json's
    if sample.method == "cgs" and sample.cgs.kernel == "teacher":
        key["teacher"] = teacher_identity(cfg)
    return key


def data_key(cfg: AnyConfig) -> dict:
    dataset = cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True))
    return {k: v for k, v in dataset.items() if k not in _NOT_DATA_KEYS}


def base_key(cfg: AnyConfig, dcfg: DiffusionConfig) -> dict:
    """What determines the base model (architecture, schedule, and training when trained here) and the data.

    The data is part of the key even for a pretrained model: fine-tuning, keyed by this, reads it.
    """
    key = {
        "backbone": str(dcfg.backbone),
        "model": to_plain(dcfg.model),
        "schedule": to_plain(dcfg.schedule),
        "data": data_key(cfg),
    }
    if dcfg.model.pretrained is None:
        key["train"] = training_key(dcfg.train)
    return key


def training_key(tcfg: DiffusionTrainConfig | Mapping[str, Any]) -> dict:
    """A train/finetune node (or its plain dict) as a cache key: every field but those that do not change
    the weights."""
    return {
        k: v
        for k, v in to_plain(tcfg).items()
        if k not in _NOT_WEIGHT_KEYS and not (k in _DEFAULTS and v == _DEFAULTS[k] and type(v) is type(_DEFAULTS[k]))
    }
