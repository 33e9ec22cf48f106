"""Shares of work items among shards and torchrun ranks (ddist/runtime/shard.py)."""

import pytest
from omegaconf import OmegaConf

from ddist.errors import ConfigError
from ddist.runtime.shard import share


def _cfg(index, count):
    return OmegaConf.create({"shard": {"index": index, "count": count}})


def test_shards_partition_the_items(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    parts = [share(_cfg(i, 3)).items(10) for i in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(10))
    assert parts[0] == [0, 3, 6, 9]
    assert not share(_cfg(0, 1)).sharded


def test_ranks_split_each_shard(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for shard in range(2):
        for rank in range(2):
            monkeypatch.setenv("RANK", str(rank))
            seen += share(_cfg(shard, 2)).items(9)
    assert sorted(seen) == list(range(9))


@pytest.mark.parametrize("index,count", [(2, 2), (-1, 2), (0, 0)])
def test_bad_shard_names_the_option(index, count):
    with pytest.raises(ConfigError, match="shard.index"):
        share(_cfg(index, count))
