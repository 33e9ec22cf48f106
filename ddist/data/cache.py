"""Decoded-split cache: `<cache_dir>/datasets/<key>.safetensors`.

The key hashes what the decoded tensor depends on: format, absolute root,
split, resolution, channels, the crop rule, the label order, and every file's
path, label, size and mtime, so an edited or added file invalidates the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ddist.data.decode import Resize
from ddist.data.layouts import SplitFiles
from ddist.errors import ConfigError
from ddist.runtime.artifacts import atomic_save_tensors

# Bump when decoding changes in a way that alters pixels, to invalidate old entries.
DECODER_VERSION = 1


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


def cache_key(fmt: str, split: str, channels: int, resize: Resize, labels: tuple, files: SplitFiles) -> str:
    """16 hex characters identifying one decoded split."""
    key = {
        "version": DECODER_VERSION,
        "format": fmt,
        "root": str(files.root),
        "split": split,
        "channels": channels,
        "resize": [resize.size, resize.short_side],
        "labels": list(labels),
        "files": _files_digest(files),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cached_images(
    cache_dir: Path | None, key: str, decode: Callable[[], torch.Tensor], targets: torch.Tensor
) -> torch.Tensor:
    """The decoded uint8 images: read from the cache, or decoded and then stored."""
    if cache_dir is None:
        return decode()
    path = Path(cache_dir) / "datasets" / f"{key}.safetensors"
    if path.is_file():
        try:
            stored = load_file(path)
            if torch.equal(stored["targets"], targets):
                return stored["images"]
        except (SafetensorError, OSError, KeyError):
            pass  # unreadable entry: decode again and overwrite it
    images = decode()
    atomic_save_tensors(path, {"images": images, "targets": targets})
    return images
