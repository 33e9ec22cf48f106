"""Decoding a split with a worker pool gives the same tensor, in the same order, as one worker."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

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
