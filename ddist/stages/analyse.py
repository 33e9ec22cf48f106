"""Analyse: measure the DistilledSet against the real data, draw its figures, collect its cost.

Recipe: load the set, the teacher and a class-balanced random real subsample
(`analyse.real_samples_per_class` per class, an independent seeded draw); embed both with
the teacher's penultimate features; compute

- class-prototype cosine distance (ddist.metrics.diversity), per class and overall,
  of the synthetic set, of real images, and of the synthetic images to the real class centres;
- within-class mean pairwise SSIM (pixels in [0,1]) and feature cosine similarity;
- the feature spectrum (normalised singular values, effective rank, decay slope);
- per class, the covariance figures of DEDA's final-layer features L (ddist.metrics.covariance:
  mean diagonal, off-diagonal Frobenius norm, smallest eigenvalue, condition number), which
  show what DEDA's diversity regulariser did; L is the last of `recover.deda.layers` in a
  DEDA run and DEDA's default L, the pooled last block, in any other run;
- fd_teacher, the Frechet distance in teacher-feature space, and the standard FID when
  `analyse.fid.weights` points at InceptionV3 weights;
- with `analyse.robust_scores=true`, DD-Ranking's IOR/HLR/LRS/ARS (ddist.metrics.robust),
  training the baseline students it needs with the evaluate stage's `evaluate_set`;
- the cost so far: wall seconds and peak memory of every earlier stage.

Set-level comparisons (prototype distance, pairwise similarity, spectrum) put the synthetic
set next to "real at the same IPC" (the first `ipc` images per class of the subsample):
effective rank grows with the number of rows and a centre of few points lies closer to
them, so sets of different sizes would not compare. The real class centres and the
Frechet distance use the whole subsample. Results go to ctx.results["analysis"] (hence
results.json) and analysis.json; figures are PNGs in <run_dir>/analysis/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from ddist.artifacts import atomic_write_text, cache_entry, load_distilled, save_distilled, strict_json
from ddist.context import RunContext
from ddist.data import class_indices, load_split
from ddist.data.spec import without_unset_val
from ddist.data.subsets import save_random_real
from ddist.logging import info
from ddist.metrics import covariance, diversity, fid, robust, spectrum
from ddist.models import FeatureModel
from ddist.students import evaluate_set
from ddist.teacher import deda_layers, frozen_teacher, load_teacher

# The image grid shows at most this many classes (rows) and images per class (columns).
GRID_CLASSES, GRID_IMAGES = 20, 10
# Evaluate settings that switch augmentation off for ARS's "without augmentation" runs.
NO_AUGMENT = {"augment": {"crop_scale": None, "flip": False, "roll": 0}, "mix": "none"}
# Offsets the real subsample's random stream from `seed` (see real_subsample).
SUBSAMPLE_SEED_OFFSET = 1_000_003


def run(cfg: DictConfig, ctx: RunContext) -> RunContext:
    acfg = cfg.analyse
    if not acfg.enabled:
        return ctx
    spec, device = ctx.spec, ctx.device
    out_dir = ctx.run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)

    # -- setup: the set, the teacher, the real subsample
    distilled = load_distilled(ctx.require("distilled"))
    teacher = frozen_teacher(cfg, load_teacher(cfg, ctx))
    train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
    per_class = real_subsample(train, spec.num_classes, acfg.real_samples_per_class, cfg.seed)
    real_idx = torch.cat(per_class)
    real_x, real_y = torch.stack([train[int(i)][0] for i in real_idx]), train.targets[real_idx]
    same_pos = same_ipc_rows([len(idx) for idx in per_class], distilled.ipc)
    syn_x, syn_y = distilled.images, distilled.labels

    # -- metrics
    syn_f, real_f = features(teacher, syn_x, device), features(teacher, real_x, device)
    analysis = set_metrics(syn_x, syn_y, syn_f, real_x, real_y, real_f, same_pos, spec)
    layer = covariance_layer(cfg, teacher)
    analysis["covariance"] = covariance_metrics(
        features(teacher, syn_x, device, layer),
        syn_y,
        features(teacher, real_x[same_pos], device, layer),
        real_y[same_pos],
        spec.num_classes,
        layer,
    )
    analysis["num_real_per_class"] = int(acfg.real_samples_per_class)
    if acfg.fid.weights:
        analysis["fid"] = fid.inception_fid(
            spec.denormalize(real_x).clamp(0, 1), spec.denormalize(syn_x).clamp(0, 1), acfg.fid.weights, device
        )
    if acfg.robust_scores:
        analysis["robust"] = robust_baselines(cfg, ctx, train, out_dir)
    analysis["cost"] = {"seconds": dict(ctx.timings), "peak_memory_mb": dict(ctx.peak_memory_mb)}

    # -- figures and outputs
    if acfg.figures:
        analysis["figures"] = [
            str(p.relative_to(ctx.run_dir)) for p in draw_figures(out_dir, syn_x, syn_y, spec, analysis)
        ]
    atomic_write_text(ctx.run_dir / "analysis.json", strict_json(analysis))
    ctx.results["analysis"] = without_arrays(analysis)  # results.json: the figures, not per-sample arrays
    log_analysis(ctx.logger, analysis, spec, ctx.run_dir)
    info("analyse: " + ", ".join(f"{k} {v:.4g}" for k, v in headline(analysis).items()))
    return ctx


# ----------------------------------------------------------------------------- data and features


def real_subsample(train, num_classes: int, per_class: int, seed: int) -> list[torch.Tensor]:
    """Up to `per_class` random train indices of each class (all of a smaller class), seeded.

    The stream is offset from `seed` so the reference is an independent draw, not the very
    images the random pipeline (seeded by `seed` alone) picked as its DistilledSet.
    """
    generator = torch.Generator().manual_seed(SUBSAMPLE_SEED_OFFSET + seed)
    picked = []
    for c in range(num_classes):
        pool = class_indices(train, c)
        picked.append(pool[torch.randperm(len(pool), generator=generator)[:per_class]])
    return picked


def same_ipc_rows(class_sizes: list[int], ipc: int) -> torch.Tensor:
    """Rows of the class-by-class subsample holding the first `ipc` images of each class."""
    rows, start = [], 0
    for size in class_sizes:
        rows.append(torch.arange(start, start + min(size, ipc)))
        start += size
    return torch.cat(rows)


@torch.inference_mode()
def features(
    model: FeatureModel, x: torch.Tensor, device: torch.device, key: str = "penultimate", batch_size: int = 256
) -> torch.Tensor:
    """The model's `key` features (FeatureModel.features) of normalised images [N,C,H,W], on the CPU."""
    feats = [model.features(x[i : i + batch_size].to(device))[key].float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(feats)


def covariance_layer(cfg: DictConfig, teacher) -> str:
    """The feature key L of DEDA's diversity regulariser: the last aligned layer of a DEDA
    recover, else DEDA's default L (the pooled last block), so every run reports the same figure."""
    if cfg.recover.objective == "deda":
        return deda_layers(cfg, teacher)[-1]
    return [n for n in teacher.feature_names if n.startswith("stage")][-1]


# ----------------------------------------------------------------------------- metrics


def set_metrics(syn_x, syn_y, syn_f, real_x, real_y, real_f, same_pos, spec) -> dict:
    """Diversity, spectrum and fd_teacher of the synthetic set next to the real reference."""
    k = spec.num_classes
    syn01, same01 = spec.denormalize(syn_x).clamp(0, 1), spec.denormalize(real_x[same_pos]).clamp(0, 1)
    same_f, same_y = real_f[same_pos], real_y[same_pos]
    syn_pd, syn_pd_all = diversity.prototype_cosine_distance(syn_f, syn_y, k)
    same_pd, same_pd_all = diversity.prototype_cosine_distance(same_f, same_y, k)
    real_pd, real_pd_all = diversity.prototype_cosine_distance(real_f, real_y, k)
    real_centres = diversity.class_centres(real_f, real_y, k)
    _, to_real = diversity.prototype_cosine_distance(syn_f, syn_y, k, centres=real_centres)
    syn_ssim, syn_ssim_all = diversity.within_class_ssim(syn01, syn_y, k)
    real_ssim, real_ssim_all = diversity.within_class_ssim(same01, same_y, k)
    syn_cos, syn_cos_all = diversity.within_class_cosine(syn_f, syn_y, k)
    real_cos, real_cos_all = diversity.within_class_cosine(same_f, same_y, k)
    return {
        "prototype_distance": {
            "synthetic": syn_pd_all,
            "real_same_ipc": same_pd_all,
            "real": real_pd_all,
            "synthetic_to_real_centres": to_real,
            "synthetic_per_class": _list(syn_pd),
            "real_same_ipc_per_class": _list(same_pd),
            "real_per_class": _list(real_pd),
        },
        "ssim": {
            "synthetic": syn_ssim_all,
            "real_same_ipc": real_ssim_all,
            "synthetic_per_class": _list(syn_ssim),
            "real_same_ipc_per_class": _list(real_ssim),
        },
        "feature_cosine": {
            "synthetic": syn_cos_all,
            "real_same_ipc": real_cos_all,
            "synthetic_per_class": _list(syn_cos),
            "real_same_ipc_per_class": _list(real_cos),
        },
        "spectrum": {
            "synthetic": spectrum.spectrum_summary(syn_f),
            "real_same_ipc": spectrum.spectrum_summary(same_f),
            "real": spectrum.spectrum_summary(real_f),
        },
        "fd_teacher": fid.frechet_distance_features(real_f, syn_f) if len(syn_f) > 1 else None,
    }


def covariance_metrics(syn_f, syn_y, same_f, same_y, num_classes: int, layer: str) -> dict:
    """Per-class covariance figures of the synthetic set and of real images at the same IPC."""
    return {
        "layer": layer,
        "dim": int(syn_f.shape[1]),
        "note": "per class (n images, d features): Theorem 1's premises sigma2_min, sigma2_max, eps and its "
        "Gershgorin bound sigma2_min - (d - 1) eps; spanned_*: over the top min(n - 1, d) eigenvalues of the "
        "covariance, comparable only at equal IPC; null: fewer than two images, or a numerically zero "
        "eigenvalue among the spanned ones",
        "synthetic": covariance.class_covariance_figures(syn_f, syn_y, num_classes),
        "real_same_ipc": covariance.class_covariance_figures(same_f, same_y, num_classes),
    }


def _list(t: torch.Tensor) -> list:
    """Per-class values for JSON: NaN (a class without enough images) becomes null."""
    return [None if math.isnan(v) else float(v) for v in t.tolist()]


def headline(analysis: dict) -> dict[str, float]:
    """The scalar summary logged to the console and W&B."""
    out = {
        "prototype_distance": analysis["prototype_distance"]["synthetic"],
        "ssim": analysis["ssim"]["synthetic"],
        "feature_cosine": analysis["feature_cosine"]["synthetic"],
        "effective_rank": analysis["spectrum"]["synthetic"]["effective_rank"],
        "spectrum_slope": analysis["spectrum"]["synthetic"]["decay_slope"],
        "fd_teacher": analysis["fd_teacher"],
        "cov_mean_diagonal": analysis["covariance"]["synthetic"]["mean_diagonal"],
        "cov_offdiag_relative": analysis["covariance"]["synthetic"]["offdiag_relative"],
        "cov_gershgorin_positive_share": analysis["covariance"]["synthetic"]["gershgorin_bound_positive_share"],
        "fid": analysis.get("fid"),
        **{k: v for k, v in analysis.get("robust", {}).items() if k in ("ior", "hlr", "lrs", "ars")},
    }
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not math.isnan(v)}


# ----------------------------------------------------------------------------- robust scores


def robust_baselines(cfg: DictConfig, ctx: RunContext, train, out_dir: Path) -> dict:
    """Train the students DD-Ranking's scores need and combine their accuracies.

    Runs (first configured student, `evaluate.repeats` repeats each):
      syn           the set under the run's protocol (taken from the evaluate stage when it ran)
      random        random real images at the same IPC, same protocol (seed-matched)
      syn_hard      the set under the hard-label protocol (`analyse.hard`, = evaluate/hard)
      real_hard     the full real train split, hard labels; cached, or `analyse.real_hard_acc`
      syn_noaug, random_noaug   both sets with augmentation and mixing off
    """
    acfg, ev = cfg.analyse, cfg.evaluate
    student = ev.students[0]
    # Baselines use online soft labels: stored ones belong to the distilled set only, and
    # online labels give the same batches (see relabel).
    same = {"students": [student]}
    hard = {**cast("dict[str, Any]", OmegaConf.to_container(acfg.hard)), "students": [student], "repeats": ev.repeats}

    def acc(path: Path, overrides: dict) -> float:
        return evaluate_set(cfg, ctx, path, overrides)[0]["acc_mean"]

    distilled = ctx.require("distilled")
    random_path = save_random_real(out_dir / "random_real", train, ctx.spec, cfg.ipc, cfg.seed)
    done = [s for s in ctx.results.get("students", []) if s["protocol"] == ev.protocol]
    accs = {"syn": done[0]["acc_mean"] if done else acc(distilled, same), "random": acc(random_path, same)}
    accs["syn_hard"] = accs["syn"] if ev.protocol == "hard" else acc(distilled, hard)
    accs["real_hard"] = real_hard_accuracy(cfg, ctx, train, hard)
    accs["syn_noaug"] = acc(distilled, {**same, **NO_AUGMENT})
    accs["random_noaug"] = acc(random_path, {**same, **NO_AUGMENT})
    scores = robust.robust_scores(accs, w=acfg.lrs_weight, gamma=acfg.ars_weight)
    return {
        "student": student if isinstance(student, str) else OmegaConf.to_container(student),
        "protocol": ev.protocol,
        "accuracies": accs,
        **scores,
    }


def real_hard_accuracy(cfg: DictConfig, ctx: RunContext, train, hard: dict) -> float:
    """Acc(real, hard): a student trained on the whole train split with hard labels.

    `analyse.real_hard_acc` supplies a known value (e.g. a published full-data accuracy);
    otherwise the result is cached per dataset, hard protocol, student and seed, so a
    sweep over methods and IPCs trains it once per seed.
    """
    if cfg.analyse.real_hard_acc is not None:
        return float(cfg.analyse.real_hard_acc)
    ev_hard = OmegaConf.merge(cfg.evaluate, hard)
    key = {
        "dataset": without_unset_val(
            cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True, enum_to_str=True))
        ),
        "evaluate": OmegaConf.to_container(ev_hard, resolve=True, enum_to_str=True),
        "seed": cfg.seed,
    }
    entry = cache_entry(cfg, "real_hard_acc", key)
    result = entry / "acc.json"
    if result.is_file():
        return float(json.loads(result.read_text())["acc"])
    spec = ctx.spec
    # The whole split as one DistilledSet; its "ipc" (largest class) picks the epochs entry.
    largest = max(len(class_indices(train, c)) for c in range(spec.num_classes))
    images = torch.stack([train[i][0] for i in range(len(train))])
    full = save_distilled(
        entry / "full_train",
        images,
        train.targets,
        spec,
        {"dataset": spec.name, "method": "full_real", "ipc": largest, "seed": cfg.seed},
    )
    value = evaluate_set(cfg, ctx, full, hard)[0]["acc_mean"]
    atomic_write_text(result, json.dumps({"acc": value}))
    return value


# ----------------------------------------------------------------------------- figures and logging


def draw_figures(out_dir: Path, syn_x, syn_y, spec, analysis: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return [
        grid_figure(plt, out_dir / "grid.png", spec.denormalize(syn_x).clamp(0, 1), syn_y, spec.classes),
        spectrum_figure(plt, out_dir / "spectrum.png", analysis["spectrum"]),
        prototype_figure(plt, out_dir / "prototype_distance.png", analysis["prototype_distance"], spec.classes),
    ]


def grid_figure(plt, path: Path, images01: torch.Tensor, labels: torch.Tensor, classes) -> Path:
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
    ax.set_title("distilled images per class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finish_figure(plt, fig, ax, title: str, path: Path) -> Path:
    """Title, legend, save as PNG and release the figure."""
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def spectrum_figure(plt, path: Path, spectra: dict) -> Path:
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
    return finish_figure(plt, fig, ax, "teacher-feature spectrum", path)


def prototype_figure(plt, path: Path, pd: dict, classes) -> Path:
    import numpy as np

    syn = np.array([np.nan if v is None else v for v in pd["synthetic_per_class"]])
    real = np.array([np.nan if v is None else v for v in pd["real_same_ipc_per_class"]])
    shown = np.arange(min(len(classes), GRID_CLASSES * 5))  # bars stay readable up to ~100 classes
    fig, ax = plt.subplots(figsize=(max(5, len(shown) * 0.35), 3.5))
    ax.bar(shown - 0.2, syn[shown], width=0.4, label=f"synthetic (mean {pd['synthetic']:.3f})")
    ax.bar(shown + 0.2, real[shown], width=0.4, label=f"real, same IPC (mean {pd['real_same_ipc']:.3f})")
    ax.set_xticks(shown, [str(classes[c]) for c in shown], rotation=90 if len(shown) > 10 else 0, fontsize=7)
    ax.set_ylabel("1 - cos(f, class centre)")
    return finish_figure(plt, fig, ax, "class-prototype cosine distance", path)


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


# Per-sample arrays: analysis.json keeps them, results.json does not.
PER_SAMPLE_KEYS = ("normalized_singular_values",)


def without_arrays(node):
    """A copy of the analysis without its per-sample arrays (PER_SAMPLE_KEYS, at any depth)."""
    if isinstance(node, dict):
        return {k: without_arrays(v) for k, v in node.items() if k not in PER_SAMPLE_KEYS}
    return node
