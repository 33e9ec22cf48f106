"""Decoded-split cache: a store entry (ddist/runtime/store.py) `<cache_dir>/datasets/<hash>/images.safetensors`.

The key holds what the decoded tensor depends on: format, absolute root, split, resolution,
channels, the crop rule, the label order, and a digest of every file's path, label, size and
mtime, so an edited or added file makes another entry. Its version is the store's CACHE_VERSION.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ddist.data.decode import Resize
from ddist.data.layouts import SplitFiles
from ddist.errors import ConfigError
from ddist.runtime.artifacts import atomic_save_tensors, load_tensors
from ddist.runtime.store import Entry, cached, entry


def _files_digest(files: SplitFiles) -> str:
    digest = hashlib.sha256()
    root = str(files.root)
    for rel, label in zip(files.paths, files.targets, strict=False):
        try:
            st = os.stat(os.path.join(root, rel))
        except FileNotFoundError:
            raise ConfigError(
                f"{files.root / rel} is listed by the dataset but does not exist; set "
                "dataset.root to a complete copy of the data."
            ) from None
        digest.update(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(fmt: str, split: str, channels: int, resize: Resize, labels: tuple, files: SplitFiles) -> dict:
    """The store key of one decoded split."""
    return {
        "format": fmt,
        "root": str(files.root),
        "split": split,
        "channels": channels,
        "resize": [resize.size, resize.short_side],
        "labels": list(labels),
        "files": _files_digest(files),
    }


def cached_images(
    cache_dir: Path | None, key: dict, decode: Callable[[], torch.Tensor], targets: torch.Tensor
) -> torch.Tensor:
    """The decoded uint8 images: read from the cache, or decoded and then stored (one process
    decodes, any other waits and reads; a damaged entry is decoded again, with a warning)."""
    if cache_dir is None:
        return decode()

    def build(e: Entry) -> None:
        atomic_save_tensors(e / "images.safetensors", {"images": decode(), "targets": targets})

    def read(e: Entry) -> torch.Tensor:
        stored = load_tensors(e / "images.safetensors", what="decoded images")
        if "images" not in stored or not torch.equal(stored.get("targets", torch.empty(0)), targets):
            raise e.damaged("holds other images or labels than the split's files")
        return stored["images"]

    return cached(entry(cache_dir, "datasets", key), build, read)
