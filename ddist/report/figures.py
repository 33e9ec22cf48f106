"""The analyse stage's figures (image grid, feature spectrum, prototype distances) and its
logging to the run's logger (headline, per-class tables, the figures)."""

from __future__ import annotations

from pathlib import Path

import torch

from ddist.metrics import covariance
from ddist.metrics.analysis import headline

# The image grid shows at most this many classes (rows) and images per class (columns).
GRID_CLASSES, GRID_IMAGES = 20, 10


def run_title(cfg) -> str:
    """What a figure shows the run as: method, dataset, IPC and seed."""
    return f"{cfg.pipeline.name} on {cfg.dataset.name}, IPC {cfg.ipc}, seed {cfg.seed}"


def draw_figures(out_dir: Path, syn_x, syn_y, spec, analysis: dict, run: str = "") -> list[Path]:
    """The figures, each titled with its content and `run` (run_title) beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return [
        grid_figure(plt, out_dir / "grid.png", spec.denormalize(syn_x).clamp(0, 1), syn_y, spec.classes, run),
        spectrum_figure(plt, out_dir / "spectrum.png", analysis["spectrum"], run),
        prototype_figure(plt, out_dir / "prototype_distance.png", analysis["prototype_distance"], spec.classes, run),
    ]


def _titled(title: str, run: str) -> str:
    return f"{title}\n{run}" if run else title


def grid_figure(plt, path: Path, images01: torch.Tensor, labels: torch.Tensor, classes, run: str = "") -> Path:
    """One row per class (the first GRID_CLASSES), up to GRID_IMAGES images each."""
    shown = [c for c in range(len(classes)) if (labels == c).any()][:GRID_CLASSES]
    cols = min(GRID_IMAGES, max(int((labels == c).sum()) for c in shown))
    _, channels, h, w = images01.shape
    pad = 1
    canvas = torch.ones(channels, len(shown) * (h + pad), cols * (w + pad))
    for r, c in enumerate(shown):
        for j, img in enumerate(images01[labels == c][:cols]):
            canvas[:, r * (h + pad) : r * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = img
    fig, ax = plt.subplots(figsize=(max(3, cols * 0.8), max(2, len(shown) * 0.8)))
    array = canvas.permute(1, 2, 0).numpy()
    ax.imshow(
        array[..., 0] if channels == 1 else array,
        cmap="gray" if channels == 1 else None,
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    ax.set_yticks([r * (h + pad) + h / 2 for r in range(len(shown))], [str(classes[c]) for c in shown])
    ax.set_xticks([])
    ax.set_title(_titled("distilled images per class", run), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finish_figure(plt, fig, ax, title: str, path: Path) -> Path:
    """Title, legend, save as PNG and release the figure."""
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def spectrum_figure(plt, path: Path, spectra: dict, run: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label, style in (
        ("real", "real (subsample)", ":"),
        ("real_same_ipc", "real, same IPC", "--"),
        ("synthetic", "synthetic", "-"),
    ):
        s = spectra[key]["normalized_singular_values"]
        if s:
            ax.plot(
                range(1, len(s) + 1),
                s,
                style,
                label=f"{label}: erank {spectra[key]['effective_rank']:.1f}, slope {spectra[key]['decay_slope']:.2f}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i / sigma_1")
    return finish_figure(plt, fig, ax, _titled("teacher-feature spectrum", run), path)


def prototype_figure(plt, path: Path, pd: dict, classes, run: str = "") -> Path:
    import numpy as np

    syn = np.array([np.nan if v is None else v for v in pd["synthetic_per_class"]])
    real = np.array([np.nan if v is None else v for v in pd["real_same_ipc_per_class"]])
    shown = np.arange(min(len(classes), GRID_CLASSES * 5))  # bars stay readable up to ~100 classes
    fig, ax = plt.subplots(figsize=(max(5, len(shown) * 0.35), 3.5))
    ax.bar(shown - 0.2, syn[shown], width=0.4, label=f"synthetic (mean {pd['synthetic']:.3f})")
    ax.bar(shown + 0.2, real[shown], width=0.4, label=f"real, same IPC (mean {pd['real_same_ipc']:.3f})")
    ax.set_xticks(shown, [str(classes[c]) for c in shown], rotation=90 if len(shown) > 10 else 0, fontsize=7)
    ax.set_ylabel("1 - cos(f, class centre)")
    title = "class-prototype cosine distance" + (" (0 at IPC 1: each image is its prototype)" if "note" in pd else "")
    return finish_figure(plt, fig, ax, _titled(title, run), path)


def log_analysis(logger, analysis: dict, spec, run_dir: Path) -> None:
    logger.log({f"analyse/{k}": v for k, v in headline(analysis).items()})
    pd, ssim, cos = analysis["prototype_distance"], analysis["ssim"], analysis["feature_cosine"]
    rows = [
        [
            str(name),
            pd["synthetic_per_class"][c],
            pd["real_same_ipc_per_class"][c],
            ssim["synthetic_per_class"][c],
            ssim["real_same_ipc_per_class"][c],
            cos["synthetic_per_class"][c],
            cos["real_same_ipc_per_class"][c],
        ]
        for c, name in enumerate(spec.classes)
    ]
    logger.log_table(
        "analyse/per_class",
        [
            "class",
            "proto_dist_synthetic",
            "proto_dist_real_same_ipc",
            "ssim_synthetic",
            "ssim_real_same_ipc",
            "feature_cosine_synthetic",
            "feature_cosine_real_same_ipc",
        ],
        rows,
    )
    cov = analysis["covariance"]
    figures = covariance.FIGURES
    logger.log_table(
        "analyse/covariance_per_class",
        ["class", *(f"{k}_{side}" for side in ("synthetic", "real_same_ipc") for k in figures)],
        [
            [str(name), *(cov[side][f"{k}_per_class"][c] for side in ("synthetic", "real_same_ipc") for k in figures)]
            for c, name in enumerate(spec.classes)
        ],
    )
    for rel in analysis.get("figures", []):
        logger.log_image(f"analyse/{Path(rel).stem}", run_dir / rel)
