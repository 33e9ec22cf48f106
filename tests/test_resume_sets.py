"""Recover and diffusion sampling resume, reuse and shard (ddist/runtime/workdir.py, ddist/runtime/merge.py).

A run (a forked child) killed with SIGKILL while its parts are being written resumes with only the unfinished
parts and ends byte-identical to an uninterrupted run; shards (by hand, or a joblib multirun)
assemble the same set; an identical configuration reuses a finished set. Only the
multiruns are `python -m ddist` subprocesses; the others run in-process.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import CONF, compose_cfg, kill_when, run_ddist, run_logged, start_forked_run
from hydra import compose, initialize_config_dir
from test_experiments_diffusion import TINY_PIXEL

from ddist.data import dataset_spec
from ddist.errors import CheckpointError
from ddist.runtime import merge
from ddist.runtime.artifacts import load_distilled, save_distilled, to_plain
from ddist.runtime.workdir import WorkDir

# 10 recover groups (ipc_slice, 2 classes a batch, 2 images a class) of 60 iterations each
RECOVER = ["pipeline=sre2l", "pipeline.stages=[squeeze,recover]", "ipc=2", "recover.batch.size=2"]
RECOVER_ITERATIONS = "recover.iterations=60"
# 10 sampling groups (independent, 2 images each) of 20 steps each, with the tiny pixel UNet
SAMPLE = ["pipeline=diffusion", "pipeline.stages=[diffusion]", "ipc=2", *TINY_PIXEL, "diffusion.sample.batch_size=2"]
SAMPLE_STEPS = "diffusion.sample.steps=20"


def _work_dir(log: str) -> Path:
    """The work directory a run assembled or reused its set in (from its log)."""
    match = re.search(r"(?:assembled .* into|reusing the finished set) (\S+)/distilled", log)
    assert match, log[-3000:]
    return Path(match.group(1))


def _kill_after_some_parts(args: list[str], cache: Path, work: Path, run_dir: Path, total: int) -> set[str]:
    """Start a run of ARGS (a forked child), SIGKILL it once a random number (1 .. total - 2) of its parts
    are on disk in its work directory `work`; returns the names of the parts that were there."""
    want = random.randint(1, total - 2)
    proc = start_forked_run(*args, run_dir=run_dir, cache_dir=cache)
    kill_when(proc, lambda: len(list(work.glob("parts/*.safetensors"))) >= want)
    assert proc.exitcode == -signal.SIGKILL, f"the run ended before it was killed (wanted {want} parts)"
    parts = list(work.glob("parts/*.safetensors"))
    assert 1 <= len(parts) < total
    assert not (work / "distilled").exists()
    return {p.name for p in parts}


def _redone(log: str, pattern: str) -> set[str]:
    """The parts a run made, as part file names, from its 'group g/N' log lines."""
    return {f"{int(g) - 1:06d}.safetensors" for g in re.findall(pattern, log)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "kind", "done_line"),
    [
        ([*RECOVER, RECOVER_ITERATIONS], "recover", r"recover batch (\d+)/10 done"),
        ([*SAMPLE, SAMPLE_STEPS], "diffusion_sample", r"sampled group (\d+)/10"),
    ],
    ids=["recover", "sampling"],
)
def test_a_killed_run_resumes_with_only_the_unfinished_parts(args, kind, done_line, cache_dir, tmp_path, caplog):
    reference = run_logged(*args, run_dir=tmp_path / "ref", cache_dir=cache_dir, caplog=caplog)
    expected = (tmp_path / "ref" / "distilled" / "data.safetensors").read_bytes()
    work = _work_dir(reference)
    shutil.rmtree(work)  # the same cache (teacher, diffusion model), no finished set

    finished = _kill_after_some_parts(args, cache_dir, work, tmp_path / "killed", total=10)
    rerun = run_logged(*args, run_dir=tmp_path / "rerun", cache_dir=cache_dir, caplog=caplog)

    name = "recover" if kind == "recover" else "diffusion_sample"
    first_missing = min(set(f"{i:06d}.safetensors" for i in range(10)) - finished)
    assert f"{name}: {len(finished)}/10 groups done, resuming at {int(first_missing[:6]) + 1}" in rerun
    assert _redone(rerun, done_line).isdisjoint(finished)  # no finished part was made again
    assert len(_redone(rerun, done_line)) == 10 - len(finished)
    assert (tmp_path / "rerun" / "distilled" / "data.safetensors").read_bytes() == expected
    assert not (_work_dir(rerun) / "parts").exists()  # the parts went into the set


@pytest.mark.slow
def test_an_identical_configuration_reuses_the_finished_set(cache_dir, tmp_path, caplog):
    args = [*RECOVER, "recover.iterations=3"]
    first = run_logged(*args, run_dir=tmp_path / "a", cache_dir=cache_dir, caplog=caplog)
    second = run_logged(*args, run_dir=tmp_path / "b", cache_dir=cache_dir, caplog=caplog)
    assert "reusing the finished set" in second and "recover batch" not in second
    assert _work_dir(first) == _work_dir(second)
    a, b = (tmp_path / r / "distilled" / "data.safetensors" for r in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_ino == b.stat().st_ino  # run directories hold hard links, not copies ...
    assert not a.stat().st_mode & 0o222  # ... to read-only files: an ordinary user cannot change them in place
    # root can: the changed bytes are the cache entry's, whose checksum the next run checks
    expected = a.read_bytes()
    with open(b, "r+b") as f:
        f.seek(len(expected) - 4)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(CheckpointError, match=rf"a copy of the cache entry {_work_dir(first)}"):
        load_distilled(tmp_path / "a" / "distilled")  # the copy's own error names the entry too
    third = run_logged(*args, run_dir=tmp_path / "d", cache_dir=cache_dir, caplog=caplog)
    assert f"The cached recover at {_work_dir(first)} has a distilled/data.safetensors whose checksum" in third
    assert "building it again" in third and "recover batch" in third
    assert (tmp_path / "d" / "distilled" / "data.safetensors").read_bytes() == expected
    other = run_logged(*args, "seed=1", run_dir=tmp_path / "c", cache_dir=cache_dir, caplog=caplog)
    assert "recover batch" in other and _work_dir(other) != _work_dir(first)


@pytest.mark.slow
def test_shards_by_hand_stop_after_their_share_and_the_last_assembles(cache_dir, tmp_path, caplog):
    args = [*RECOVER, "recover.iterations=4", "shard.count=2"]
    reference = run_logged(
        *RECOVER, "recover.iterations=4", run_dir=tmp_path / "ref", cache_dir=cache_dir, caplog=caplog
    )
    shutil.rmtree(_work_dir(reference))

    first = run_logged(*args, "shard.index=0", run_dir=tmp_path / "s0", cache_dir=cache_dir, caplog=caplog)
    shard = json.loads((tmp_path / "s0" / "shard.json").read_text())
    assert shard["parts"] == [0, 2, 4, 6, 8] and shard["missing"] == [1, 3, 5, 7, 9]
    assert not (tmp_path / "s0" / "results.json").exists() and not (tmp_path / "s0" / "distilled").exists()
    assert "stopping here" in first
    assert merge.main([str(tmp_path / "s0")]) == 2  # parts missing: nothing to merge yet

    run_logged(*args, "shard.index=1", run_dir=tmp_path / "s1", cache_dir=cache_dir, caplog=caplog)
    expected = (tmp_path / "ref" / "distilled" / "data.safetensors").read_bytes()
    assert (tmp_path / "s1" / "distilled" / "data.safetensors").read_bytes() == expected
    assert merge.main([str(tmp_path / "s0")]) == 0  # already assembled: says so


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "plugin"),
    [("joblib", "hydra_plugins.hydra_joblib_launcher"), ("submitit_local", "hydra_plugins.hydra_submitit_launcher")],
)
def test_launcher_shards_assemble_the_unsharded_set(launcher, plugin, cache_dir, tmp_path, caplog):
    """Two shards as one multirun, in parallel processes (joblib) or submitit's local executor
    (the SLURM launcher's code path without a cluster)."""
    pytest.importorskip(plugin, reason=f"the optional launcher plugin for hydra/launcher={launcher} is not installed")
    args = [*RECOVER, "recover.iterations=4", "seed=3"]
    reference = run_logged(*args, run_dir=tmp_path / "ref", cache_dir=cache_dir, caplog=caplog)
    shutil.rmtree(_work_dir(reference))
    run_ddist(
        "-m",
        *args,
        "shard.index=0,1",
        "shard.count=2",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra.sweep.subdir=${hydra.job.num}",
        run_dir=tmp_path,
        cache_dir=cache_dir,
    )
    jobs = [tmp_path / "sweep" / str(i) for i in range(2)]
    expected = (tmp_path / "ref" / "distilled" / "data.safetensors").read_bytes()
    sets = [j / "distilled" / "data.safetensors" for j in jobs if (j / "distilled").exists()]
    assert sets and all(s.read_bytes() == expected for s in sets)
    # a job either stopped after its share or went on with the set (assembled by it, or by the other)
    assert all((j / "shard.json").exists() != (j / "distilled").exists() for j in jobs)


def test_merge_assembles_parts_into_the_set_save_distilled_writes(tmp_path):
    cfg = compose_cfg("ipc=3", cache_dir=tmp_path / "cache", run_dir=tmp_path / "run")
    spec = dataset_spec(cfg.dataset)
    labels = torch.arange(10).repeat_interleave(3)
    images = torch.randn(30, 1, 16, 16)
    groups = [torch.arange(c, 30, 3) for c in range(3)]  # one image of every class per part, as ipc_slice
    plan = {"labels": labels.tolist(), "dataset": to_plain(cfg.dataset), "meta": {"ipc": 3}}
    work = WorkDir(cfg, "recover", {"test": 1}, "groups", len(groups), plan)
    for g in (2, 0):
        work.save(g, images[groups[g]], groups[g])
    assert merge.main([str(work.root)]) == 2  # part 1 is missing
    work.save(1, images[groups[1]], groups[1])
    assert merge.main([str(work.root)]) == 0
    save_distilled(tmp_path / "direct", images, labels, spec, {"ipc": 3})
    assert (work.distilled / "data.safetensors").read_bytes() == (tmp_path / "direct" / "data.safetensors").read_bytes()
    assert load_distilled(work.distilled).meta["sha256"] == load_distilled(tmp_path / "direct").meta["sha256"]
    assert sorted(p.name for p in (work.distilled / "images").rglob("*.png")) == sorted(
        p.name for p in (tmp_path / "direct" / "images").rglob("*.png")
    )


def test_a_truncated_plan_is_named_by_merge_and_written_again_by_a_rerun(tmp_path, capsys, caplog):
    cfg = compose_cfg("ipc=3", cache_dir=tmp_path / "cache", run_dir=tmp_path / "run")
    labels = torch.arange(10).repeat_interleave(3)
    groups = [torch.arange(c, 30, 3) for c in range(3)]
    plan = {"labels": labels.tolist(), "dataset": to_plain(cfg.dataset), "meta": {"ipc": 3}}
    work = WorkDir(cfg, "recover", {"test": 2}, "groups", len(groups), plan)
    for g in range(3):
        work.save(g, torch.randn(10, 1, 16, 16), groups[g])
    assert json.loads((work.root / "key.json").read_text()) == {"test": 2}  # the store records the key
    (work.root / "plan.json").write_text('{"kind": "recover", "num_pa')  # a killed editor, a full disk
    assert merge.main([str(work.root)]) == 2
    err = capsys.readouterr().err
    assert f"The cached recover at {work.root} has an unreadable plan.json" in err and "Rerun one of the jobs" in err
    with caplog.at_level(logging.WARNING, logger="ddist"):
        work.start()  # what a rerun of the job does first
    assert "writing it again" in caplog.text
    assert merge.main([str(work.root)]) == 0 and work.finished()
    assert not (work.distilled / "data.safetensors").stat().st_mode & 0o222  # read-only once complete
    assert json.loads((work.distilled / "meta.json").read_text())["cache_entry"] == str(work.root)


def test_merge_of_a_directory_that_is_no_work_names_what_to_pass(tmp_path, capsys):
    assert merge.main([str(tmp_path)]) == 2
    assert "neither a work directory" in capsys.readouterr().err


def test_the_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra/launcher=slurm needs its plugin")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "shard.count=4", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.gpus_per_node == 1 and cfg.shard.count == 4
