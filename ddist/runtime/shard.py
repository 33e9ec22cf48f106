"""Which share of a stage's independent work items (recover groups, sampled classes) this job does.

`shard.index` / `shard.count` split the items among N jobs (SLURM array, joblib, or by hand) that
share one content-keyed work directory; torchrun ranks split each shard further. Items are dealt
round-robin (item i goes to worker i mod N), so every worker gets a spread of classes and groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddist.config.schema import AnyConfig
from ddist.errors import ConfigError
from ddist.runtime.ranks import launched_rank, launched_world


@dataclass(frozen=True)
class Share:
    index: int  # this worker, 0 <= index < count
    count: int  # workers in all (shards x ranks)

    def owns(self, item: int) -> bool:
        return item % self.count == self.index

    def items(self, n: int) -> list[int]:
        return [i for i in range(n) if self.owns(i)]

    @property
    def sharded(self) -> bool:
        return self.count > 1


def share(cfg: AnyConfig) -> Share:
    """This process's share: shard (cfg.shard) x torchrun rank (WORLD_SIZE / RANK in the environment)."""
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    if count < 1 or not 0 <= index < count:
        msg = f"shard.index={index} shard.count={count}: need shard.count >= 1 and 0 <= shard.index < shard.count."
        raise ConfigError(msg)
    world, rank = launched_world(), launched_rank()
    return Share(index=index * world + rank, count=count * world)
