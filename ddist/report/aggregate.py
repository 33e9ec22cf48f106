"""Aggregating runs into report rows: one row per (dataset, method, IPC, student, protocol,
scored split), with the mean and std over seeds, the random-real baseline, the gain and IOR, the
analyse metrics averaged over seeds, the cost, and the overrides the row's runs share."""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ddist.report.collect import ANALYSIS_COLUMNS, KEY, SAMPLE_ACC, Run, num
from ddist.report.stats import paired, summarize


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
        acc = summarize(accs)  # the 95% t interval over seeds (None at one seed)
        row["acc_ci_low"], row["acc_ci_high"], row["acc_ci_half"] = acc.low, acc.high, acc.half_width
        # (seed, accuracy, the baseline that run evaluated beside its set), paired below
        row["by_seed"] = [
            (run.results.get("seed"), a, s.get("baseline_acc_mean")) for (run, s), a in zip(members, accs, strict=True)
        ]
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
    random_acc = {_baseline_cell(r): r["acc_mean"] for r in rows if r["method"] == "random"}
    random_by_seed = {
        (_baseline_cell(r), seed): a for r in rows if r["method"] == "random" for seed, a, _ in r["by_seed"]
    }
    for row in rows:
        base = row.pop("own_random_acc")
        if base is None:
            base = random_acc.get(_baseline_cell(row))
        row["random_acc"] = base
        # DD-Ranking's IOR = Acc(syn) - Acc(random real, same protocol) (ddist.training.baseline),
        # and the same in points
        row["ior"] = None if base is None else row["acc_mean"] - base
        row["gain_pp"] = None if base is None else 100 * row["ior"]
        pairs = [
            (a, b if b is not None else random_by_seed.get((_baseline_cell(row), seed)))
            for seed, a, b in row.pop("by_seed")
        ]
        row.update(_paired_columns(row, [(a, b) for a, b in pairs if b is not None]))
    # Random first within each IPC: it is the baseline the other rows are read against.
    return sorted(
        rows,
        key=lambda r: (
            str(r["dataset"]),
            num(r["ipc"]),
            str(r["student"]),
            str(r["protocol"]),
            r["split"],
            r["method"] != "random",
            str(r["method"]),
            *((num(v), str(v)) for v in r["sweep_values"].values()),
        ),
    )


def _baseline_cell(row: dict) -> tuple:
    return (row["dataset"], row["ipc"], row["student"], row["protocol"], row["split"])


GAIN_COLUMNS = ("gain_n", "gain_ci_low", "gain_ci_high", "gain_p_t", "gain_p_sign", "vs_random")


def _paired_columns(row: dict, pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """The gain over random real paired by seed (ddist.report.stats): the seeds paired, the 95% t interval of
    the mean difference (points), the paired t-test's and (few seeds) the sign test's p-values, and
    whether the interval lies above 0, below it, or covers it ("n.d."). With every seed paired the mean
    difference is gain_pp; the random pipeline's own rows are the baseline itself."""
    out: dict[str, Any] = dict.fromkeys(GAIN_COLUMNS)
    out["gain_n"], out["vs_random"] = len(pairs), "-"
    if row["method"] == "random":
        out["vs_random"] = "baseline"
        return out
    if not pairs:
        return out
    gain = paired([a for a, _ in pairs], [b for _, b in pairs])
    if len(pairs) == row["seeds"]:
        row["gain_pp"], row["ior"] = gain.diff.mean, gain.diff.mean / 100
    out |= {"gain_ci_low": gain.diff.low, "gain_ci_high": gain.diff.high, "gain_p_t": gain.t_p}
    out |= {"gain_p_sign": gain.sign_p, "vs_random": gain.verdict}
    return out


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
