"""The report's plots (accuracy against IPC, a sweep's metrics against its first key) and its
W&B run."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ddist.report.collect import num
from ddist.report.render import CSV_COLUMNS, short
from ddist.utils import safe_name


def _save(fig, path: Path, dpi: int = 120) -> Path:
    """Lay the figure out, write it to path and close it; return path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_accuracy_vs_ipc(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """One PNG per dataset: accuracy (%) against IPC (log axis), error bars = the 95% t interval's
    half-width over seeds (t_{0.975,n-1} · sd/√n; none at one seed)."""
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
            pts.sort(key=lambda r: num(r["ipc"]))
            style = "--" if pts[0]["method"] == "random" else "-"
            ax.errorbar(
                [r["ipc"] for r in pts],
                [100 * r["acc_mean"] for r in pts],
                yerr=[100 * (r.get("acc_ci_half") or 0) for r in pts],
                fmt=style + "o",
                capsize=3,
                label=label,
            )
        ax.set_xscale("log")
        ipcs = sorted({num(r["ipc"]) for r in subset} - {math.inf})
        ax.set_xticks(ipcs, [f"{i:g}" for i in ipcs], minor=False)  # the measured IPCs, not powers of ten
        ax.set_xticks([], minor=True)
        ax.set_xlabel("images per class")
        ax.set_ylabel("test accuracy (%), mean and 95% CI over seeds")
        ax.set_title(f"{dataset}: accuracy vs IPC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="error bars: 95% t interval", title_fontsize=7)
        plots[dataset] = _save(fig, out_dir / f"acc_vs_ipc_{safe_name(str(dataset))}.png")
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
        subset = [r for r in rows if r["dataset"] == dataset and math.isfinite(num(r["sweep_values"][x_key]))]
        if not subset:
            continue
        lines: dict[str, list[dict]] = defaultdict(list)
        several = len({(r["student"], r["protocol"]) for r in subset}) > 1
        for r in subset:
            others = {k: v for k, v in r["sweep_values"].items() if k != x_key}
            label = " ".join(
                [
                    str(r["method"]),
                    *([short(others)] if others else []),
                    *([f"({r['student']}, {r['protocol']})"] if several else []),
                ]
            )
            lines[label].append(r)
        # a panel only for a column some row has (recover runs have no teacher accuracy on samples)
        drawn = [p for p in panels if any(r.get(p[0]) is not None for r in subset)] or panels[2:3]
        fig, axes = plt.subplots(1, len(drawn), figsize=(4 * len(drawn), 3.5), squeeze=False)
        xs = sorted({num(r["sweep_values"][x_key]) for r in subset})
        positive = [x for x in xs if x > 0]
        for ax, (column, title, scale) in zip(axes[0], drawn, strict=True):
            for label, pts in sorted(lines.items()):
                pts = sorted((p for p in pts if p[column] is not None), key=lambda p: num(p["sweep_values"][x_key]))
                ax.plot(
                    [num(p["sweep_values"][x_key]) for p in pts], [scale * p[column] for p in pts], "o-", label=label
                )
            if positive:
                ax.set_xscale("symlog", linthresh=min(positive))
            ax.set_xticks(xs, [f"{x:g}" for x in xs], minor=False)  # the swept values (symlog drops its labels)
            ax.set_xticks([], minor=True)
            ax.set_xlabel(x_key.rsplit(".", 1)[-1])
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{dataset}: sweep over {x_key}", fontsize=9)
        plots[dataset] = _save(fig, out_dir / f"sweep_{safe_name(str(dataset))}.png")
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
