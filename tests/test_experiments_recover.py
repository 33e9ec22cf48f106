"""Every deda/ and sre2l/ experiment file composes and holds the paper's values."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[1] / "conf"
PAPER_CELLS = [
    "cifar10_ipc10",
    "cifar10_ipc50",
    "cifar100_ipc10",
    "cifar100_ipc50",
    "tiny_imagenet_ipc50",
    "tiny_imagenet_ipc100",
    "imagenet1k_ipc10",
    "imagenet1k_ipc50",
]
DIGITS_CELLS = ["digits_ipc1", "digits_ipc10", "digits_ipc50"]

# DEDA (issue 3): iterations, regularised last iterations, gamma, lambda1, lambda2
DEDA = {
    "cifar10": (1000, 500, 50.0, 0.2, 4.0),
    "cifar100": (1000, 500, 50.0, 0.2, 4.0),
    "tiny_imagenet": (2000, 1000, 50.0, 0.2, 4.0),
    "imagenet1k": (2000, 1000, 1.0, 0.01, 0.25),
}
# SRe2L defaults: lr, iterations, r_bn
SRE2L = {
    "cifar10": (0.25, 1000, 0.01),
    "cifar100": (0.25, 1000, 0.01),
    "tiny_imagenet": (0.1, 4000, 1.0),
    "imagenet1k": (0.25, 4000, 0.01),
}
# soft protocol: student epochs and temperature where the issue states them
STUDENTS = {"cifar10": (400, 30.0), "cifar100": (400, 30.0), "imagenet1k": (300, 20.0)}


def compose_experiment(name: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}"])


def test_every_experiment_file_is_covered():
    for method in ("deda", "sre2l"):
        on_disk = sorted(p.stem for p in (CONF / "experiment" / method).glob("*.yaml"))
        assert on_disk == sorted(PAPER_CELLS + DIGITS_CELLS)


def split(cell: str) -> tuple[str, int]:
    dataset, ipc = cell.rsplit("_ipc", 1)
    return dataset, int(ipc)


def check_common(cfg, method: str, cell: str) -> None:
    dataset, ipc = split(cell)
    assert cfg.dataset.name == dataset
    assert cfg.ipc == ipc
    assert cfg.pipeline.name == method
    assert list(cfg.pipeline.stages) == ["squeeze", "recover", "relabel", "evaluate", "analyse"]
    assert cfg.recover.objective == method
    assert list(cfg.recover.betas) == [0.5, 0.9]
    assert cfg.recover.schedule == "cosine"


def check_students(cfg, dataset: str) -> None:
    ev = cfg.evaluate
    assert list(ev.students) == ["resnet18"]
    assert (ev.protocol, ev.optimizer, ev.lr, ev.schedule) == ("soft", "adamw", 1e-3, "cosine")
    if dataset in STUDENTS:
        assert (ev.epochs, ev.temperature) == STUDENTS[dataset]
    assert cfg.teacher.model.name == "resnet18"
    if dataset == "imagenet1k":  # torchvision's pretrained weights, kept as they are
        assert cfg.teacher.model.pretrained is True
        assert cfg.teacher.epochs == 0


@pytest.mark.parametrize("cell", PAPER_CELLS)
def test_deda_paper_cell(cell):
    cfg = compose_experiment(f"deda/{cell}")
    check_common(cfg, "deda", cell)
    dataset, _ = split(cell)
    rec, deda = cfg.recover, cfg.recover.deda
    assert (rec.iterations, deda.reg_iterations, deda.gamma, deda.lambda_diag, deda.lambda_offdiag) == DEDA[dataset]
    assert rec.lr == 0.25
    assert rec.batch.mode == "whole_class"
    assert rec.bn_matching is None
    check_students(cfg, dataset)


@pytest.mark.parametrize("cell", PAPER_CELLS)
def test_sre2l_paper_cell(cell):
    cfg = compose_experiment(f"sre2l/{cell}")
    check_common(cfg, "sre2l", cell)
    dataset, _ = split(cell)
    rec = cfg.recover
    assert (rec.lr, rec.iterations, rec.bn_matching.r_bn) == SRE2L[dataset]
    assert rec.bn_matching.first_bn_multiplier == 10.0
    assert rec.batch.mode == "ipc_slice"  # one image per class per batch, as the reference
    assert "deda" not in rec
    check_students(cfg, dataset)


@pytest.mark.parametrize("method", ["deda", "sre2l"])
@pytest.mark.parametrize("cell", DIGITS_CELLS)
def test_digits_cells_are_small(method, cell):
    cfg = compose_experiment(f"{method}/{cell}")
    check_common(cfg, method, cell)
    assert cfg.recover.iterations <= 300  # recover in well under a minute on a CPU
    assert cfg.teacher.model.name == "convnet"
    assert cfg.evaluate.epochs < 400
