"""Resumable, shardable making of a DistilledSet out of independent parts.

Recover's batch groups and the diffusion stage's sampling groups are independent of each
other: each draws its randomness from (seed, part) alone. A stage keeps them in a work
directory under the content-keyed cache, keyed by exactly the configuration that determines
the set (so a new run directory of the same command finds it):

    <cache_dir>/<kind>/<hash>/key.json               what made it
                              plan.json              parts, labels, dataset and meta of the set
                              parts/000012.safetensors   a finished part: its images and their rows
                              distilled/             the assembled DistilledSet
                              done.json              written once the set is assembled (ddist/runtime/store.py)

Each part is written atomically the moment it is finished, so a killed run loses at most
the part it was in; the rerun logs e.g. "recover: 37/50 groups done, resuming at 38" and
does only the rest. Once every part is there, the set is assembled part by part (only one
chunk of images in memory, ddist.runtime.artifacts.write_distilled), the parts are deleted and
the entry is marked complete (its files read-only); a later run of the same configuration (an
evaluate.* sweep) checks the finished set's checksum and reuses it (a damaged one is made again,
with a warning naming the entry). The run directory's distilled/ is hard links to the entry's
read-only files (copies where links cannot be made).

Sharding (ddist/runtime/shard.py): each job makes only its share of the parts; whichever job then
finds every part present assembles the set (under the entry's file lock, so once), and the
others stop after their share (the pipeline writes shard.json instead of results.json and
runs no later stage). `python -m ddist.runtime.merge DIR` assembles explicitly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ddist.config.schema import AnyConfig
from ddist.data import dataset_spec
from ddist.errors import CheckpointError
from ddist.logging import info, warn
from ddist.runtime import distributed, store
from ddist.runtime.artifacts import (
    TensorRows,
    atomic_dir,
    atomic_save_tensors,
    atomic_write_text,
    distilled_checksum,
    load_tensors,
    strict_json,
    to_plain,
    write_distilled,
)
from ddist.runtime.context import RunContext
from ddist.runtime.shard import Share, share

ASSEMBLE_CHUNK = 256  # images in memory at once while assembling


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


# what plan.json must hold to be trusted
PLAN = store.fields(
    kind=(_is_str, "a string"),
    num_parts=(lambda v: store.is_count(v) and v >= 1, "an integer >= 1"),
    labels=(_is_int_list, "a list of labels"),
    dataset=(lambda v: isinstance(v, dict), "a mapping"),
    meta=(lambda v: isinstance(v, dict), "a mapping"),
)
PLAN_FIX = "Rerun one of the jobs' command (it writes plan.json again, keeping the parts), then merge again."


class WorkDir:
    """The work directory of one configuration's set: `num_parts` parts that together hold the
    rows 0..len(labels)-1 of the set, each row exactly once. A store entry (ddist/runtime/store.py)
    filled over one or several runs: complete once the set is assembled."""

    def __init__(self, cfg: AnyConfig, kind: str, key: Any, noun: str, num_parts: int, plan: dict):
        self.entry = store.entry(cfg, kind, key)
        self.root = self.entry.path
        self.kind, self.noun, self.num_parts = kind, noun, num_parts
        self.plan = {"kind": kind, "num_parts": num_parts, **to_plain(plan)}
        self.share: Share = share(cfg)

    def start(self) -> None:
        """Create the entry (key.json) and write plan.json, or write it again where it is damaged."""
        store.create(self.entry)
        plan_file = self.root / "plan.json"
        if plan_file.is_file():
            try:
                self.entry.read_json("plan.json", PLAN)
                return
            except CheckpointError as err:
                warn(f"{getattr(err, 'what', err)}: writing it again")
        atomic_write_text(plan_file, strict_json(self.plan))

    @property
    def distilled(self) -> Path:
        return self.root / "distilled"

    def finished(self) -> bool:
        return self.entry.done

    def reusable(self, locked: bool) -> bool:
        """Whether the finished set can be reused: complete and intact. A damaged one (a file
        changed in place, through a run directory's hard link or in the cache) is cleared, with a
        warning naming the entry, to be made again (`locked`: this job holds the entry's lock)."""
        if not self.finished():
            return False
        try:
            self.entry.verify()
            meta = self.entry.read_json("distilled/meta.json", store.fields(sha256=(_is_str, "a checksum")))
            if distilled_checksum(self.distilled) != meta["sha256"]:
                raise self.entry.damaged("has a distilled/data.safetensors whose checksum differs from meta.json's")
            return True
        except CheckpointError as err:
            with contextlib.nullcontext() if locked else store.locked(self.entry):
                if self.finished():
                    store.rebuild_damaged(self.entry, err)
            return False

    def part(self, i: int) -> Path:
        return self.root / "parts" / f"{i:06d}.safetensors"

    def missing(self) -> list[int]:
        return [i for i in range(self.num_parts) if not self.part(i).is_file()]

    def todo(self) -> list[int]:
        """This job's unfinished parts; logs how far the work got."""
        mine = self.share.items(self.num_parts)
        todo = [i for i in mine if not self.part(i).is_file()]
        done = len(mine) - len(todo)
        of = f" (share {self.share.index} of {self.share.count})" if self.share.sharded else ""
        if not todo:
            info(f"{self.kind}: {done}/{len(mine)} {self.noun} done{of}")
        elif done:
            info(f"{self.kind}: {done}/{len(mine)} {self.noun} done{of}, resuming at {todo[0] + 1}")
        else:
            info(f"{self.kind}: {len(mine)} {self.noun} to do{of}")
        return todo

    def save(self, i: int, images: torch.Tensor, rows: torch.Tensor) -> None:
        if not (self.root / "plan.json").is_file():
            self.start()
        atomic_save_tensors(self.part(i), {"images": images.float(), "rows": rows.long()})


def make_set(cfg: AnyConfig, ctx: RunContext, work: WorkDir, make_parts) -> RunContext:
    """The stage's DistilledSet: reused if finished, else this job's parts made (make_parts(todo)
    saves each with work.save) and the set assembled when every part is there.

    Sets ctx.distilled (a run-directory copy of the set, hard links where possible), or,
    when other shards' parts are still missing, ctx.stop (what this job did) for the pipeline.
    Under torchrun each rank makes its parts; rank 0 decides, assembles and copies for all.
    """
    unsharded = not work.share.sharded
    reused = distributed.from_main(lambda: work.reusable(locked=False))  # a read-only cache: no lock needed
    if not reused:
        with store.locked(work.entry) if unsharded else contextlib.nullcontext():  # one unsharded build at a time
            reused = distributed.from_main(lambda: work.reusable(locked=unsharded))  # made meanwhile?
            if not reused:
                distributed.from_main(work.start)
                todo = work.todo()
                if todo:
                    make_parts(todo)
                distributed.barrier()  # every rank's parts are on disk
                ctx.stop = distributed.from_main(lambda: _assemble_or_stop(work))
                if ctx.stop:
                    return ctx
    if reused:
        info(f"{work.kind}: reusing the finished set {work.distilled}")
    ctx.distilled = distributed.from_main(lambda: link_copy(work.distilled, ctx.run_dir / "distilled"))
    return ctx


def _assemble_or_stop(work: WorkDir) -> dict[str, Any] | None:
    """Assemble the set when every part is there (one job at a time); else what this job did."""
    with store.locked(work.entry) if work.share.sharded else contextlib.nullcontext():
        if work.finished():
            return None
        missing = work.missing()
        if not missing:
            assemble(work.root)
            return None
    info(
        f"{work.kind}: share {work.share.index} of {work.share.count} done; "
        f"{len(missing)}/{work.num_parts} {work.noun} are other shards'. The last shard "
        f"to finish assembles the set (or: python -m ddist.runtime.merge {work.root}); stopping here."
    )
    return {
        "stage": work.kind,
        "share": {"index": work.share.index, "count": work.share.count},
        "parts": work.share.items(work.num_parts),
        "missing": missing,
        "work_dir": str(work.root),
    }


def assemble(root: str | os.PathLike) -> Path:
    """Write the DistilledSet of a work directory whose parts are all there, then delete the parts."""
    root = Path(root)
    entry = store.entry_at(root)
    plan = entry.read_json("plan.json", PLAN, PLAN_FIX)
    parts = [root / "parts" / f"{i:06d}.safetensors" for i in range(plan["num_parts"])]
    absent = [p.name for p in parts if not p.is_file()]
    if absent:
        raise CheckpointError(
            f"Cannot assemble {root}: {len(absent)} of {len(parts)} parts are missing ({', '.join(absent[:5])} ...). "
            "Run the shards that own them (the same command with their shard.index), then merge again."
        )
    labels = torch.tensor(plan["labels"], dtype=torch.long)
    where = torch.full((len(labels), 2), -1, dtype=torch.long)  # row -> (part, position in the part)
    for p, path in enumerate(parts):
        rows = load_tensors(path, what="work part")["rows"]
        where[rows, 0], where[rows, 1] = p, torch.arange(len(rows))
    if bool((where[:, 0] < 0).any()):
        raise CheckpointError(f"The parts in {root} do not cover every row of the set; delete {root} and rerun.")
    readers = [TensorRows(path, "images") for path in parts]
    shape = readers[0].shape[1:]
    spec = dataset_spec(plan["dataset"])
    meta = {**plan["meta"], "cache_entry": str(root)}  # a run directory's copy names where it came from
    write_distilled(root / "distilled", _chunks(readers, where), labels, shape, spec, meta)
    shutil.rmtree(root / "parts", ignore_errors=True)
    entry.finish()
    info(f"{plan['kind']}: assembled {len(labels)} images from {len(parts)} parts into {root / 'distilled'}")
    return root / "distilled"


def _chunks(readers: list[TensorRows], where: torch.Tensor) -> Iterator[torch.Tensor]:
    """The set's images in row order, ASSEMBLE_CHUNK at a time, each run of consecutive rows of a
    part read at once."""
    for start in range(0, len(where), ASSEMBLE_CHUNK):
        block = where[start : start + ASSEMBLE_CHUNK].tolist()
        out, i = [], 0
        while i < len(block):
            part, pos = block[i]
            j = i + 1
            while j < len(block) and block[j] == [part, pos + j - i]:
                j += 1
            out.append(readers[part].read(pos, pos + j - i))
            i = j
        yield torch.cat(out)


def link_copy(src: Path, dst: Path) -> Path:
    """A copy of the directory `src` at `dst` made of hard links to its files (read-only once the
    entry is complete, so an ordinary user cannot change them in place; root can, and the cache
    entry's checksum catches it) or plain copies where links cannot be made (across file systems,
    another user's files)."""
    with atomic_dir(dst) as tmp:
        for path in sorted(src.rglob("*")):
            target = tmp / path.relative_to(src)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
    return dst


def iter_images(path: str | os.PathLike, batch_size: int) -> Iterator[torch.Tensor]:
    """A DistilledSet's images in batches, read from disk batch by batch."""
    reader = TensorRows(Path(path) / "data.safetensors", "images")
    for start in range(0, len(reader), batch_size):
        yield reader.read(start, min(start + batch_size, len(reader)))
