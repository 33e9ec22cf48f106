"""THE artifact store: one look-up, lock, build, write-atomically API for every cached thing.

Teachers, students' accuracies, real class statistics, denoisers, class means, the real
hard-label accuracy, decoded datasets and the recover / sampling work directories all live here:

    <paths.cache_dir>/<kind>/<hash>/key.json     the key that made the entry (written by the store)
                                   .lock         the entry's file lock
                                   done.json     written last: the entry is complete; names each
                                                 of its files with its size
                                   ...           the kind's own files, read-only once complete

Use:  e = store.entry(cfg, "teacher", key)
      value = store.cached(e, build=lambda e: <write files into e.path>, read=lambda e: <read, check>)
or, for work that fills an entry over several runs (work directories), `with store.locked(e):`,
`e.done`, `e.finish()` directly.

Keys. The kind builds its key from declared fields, and a key holds exactly those fields, always,
with their values (null and defaults included): no field is left out because it is unset or at
its default, and none to keep an older key valid. A field that cannot change the artifact
(log_every, num_workers, checkpoint, ...) is excluded by name, in the kind's own declared list,
never by its value. The hash covers (CACHE_VERSION, key), so one bump of CACHE_VERSION
invalidates every entry at once (decoded datasets included: there is no other version).

Lock policy (the one place it is stated). A complete entry never changes, so it is read without
the lock. An incomplete one is built under its file lock (`filelock` on <entry>/.lock: it holds
across processes and, on a shared file system, across hosts): whoever takes the lock builds, the
others wait on it, then find the entry complete and read it. torchrun ranks: with
`together=True` (builders that train with DDP: the teacher, the students) every rank must call;
rank 0 takes the lock for all, decides whether to build, every rank then builds (only rank 0
writes) and all read after a barrier. Without it each rank is a process like any other (no
collectives, so it may be called from code that runs on one rank alone): one of them builds,
the others wait on the lock and read.

Trust. A complete entry is checked before it is read: done.json's files must be there with
their sizes, then the kind's `read` checks what it reads (JSON through `Entry.read_json` with a
check of its structure and ranges, tensors through their loader). A damaged entry (a
CheckpointError from `read`) is rebuilt with a warning that names it; where the cache cannot be
written the error names the entry and says to delete it.

Read-only caches. A cache directory this user cannot write (a lab's shared teachers) serves every
complete entry; an entry that must be built there fails naming it and paths.cache_dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock

from ddist.config.schema import AnyConfig
from ddist.errors import CacheError, CheckpointError
from ddist.logging import warn
from ddist.runtime.artifacts import atomic_write_text, to_plain
from ddist.runtime.ranks import active as ranks_active
from ddist.runtime.ranks import barrier, from_main, is_main

T = TypeVar("T")

# Bump when a cached artifact's format or meaning, or how keys are made, changes: every entry is
# then rebuilt. 2: the store (key.json by the store, done.json, keys of exactly the declared
# fields with no kept-valid special cases, decoded datasets as store entries).
CACHE_VERSION = 2

DONE = "done.json"
KEY = "key.json"
LOCK = ".lock"
_OWN = {KEY, LOCK, DONE}  # the store's files, not the kind's


# ----------------------------------------------------------------------------- keys


def key_plain(obj: Any) -> Any:
    """to_plain with every mapping key a string, as JSON writes it: sorting the keys of a table
    like hard_epochs {10: 1000, max: 300} would otherwise compare an int with a str."""
    obj = to_plain(obj)
    if isinstance(obj, dict):
        return {str(k): key_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [key_plain(v) for v in obj]
    return obj


def config_hash(obj: Any) -> str:
    """16 hex characters of the SHA-256 of the canonical JSON of (CACHE_VERSION, obj)."""
    blob = json.dumps({"v": CACHE_VERSION, "obj": key_plain(obj)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- checks of what is read back


Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it (None: nothing)


def is_fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1


def is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


FRACTION = (is_fraction, "a fraction in [0, 1]")
COUNT = (is_count, "an integer >= 0")


def fields(**tests: tuple[Callable[[Any], bool], str]) -> Check:
    """A check of a JSON object: each named field present and passing its test (extra fields pass)."""

    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"is not a JSON object (got {type(value).__name__})"
        for name, (test, what) in tests.items():
            if name not in value:
                return f"lacks {name!r}"
            if not test(value[name]):
                return f"has {name}={value[name]!r}, not {what}"
        return None

    return check


# ----------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """One cache entry: `path` = <cache_dir>/<kind>/<hash of key>."""

    kind: str
    key: Any
    path: Path
    cache_dir: Path

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def done(self) -> bool:
        return (self.path / DONE).is_file()

    def damaged(self, problem: str, fix: str | None = None) -> CacheError:
        """The error for a damaged entry: what is wrong, and how to rebuild it."""
        fix = fix or f"Delete {self.path} and rerun: the entry is rebuilt."
        err = CacheError(f"The cached {self.kind} at {self.path} {problem}. {fix}")
        err.what = f"The cached {self.kind} at {self.path} {problem}"  # without the fix: for the warning
        return err

    def read_json(self, name: str, check: Check, fix: str | None = None) -> Any:
        """The JSON file `name` of the entry, checked: a missing, unreadable or wrong one is a
        CacheError naming the entry (and `fix`, the way to rebuild it)."""
        path = self.path / name
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            raise self.damaged(f"lacks {name}", fix) from None
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise self.damaged(f"has an unreadable {name} ({err})", fix) from None
        problem = check(value)
        if problem:
            raise self.damaged(f"has a {name} that {problem}", fix)
        return value

    def verify(self) -> None:
        """done.json's files are all there with the sizes they were written with."""
        files = self.read_json(DONE, lambda v: None if isinstance(v, dict) and "files" in v else "lists no files")
        for rel, size in files["files"].items():
            path = self.path / rel
            if not path.is_file():
                raise self.damaged(f"lacks {rel}")
            if path.stat().st_size != size:
                raise self.damaged(f"has {rel} of {path.stat().st_size} bytes, not the {size} it was written with")

    def finish(self) -> None:
        """Mark the entry complete: its files become read-only (a-w) and done.json lists them."""
        files = {}
        for path in sorted(self.path.rglob("*")):
            rel = str(path.relative_to(self.path))
            if path.is_file() and rel not in _OWN and not path.name.startswith("."):
                os.chmod(path, os.stat(path).st_mode & ~0o222)
                files[rel] = path.stat().st_size
        atomic_write_text(self.path / DONE, json.dumps({"kind": self.kind, "files": files}, indent=1))
        os.chmod(self.path / DONE, 0o444)
        if (self.path / KEY).is_file():
            os.chmod(self.path / KEY, 0o444)

    def clear(self) -> None:
        """Remove everything but the key and the lock (under the lock), so the entry is built again."""
        for path in self.path.iterdir():
            if path.name in (KEY, LOCK):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def writable(self) -> bool:
        """Whether this user may write the entry (its directory, or the nearest one that exists)."""
        return _may_write(next(p for p in [self.path, *self.path.parents] if p.exists()))

    def read_only_error(self, why: str = "") -> CacheError:
        return CacheError(
            f"The {self.kind} cache entry {self.path} must be built, but paths.cache_dir={self.cache_dir} "
            f"cannot be written here{why}. Set paths.cache_dir to a writable directory (or build the entry "
            "once where the cache can be written)."
        )


def _may_write(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def entry(where: AnyConfig | str | os.PathLike, kind: str, key: Any) -> Entry:
    """The entry of `kind` made by exactly `key`, under paths.cache_dir of a config (or a cache
    directory). Looking up writes nothing: a read-only cache serves its complete entries."""
    cache_dir = Path(where if isinstance(where, (str, os.PathLike)) else where.paths.cache_dir)
    plain = key_plain(key)
    return Entry(kind, plain, cache_dir / kind / config_hash(plain), cache_dir)


def entry_at(path: str | os.PathLike) -> Entry:
    """The entry at an existing directory <cache_dir>/<kind>/<hash> (its key read back from key.json)."""
    path = Path(path)
    try:
        key = json.loads((path / KEY).read_text())
    except (OSError, ValueError):
        key = None
    return Entry(path.parent.name, key, path, path.parent.parent)


def create(e: Entry) -> Entry:
    """Make the entry's directory and record its key.json (a read-only cache: the error naming both)."""
    if not e.writable():
        raise e.read_only_error()
    try:
        e.path.mkdir(parents=True, exist_ok=True)
        if not (e.path / KEY).is_file():
            atomic_write_text(e.path / KEY, json.dumps(e.key, indent=2, sort_keys=True, default=str))
    except PermissionError as err:
        raise e.read_only_error(f" ({err.strerror})") from None
    return e


@contextlib.contextmanager
def locked(e: Entry, together: bool = False) -> Iterator[Entry]:
    """Hold the entry's lock (creating the entry and its key.json): see the lock policy above.
    With `together` under torchrun only rank 0 holds it, and every rank leaves after a barrier."""
    if together and ranks_active() and not is_main():
        try:
            yield e
        finally:
            barrier()
        return
    create(e)
    lock = FileLock(str(e.path / LOCK))
    try:
        lock.acquire()
    except PermissionError as err:
        raise e.read_only_error(f" ({err.strerror})") from None
    try:
        yield e
    finally:
        if together:
            barrier()  # nobody reads the entry before rank 0 has written it
        lock.release()


def _read_checked(e: Entry, read: Callable[[Entry], T]) -> T:
    """read(e) after done.json's check; any CheckpointError it raises is the entry's damage."""
    e.verify()
    try:
        return read(e)
    except CacheError:
        raise
    except CheckpointError as err:  # a loader's own message: the entry is named, its advice replaced
        raise e.damaged(f"cannot be read ({str(err).split('. ')[0][:300]})") from None


def rebuild_damaged(e: Entry, err: CheckpointError) -> None:
    """A damaged entry found under its lock: cleared with a warning, or (read-only) the error."""
    if not e.writable():
        raise _read_only_damage(e, err)
    warn(f"{getattr(err, 'what', err)}: building it again")
    e.clear()


def _read_only_damage(e: Entry, err: CheckpointError) -> CacheError:
    return CacheError(
        f"{err} But paths.cache_dir={e.cache_dir} is read-only for this user: ask its owner to delete the entry, "
        "or set paths.cache_dir to a writable directory."
    )


def cached(e: Entry, build: Callable[[Entry], None], read: Callable[[Entry], T], together: bool = False) -> T:
    """read(e) of the complete entry; else build(e) (which writes the entry's files) under the lock,
    mark it complete, then read(e). A damaged complete entry is rebuilt (see the module docstring)."""
    if together and ranks_active():
        return _cached_together(e, build, read)
    if e.done:
        try:
            return _read_checked(e, read)
        except CheckpointError as err:  # damaged: looked at again under the lock, and rebuilt
            if not e.writable():
                raise _read_only_damage(e, err) from None
    with locked(e):
        if e.done:
            try:
                return _read_checked(e, read)
            except CheckpointError as err:
                rebuild_damaged(e, err)
        build(e)
        e.finish()
        return _read_checked(e, read)


def cached_many(entries: list[Entry], build: Callable[[list[Entry]], None], read: Callable[[Entry], T]) -> list[T]:
    """cached() for entries built together: read(e) of each complete one; the others are locked
    (in path order, so two processes never wait on each other), looked at again, and those still
    incomplete go to one build(entries), which writes their files; each is then marked complete.
    Not for torchrun ranks that build together (see cached's `together`)."""
    values: dict[Path, T] = {}
    pending: list[Entry] = []
    for e in {e.path: e for e in entries}.values():  # one build per entry, however often it is named
        if e.done:
            try:
                values[e.path] = _read_checked(e, read)
                continue
            except CheckpointError as err:
                if not e.writable():
                    raise _read_only_damage(e, err) from None
        pending.append(e)
    with contextlib.ExitStack() as held:
        for e in sorted(pending, key=lambda e: str(e.path)):
            held.enter_context(locked(e))
        todo = []
        for e in pending:
            if e.done:
                try:
                    values[e.path] = _read_checked(e, read)
                    continue
                except CheckpointError as err:
                    rebuild_damaged(e, err)
            todo.append(e)
        if todo:
            build(todo)
            for e in todo:
                e.finish()
                values[e.path] = _read_checked(e, read)
    return [values[e.path] for e in entries]


def _cached_together(e: Entry, build: Callable[[Entry], None], read: Callable[[Entry], T]) -> T:
    """cached() for torchrun ranks that build together: rank 0 holds the lock and decides."""

    def must_build() -> bool:
        if not e.done:
            return True
        try:
            _read_checked(e, read)
            return False
        except CheckpointError as err:
            rebuild_damaged(e, err)
            return True

    with locked(e, together=True):
        if from_main(must_build):
            build(e)  # every rank; only rank 0 writes
            if is_main():
                e.finish()
    return read(e)  # after the barrier locked() ends with
