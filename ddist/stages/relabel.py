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

from ddist.config.schema import Config
from ddist.runtime.context import RunContext
from ddist.runtime.stages import Stage
from ddist.training.students import store_soft_labels

STAGE = Stage(name="relabel", needs=frozenset({"teacher", "distilled"}))


def run(cfg: Config, ctx: RunContext) -> RunContext:
    ctx.relabel = None
    if cfg.relabel.mode == "online" or cfg.evaluate.protocol != "soft":
        return ctx
    out = ctx.run_dir / "relabel"
    nbytes = store_soft_labels(cfg, ctx, cfg.evaluate.distilled or ctx.require("distilled"), out)
    ctx.logger.log({"relabel/bytes": nbytes})
    ctx.results["relabel_bytes"] = nbytes
    ctx.relabel = out
    return ctx
