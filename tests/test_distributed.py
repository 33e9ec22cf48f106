"""torchrun: DDP training of teacher and students on CPU (gloo), one run directory and one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, TINY, TRAINED_TEACHER, run_pipeline

from ddist.errors import ConfigError
from ddist.logging import RunLogger
from ddist.runtime import distributed
from ddist.training.engine import Loop, Optim
from ddist.training.loop import CHECKPOINT, Logging, fit

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _fit(work, crash_at=None):
    """A regression fit over a seeded stream (4 epochs of 3 batches of 6), each rank on its part of a batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 12)
    gen = torch.Generator().manual_seed(1)
    stream = ((torch.randn(7, 4, generator=gen), torch.randn(7, 1, generator=gen)) for _ in range(12))
    steps = []

    def loss_fn(m, batch):
        steps.append(len(steps))
        if crash_at is not None and len(steps) > crash_at:
            raise KeyboardInterrupt  # stands for a kill
        x, y = batch
        part, weight = distributed.my_part(len(y))
        return weight * torch.nn.functional.mse_loss(m(x[part]), y[part])

    fit(
        model,
        stream,
        loss_fn,
        Optim(opt, list(model.parameters()), schedule),
        Loop(total=12, desc="t", stage="t", hint=""),
        Logging(RunLogger(None), every=100, steps_per_epoch=3),
        work_dir=work,
    )
    return model, len(steps)


def _rank(rank, world, init_file, work, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, computed = _fit(work)
        torch.save({"state": model.state_dict(), "computed": computed}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp_path, work):
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(_rank, args=(2, tmp_path / "init", work, out), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_ddp_fit_of_two_ranks_resumes_a_checkpoint_and_matches_one_process(tmp_path):
    reference, _ = _fit(None)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, crash_at=7)  # one process, killed in the third epoch: two epochs checkpointed
    ranks = _two_ranks(tmp_path, tmp_path)
    assert [r["computed"] for r in ranks] == [6, 6]  # both ranks resumed at step 6
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # DDP keeps the ranks' weights identical
    # each rank saw its part of every batch: together, the one-process gradient (up to float sums)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(a[k], v, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / CHECKPOINT).exists()


def test_a_batch_smaller_than_the_rank_count_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world", lambda: 4)
    monkeypatch.setattr(distributed, "rank", lambda: 3)
    assert distributed.my_part(10) == (slice(7, 10), 4 * 3 / 10)
    with pytest.raises(ConfigError, match="nproc_per_node"):
        distributed.my_part(3)


RANDOM_SET = [*TRAINED_TEACHER, "pipeline=random", "pipeline.stages=[squeeze,random,evaluate]"]


def _torchrun(cwd: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m ddist RANDOM_SET OVERRIDES` in cwd."""
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DDIST_PROGRESS": "0", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [*cmd, "-m", "ddist", *TINY, *RANDOM_SET, f"paths.cache_dir={cache}", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


@pytest.mark.slow  # a two-rank run of squeeze, random, evaluate beside the same run in this process
def test_torchrun_trains_teacher_and_students_with_ddp_and_rank_0_alone_writes(tmp_path, cache_dir):
    one = run_pipeline(*RANDOM_SET, run_dir=tmp_path / "one", cache_dir=cache_dir)  # the session's teacher
    both = tmp_path / "two"
    both.mkdir()
    _torchrun(both, tmp_path / "cache2", "logger=wandb", "logger.mode=offline")
    # one run directory (the default, named by rank 0's start time) with one results.json and one W&B run
    (run_dir,) = both.glob("outputs/runs/*/*")
    assert [p.relative_to(both) for p in both.rglob("results.json")] == [run_dir.relative_to(both) / "results.json"]
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    assert (run_dir / ".hydra").is_dir() and len(list(run_dir.glob("*_rank1.log"))) == 1
    # the teacher and students trained across the ranks come near the one-process accuracies, not to them:
    # the rank count keys their entries (ddist/training/teacher.py teacher_key)
    (teacher_key,) = (tmp_path / "cache2").glob("teacher/*/key.json")
    assert json.loads(teacher_key.read_text())["world_size"] == 2
    two = json.loads((run_dir / "results.json").read_text())
    assert one["teacher_acc"] > 0.85 and abs(two["teacher_acc"] - one["teacher_acc"]) < 0.05
    assert abs(two["students"][0]["acc_mean"] - one["students"][0]["acc_mean"]) < 0.15


def test_a_fixed_gpu_under_torchrun_is_refused_naming_the_option(monkeypatch):
    from ddist.training.loop import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "active", lambda: True)
    with pytest.raises(ConfigError, match="device=auto"):
        resolve_device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")


def test_the_rank_count_keys_the_teacher_and_the_students(tmp_path, monkeypatch):
    """DDP's ranks train another teacher and other students than one process (issue 23: 86.39% vs 86.11% on
    digits): the rank count is in their keys, so torchrun and one-process runs never share those entries, and
    what is keyed on the teacher (teacher_identity: recover, class statistics, diffusion) follows."""
    from conftest import compose_cfg, stage_ctx
    from omegaconf import OmegaConf

    from ddist.runtime.artifacts import DistilledSet
    from ddist.training.students import student_base_key
    from ddist.training.teacher import teacher_identity, teacher_key

    cfg = compose_cfg(cache_dir=tmp_path, run_dir=tmp_path)
    ev = OmegaConf.merge(cfg.evaluate, {"protocol": "hard"})
    distilled = DistilledSet(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), {"sha256": "0" * 64})
    ctx = stage_ctx(cfg, tmp_path)  # its device resolves evaluate.precision

    def keys(world: int) -> tuple[dict, dict, dict]:
        monkeypatch.setenv("WORLD_SIZE", str(world))  # torchrun's launch: the squeeze stage's ranks
        monkeypatch.setattr(distributed, "world", lambda: world)  # the ranks training the students now
        return teacher_key(cfg), teacher_identity(cfg), student_base_key(cfg, ev, distilled, ctx)

    one, two = keys(1), keys(2)
    assert one[0]["world_size"] == 1 and two[0]["world_size"] == 2  # declared always, 1 included
    for a, b in zip(one, two, strict=True):
        assert a != b
    assert keys(2) == two and keys(1) == one  # the same rank count, the same keys
