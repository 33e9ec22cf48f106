"""The RunContext: what the pipeline hands from stage to stage.

Each stage is `run(cfg, ctx) -> ctx`. The fields below are the whole contract between
stages: the run's setting (made by the pipeline), the artifacts stages make and read
(paths, not tensors), and the numbers that go to results.json. A stage reads an
artifact another stage makes with `ctx.require(name)`, which says which stage to add
when none made it (ddist.config.checks catches most of these before any work).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ddist.data.spec import DatasetSpec
from ddist.errors import ConfigError
from ddist.logging import RunLogger
from ddist.runtime.stages import providers

Artifact = Literal["teacher", "distilled"]

# artifact -> what else gets one into the run, besides the stages that make it (their STAGE declarations)
OTHERWISE: dict[str, str] = {
    "teacher": " (it trains the teacher, or loads teacher.checkpoint)",
    "distilled": ", or set evaluate.distilled=PATH",
}
WHAT = {"teacher": "a teacher", "distilled": "a distilled set"}


@dataclass
class RunContext:
    # the run (made by the pipeline)
    run_dir: Path
    device: torch.device
    spec: DatasetSpec
    logger: RunLogger = field(default_factory=RunLogger)
    stage: str = ""  # the stage running now, for messages

    # artifacts: made by one stage, read by later ones
    teacher: Path | None = None  # squeeze: the teacher's checkpoint
    teacher_acc: float | None = None  # squeeze: its test accuracy
    distilled: Path | None = None  # random | recover | diffusion (or evaluate.distilled): the DistilledSet
    # random | recover | diffusion: the name of the method that made the set, as its meta.json says (from the
    # method's descriptor, ddist/methods/); results.json's "method" (the pipeline's name when no stage made a set)
    method: str | None = None
    relabel: Path | None = None  # relabel (stored protocol): the stored soft labels; None = online
    # recover | diffusion under sharding: this job did its share and another assembles the set
    # (what it did, for shard.json); the pipeline stops after that stage
    stop: dict[str, Any] | None = None

    # what goes to results.json
    results: dict[str, Any] = field(default_factory=dict)  # stage outputs: students, analysis, ...
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    peak_memory_mb: dict[str, float] = field(default_factory=dict)  # stage -> peak memory

    def require(self, name: Artifact) -> Path:
        """The path of artifact `name`; a ConfigError naming the stage that makes it when none did."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(
                f"{self.stage or 'this stage'} needs {WHAT[name]}, but no earlier stage in pipeline.stages "
                f"made one: {how_to_get(name)}."
            )
        return Path(value)


def how_to_get(name: str) -> str:
    """How to get artifact `name` into a run: the stages that make it (ddist/runtime/stages.py), or the option."""
    *others, last = providers(name)
    stages = f"{', '.join(others)} or {last}" if others else last
    return f"add {stages} before it{OTHERWISE.get(name, '')}"
