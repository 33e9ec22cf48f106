"""Reading finished runs for the report: every results.json below the given paths (with the
analyse stage's numbers merged in), the unfinished and unreadable jobs, superseded duplicates,
and the (method, IPC, seed) cells of each dataset's grid that no run covers."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Columns taken from the analyse stage's output: (column, path into the analysis dict).
ANALYSIS_COLUMNS = [
    ("proto_dist", ("prototype_distance", "synthetic")),
    ("ssim", ("ssim", "synthetic")),
    ("feat_cos", ("feature_cosine", "synthetic")),
    ("erank", ("spectrum", "synthetic", "effective_rank")),
    ("spec_slope", ("spectrum", "synthetic", "decay_slope")),
    ("fd_teacher", ("fd_teacher",)),
    ("fid", ("fid",)),
    ("hlr", ("robust", "hlr")),
    ("lrs", ("robust", "lrs")),
    ("ars", ("robust", "ars")),
]
KEY = ("dataset", "method", "ipc", "student", "protocol")
STAGE_ORDER = ("squeeze", "random", "recover", "diffusion", "relabel", "evaluate", "analyse")
# The diffusion stage's fidelity check: the teacher's top-1 accuracy on the samples, with their intended labels.
SAMPLE_ACC = ("diffusion", "teacher_acc_on_samples")


@dataclass
class Run:
    """One finished job: its directory and its results (with the analysis merged in)."""

    path: Path
    results: dict
    mtime: float
    sweep: tuple = ()  # the values of the --sweep overrides

    @property
    def analysis(self) -> dict:
        return self.results.get("analysis") or {}

    @property
    def cell(self) -> tuple:
        r = self.results
        return (r.get("dataset"), r.get("method"), r.get("ipc"), r.get("seed"))

    @property
    def split(self) -> str:
        """Where its students were scored: "val" marks a run that chose settings (evaluate.split=val)."""
        return str(self.results.get("evaluate_split") or "test")

    @property
    def identity(self) -> tuple:
        """The cell plus what was evaluated and where: runs of one cell under other protocols or students,
        or scored on another split, are not duplicates."""
        evaluated = sorted((str(s.get("name")), str(s.get("protocol"))) for s in self.results.get("students") or [])
        return (*self.cell, tuple(evaluated), self.split, self.sweep)


@dataclass
class Collected:
    runs: list[Run] = field(default_factory=list)
    incomplete: list[tuple[Path, str]] = field(default_factory=list)  # (job dir, its overrides)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    duplicates: list[Path] = field(default_factory=list)  # older runs of the same cell


def num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.inf


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    return data


def _overrides(job_dir: Path) -> str:
    """A Hydra job's command-line overrides, for listing an unfinished job."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    lines = [ln.strip()[2:] for ln in path.read_text().splitlines() if ln.strip().startswith("- ")]
    return " ".join(lines)


def override_value(results: dict, key: str) -> str:
    """The value a run's command line gave `key` (results.json "overrides"), else "default"."""
    for item in results.get("overrides") or []:
        name, _, value = str(item).partition("=")
        if name.lstrip("+") == key:
            return value
    return "default"


def load_run(results_path: Path, sweep_keys: tuple[str, ...] = ()) -> Run:
    results = _read_json(results_path)
    missing = [k for k in ("method", "dataset", "ipc", "students") if k not in results]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    analysis_path = results_path.parent / "analysis.json"
    if not results.get("analysis") and analysis_path.is_file():
        results["analysis"] = _read_json(analysis_path)
    sweep = tuple(override_value(results, k) for k in sweep_keys)
    return Run(results_path.parent, results, results_path.stat().st_mtime, sweep)


def collect(paths: list[Path], sweep_keys: tuple[str, ...] = ()) -> Collected:
    """Every run below `paths`; a newer run of the same cell, evaluation and sweep point replaces an older one."""
    out = Collected()
    seen_dirs: set[Path] = set()
    by_cell: dict[tuple, Run] = {}
    for root in paths:
        for results_path in sorted(root.rglob("results.json")):
            if results_path.parent in seen_dirs:
                continue
            seen_dirs.add(results_path.parent)
            try:
                run = load_run(results_path, sweep_keys)
            except (OSError, ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
                out.unreadable.append((results_path, str(err)))
                continue
            old = by_cell.get(run.identity)
            if old is not None:
                newer, older = (run, old) if run.mtime >= old.mtime else (old, run)
                by_cell[run.identity] = newer
                out.duplicates.append(older.path)
            else:
                by_cell[run.identity] = run
        # A Hydra job directory (it has .hydra/) without results.json did not finish (a shard's
        # job that made its share of a set, shard.json, did: another job has the results).
        for hydra_dir in sorted(root.rglob(".hydra")):
            job = hydra_dir.parent
            if job not in seen_dirs and not (job / "results.json").exists() and not (job / "shard.json").exists():
                out.incomplete.append((job, _overrides(job)))
    out.runs = sorted(by_cell.values(), key=lambda r: tuple(str(x) for x in r.identity))
    return out


def missing_cells(runs: list[Run]) -> list[tuple]:
    """(dataset, method, ipc, seed) cells of each dataset's grid (its methods x IPCs x seeds) with no run."""
    grid: dict[Any, dict[str, set]] = defaultdict(lambda: {"method": set(), "ipc": set(), "seed": set()})
    have = {r.cell for r in runs}
    for dataset, method, ipc, seed in have:
        g = grid[dataset]
        g["method"].add(method)
        g["ipc"].add(ipc)
        g["seed"].add(seed)
    missing = []
    for dataset, g in grid.items():
        for method in sorted(g["method"], key=str):
            for ipc in sorted(g["ipc"], key=num):
                for seed in sorted(g["seed"], key=num):
                    if (dataset, method, ipc, seed) not in have:
                        missing.append((dataset, method, ipc, seed))
    return sorted(missing, key=lambda c: tuple(str(x) for x in c))
