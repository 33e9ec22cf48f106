"""Decode image files into uint8 tensors at a fixed square resolution (PIL only)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddist.errors import ConfigError
from ddist.logging import info, progress
from ddist.utils import ceil_div

# ImageNet evaluation convention: resize the shorter side to 256, centre-crop 224.
IMAGENET_CROP_RATIO = 224 / 256


@dataclass(frozen=True)
class Resize:
    """Resize the shorter side to `short_side`, then centre-crop `size` x `size`."""

    size: int
    short_side: int

    @classmethod
    def for_split(cls, fmt: str, split: str, resolution: int) -> Resize:
        # ImageNet-style test images keep the usual 256->224 margin. Training
        # images are stored at the model resolution and random crops/flips are
        # applied later on tensors (ddist/data/augment.py).
        if split == "test" and fmt in ("imagenet", "imagenet_subset"):
            return cls(resolution, round(resolution / IMAGENET_CROP_RATIO))
        return cls(resolution, resolution)


def _decode_hwc(path: str | Path, channels: int, resize: Resize) -> np.ndarray:
    """One image file as uint8 [size, size, channels] (PIL's own layout, no copy)."""
    mode = {1: "L", 3: "RGB"}[channels]
    try:
        with Image.open(path) as f:
            # Let the JPEG decoder downscale by a power of two while staying
            # at least as large as needed: large ImageNet files decode faster.
            f.draft(None, (resize.short_side, resize.short_side))
            im = f.convert(mode)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"Cannot read image {path}: {exc}. Remove or replace the file, or set "
            "dataset.root to an intact copy of the data."
        ) from None
    im = _resize_center_crop(im, resize)
    return np.asarray(im, dtype=np.uint8).reshape(resize.size, resize.size, channels)


def decode_image(path: Path, channels: int, resize: Resize) -> torch.Tensor:
    """One image file as a uint8 tensor [channels, size, size]."""
    return torch.from_numpy(_decode_hwc(path, channels, resize).transpose(2, 0, 1).copy())


def _resize_center_crop(im: Image.Image, resize: Resize) -> Image.Image:
    w, h = im.size
    if (w, h) == (resize.size, resize.size):
        return im
    scale = resize.short_side / min(w, h)
    new_w, new_h = max(resize.size, round(w * scale)), max(resize.size, round(h * scale))
    if (new_w, new_h) != (w, h):
        # PIL's bilinear filter widens with the scale factor, so downscaling is antialiased.
        im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - resize.size) // 2, (new_h - resize.size) // 2
    return im.crop((left, top, left + resize.size, top + resize.size))


# Below this many files a pool is not worth it.
POOL_MIN_FILES = 2000


def decode_all(
    root: Path,
    paths: tuple[str, ...],
    channels: int,
    resize: Resize,
    workers: int | None = None,
    desc: str = "decode",
) -> torch.Tensor:
    """All files (relative to root) stacked into uint8 [N, C, size, size], in order.

    Large splits are decoded by `workers` threads (default: torch's thread count, i.e. this
    job's share of the cores), in contiguous chunks so the order is kept. Threads, not
    processes: Pillow releases the GIL while it decodes, and a thread pool needs no
    `if __name__ == "__main__"` guard in the user's script. Progress (ddist.logging.progress) is
    reported under `desc`, image by image (one worker) or chunk by chunk (several).
    """
    workers = workers or torch.get_num_threads()
    start = time.perf_counter()
    with progress(desc=desc, total=len(paths), unit="img") as bar:
        if workers <= 1 or len(paths) < POOL_MIN_FILES:
            hwc = _decode_chunk(str(root), paths, channels, resize, bar.update)
        else:
            step = ceil_div(len(paths), 4 * workers)  # a few chunks per worker balance slow and fast files
            chunks = [paths[i : i + step] for i in range(0, len(paths), step)]
            parts = []
            with ThreadPoolExecutor(workers) as pool:
                n = len(chunks)
                for part in pool.map(_decode_chunk, [str(root)] * n, chunks, [channels] * n, [resize] * n):
                    parts.append(part)
                    bar.update(len(part))
            hwc = np.concatenate(parts)
    info(f"{desc}: {len(paths)} images decoded in {time.perf_counter() - start:.1f} s")
    return torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()


def _decode_chunk(
    root: str, paths: tuple[str, ...], channels: int, resize: Resize, on_image: Callable[[int], object] | None = None
) -> np.ndarray:
    """Files decoded into PIL's HWC layout [n, size, size, C]: one transpose at the end beats one per image.
    on_image(1) is called after each file."""
    out = np.empty((len(paths), resize.size, resize.size, channels), dtype=np.uint8)
    for i, rel in enumerate(paths):
        out[i] = _decode_hwc(os.path.join(root, rel), channels, resize)
        if on_image is not None:
            on_image(1)
    return out
