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
