"""The analyse stage end to end on digits (teacher-space FD, figures, robust scores) and its helpers."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_pipeline

from ddist.data.subsets import pick_random_real, real_subsample, same_ipc_rows
from ddist.metrics import robust


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    """One tiny random-pipeline run with every analyse option that works offline."""
    run = tmp_path_factory.mktemp("analyse") / "run"
    run_pipeline(
        "pipeline=random",
        "ipc=2",
        "analyse.enabled=true",
        "analyse.hard.epochs=1",
        "analyse.real_samples_per_class=10",
        "analyse.robust_scores=true",
        "analyse.real_hard_acc=0.9",
        run_dir=run,
        cache_dir=cache_dir,
    )
    return run


def test_analysis_written_to_results_and_file(run_dir):
    analysis = json.loads((run_dir / "analysis.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    # results.json keeps the figures; the per-sample arrays stay in analysis.json
    assert "normalized_singular_values" not in json.dumps(results)
    assert (
        results["analysis"]["spectrum"]["synthetic"]["effective_rank"]
        == analysis["spectrum"]["synthetic"]["effective_rank"]
    )
    assert results["analysis"]["fd_teacher"] == analysis["fd_teacher"]
    assert "fid" not in analysis  # no Inception weights given: never called FID
    assert analysis["fd_teacher"] > 0
    pd = analysis["prototype_distance"]
    assert len(pd["synthetic_per_class"]) == 10
    assert 0 <= pd["synthetic"] <= 2 and 0 <= pd["real"] <= 2
    assert -1 <= analysis["ssim"]["synthetic"] <= 1
    spec = analysis["spectrum"]
    # 20 synthetic rows, centred: at most 19 nonzero singular values; 100 real rows.
    assert 1 <= spec["synthetic"]["effective_rank"] <= 19
    assert spec["synthetic"]["num_samples"] == 20 and spec["real"]["num_samples"] == 100
    assert spec["synthetic"]["normalized_singular_values"][0] == pytest.approx(1.0)
    assert set(analysis["cost"]["seconds"]) == {"squeeze", "random", "relabel", "evaluate"}
    for name in ("results.json", "analysis.json"):  # strict JSON: no NaN/inf
        json.loads((run_dir / name).read_text(), parse_constant=pytest.fail)


def test_covariance_figures_of_the_final_layer_per_class(run_dir):
    cov = json.loads((run_dir / "analysis.json").read_text())["covariance"]
    # a random run reports DEDA's default L: the pooled last block of the width-16 ConvNet-3
    assert (cov["layer"], cov["dim"]) == ("stage3", 16)
    for side in ("synthetic", "real_same_ipc"):
        figs = cov[side]
        assert len(figs["mean_diagonal_per_class"]) == 10 and figs["mean_diagonal"] > 0
        assert figs["offdiag_norm"] >= 0 and figs["spanned_min_eigenvalue"] > 0
        # IPC 2: two images per class span one direction, so lambda_max = lambda_min
        assert figs["spanned_condition_number_per_class"] == pytest.approx([1.0] * 10)


def test_robust_scores_follow_the_definitions(run_dir):
    r = json.loads((run_dir / "analysis.json").read_text())["robust"]
    acc = r["accuracies"]
    assert acc["real_hard"] == 0.9  # supplied by analyse.real_hard_acc: not retrained
    assert r["ior"] == pytest.approx(acc["syn"] - acc["random"])
    assert r["hlr"] == pytest.approx(0.9 - acc["syn_hard"])
    assert r["lrs"] == pytest.approx(robust.label_robust_score(r["hlr"], r["ior"], 0.5))
    expected_ars = robust.augmentation_robust_score(acc["syn"], acc["random"], acc["syn_noaug"], acc["random_noaug"])
    assert r["ars"] == pytest.approx(expected_ars)
    assert 0 <= r["lrs"] <= 1 and 0 <= r["ars"] <= 1


def test_figures_written_and_non_empty(run_dir):
    analysis = json.loads((run_dir / "analysis.json").read_text())
    names = sorted(Path(p).name for p in analysis["figures"])
    assert names == ["grid.png", "prototype_distance.png", "spectrum.png"]
    for rel in analysis["figures"]:
        data = (run_dir / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


class _Labels:
    def __init__(self, targets):
        self.targets = torch.tensor(targets)


def test_real_subsample_is_balanced_and_independent_of_the_random_pick():
    ds = _Labels([c for c in range(3) for _ in range(30)] + [3] * 4)  # class 3 is small
    picked = real_subsample(ds, 4, per_class=10, seed=0)
    assert [len(p) for p in picked] == [10, 10, 10, 4]
    for c, idx in enumerate(picked):
        assert (ds.targets[idx] == c).all() and len(set(idx.tolist())) == len(idx)
    random_set = pick_random_real(ds, 3, ipc=2, seed=0)
    assert not all(torch.equal(picked[c][:2], random_set[2 * c : 2 * c + 2]) for c in range(3))


def test_same_ipc_rows_take_the_first_images_of_each_class():
    assert same_ipc_rows([3, 2, 4], ipc=2).tolist() == [0, 1, 3, 4, 5, 6]
    assert same_ipc_rows([1, 3], ipc=2).tolist() == [0, 1, 2]
    assert not math.isnan(float(same_ipc_rows([5], 5).sum()))
