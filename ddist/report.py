"""Build the method-comparison table from finished runs.

    python -m ddist.report PATH... [--out DIR] [--sweep KEY...] [--wandb]

PATH is a run directory, a Hydra multirun directory or any folder above them: every
results.json below it is read (with the analyse stage's numbers, from results.json's
"analysis" section or an analysis.json beside it). Writes into DIR (default: the first
PATH):

    report.md                  one table per dataset, the missing runs, the cost table
    report.csv                 the same rows, machine-readable (accuracies as fractions)
    acc_vs_ipc_<dataset>.png   accuracy versus IPC, one line per method/student/protocol
    sweep_<dataset>.png        with --sweep: SSIM, spectrum slope, student accuracy and the teacher's
                               accuracy on the samples against the first KEY, one line per value of the others

A row is one (dataset, method, IPC, student, protocol, scored split): accuracy mean +- std
over seeds (std of the per-seed means), the random-real accuracy under the same protocol and
IPC (the baseline each run evaluated beside its set, else the random pipeline's runs), the
gain in points and IOR = acc - random acc, the analyse metrics averaged over seeds, and the
cost. Rows scored on the validation split (evaluate.split=val) are marked [val]: they chose
settings and are no test result. Missing
runs are listed, never fatal: a Hydra job directory without results.json, and any
(method, IPC, seed) of a dataset's grid that no run covers. Paths in the report are
relative to DIR, so a report and its runs can move to another machine together.

--sweep KEY... names Hydra overrides that vary across the runs (e.g.
diffusion.sample.cgs.eta_dpp diffusion.sample.cgs.kernel): runs that differ in them are
different rows (the method column shows the values), not duplicates. A run that does not set
KEY on its command line has the value "default".
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from ddist.sweep import read_error
from ddist.utils import safe_name

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
CSV_COLUMNS = [
    *KEY,
    "sweep",
    "seeds",
    "acc_mean",
    "acc_std",
    "split",
    "random_acc",
    "gain_pp",
    "ior",
    *(name for name, _ in ANALYSIS_COLUMNS),
    "sample_acc",
    "time_s",
    "peak_mem_mb",
    "overrides",
    "runs",
]


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


# ----------------------------------------------------------------------------- reading runs


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
            for ipc in sorted(g["ipc"], key=_num):
                for seed in sorted(g["seed"], key=_num):
                    if (dataset, method, ipc, seed) not in have:
                        missing.append((dataset, method, ipc, seed))
    return sorted(missing, key=lambda c: tuple(str(x) for x in c))


# ----------------------------------------------------------------------------- aggregation


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.inf


def _dig(d: Any, path: tuple) -> float | None:  # a nested dict, walked down to a leaf
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(vals) if vals else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def _peak_memory_mb(run: Run) -> float | None:
    """The largest per-stage peak memory the pipeline recorded (RSS on CPU, CUDA allocator on GPU), MiB."""
    memory = run.results.get("peak_memory_mb") or run.analysis.get("cost", {}).get("peak_memory_mb") or {}
    peaks = [float(v) for v in memory.values() if isinstance(v, (int, float))]
    return max(peaks) if peaks else None


def _total_time(run: Run) -> float | None:
    timings = run.results.get("timings") or {}
    values = [float(v) for v in timings.values() if isinstance(v, (int, float))]
    return sum(values) if values else None


def build_rows(runs: list[Run], relative_to: Path, sweep_keys: tuple[str, ...] = ()) -> list[dict]:
    """One row per (dataset, method, IPC, student, protocol, scored split, sweep point), seeds aggregated."""
    groups: dict[tuple, list[tuple[Run, dict]]] = defaultdict(list)
    for run in runs:
        r = run.results
        for student in r.get("students") or []:
            cell = (r["dataset"], r["method"], r["ipc"], student.get("name"), student.get("protocol"))
            groups[(*cell, run.split, run.sweep)].append((run, student))
    rows = []
    for (*key, split, sweep), members in groups.items():
        accs = [float(s["acc_mean"]) if "acc_mean" in s else statistics.fmean(s["accs"]) for _, s in members]
        row: dict[str, Any] = dict(zip(KEY, key, strict=False))
        row["sweep"] = " ".join(f"{k}={v}" for k, v in zip(sweep_keys, sweep, strict=False))
        row["sweep_values"] = dict(zip(sweep_keys, sweep, strict=False))
        row["split"] = split
        row["seeds"] = len(members)
        # the random-real baseline each run evaluated beside its set (evaluate.baseline=random)
        bases = [float(s["baseline_acc_mean"]) for _, s in members if s.get("baseline_acc_mean") is not None]
        row["own_random_acc"] = statistics.fmean(bases) if len(bases) == len(members) else None
        row["acc_mean"] = statistics.fmean(accs)
        row["acc_std"] = _std(accs)
        for name, path in ANALYSIS_COLUMNS:
            row[name] = _mean([_dig(run.analysis, path) for run, _ in members])
        row["sample_acc"] = _mean([_dig(run.results, SAMPLE_ACC) for run, _ in members])
        row["time_s"] = _mean([_total_time(run) for run, _ in members])
        peaks = [p for p in (_peak_memory_mb(run) for run, _ in members) if p is not None]
        row["peak_mem_mb"] = max(peaks) if peaks else None
        row["runs"] = ";".join(sorted(os.path.relpath(run.path, relative_to) for run, _ in members))
        row["overrides"] = " ".join(row_overrides([run for run, _ in members], sweep_keys))
        rows.append(row)
    # runs made before the baseline ran beside every result: the random pipeline's rows of the same cell
    random_acc = {
        (r["dataset"], r["ipc"], r["student"], r["protocol"], r["split"]): r["acc_mean"]
        for r in rows
        if r["method"] == "random"
    }
    for row in rows:
        base = row.pop("own_random_acc")
        if base is None:
            base = random_acc.get((row["dataset"], row["ipc"], row["student"], row["protocol"], row["split"]))
        row["random_acc"] = base
        # DD-Ranking's IOR = Acc(syn) - Acc(random real, same protocol) (ddist.baseline), and the same in points
        row["ior"] = None if base is None else row["acc_mean"] - base
        row["gain_pp"] = None if base is None else 100 * row["ior"]
    # Random first within each IPC: it is the baseline the other rows are read against.
    return sorted(
        rows,
        key=lambda r: (
            str(r["dataset"]),
            _num(r["ipc"]),
            str(r["student"]),
            str(r["protocol"]),
            r["split"],
            r["method"] != "random",
            str(r["method"]),
            *((_num(v), str(v)) for v in r["sweep_values"].values()),
        ),
    )


# Overrides the row's own columns already say (and paths, which differ by machine).
IDENTITY_KEYS = ("pipeline", "dataset", "ipc", "seed", "experiment")
IGNORED_PREFIXES = ("paths.", "hydra.", "logger", "dataset.root", "dataset.format", "threads")


def row_overrides(runs: list[Run], sweep_keys: tuple[str, ...]) -> list[str]:
    """The command-line overrides, beyond the defaults, that every run of a row shares and that
    its columns do not already show (e.g. `recover.iterations=150`)."""
    shared = None
    for run in runs:
        mine = {o for o in run.results.get("overrides") or [] if isinstance(o, str)}
        shared = mine if shared is None else shared & mine
    keep = []
    for override in sorted(shared or ()):
        key = override.split("=", 1)[0].lstrip("+~")
        if key in IDENTITY_KEYS or key in sweep_keys or key.startswith(IGNORED_PREFIXES):
            continue
        keep.append(override)
    return keep


def stage_costs(runs: list[Run]) -> dict[tuple, dict[str, float]]:
    """Mean seconds per stage over seeds, per (dataset, method, IPC)."""
    acc: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        d, m, ipc, _ = run.cell
        for stage, secs in (run.results.get("timings") or {}).items():
            if isinstance(secs, (int, float)):
                acc[(d, m, ipc)][stage].append(float(secs))
    return {k: {s: statistics.fmean(v) for s, v in stages.items()} for k, stages in acc.items()}


# ----------------------------------------------------------------------------- writing


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _gain(points: float | None) -> str:
    return "" if points is None else f"{points:+.1f}"


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return ""
    if abs(x) < 0.5 * 10**-digits:
        x = 0.0  # no "-0.000" for a value that rounds to zero
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    path.write_text(buf.getvalue())


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def table_cells(row: dict) -> list[str]:
    acc = f"{_pct(row['acc_mean'])} ± {_pct(row['acc_std'])}"
    fd = row["fid"] if row["fid"] is not None else row["fd_teacher"]
    method = str(row["method"]) + (f" ({_short(row['sweep_values'])})" if row["sweep_values"] else "")
    if row["split"] == "val":
        method += " [val]"  # chose settings on the validation split: not a test result
    return [
        method,
        str(row["ipc"]),
        str(row["student"]),
        str(row["protocol"]),
        str(row["seeds"]),
        acc,
        _pct(row["random_acc"]),
        _gain(row["gain_pp"]),
        _fmt(row["ior"]),
        _fmt(row["lrs"]),
        _fmt(row["ars"]),
        _fmt(row["proto_dist"]),
        *((UNDEFINED_AT_IPC1 if _num(row["ipc"]) == 1 else _fmt(row[k])) for k in ("ssim", "feat_cos")),
        _fmt(row["erank"], 2),
        _fmt(row["spec_slope"]),
        _fmt(fd, 2),
        _pct(row["sample_acc"]),
        _fmt(row["time_s"], 1),
        _fmt(row["peak_mem_mb"], 0),
        f"`{row['overrides']}`" if row["overrides"] else "",
    ]


# Within-class pairwise metrics (SSIM, feature cosine) need two images of a class.
UNDEFINED_AT_IPC1 = "n/a"


def _short(values: dict[str, str]) -> str:
    """Sweep values labelled by the last part of their keys: "eta_dpp=10, kernel=zt"."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())


TABLE_HEADER = [
    "method",
    "IPC",
    "student",
    "protocol",
    "seeds",
    "acc % (mean ± std)",
    "random %",
    "gain (pp)",
    "IOR",
    "LRS",
    "ARS",
    "proto dist",
    "SSIM",
    "feat cos",
    "eff. rank",
    "spec. slope",
    "FD",
    "teacher acc on samples %",
    "time s",
    "peak MiB",
    "overrides",
]


def write_markdown(
    path: Path,
    rows: list[dict],
    collected: Collected,
    missing: list[tuple],
    costs: dict[tuple, dict[str, float]],
    plots: dict[str, Path],
    inputs: list[str],
    sweep_plots: dict[str, Path],
) -> None:
    out = [
        f"# ddist report ({date.today().isoformat()})",
        "",
        f"Runs read: {len(collected.runs)} from {', '.join(inputs)}.",
        "",
        (
            "Accuracies are top-1 on the real test set, mean ± std over seeds; [val]: scored on the validation "
            "split carved from train (evaluate.split=val), i.e. a run that chose settings: report test accuracy "
            "only for the chosen setting. random %: random real images at the same IPC, seed and protocol, "
            "evaluated beside each run (else the random pipeline's runs). gain = acc - random acc (percentage "
            "points); IOR: DD-Ranking's improvement over random, the same as a fraction. LRS/ARS: DD-Ranking "
            "scores in [0, 1] (only when `analyse.robust_scores=true`). proto dist: class-prototype cosine "
            "distance (higher = more spread); "
            "SSIM, feat cos: within-class pairwise similarity (lower = more diverse); eff. rank and spec. slope of "
            "the teacher-feature spectrum; FD: FID when Inception weights were given, else the teacher-space "
            "Frechet distance (fd_teacher). teacher acc on samples: the teacher's top-1 accuracy on a diffusion "
            "set's images with their intended labels. time: wall seconds of the whole pipeline. n/a: undefined at "
            "IPC 1 (one image per class has no within-class pairs). overrides: the command-line settings beyond "
            "the defaults that the row's runs share."
        ),
    ]
    for dataset in sorted({r["dataset"] for r in rows}, key=str):
        subset = [r for r in rows if r["dataset"] == dataset]
        out += ["", f"## {dataset}", "", markdown_table(TABLE_HEADER, [table_cells(r) for r in subset])]
        if dataset in plots:
            out += ["", f"![accuracy vs IPC, {dataset}]({plots[dataset].name})"]
        if dataset in sweep_plots:
            out += ["", f"![sweep, {dataset}]({sweep_plots[dataset].name})"]
    if costs:
        seen = {s for c in costs.values() for s in c}
        stages = [s for s in STAGE_ORDER if s in seen] + sorted(seen - set(STAGE_ORDER))
        body = [
            [str(d), str(m), str(i), *(_fmt(c.get(s), 1) for s in stages)]
            for (d, m, i), c in sorted(costs.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), _num(kv[0][2])))
        ]
        out += [
            "",
            "## Cost (mean wall seconds per stage)",
            "",
            markdown_table(["dataset", "method", "IPC", *stages], body),
        ]
    out += ["", "## Missing runs", ""]
    if not (missing or collected.incomplete or collected.unreadable):
        out.append("None: every (method, IPC, seed) of each dataset's grid has a result.")
    for dataset, method, ipc, seed in missing:
        out.append(f"- no run for dataset={dataset} method={method} ipc={ipc} seed={seed}")
    for job, overrides in collected.incomplete:
        where = f"`{os.path.relpath(job, path.parent)}` {overrides}".rstrip()
        error = read_error(job)
        if error is None:
            out.append(f"- unfinished job (no results.json): {where}")
        else:
            out.append(f"- failed job: {where}: {error['message'].splitlines()[0].removeprefix('ddist: error: ')}")
    for file, why in collected.unreadable:
        out.append(f"- unreadable: `{os.path.relpath(file, path.parent)}` ({why})")
    if collected.duplicates:
        out += [
            "",
            "Older runs of the same cell, superseded by a newer one: "
            + ", ".join(f"`{os.path.relpath(p, path.parent)}`" for p in collected.duplicates),
        ]
    path.write_text("\n".join(out) + "\n")


def plot_accuracy_vs_ipc(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """One PNG per dataset: accuracy (%) against IPC (log axis), error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    for dataset in sorted({r["dataset"] for r in rows}, key=str):
        subset = [r for r in rows if r["dataset"] == dataset]
        lines: dict[str, list[dict]] = defaultdict(list)
        several = len({(r["student"], r["protocol"]) for r in subset}) > 1
        for r in subset:
            label = f"{r['method']} ({r['student']}, {r['protocol']})" if several else str(r["method"])
            lines[label].append(r)
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in sorted(lines.items()):
            pts.sort(key=lambda r: _num(r["ipc"]))
            style = "--" if pts[0]["method"] == "random" else "-"
            ax.errorbar(
                [r["ipc"] for r in pts],
                [100 * r["acc_mean"] for r in pts],
                yerr=[100 * (r["acc_std"] or 0) for r in pts],
                fmt=style + "o",
                capsize=3,
                label=label,
            )
        ax.set_xscale("log")
        ipcs = sorted({_num(r["ipc"]) for r in subset} - {math.inf})
        ax.set_xticks(ipcs, [f"{i:g}" for i in ipcs], minor=False)  # the measured IPCs, not powers of ten
        ax.set_xticks([], minor=True)
        ax.set_xlabel("images per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset}: accuracy vs IPC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"acc_vs_ipc_{safe_name(str(dataset))}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        plots[dataset] = path
    return plots


def plot_sweep(rows: list[dict], sweep_keys: tuple[str, ...], out_dir: Path) -> dict[str, Path]:
    """One PNG per dataset: SSIM, spectrum slope, student accuracy and teacher accuracy on the samples
    against the first sweep key (symlog axis: 0 is a sweep point), one line per (method, other sweep
    values, student, protocol)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, plots = sweep_keys[0], {}
    panels = [
        ("ssim", "within-class SSIM", 1),
        ("spec_slope", "feature spectrum decay slope", 1),
        ("acc_mean", "student accuracy (%)", 100),
        ("sample_acc", "teacher accuracy on samples (%)", 100),
    ]
    for dataset in sorted({r["dataset"] for r in rows}, key=str):
        subset = [r for r in rows if r["dataset"] == dataset and math.isfinite(_num(r["sweep_values"][x_key]))]
        if not subset:
            continue
        lines: dict[str, list[dict]] = defaultdict(list)
        several = len({(r["student"], r["protocol"]) for r in subset}) > 1
        for r in subset:
            others = {k: v for k, v in r["sweep_values"].items() if k != x_key}
            label = " ".join(
                [
                    str(r["method"]),
                    *([_short(others)] if others else []),
                    *([f"({r['student']}, {r['protocol']})"] if several else []),
                ]
            )
            lines[label].append(r)
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
        positive = [_num(r["sweep_values"][x_key]) for r in subset if _num(r["sweep_values"][x_key]) > 0]
        for ax, (column, title, scale) in zip(axes, panels, strict=False):
            for label, pts in sorted(lines.items()):
                pts = sorted((p for p in pts if p[column] is not None), key=lambda p: _num(p["sweep_values"][x_key]))
                ax.plot(
                    [_num(p["sweep_values"][x_key]) for p in pts], [scale * p[column] for p in pts], "o-", label=label
                )
            if positive:
                ax.set_xscale("symlog", linthresh=min(positive))
            ax.set_xlabel(x_key.rsplit(".", 1)[-1])
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{dataset}: sweep over {x_key}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"sweep_{safe_name(str(dataset))}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        plots[dataset] = path
    return plots


def log_wandb(rows: list[dict], plots: dict[str, Path], out_dir: Path, project: str, mode: str) -> None:
    """The table (and plots) as one W&B run of job_type "report"."""
    import wandb

    # mode is a command-line string, which wandb.init validates itself; wandb types it as a Literal
    run = wandb.init(project=project, mode=mode, dir=str(out_dir), job_type="report", name=f"report-{out_dir.name}")  # type: ignore[arg-type]
    # wandb annotates columns as list[str | int], which an (invariant) list[str] is not
    table = wandb.Table(columns=CSV_COLUMNS, data=[[row.get(c) for c in CSV_COLUMNS] for row in rows])  # type: ignore[arg-type]
    run.log({"report/table": table, **{f"report/acc_vs_ipc/{d}": wandb.Image(str(p)) for d, p in plots.items()}})
    run.finish()


# ----------------------------------------------------------------------------- entry point


def build_report(
    paths: list[Path], out_dir: Path, sweep_keys: tuple[str, ...] = ()
) -> tuple[list[dict], Collected, list[tuple]]:
    """Read the runs, write report.md, report.csv and the plots into out_dir; return what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    collected = collect(paths, sweep_keys)
    rows = build_rows(collected.runs, out_dir, sweep_keys)
    missing = missing_cells(collected.runs)
    plots = plot_accuracy_vs_ipc(rows, out_dir) if rows else {}
    sweep_plots = plot_sweep(rows, sweep_keys, out_dir) if rows and sweep_keys else {}
    write_csv(rows, out_dir / "report.csv")
    inputs = [os.path.relpath(p, out_dir) for p in paths]
    write_markdown(
        out_dir / "report.md", rows, collected, missing, stage_costs(collected.runs), plots, inputs, sweep_plots
    )
    return rows, collected, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddist.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or multirun directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the first PATH)")
    parser.add_argument(
        "--sweep",
        nargs="+",
        default=[],
        metavar="KEY",
        help="overrides that vary across the runs; the first is the x axis of sweep_<dataset>.png",
    )
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B")
    parser.add_argument("--wandb-project", default="ddist")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online"])
    args = parser.parse_args(argv)
    for p in args.paths:
        if not p.is_dir():
            print(f"error: {p} is not a directory; give run or multirun directories.", file=sys.stderr)
            return 2
    out_dir = args.out or args.paths[0]
    rows, collected, missing = build_report(args.paths, out_dir, tuple(args.sweep))
    if args.wandb:
        plots = {r["dataset"]: out_dir / f"acc_vs_ipc_{safe_name(str(r['dataset']))}.png" for r in rows}
        log_wandb(rows, plots, out_dir, args.wandb_project, args.wandb_mode)
    n_missing = len(missing) + len(collected.incomplete) + len(collected.unreadable)
    print(
        f"{len(collected.runs)} runs -> {len(rows)} rows; {n_missing} missing or unfinished; "
        f"wrote {out_dir / 'report.md'} and {out_dir / 'report.csv'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
