"""Cache keys of the diffusion stage's artifacts: exactly the config that made each (the data,
the base model, its fine-tuning, the sampling settings), written so that the keys of models and
sets cached before an option was added stay valid."""

from __future__ import annotations

from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from ddist.data.spec import without_unset_val
from ddist.methods import diffusion_method
from ddist.training.teacher import teacher_identity

# dataset keys that do not change what a diffusion model learns
_NOT_DATA_KEYS = ("protocol", "download", "augment")
# training keys that do not change the trained weights
_NOT_WEIGHT_KEYS = ("checkpoint_every",)
# The latent (DiT) training loop's revision, in the keys of the models it trains (and so of their
# samples): 2 = the label dropped once per sample by the loop (each DiT block drew its own before)
# and DiffFit as MiniMax's (DitDiffFit: embedders tied, DiffFit scales, adaLN weights frozen);
# absent = before. The pixel models' keys do not have it: their training did not change.
LATENT_TRAINING_REVISION = 2


def sample_key(cfg: DictConfig, dcfg: dict) -> dict:
    """Exactly what determines the sampled set: the model (base and fine-tuning), the sampling
    settings, ipc, seed, the method's name (meta.json's, under the key "pipeline" it had when the
    pipeline's name was the method's) and, for CGS's teacher kernel, the teacher."""
    model: dict[str, Any] = {"base": base_key(cfg, dcfg)}
    if dcfg["finetune"]["objective"] != "none":
        model["finetune"] = {**with_set_schedule(dcfg["finetune"]), **revision(dcfg["backbone"])}
    key = {"model": model, "sample": sample_settings_key(dcfg["sample"]), "ipc": int(cfg.ipc), "seed": int(cfg.seed)}
    key["pipeline"] = diffusion_method(dcfg["finetune"]["objective"], dcfg["sample"]["method"])  # meta.json's
    if dcfg["sample"]["method"] == "cgs" and dcfg["sample"]["cgs"]["kernel"] == "teacher":
        key["teacher"] = teacher_identity(cfg)
    return key


def sample_settings_key(scfg: dict) -> dict:
    """diffusion.sample as a cache key: CGS's step size and window written as before those options
    (no step_norm or max_step, window start 0 and end null) when they change nothing, so the keys
    of sets sampled before them stay valid."""
    cgs = dict(scfg["cgs"])
    if cgs["step_norm"] == "none":
        del cgs["step_norm"], cgs["max_step"]
    if (cgs["start"], cgs["end"]) == (0, 1):
        cgs["start"], cgs["end"] = 0, None
    return {**scfg, "cgs": cgs}


def data_key(cfg: DictConfig) -> dict:
    dataset = cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True))
    # subset and val_per_class only when set, so the keys of models cached before the options stay valid
    dataset = without_unset_val(dataset)
    return {k: v for k, v in dataset.items() if k not in _NOT_DATA_KEYS and (k != "subset" or v)}


def base_key(cfg: DictConfig, dcfg: dict) -> dict:
    """What determines the base model (architecture, schedule, and training when trained here) and the data.

    The data is part of the key even for a pretrained model: fine-tuning, keyed by this, reads it.
    """
    # random_weights only when set, so the keys of models cached before the option stay valid
    model = {k: v for k, v in dcfg["model"].items() if k != "random_weights" or v}
    key = {"backbone": dcfg["backbone"], "model": model, "schedule": dcfg["schedule"], "data": data_key(cfg)}
    if dcfg["model"]["pretrained"] is None:
        key["train"] = training_key(dcfg["train"], dcfg["backbone"])
    return key


def training_key(tcfg: dict, backbone: str) -> dict:
    """A train/finetune node as a cache key: without the keys that do not change the weights, with
    ema only when set and ema_schedule only when it is fixed (with_set_schedule), so the keys of
    models cached before these options stay valid; with the latent loop's revision."""
    node = with_set_schedule(tcfg)
    key = {k: v for k, v in node.items() if k not in _NOT_WEIGHT_KEYS and (k != "ema" or v is not None)}
    return {**key, **revision(backbone)}


def with_set_schedule(tcfg: dict) -> dict:
    """tcfg without ema_schedule where it changes nothing (no EMA) or is the schedule of before the
    option (warmup, diffusers' EMAModel)."""
    return {k: v for k, v in tcfg.items() if k != "ema_schedule" or (tcfg["ema"] is not None and v != "warmup")}


def revision(backbone: str) -> dict:
    return {"revision": LATENT_TRAINING_REVISION} if backbone == "latent" else {}
