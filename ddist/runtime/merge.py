"""`python -m ddist.runtime.merge DIR`: assemble the DistilledSet of sharded recover or sampling jobs.

DIR is the work directory the jobs shared (<cache_dir>/recover/<hash>, <cache_dir>/diffusion_sample/<hash>:
the one a job's log names) or the run directory of one of the jobs (its shard.json names the work
directory). Every part must be there; the set is written to <work dir>/distilled, where a rerun
of the same command finds and reuses it. Usually not needed: the last shard to finish assembles.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ddist.errors import DdistError
from ddist.runtime.store import entry_at
from ddist.runtime.workdir import assemble


def work_dir(path: Path) -> Path:
    """The work directory DIR names (itself, or the one in a run directory's shard.json)."""
    if (path / "plan.json").is_file():
        return path
    if (path / "shard.json").is_file():
        try:
            return Path(json.loads((path / "shard.json").read_text())["work_dir"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DdistError(
                f"{path / 'shard.json'} is unreadable ({type(err).__name__}: {err}). Pass the work directory "
                "its job's log names (<cache_dir>/recover/<hash> or <cache_dir>/diffusion_sample/<hash>) instead."
            ) from None
    raise DdistError(
        f"{path} is neither a work directory (no plan.json) nor a shard job's run directory (no shard.json). "
        "Pass the directory a sharded job's log names after 'python -m ddist.runtime.merge'."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddist.runtime.merge", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a work directory, or a sharded job's run directory")
    args = parser.parse_args(argv)
    try:
        root = work_dir(args.dir)
        if entry_at(root).done:
            print(f"already assembled: {root / 'distilled'}")
            return 0
        print(f"assembled: {assemble(root)}")
    except DdistError as err:
        print(f"ddist.runtime.merge: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
