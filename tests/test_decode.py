"""Decoding a split with a worker pool gives the same tensor, in the same order, as one worker."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ddist import logging as ddist_logging
from ddist.data import decode


def test_pooled_decode_equals_sequential(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(23):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(f"{i}.png")
    monkeypatch.setattr(decode, "POOL_MIN_FILES", 2)
    resize = decode.Resize(16, 16)
    one = decode.decode_all(tmp_path, tuple(paths), 3, resize, workers=1)
    pooled = decode.decode_all(tmp_path, tuple(paths), 3, resize, workers=3)
    assert one.shape == (23, 3, 16, 16) and one.dtype == torch.uint8
    assert torch.equal(one, pooled)
    assert torch.equal(one[5], decode.decode_image(tmp_path / "5.png", 3, resize))


def test_decode_reports_progress(tmp_path, monkeypatch):
    """Decoding reports every image to ddist.logging.progress under its desc, with one worker or several."""
    for i in range(5):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    bars = []

    def recording(*args, **kwargs):
        bar = ddist_logging.progress(*args, **kwargs)
        bars.append((kwargs["desc"], kwargs["total"], bar))
        return bar

    monkeypatch.setattr(decode, "progress", recording)
    monkeypatch.setattr(decode, "POOL_MIN_FILES", 2)
    monkeypatch.setenv("DDIST_PROGRESS", "1")  # CI silences progress (DDIST_PROGRESS=0): a disabled bar counts nothing
    paths = tuple(f"{i}.png" for i in range(5))
    for workers in (1, 2):
        decode.decode_all(tmp_path, paths, 3, decode.Resize(4, 4), workers=workers, desc="decode tiny train")
    assert [(desc, total, bar.n) for desc, total, bar in bars] == [("decode tiny train", 5, 5)] * 2
