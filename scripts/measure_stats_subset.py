"""How far DEDA's real class statistics from a per-class subset are from those of all images.

    OMP_NUM_THREADS=1 python scripts/measure_stats_subset.py --checkpoint PATH/teacher.pt
    OMP_NUM_THREADS=1 python scripts/measure_stats_subset.py            # random-init teacher

On CIFAR-10 (../shared/data/cifar10 as format=folder, 5000 train images per class) with a
ConvNet-3 width 32 teacher (a trained checkpoint, or a random-init one when none is given),
the teacher's features of every train image are computed once (the folded teacher, as
recover runs it); then for each `recover.class_stats.images_per_class` in --sizes, the class
statistics of the seeded subset `stats_indices` picks are compared with those of all images,
per DEDA layer (every pooled stage):
  mean error = ||M_n - M_all||_F / ||M_all||_F over the [classes, d] means;
  cov error  = ||C_n - C_all||_F / ||C_all||_F over the [classes, d, d] covariances,
and the worst class's covariance error. The full pass's wall time is printed too (a subset's
pass costs its share of it: n / 5000).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ddist.data import dataset_spec, load_split
from ddist.models.fold import fold_batchnorm
from ddist.objectives import ClassMomentSums
from ddist.runtime.artifacts import load_checkpoint, load_model_state
from ddist.training.class_stats import class_sorted_batches, class_stats_layers, stats_indices
from ddist.training.teacher import build_teacher

REPO = Path(__file__).resolve().parents[1]


def moments(feats: dict[str, torch.Tensor], targets: torch.Tensor, idx: torch.Tensor, num_classes: int) -> dict:
    sums = ClassMomentSums(num_classes, {k: f.shape[1] for k, f in feats.items()})
    for chunk in idx.split(4096):
        sums.update({k: f[chunk] for k, f in feats.items()}, targets[chunk])
    return sums.moments()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO.parent / "shared/data/cifar10"), help="the CIFAR-10 image folders")
    parser.add_argument("--checkpoint", default=None, help="a CIFAR-10 ConvNet-3 width 32 teacher state dict")
    parser.add_argument("--cache-dir", default=None, help="where the decoded split is cached (default: a temp dir)")
    parser.add_argument("--sizes", default="250,500,1000,2000", help="images per class to compare with all")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="stats_subset_"))

    cifar = ["dataset=cifar10", "dataset.format=folder", f"dataset.root={args.root}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*cifar, "recover=deda", "teacher.model.width=32", "logger=none"])
    spec = dataset_spec(cfg.dataset)
    torch.manual_seed(0)
    teacher = build_teacher(cfg, spec)
    if args.checkpoint:
        load_model_state(teacher, load_checkpoint(args.checkpoint, "--checkpoint"), args.checkpoint, "--checkpoint")
    teacher = fold_batchnorm(teacher.eval(), channels_last=True)
    layers = class_stats_layers(cfg, teacher.feature_names)

    start = time.perf_counter()
    train = load_split(cfg.dataset, "train", cache_dir)
    print(f"loaded {len(train.targets)} train images in {time.perf_counter() - start:.1f} s (cache {cache_dir})")

    # -- the features of every image, once (label order, as the statistics pass reads them)
    order = stats_indices(train.targets, None)
    start = time.perf_counter()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    with torch.inference_mode():
        for x, _ in class_sorted_batches(train, spec, 256, order=order):
            feats = teacher.features(x)
            for k in layers:
                parts[k].append(feats[k])
    full_pass = time.perf_counter() - start
    feats = {k: torch.cat(v) for k, v in parts.items()}
    targets = train.targets[order]
    print(f"features of all {len(order)} images ({layers}): {full_pass:.1f} s, {len(order) / full_pass:.0f} images/s")

    # -- subsets vs all (indices into the label-ordered features)
    all_stats = moments(feats, targets, torch.arange(len(order)), spec.num_classes)
    teacher_kind = f"checkpoint {args.checkpoint}" if args.checkpoint else "random-init"
    print(f"teacher: ConvNet-3 width 32, {teacher_kind}; relative Frobenius errors vs all images")
    print(f"{'per class':>9} {'layer':>7} {'d':>4} {'mean err':>9} {'cov err':>8} {'worst class cov err':>20}")
    for n in (int(s) for s in args.sizes.split(",")):
        idx = stats_indices(targets, n)
        sub = moments(feats, targets, idx, spec.num_classes)
        for k in layers:
            (m_n, c_n), (m_a, c_a) = sub[k], all_stats[k]
            worst = max(rel(c_n[c], c_a[c]) for c in range(spec.num_classes))
            print(f"{n:>9} {k:>7} {m_a.shape[1]:>4} {rel(m_n, m_a):>9.4f} {rel(c_n, c_a):>8.4f} {worst:>20.4f}")


if __name__ == "__main__":
    main()
