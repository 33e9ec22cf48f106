"""Writing the report: report.csv (the rows, machine-readable) and report.md (one table per
dataset, the missing runs, the cost table)."""

from __future__ import annotations

import csv
import io
import os
from datetime import date
from pathlib import Path

from ddist.report.collect import ANALYSIS_COLUMNS, KEY, STAGE_ORDER, Collected, num
from ddist.runtime.multirun import read_error

CSV_COLUMNS = [
    *KEY,
    "sweep",
    "seeds",
    "acc_mean",
    "acc_std",
    "acc_ci_low",
    "acc_ci_high",
    "split",
    "random_acc",
    "gain_pp",
    "ior",
    "gain_n",
    "gain_ci_low",
    "gain_ci_high",
    "gain_p_t",
    "gain_p_sign",
    "vs_random",
    "published",
    "published_source",
    *(name for name, _ in ANALYSIS_COLUMNS),
    "sample_acc",
    "time_s",
    "peak_mem_mb",
    "overrides",
    "runs",
]


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


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _interval(low: float | None, high: float | None, scale: float, sign: str = "") -> str:
    """The interval as "[low, high]" at one decimal (scaled), "-" without one (one seed)."""
    if low is None or high is None:
        return "-"
    return f"[{scale * low:{sign}.1f}, {scale * high:{sign}.1f}]"


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
    one_seed = row.get("seeds", 2) < 2  # one seed has no spread: a dash, not "± 0.0"
    acc = f"{_pct(row['acc_mean'])} ± {'-' if one_seed else _pct(row['acc_std'])}"
    fd = row["fid"] if row["fid"] is not None else row["fd_teacher"]
    method = str(row["method"]) + (f" ({short(row['sweep_values'])})" if row["sweep_values"] else "")
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
        _interval(row["acc_ci_low"], row["acc_ci_high"], 100),
        *_gain_cells(row),
        "-" if row.get("published") is None else _pct(row["published"]),
        _fmt(row["lrs"]),
        _fmt(row["ars"]),
        _fmt(row["proto_dist"]),
        *((UNDEFINED_AT_IPC1 if num(row["ipc"]) == 1 else _fmt(row[k])) for k in ("ssim", "feat_cos")),
        _fmt(row["erank"], 2),
        _fmt(row["spec_slope"]),
        _fmt(fd, 2),
        _pct(row["sample_acc"]),
        _fmt(row["time_s"], 1),
        _fmt(row["peak_mem_mb"], 0),
        f"`{row['overrides']}`" if row["overrides"] else "",
    ]


def _gain_cells(row: dict) -> list[str]:
    """The paired gain's interval (with the pairs' count where fewer seeds than the row's were paired),
    its p-values and the verdict; blank without a baseline."""
    if not row.get("gain_n"):
        return ["", "", "", row.get("vs_random") or "-"]
    interval = _interval(row["gain_ci_low"], row["gain_ci_high"], 1, "+")
    if row["gain_n"] != row["seeds"]:
        interval += f" (n={row['gain_n']})"
    return [interval, _p(row["gain_p_t"]), _p(row["gain_p_sign"]), str(row["vs_random"])]


# Within-class pairwise metrics (SSIM, feature cosine) need two images of a class.
UNDEFINED_AT_IPC1 = "n/a"


def short(values: dict[str, str]) -> str:
    """Sweep values labelled by the last part of their keys: "eta_dpp=10, kernel=zt"."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())


# The statistics' footnote (ddist.report.stats), in report.md under the tables' header line.
STATS_NOTE = (
    "acc 95% CI: mean ± t_{0.975,n-1} · sd/√n over the n seeds (Student's t). The gain over random real is "
    "paired by seed (each run's random-real baseline at its own seed): gain 95% CI is the t interval of the "
    "mean paired difference in points (n=k: only k seeds had a baseline), p (paired t) the two-sided paired "
    "t-test's p-value, p (sign) the exact two-sided sign test's (below 6 seeds). vs random: above / below "
    "when the gain's interval excludes 0, n.d. (not distinguishable from random real) when it covers 0; "
    "baseline: the random-real rows themselves. One seed gives no interval and no p-value (-). published %: "
    "the figure a paper states for the same dataset, method, IPC and student (conf/published.yaml; "
    "report.csv names the source), - where none is known."
)

TABLE_HEADER = [
    "method",
    "IPC",
    "student",
    "protocol",
    "seeds",
    "acc % (mean ± sd)",
    "random %",
    "gain (pp)",
    "IOR",
    "acc 95% CI",
    "gain 95% CI (pp)",
    "p (paired t)",
    "p (sign)",
    "vs random",
    "published %",
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
            "Accuracies are top-1 on the real test set, mean ± sd over seeds (sample sd, ddof=1); [val]: "
            "scored on the validation split carved from train (evaluate.split=val), i.e. a run that chose "
            "settings: report test accuracy only for the chosen setting. random %: random real images at the "
            "same IPC, seed and protocol, evaluated beside each run (else the random pipeline's runs). gain = "
            "acc - random acc (percentage points; the mean of the per-seed differences when each seed has its "
            "baseline); IOR: DD-Ranking's improvement over random, the same as a fraction. "
            + STATS_NOTE
            + " LRS/ARS: DD-Ranking scores in [0, 1] (only when `analyse.robust_scores=true`). proto dist: "
            "class-prototype cosine distance (higher = more spread; 0 by construction at IPC 1, where each "
            "image is its class's prototype); SSIM, feat cos: within-class pairwise similarity (lower = more "
            "diverse); eff. rank and spec. slope of the teacher-feature spectrum; FD: FID when Inception weights "
            "were given, else the teacher-space Frechet distance (fd_teacher). teacher acc on samples: the "
            "teacher's top-1 accuracy on a diffusion set's images with their intended labels. time: wall seconds "
            "of the whole pipeline. n/a: undefined at IPC 1 (one image per class has no within-class pairs). "
            "overrides: the command-line settings beyond the defaults that the row's runs share."
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
            for (d, m, i), c in sorted(costs.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), num(kv[0][2])))
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
