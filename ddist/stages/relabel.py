"""Relabel: where the student's soft labels come from.

- online (default): nothing is stored; evaluate runs the teacher on each augmented batch.
- stored (SRe2L / FKD): for `relabel.epochs` epochs, store per batch the image indices,
  crop/flip/roll and mix parameters and the teacher's logits in fp16 (optionally only the
  top-k per image, renormalised by a softmax over those k). evaluate replays exactly these
  batches. The batch plan is the one evaluate would draw online for the same seed
  (ddist.data.augment.batch_plan), so both modes train on the same signal, up to fp16.

Layout: <run_dir>/relabel/{meta.json, epoch_0000.safetensors, ...}, written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from ddist.artifacts import atomic_dir, file_sha256, load_distilled
from ddist.context import RunContext
from ddist.data.plan import augmented_batch, compress_logits, plan, plan_settings
from ddist.logging import info, progress
from ddist.teacher import frozen_teacher, load_teacher
from ddist.train import epochs_for
from ddist.utils import ceil_div


def run(cfg: DictConfig, ctx: RunContext) -> RunContext:
    ctx.relabel = None
    if cfg.relabel.mode == "online" or cfg.evaluate.protocol != "soft":
        return ctx

    distilled = load_distilled(cfg.evaluate.distilled or ctx.require("distilled"), ctx.spec)
    teacher, device = frozen_teacher(cfg, load_teacher(cfg, ctx), grad=False), ctx.device
    epochs = epochs_for(cfg.relabel.epochs, distilled.ipc)
    settings = {
        **plan_settings(cfg.evaluate, cfg.dataset.resolution, cfg.seed, len(distilled.labels), epochs),
        "top_k": cfg.relabel.top_k,
        "teacher_sha256": file_sha256(ctx.require("teacher")),
    }
    steps_per_epoch = ceil_div(settings["num_images"], settings["batch_size"])
    out = ctx.run_dir / "relabel"
    with atomic_dir(out) as tmp, torch.inference_mode():
        epoch_tensors: dict[str, torch.Tensor] = {}
        for step, batch in enumerate(
            progress(plan(settings), desc="relabel", total=steps_per_epoch * settings["epochs"])
        ):
            logits = teacher(augmented_batch(distilled.images, batch, device)).float().cpu()
            stored = {**batch, **compress_logits(logits, settings["top_k"])}
            epoch_tensors.update({f"{step:07d}/{k}": v for k, v in stored.items()})
            if (step + 1) % steps_per_epoch == 0:
                _save(tmp / f"epoch_{step // steps_per_epoch:04d}.safetensors", epoch_tensors)
                epoch_tensors = {}
        nbytes = sum(f.stat().st_size for f in tmp.glob("epoch_*.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({**settings, "bytes": nbytes}, indent=2))
    info(f"relabel: stored {settings['epochs']} epochs of soft labels, {nbytes / 1e6:.2f} MB in {out}")
    ctx.logger.log({"relabel/bytes": nbytes})
    ctx.results["relabel_bytes"] = nbytes
    ctx.relabel = out
    return ctx


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
