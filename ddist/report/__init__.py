"""Build the method-comparison table from finished runs.

    python -m ddist.report PATH... [--out DIR] [--sweep KEY...] [--wandb]

PATH is a run directory, a Hydra multirun directory or any folder above them: every
results.json below it is read (with the analyse stage's numbers, from results.json's
"analysis" section or an analysis.json beside it). Writes into DIR (default: the first
PATH):

    report.md                  one table per dataset, the missing runs, the cost table
    report.csv                 the same rows, machine-readable (accuracies as fractions)
    acc_vs_ipc_<dataset>.png   accuracy versus IPC, one line per method/student/protocol (error bars:
                               the 95% t interval over seeds)
    sweep_<dataset>.png        with --sweep: SSIM, spectrum slope, student accuracy and the teacher's
                               accuracy on the samples against the first KEY, one line per value of the others

A row is one (dataset, method, IPC, student, protocol, scored split): the seeds n, accuracy
mean +- sd over seeds (sample sd, ddof=1, of the per-seed means) and its 95% interval from
Student's t (mean +- t_{0.975,n-1} sd/sqrt(n); none at n = 1), the random-real accuracy under
the same protocol and IPC (the baseline each run evaluated beside its set, else the random
pipeline's runs), the gain in points and IOR = acc - random acc, the gain paired by seed (its
95% t interval, the paired t-test's p-value, below 6 seeds the exact sign test's, and "vs
random": above, below, or n.d. when the interval covers 0; ddist/report/stats.py), the
published figure for the same dataset, method, IPC and student (conf/published.yaml), the
analyse metrics averaged over seeds, and the cost. Rows scored on the validation split
(evaluate.split=val) are marked [val]: they chose settings and are no test result. Missing
runs are listed, never fatal: a Hydra job directory without results.json, and any
(method, IPC, seed) of a dataset's grid that no run covers. Paths in the report are
relative to DIR, so a report and its runs can move to another machine together.

--sweep KEY... names Hydra overrides that vary across the runs (e.g.
diffusion.sample.cgs.eta_dpp diffusion.sample.cgs.kernel): runs that differ in them are
different rows (the method column shows the values), not duplicates. A run that does not set
KEY on its command line has the value "default".

collect.py reads the runs, aggregate.py makes the rows (stats.py: the intervals and tests;
published.py: the published figures), render.py writes report.md and
report.csv, plots.py draws the plots (and logs to W&B); figures.py draws the analyse stage's
per-run figures.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ddist.report.aggregate import build_rows, stage_costs
from ddist.report.collect import Collected, collect, missing_cells, override_value
from ddist.report.plots import log_wandb, plot_accuracy_vs_ipc, plot_sweep
from ddist.report.published import PUBLISHED, add_published, load_published
from ddist.report.render import write_csv, write_markdown
from ddist.utils import safe_name

__all__ = ["build_report", "collect", "main", "override_value"]


def build_report(
    paths: list[Path], out_dir: Path, sweep_keys: tuple[str, ...] = (), published: Path = PUBLISHED
) -> tuple[list[dict], Collected, list[tuple]]:
    """Read the runs, write report.md, report.csv and the plots into out_dir; return what was written.
    published: the published-results file whose figures stand beside the rows'."""
    out_dir.mkdir(parents=True, exist_ok=True)
    collected = collect(paths, sweep_keys)
    rows = build_rows(collected.runs, out_dir, sweep_keys)
    add_published(rows, load_published(published))
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
    if not any(next(p.rglob("results.json"), None) or next(p.rglob(".hydra"), None) for p in args.paths):
        print(
            f"error: no runs under {', '.join(str(p) for p in args.paths)} (no results.json and no Hydra job "
            "directory with .hydra/ below it); give the run or multirun directories that ddist wrote.",
            file=sys.stderr,
        )
        return 2
    out_dir = args.out or args.paths[0]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(
            f"error: cannot write the report into {out_dir} ({err.strerror or err}); "
            "set --out to a directory that can be created (not a file, nor a path under one).",
            file=sys.stderr,
        )
        return 2
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
