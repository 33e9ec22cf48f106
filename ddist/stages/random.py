"""Random real images: IPC images per class drawn (seeded) from the real train split.

The baseline every distillation method is compared with under the same protocol.
"""

from __future__ import annotations

from pathlib import Path

from ddist.config.schema import Config
from ddist.data import load_split
from ddist.data.subsets import save_random_real
from ddist.runtime.context import RunContext
from ddist.runtime.stages import Stage

STAGE = Stage(name="random", makes=frozenset({"distilled"}))


def run(cfg: Config, ctx: RunContext) -> RunContext:
    train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
    ctx.distilled = save_random_real(ctx.run_dir / "distilled", train, ctx.spec, cfg.ipc, cfg.seed)
    ctx.method = "random"  # as its meta.json
    return ctx
