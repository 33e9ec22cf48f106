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
  show what DEDA's diversity regulariser did; L is the last of `recover.class_stats.layers`
  where a recover method aligned to the real class statistics (DEDA) and DEDA's default L,
  the pooled last block, in any other run;
- fd_teacher, the Frechet distance in teacher-feature space, and the standard FID when
  `analyse.fid.weights` points at InceptionV3 weights;
- with `analyse.robust_scores=true`, DD-Ranking's IOR/HLR/LRS/ARS (ddist.metrics.robust),
  training the baseline students it needs (ddist.training.baseline);
- the cost so far: wall seconds and peak memory of every earlier stage.

Set-level comparisons (prototype distance, pairwise similarity, spectrum) put the synthetic
set next to "real at the same IPC" (the first `ipc` images per class of the subsample):
effective rank grows with the number of rows and a centre of few points lies closer to
them, so sets of different sizes would not compare. The real class centres and the
Frechet distance use the whole subsample. Results go to ctx.results["analysis"] (hence
results.json) and analysis.json; figures are PNGs in <run_dir>/analysis/
(ddist/report/figures.py); the metrics are assembled in ddist/metrics/analysis.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddist.config.schema import Config
from ddist.data import load_split
from ddist.data.subsets import real_subsample, same_ipc_rows
from ddist.logging import info
from ddist.methods import recover_method
from ddist.metrics import fid
from ddist.metrics.analysis import covariance_metrics, features, headline, set_metrics, without_arrays
from ddist.report.figures import draw_figures, log_analysis, run_title
from ddist.runtime.artifacts import atomic_write_text, load_distilled, strict_json
from ddist.runtime.context import RunContext
from ddist.runtime.stages import Stage
from ddist.training.baseline import robust_baselines
from ddist.training.class_stats import class_stats_layers
from ddist.training.teacher import frozen_teacher, load_teacher

STAGE = Stage(name="analyse", needs=frozenset({"teacher", "distilled"}))


def run(cfg: Config, ctx: RunContext) -> RunContext:
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
            str(p.relative_to(ctx.run_dir)) for p in draw_figures(out_dir, syn_x, syn_y, spec, analysis, run_title(cfg))
        ]
    atomic_write_text(ctx.run_dir / "analysis.json", strict_json(analysis))
    ctx.results["analysis"] = without_arrays(analysis)  # results.json: the figures, not per-sample arrays
    log_analysis(ctx.logger, analysis, spec, ctx.run_dir)
    info("analyse: " + ", ".join(f"{k} {v:.4g}" for k, v in headline(analysis).items()))
    return ctx


def covariance_layer(cfg: Config, teacher) -> str:
    """The feature key L of DEDA's diversity regulariser: the last layer of the real class statistics
    (recover.class_stats.layers) when the recover method aligns to them, else DEDA's
    default L (the pooled last block), so every run reports the same figure."""
    if "class_stats" in recover_method(cfg.recover.objective).needs:
        return class_stats_layers(cfg, teacher.feature_names)[-1]
    return [n for n in teacher.feature_names if n.startswith("stage")][-1]
