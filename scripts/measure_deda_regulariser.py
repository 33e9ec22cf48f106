"""Does DEDA's diversity regulariser raise the diagonal of the class covariance at the paper's weights?

    python scripts/measure_deda_regulariser.py                         # digits, default teacher
    python scripts/measure_deda_regulariser.py teacher.epochs=2 teacher.model.width=16   # the tests' teacher
    python scripts/measure_deda_regulariser.py --cache-dir /work/cache dataset=cifar10 \\
        dataset.format=folder dataset.root=/work/shared/data/cifar10   # a cached CIFAR-10 teacher
    python scripts/measure_deda_regulariser.py --recover               # + whole DEDA recovers (digits)

Realistic features: IPC real train images of every class (the random pipeline's seeded pick)
through the trained teacher (squeeze: a cache hit when the teacher exists; digits trains in
seconds, other datasets must be cached or --train-teacher given), at DEDA's final layer L
(default: the pooled last block; --layers adds others). For each weight pair
(lambda1, lambda2) of the configs (conf/recover/deda.yaml, the CIFAR/Tiny and ImageNet-1K
paper cells) and each normalisation of the regulariser (REG_NORMALISATIONS), the regulariser
alone is applied three ways:

- feature: one gradient step on each class's features themselves, scaled to move them by
  --step of their centred norm (the normalisations differ by orders of magnitude in gradient
  size; the direction decides the effect);
- pixel: one such step on the images (through the teacher), scaled the same way in pixels;
- adam: --adam-steps Adam steps (lr --lr, recover's betas) on the images with the pixels
  clipped to the image range, as the recover loop does (without augmentation).

Table 1 gives the mean over classes of mean(diag Cov_c) and ||Cov_c - Diag Cov_c||_F before
and after, and in how many classes the diagonal went up *and* the off-diagonal norm down.
With --recover, table 2 runs the dataset's whole DEDA recover (its config, IPC --ipc) once
with lambda1 = lambda2 = 0 and once per reading (--readings) and weight pair, from the same
seed, and gives the covariance figures of the result at L (ddist.metrics.covariance: mean
variance, off-diagonal norm absolute and relative to the diagonal, Theorem 1's sigma2_min,
eps and the share of classes with a positive Gershgorin bound, means over classes) next to
random real images at the same IPC.

Measured (2026-12-05, this 2-core CPU box, one thread each, the box shared; IPC 10, seed 0; the CIFAR-10
ResNet-18 teacher trained 3 epochs on 500 images per class, `dataset.subset.per_class=500`; wall times
8, 14, 41 and 68 minutes). "both": the mean variance up and the off-diagonal norm down against the run
with lambda1 = lambda2 = 0, absolute / relative to the diagonal (||Cov - Diag||_F / ||Diag||_F):

    python scripts/measure_deda_regulariser.py --recover-only --readings sum_rel mean_rel ratio_corr sum_sum
    python scripts/measure_deda_regulariser.py --recover-only --readings sum_rel mean_rel ratio_corr sum_sum \
        model@teacher.model=resnet18
    python scripts/measure_deda_regulariser.py --recover-only --train-teacher --readings sum_rel mean_rel \
        ratio_corr sum_sum $CIFAR model@teacher.model=convnet teacher.model.width=32 teacher.epochs=2 \
        dataset.protocol.recover_iterations=300 dataset.protocol.deda_reg_iterations=150
    python scripts/measure_deda_regulariser.py --recover-only --train-teacher --readings sum_rel mean_rel \
        ratio_corr $CIFAR model@teacher.model=resnet18 teacher.epochs=3 dataset.subset.per_class=500 \
        dataset.protocol.recover_iterations=100 dataset.protocol.deda_reg_iterations=50
    # CIFAR="dataset=cifar10 dataset.format=folder dataset.root=../shared/data/cifar10"

    digits, convnet teacher (0.9778), 200 iterations (regulariser in the last 100), L = stage3, d = 128:

    | reading | l1/l2 | mean var | off-diag | off rel | sigma2_min | eps | Gersh. > 0 | log det | both |
    |---|---|---|---|---|---|---|---|---|---|
    | lambda1 = lambda2 = 0 | - | 0.01494 | 0.8933 | 4.153 | 0.00155 | 0.054 | 0.00 | -18.5 | - |
    | sum_rel | 0.2/4 | 0.02449 | 1.123 | 3.362 | 0.0032 | 0.0619 | 0.00 | -10.7 | no / yes |
    | mean_rel | 0.2/4 | 0.01513 | 0.6812 | 3.304 | 0.00196 | 0.0379 | 0.00 | -15.0 | yes / yes |
    | ratio_corr | 0.2/4 | 0.01986 | 0.9475 | 3.519 | 0.00287 | 0.0541 | 0.00 | -12.9 | no / yes |
    | sum_sum | 0.2/4 | 0.005037 | 0.2271 | 3.422 | 0.000751 | 0.0113 | 0.00 | -24.8 | no / no |
    | sum_rel | 0.01/0.25 | 0.01566 | 0.8847 | 3.973 | 0.0017 | 0.0523 | 0.00 | -17.2 | yes / yes |
    | mean_rel | 0.01/0.25 | 0.01532 | 0.8685 | 3.983 | 0.00168 | 0.0515 | 0.00 | -17.5 | yes / yes |
    | ratio_corr | 0.01/0.25 | 0.01532 | 0.8847 | 4.031 | 0.00163 | 0.0538 | 0.00 | -17.6 | yes / yes |
    | sum_sum | 0.01/0.25 | 0.01134 | 0.6225 | 3.924 | 0.00139 | 0.0367 | 0.00 | -19.8 | no / no |
    | real, same IPC | - | 0.01645 | 1.23 | 4.743 | 0.00121 | 0.0752 | 0.00 | -21.8 | - |

    cifar10, convnet teacher (0.6062), 300 iterations (regulariser in the last 150), L = stage3, d = 32:

    | reading | l1/l2 | mean var | off-diag | off rel | sigma2_min | eps | Gersh. > 0 | log det | both |
    |---|---|---|---|---|---|---|---|---|---|
    | lambda1 = lambda2 = 0 | - | 0.0574 | 0.6972 | 1.638 | 0.0141 | 0.137 | 0.00 | -18.0 | - |
    | sum_rel | 0.2/4 | 0.07779 | 0.7279 | 1.228 | 0.019 | 0.129 | 0.00 | -12.7 | no / yes |
    | mean_rel | 0.2/4 | 0.0634 | 0.592 | 1.144 | 0.0141 | 0.11 | 0.00 | -14.9 | yes / yes |
    | ratio_corr | 0.2/4 | 0.06927 | 0.7324 | 1.549 | 0.03 | 0.142 | 0.00 | -14.1 | no / yes |
    | sum_sum | 0.2/4 | 0.03625 | 0.2801 | 0.7884 | 0.00416 | 0.0524 | 0.00 | -20.3 | no / no |
    | sum_rel | 0.01/0.25 | 0.05943 | 0.696 | 1.585 | 0.0154 | 0.135 | 0.00 | -17.1 | yes / yes |
    | mean_rel | 0.01/0.25 | 0.0587 | 0.6913 | 1.591 | 0.0149 | 0.134 | 0.00 | -17.3 | yes / yes |
    | ratio_corr | 0.01/0.25 | 0.05868 | 0.6967 | 1.62 | 0.0164 | 0.137 | 0.00 | -17.2 | yes / yes |
    | sum_sum | 0.01/0.25 | 0.05337 | 0.6257 | 1.553 | 0.0127 | 0.124 | 0.00 | -18.3 | no / no |
    | real, same IPC | - | 0.06091 | 0.903 | 1.863 | 0.00879 | 0.184 | 0.00 | -21.5 | - |

    digits, resnet18 teacher (0.9861), 200 iterations (regulariser in the last 100), L = stage4, d = 512:

    | reading | l1/l2 | mean var | off-diag | off rel | sigma2_min | eps | Gersh. > 0 | log det | both |
    |---|---|---|---|---|---|---|---|---|---|
    | lambda1 = lambda2 = 0 | - | 0.0845 | 16.33 | 6.607 | 0.00202 | 0.38 | 0.00 | 12.9 | - |
    | sum_rel | 0.2/4 | 0.09116 | 17.62 | 6.612 | 0.00214 | 0.387 | 0.00 | 13.6 | no / no |
    | mean_rel | 0.2/4 | 0.0825 | 15.96 | 6.625 | 0.00109 | 0.361 | 0.00 | 12.7 | no / no |
    | ratio_corr | 0.2/4 | 0.08355 | 16.2 | 6.653 | 0.00147 | 0.362 | 0.00 | 12.8 | no / no |
    | sum_sum | 0.2/4 | 0.03391 | 5.793 | 6.411 | 0.000421 | 0.0782 | 0.00 | 5.7 | no / no |
    | sum_rel | 0.01/0.25 | 0.08411 | 16.21 | 6.612 | 0.00118 | 0.359 | 0.00 | 12.9 | no / no |
    | mean_rel | 0.01/0.25 | 0.08366 | 16.21 | 6.637 | 0.00129 | 0.361 | 0.00 | 12.8 | no / no |
    | ratio_corr | 0.01/0.25 | 0.08329 | 16.14 | 6.632 | 0.00157 | 0.371 | 0.00 | 12.7 | no / no |
    | sum_sum | 0.01/0.25 | 0.04562 | 7.905 | 6.345 | 0.000718 | 0.125 | 0.00 | 8.1 | no / no |
    | real, same IPC | - | 0.1287 | 27.65 | 7.054 | 0.00236 | 0.667 | 0.00 | 15.5 | - |

    cifar10, resnet18 teacher (0.4182), 100 iterations (regulariser in the last 50), L = stage4, d = 512:

    | reading | l1/l2 | mean var | off-diag | off rel | sigma2_min | eps | Gersh. > 0 | log det | both |
    |---|---|---|---|---|---|---|---|---|---|
    | lambda1 = lambda2 = 0 | - | 0.09025 | 22.75 | 8.237 | 0.00835 | 0.583 | 0.00 | 11.2 | - |
    | sum_rel | 0.2/4 | 0.09753 | 24.31 | 8.145 | 0.00902 | 0.61 | 0.00 | 12.0 | no / yes |
    | mean_rel | 0.2/4 | 0.09052 | 22.84 | 8.204 | 0.0094 | 0.582 | 0.00 | 11.2 | no / yes |
    | ratio_corr | 0.2/4 | 0.09178 | 23.27 | 8.261 | 0.00933 | 0.591 | 0.00 | 11.3 | no / no |
    | sum_rel | 0.01/0.25 | 0.08831 | 22.1 | 8.273 | 0.00821 | 0.544 | 0.00 | 11.1 | no / no |
    | mean_rel | 0.01/0.25 | 0.09001 | 22.5 | 8.205 | 0.00864 | 0.572 | 0.00 | 11.2 | no / no |
    | ratio_corr | 0.01/0.25 | 0.08881 | 22.14 | 8.187 | 0.00774 | 0.557 | 0.00 | 11.2 | no / no |
    | real, same IPC | - | 0.1254 | 32.2 | 8.286 | 0.00572 | 0.783 | 0.00 | 13.8 | - |

One of the nine digits ResNet-18 recovers warned that its loss did not decrease (first tenth 259, last
tenth 313); the script does not say which. The Gershgorin bound is positive in no class of any set: with 10
images in d >= 32 dimensions the smallest eigenvalue is 0.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ddist.data import dataset_spec, load_split
from ddist.data.subsets import pick_random_real, real_subsample
from ddist.errors import ConfigError
from ddist.metrics.covariance import class_covariance_figures
from ddist.objectives import REG_NORMALISATIONS, class_moments, diversity_regulariser
from ddist.runtime import store
from ddist.runtime.artifacts import load_distilled
from ddist.runtime.context import RunContext
from ddist.stages import recover, squeeze
from ddist.training.class_stats import class_stats_layers
from ddist.training.loop import seed_everything
from ddist.training.recover import pixel_bounds
from ddist.training.teacher import load_teacher, teacher_key

REPO = Path(__file__).resolve().parents[1]
# (label, config file, key) of every weight pair the configs use
WEIGHTS = [
    ("digits", "recover/deda.yaml", "deda"),
    ("CIFAR/Tiny", "experiment/deda/cifar10_ipc10.yaml", "recover.deda"),
    ("ImageNet-1K", "experiment/deda/imagenet1k_ipc10.yaml", "recover.deda"),
]


def config_weights() -> list[tuple[str, float, float]]:
    """(labels, lambda1, lambda2) of each distinct weight pair in the configs."""
    pairs: dict[tuple[float, float], list[str]] = {}
    for label, path, key in WEIGHTS:
        node = OmegaConf.select(OmegaConf.load(REPO / "conf" / path), key)
        pairs.setdefault((float(node.lambda_diag), float(node.lambda_offdiag)), []).append(label)
    return [(", ".join(labels), l1, l2) for (l1, l2), labels in pairs.items()]


def diag_and_offdiag(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: mean of the diagonal and Frobenius norm of the rest ([K, d, d] -> [K], [K])."""
    diag = cov.diagonal(dim1=-2, dim2=-1)
    return diag.mean(-1), (cov - torch.diag_embed(diag)).flatten(1).norm(dim=-1)


def per_class_norm(t: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """||t restricted to class k|| for every class: [N, ...] -> [K]."""
    return (onehot * t.flatten(1).pow(2).sum(1, keepdim=True)).sum(0).sqrt()


def regulariser_loss(feats, labels, classes, weights, normalisation, ref_var) -> torch.Tensor:
    return diversity_regulariser(class_moments(feats, labels, classes)[1], *weights, normalisation, ref_var).sum()


def scaled_step(var: torch.Tensor, loss: torch.Tensor, onehot: torch.Tensor, step: float) -> torch.Tensor:
    """var moved against d loss / d var, each class by `step` x its centred norm."""
    grad = torch.autograd.grad(loss, var)[0]
    with torch.no_grad():
        centred = var - (onehot @ (onehot.T @ var.flatten(1) / onehot.sum(0)[:, None])).view_as(var)
        scale = onehot @ (step * per_class_norm(centred, onehot) / per_class_norm(grad, onehot).clamp_min(1e-30))
        return var - scale.view(-1, *[1] * (var.dim() - 1)) * grad


def class_cov(teacher, layer, images, labels, classes) -> torch.Tensor:
    with torch.no_grad():
        return class_moments(teacher.forward_features(images)[1][layer], labels, classes)[1]


def regulariser_effect(mode, teacher, layer, images, labels, classes, weights, normalisation, args, bounds):
    """Class covariances of `layer` before and after the regulariser alone, applied as `mode`."""
    onehot = (labels[:, None] == classes[None, :]).float()
    before = class_cov(teacher, layer, images, labels, classes)
    ref_var = before.diagonal(dim1=-2, dim2=-1)  # real images: their own variances are ratio_corr's unit
    if mode == "feature":
        with torch.no_grad():
            feats = teacher.forward_features(images)[1][layer]
        feats = feats.clone().requires_grad_(True)
        moved = scaled_step(
            feats, regulariser_loss(feats, labels, classes, weights, normalisation, ref_var), onehot, args.step
        )
        return before, class_moments(moved, labels, classes)[1]
    x = images.clone().requires_grad_(True)
    if mode == "pixel":
        loss = regulariser_loss(teacher.forward_features(x)[1][layer], labels, classes, weights, normalisation, ref_var)
        return before, class_cov(teacher, layer, scaled_step(x, loss, onehot, args.step), labels, classes)
    optimizer = torch.optim.Adam([x], lr=args.lr, betas=(0.5, 0.9))
    for _ in range(args.adam_steps):
        loss = regulariser_loss(teacher.forward_features(x)[1][layer], labels, classes, weights, normalisation, ref_var)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(*bounds)
    return before, class_cov(teacher, layer, x.detach(), labels, classes)


def compose_cfg(args, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "logger=none",
                "pipeline=deda",
                f"paths.cache_dir={args.cache_dir}",
                f"ipc={args.ipc}",
                f"seed={args.seed}",
                "device=cpu",
                *args.overrides,
                *overrides,
            ],
        )


def regulariser_table(args, cfg, ctx, teacher) -> None:
    spec = ctx.spec
    train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
    idx = pick_random_real(train, spec.num_classes, args.ipc, args.seed)
    images, labels = torch.stack([train[int(i)][0] for i in idx]), train.targets[idx]
    classes = labels.unique()
    bounds = pixel_bounds(spec, torch.device("cpu"))
    layers = args.layers or [class_stats_layers(cfg, teacher.feature_names)[-1]]
    print(
        f"\n{cfg.dataset.name}: teacher {cfg.teacher.model.name} (width {cfg.teacher.model.get('width')}, "
        f"{cfg.teacher.epochs} epochs, test acc {ctx.teacher_acc:.4f}), IPC {args.ipc}, {len(classes)} classes; "
        f"step {args.step}; adam {args.adam_steps} steps lr {args.lr}"
    )
    print(
        "| weights (l1, l2) | normalisation | L (d) | mode | mean diag before -> after | "
        "off-diag norm before -> after | classes diag up & off down |\n|---|---|---|---|---|---|---|"
    )
    for label, l1, l2 in config_weights():
        for normalisation in REG_NORMALISATIONS:
            for layer in layers:
                for mode in ("feature", "pixel", "adam"):
                    before, after = regulariser_effect(
                        mode, teacher, layer, images, labels, classes, (l1, l2), normalisation, args, bounds
                    )
                    d0, o0 = diag_and_offdiag(before)
                    d1, o1 = diag_and_offdiag(after)
                    both = int(((d1 > d0) & (o1 < o0)).sum())
                    print(
                        f"| {label} ({l1:g}, {l2:g}) | {normalisation} | {layer} ({before.shape[-1]}) | {mode} | "
                        f"{d0.mean():.4f} -> {d1.mean():.4f} | {o0.mean():.4f} -> {o1.mean():.4f} | "
                        f"{both}/{len(classes)} |",
                        flush=True,
                    )


def recover_table(args) -> None:
    """Whole DEDA recovers: for each weight pair of the configs, lambda1 = lambda2 = 0 once and each
    reading in --readings, and the covariance figures of each result at L next to real images."""
    variants = [("lambda1 = lambda2 = 0", "-", ["recover.deda.lambda_diag=0", "recover.deda.lambda_offdiag=0"])]
    for _, l1, l2 in config_weights():
        for n in args.readings:
            overrides = [f"recover.deda.lambda_diag={l1}", f"recover.deda.lambda_offdiag={l2}"]
            variants.append((n, f"{l1:g}/{l2:g}", [*overrides, f"recover.deda.reg_normalisation={n}"]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, weights, overrides) in enumerate(variants):
            cfg = compose_cfg(args, *overrides, f"paths.output_dir={tmp}/{i}")
            spec = dataset_spec(cfg.dataset)
            ctx = squeeze.run(cfg, RunContext(run_dir=Path(tmp) / str(i), device=torch.device("cpu"), spec=spec))
            ctx = recover.run(cfg, ctx)
            teacher = load_teacher(cfg, ctx)
            layer = class_stats_layers(cfg, teacher.feature_names)[-1]
            distilled = load_distilled(ctx.distilled)
            feats = recover_features(teacher, layer, distilled.images)
            rows.append((name, weights, class_covariance_figures(feats, distilled.labels, spec.num_classes)))
        # real at the same IPC: the first IPC images of analyse's real subsample
        train = load_split(cfg.dataset, "train", Path(cfg.paths.cache_dir))
        idx = torch.cat([p[: args.ipc] for p in real_subsample(train, spec.num_classes, args.ipc, args.seed)])
        real = torch.stack([train[int(i)][0] for i in idx])
        figs = class_covariance_figures(recover_features(teacher, layer, real), train.targets[idx], spec.num_classes)
        rows.append(("real, same IPC", "-", figs))
    print(
        f"\nDEDA recover on {cfg.dataset.name}, teacher {cfg.teacher.model.name} ({ctx.teacher_acc:.4f}), "
        f"IPC {args.ipc}, {cfg.recover.iterations} iterations (regulariser in the last "
        f"{cfg.recover.deda.reg_iterations}), seed {args.seed}, L = {layer} (d = {feats.shape[1]}); means over "
        "classes; 'both': the mean variance up and the off-diagonal norm down against lambda = 0 (abs / rel)"
    )
    print(
        "| reading | l1/l2 | mean var | off-diag norm | off-diag rel | sigma2_min | eps | Gershgorin > 0 | "
        "log det | both (abs / rel) |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    zero = rows[0][2]
    for name, weights, f in rows:
        up = f["mean_diagonal"] > zero["mean_diagonal"]
        both = (
            "-"
            if weights == "-"
            else f"{'yes' if up and f['offdiag_norm'] < zero['offdiag_norm'] else 'no'} / "
            f"{'yes' if up and f['offdiag_relative'] < zero['offdiag_relative'] else 'no'}"
        )
        logdet = f["spanned_log_det"]
        print(
            f"| {name} | {weights} | {f['mean_diagonal']:.4g} | {f['offdiag_norm']:.4g} | "
            f"{f['offdiag_relative']:.4g} | "
            f"{f['sigma2_min']:.3g} | {f['eps']:.3g} | {f['gershgorin_bound_positive_share']:.2f} | "
            f"{'null' if logdet is None else f'{logdet:.1f}'} | {both} |",
            flush=True,
        )


def recover_features(teacher, layer, images) -> torch.Tensor:
    with torch.no_grad():
        return teacher.forward_features(images)[1][layer]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (dataset, teacher, recover)")
    parser.add_argument("--cache-dir", default=str(REPO / "outputs" / "cache"))
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=float, default=0.01, help="relative size of the feature and pixel steps")
    parser.add_argument("--adam-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate on the pixels")
    parser.add_argument("--layers", nargs="*", help="teacher feature keys to measure (default: DEDA's L)")
    parser.add_argument("--train-teacher", action="store_true", help="train a missing non-digits teacher")
    parser.add_argument("--recover", action="store_true", help="also run whole DEDA recovers (table 2)")
    parser.add_argument("--recover-only", action="store_true", help="skip table 1")
    parser.add_argument("--readings", nargs="*", default=list(REG_NORMALISATIONS), help="table 2's readings")
    args = parser.parse_args()

    cfg = compose_cfg(args)
    spec = dataset_spec(cfg.dataset)
    if (
        cfg.dataset.name != "digits"
        and not args.train_teacher
        and not store.entry(cfg, "teacher", teacher_key(cfg)).done
    ):
        raise ConfigError(
            f"no cached {cfg.dataset.name} teacher under --cache-dir {args.cache_dir}; "
            "point --cache-dir at it or pass --train-teacher"
        )
    seed_everything(args.seed)
    ctx = squeeze.run(cfg, RunContext(run_dir=Path(args.cache_dir), device=torch.device("cpu"), spec=spec))
    if not args.recover_only:
        regulariser_table(args, cfg, ctx, load_teacher(cfg, ctx))
    if args.recover or args.recover_only:
        recover_table(args)


if __name__ == "__main__":
    main()
