"""The student's batch plan and its stored form.

The plan (image indices, crop/flip/roll and mix parameters of every batch) is drawn from
the evaluate settings and the seed alone (ddist.data.augment.batch_plan), so online soft
labels, stored soft labels and every student see the same batches. Stored labels keep, per
batch, the plan and the teacher's logits in fp16 (optionally only the top-k per image).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ddist.data.augment import apply, apply_mix, batch_plan, split_mix
from ddist.errors import CheckpointError
from ddist.runtime.artifacts import file_sha256, load_tensors


def plan_settings(ev: DictConfig, resolution: int, seed: int, num_images: int, epochs: int) -> dict:
    """Everything that determines the batch plan of evaluate settings `ev`; stored with the labels."""
    return {
        "num_images": num_images,
        "batch_size": int(ev.batch_size),
        "epochs": int(epochs),
        "augment": OmegaConf.to_container(ev.augment, resolve=True, enum_to_str=True),
        "mix": ev.mix,
        "mix_alpha": float(ev.mix_alpha),
        "resolution": int(resolution),
        "seed": int(seed),
    }


def plan(settings: dict) -> Iterator[dict]:
    s = settings
    return batch_plan(
        s["num_images"],
        s["batch_size"],
        s["epochs"],
        s["augment"],
        s["mix"],
        s["mix_alpha"],
        s["resolution"],
        s["seed"],
    )


def augmented_batch(images: torch.Tensor, batch: dict, device: torch.device) -> torch.Tensor:
    """The student's input for one planned batch: augment, then mix."""
    aug, mix = split_mix(batch)
    return apply_mix(apply(images[batch["indices"]].to(device), aug), mix)


def stored_batches(path: str | Path, expected: dict, teacher: str | Path | None = None) -> Iterator[dict]:
    """Replay stored batches (plan parameters + dense fp32 logits), after checking they fit `expected`,
    were made by the checkpoint `teacher` (when given) and that no epoch file is missing."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"Cannot read stored soft labels in {path} ({err}). Rerun with relabel.mode=stored."
        ) from None
    mismatched = [k for k, v in expected.items() if k != "epochs" and meta.get(k) != v]
    if mismatched or meta["epochs"] < expected["epochs"]:
        raise CheckpointError(
            f"The stored soft labels in {path} were made for other settings ({mismatched or 'epochs'}). "
            "Rerun relabel with the evaluate settings, or set relabel.mode=online."
        )
    if teacher is not None and meta.get("teacher_sha256") != file_sha256(teacher):
        raise CheckpointError(
            f"The stored soft labels in {path} were made by another teacher than {teacher}. "
            "Rerun relabel with this teacher, or set relabel.mode=online."
        )
    files = [path / f"epoch_{e:04d}.safetensors" for e in range(expected["epochs"])]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"The stored soft labels in {path} lack {', '.join(missing[:5])} "
            f"({len(missing)} of {len(files)} epochs): rerun relabel, or set relabel.mode=online."
        )
    for file in files:
        tensors = load_tensors(file, "stored soft labels")
        for step in sorted({k.split("/")[0] for k in tensors}):
            batch = {k.split("/")[1]: v for k, v in tensors.items() if k.startswith(step + "/")}
            num_classes = int(batch.pop("num_classes"))
            yield {
                **{k: v for k, v in batch.items() if k not in ("logits", "topk_index")},
                "logits": expand_logits(batch, num_classes),
            }


def compress_logits(logits: torch.Tensor, top_k: int | None) -> dict[str, torch.Tensor]:
    if top_k is None or top_k >= logits.shape[1]:
        return {"logits": logits.half(), "num_classes": torch.tensor(logits.shape[1])}
    values, index = logits.topk(top_k, dim=1)
    return {"logits": values.half(), "topk_index": index.to(torch.int16), "num_classes": torch.tensor(logits.shape[1])}


def expand_logits(batch: dict, num_classes: int) -> torch.Tensor:
    """Dense fp32 logits; with top-k, the other classes get -inf so a softmax renormalises over k."""
    logits = batch["logits"].float()
    if "topk_index" not in batch:
        return logits
    dense = torch.full((logits.shape[0], num_classes), float("-inf"))
    return dense.scatter(1, batch["topk_index"].long(), logits)
