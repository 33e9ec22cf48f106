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

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ddist.artifacts import atomic_dir, load_distilled, load_tensors
from ddist.data.augment import apply, apply_mix, batch_plan, split_mix
from ddist.errors import CheckpointError
from ddist.logging import info, progress
from ddist.stages.squeeze import load_teacher
from ddist.stages.training import epochs_for


def plan_settings(ev: DictConfig, resolution: int, seed: int, num_images: int, epochs: int) -> dict:
    """Everything that determines the batch plan of evaluate settings `ev`; stored with the labels."""
    return {"num_images": num_images, "batch_size": int(ev.batch_size), "epochs": int(epochs),
            "augment": OmegaConf.to_container(ev.augment, resolve=True), "mix": ev.mix,
            "mix_alpha": float(ev.mix_alpha), "resolution": int(resolution), "seed": int(seed)}


def plan(settings: dict) -> Iterator[dict]:
    s = settings
    return batch_plan(s["num_images"], s["batch_size"], s["epochs"], s["augment"], s["mix"], s["mix_alpha"],
                      s["resolution"], s["seed"])


def augmented_batch(images: torch.Tensor, batch: dict, device: torch.device) -> torch.Tensor:
    """The student's input for one planned batch: augment, then mix."""
    aug, mix = split_mix(batch)
    return apply_mix(apply(images[batch["indices"]].to(device), aug), mix)


def run(cfg: DictConfig, ctx: dict) -> dict:
    ctx["relabel"] = None
    if cfg.relabel.mode == "online" or cfg.evaluate.protocol != "soft":
        return ctx

    distilled = load_distilled(cfg.evaluate.distilled or ctx["distilled"], ctx["spec"])
    teacher, device = load_teacher(cfg, ctx), ctx["device"]
    epochs = epochs_for(cfg.relabel.epochs, distilled.ipc)
    settings = {**plan_settings(cfg.evaluate, cfg.dataset.resolution, cfg.seed, len(distilled.labels), epochs),
                "top_k": cfg.relabel.top_k, "teacher_sha256": file_sha256(ctx["teacher"])}
    steps_per_epoch = -(-settings["num_images"] // settings["batch_size"])
    out = Path(ctx["run_dir"]) / "relabel"
    with atomic_dir(out) as tmp, torch.no_grad():
        epoch_tensors: dict[str, torch.Tensor] = {}
        for step, batch in enumerate(progress(plan(settings), desc="relabel",
                                              total=steps_per_epoch * settings["epochs"])):
            logits = teacher(augmented_batch(distilled.images, batch, device)).float().cpu()
            stored = {**batch, **_compress(logits, settings["top_k"])}
            epoch_tensors.update({f"{step:07d}/{k}": v for k, v in stored.items()})
            if (step + 1) % steps_per_epoch == 0:
                _save(tmp / f"epoch_{step // steps_per_epoch:04d}.safetensors", epoch_tensors)
                epoch_tensors = {}
        nbytes = sum(f.stat().st_size for f in tmp.glob("epoch_*.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({**settings, "bytes": nbytes}, indent=2))
    info(f"relabel: stored {settings['epochs']} epochs of soft labels, {nbytes / 1e6:.2f} MB in {out}")
    ctx["logger"].log({"relabel/bytes": nbytes})
    ctx["results"]["relabel_bytes"] = nbytes
    ctx["relabel"] = out
    return ctx


def stored_batches(path: str | Path, expected: dict, teacher: str | Path | None = None) -> Iterator[dict]:
    """Replay stored batches (plan parameters + dense fp32 logits), after checking they fit `expected`,
    were made by the checkpoint `teacher` (when given) and that no epoch file is missing."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot read stored soft labels in {path} ({err}). Rerun with relabel.mode=stored.") from None
    mismatched = [k for k, v in expected.items() if k != "epochs" and meta.get(k) != v]
    if mismatched or meta["epochs"] < expected["epochs"]:
        raise CheckpointError(f"The stored soft labels in {path} were made for other settings ({mismatched or 'epochs'}). "
                              "Rerun relabel with the evaluate settings, or set relabel.mode=online.")
    if teacher is not None and meta.get("teacher_sha256") != file_sha256(teacher):
        raise CheckpointError(f"The stored soft labels in {path} were made by another teacher than {teacher}. "
                              "Rerun relabel with this teacher, or set relabel.mode=online.")
    files = [path / f"epoch_{e:04d}.safetensors" for e in range(expected["epochs"])]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"The stored soft labels in {path} lack {', '.join(missing[:5])} "
                              f"({len(missing)} of {len(files)} epochs): rerun relabel, or set relabel.mode=online.")
    for file in files:
        tensors = load_tensors(file, "stored soft labels")
        for step in sorted({k.split("/")[0] for k in tensors}):
            batch = {k.split("/")[1]: v for k, v in tensors.items() if k.startswith(step + "/")}
            num_classes = int(batch.pop("num_classes"))
            yield {**{k: v for k, v in batch.items() if k not in ("logits", "topk_index")},
                   "logits": _expand(batch, num_classes)}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes: the identity of the teacher that made stored labels."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _compress(logits: torch.Tensor, top_k: int | None) -> dict[str, torch.Tensor]:
    if top_k is None or top_k >= logits.shape[1]:
        return {"logits": logits.half(), "num_classes": torch.tensor(logits.shape[1])}
    values, index = logits.topk(top_k, dim=1)
    return {"logits": values.half(), "topk_index": index.to(torch.int16), "num_classes": torch.tensor(logits.shape[1])}


def _expand(batch: dict, num_classes: int) -> torch.Tensor:
    """Dense fp32 logits; with top-k, the other classes get -inf so a softmax renormalises over k."""
    logits = batch["logits"].float()
    if "topk_index" not in batch:
        return logits
    dense = torch.full((logits.shape[0], num_classes), float("-inf"))
    return dense.scatter(1, batch["topk_index"].long(), logits)


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
