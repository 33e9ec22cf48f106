"""The pipeline end to end with tiny settings: in-process runs (run_pipeline) for what the pipeline
does, and `python -m ddist` subprocesses (run_ddist) for what only the command line does: the printed
table, multirun with W&B offline, one paragraph without traceback for a bad input, the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, read_results, run_ddist, run_pipeline, tiny_teacher
from safetensors.torch import load_file

from ddist import report
from ddist.errors import DdistError


def test_random_pipeline_writes_results_and_distilled_set(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "error.json").write_text('{"message": "an earlier failure", "exit_code": 2}')
    proc = run_ddist("pipeline=random", "ipc=2", run_dir=run_dir, cache_dir=cache_dir)
    assert not (run_dir / "error.json").exists()  # a rerun that succeeds clears the old error
    assert proc.stdout.rstrip().endswith(f"run directory: {run_dir}")  # the table ends by saying where it is
    results = read_results(run_dir)
    assert results["method"] == "random" and results["dataset"] == "digits" and results["ipc"] == 2
    assert 0.0 <= results["teacher_acc"] <= 1.0
    (student,) = results["students"]
    assert student["name"] == "convnet" and student["protocol"] == "soft" and len(student["accs"]) == 1
    assert 0.0 <= student["acc_mean"] <= 1.0
    assert set(results["timings"]) == {"squeeze", "random", "relabel", "evaluate", "analyse"}
    # the table is printed
    assert "random on digits, IPC 2" in proc.stdout
    # the DistilledSet layout of DESIGN.md
    distilled = run_dir / "distilled"
    tensors = load_file(distilled / "data.safetensors")
    assert tensors["images"].shape == (20, 1, 16, 16) and tensors["labels"].tolist() == sorted(
        tensors["labels"].tolist()
    )
    assert len(list((distilled / "images").glob("*/*.png"))) == 20
    assert json.loads((distilled / "meta.json").read_text())["method"] == "random"


def test_same_seed_gives_identical_distilled_set_and_accuracy(tmp_path, cache_dir):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run_dir in runs:
        run_pipeline("pipeline=random", "ipc=2", "seed=3", run_dir=run_dir, cache_dir=cache_dir)
    a, b = ((r / "distilled" / "data.safetensors").read_bytes() for r in runs)
    assert a == b
    assert read_results(runs[0])["students"] == read_results(runs[1])["students"]
    other = tmp_path / "c"
    run_pipeline("pipeline=random", "ipc=2", "seed=4", run_dir=other, cache_dir=cache_dir)
    assert (other / "distilled" / "data.safetensors").read_bytes() != a


def test_hard_protocol_and_several_students_with_repeats(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_pipeline(
        "pipeline=random",
        "ipc=1",
        "evaluate=hard",
        "evaluate.epochs=2",
        "evaluate.repeats=2",
        "evaluate.students=[{name: convnet, width: 8},{name: convnet, width: 8, norm: instance}]",
        run_dir=run_dir,
        cache_dir=cache_dir,
    )
    students = read_results(run_dir)["students"]
    assert [s["protocol"] for s in students] == ["hard", "hard"]
    assert all(len(s["accs"]) == 2 for s in students)


@pytest.mark.slow
def test_a_multirun_records_a_failed_job_goes_on_and_makes_one_wandb_run_per_job(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    # job 0 asks for IPC 0 (a clean ddist error); jobs 1 and 2 are tiny random-real runs logged to W&B
    proc = run_ddist(
        "pipeline=random",
        "-m",
        "ipc=0,1,2",
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.sweep.dir={sweep}",
        run_dir=tmp_path,
        cache_dir=cache_dir,
        env={"WANDB_MODE": "offline"},
        check=False,
    )
    failed, *jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    error = json.loads((failed / "error.json").read_text())
    assert "ipc" in error["message"] and error["exit_code"] == 2
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "1 of 3 jobs failed" in proc.stderr and failed.name in proc.stderr
    report.main([str(sweep)])
    md = (sweep / "report.md").read_text()
    assert f"failed job: `{failed.name}`" in md and "ipc" in md
    # the sweep went on: every other job has its results and one offline W&B run with its final accuracy
    assert [read_results(job)["ipc"] for job in jobs] == [1, 2]
    for job in jobs:
        results = read_results(job)
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"expected one offline W&B run in {job}"
        (table,) = runs[0].glob("files/media/table/results_*.table.json")
        logged = json.loads(table.read_text())
        row = dict(zip(logged["columns"], logged["data"][0], strict=False))
        assert row["ipc"] == results["ipc"]
        assert row["acc_mean"] == pytest.approx(results["students"][0]["acc_mean"])
        # the run's record names its sweep's group (a custom sweep dir), its name and its tags
        record = next(runs[0].glob("*.wandb")).read_bytes()
        assert f"{sweep.parent.name}_{sweep.name}".encode() in record
        assert f"random-digits-ipc{results['ipc']}-s0".encode() in record
        assert b"pipeline:random" in record


def pipeline_error(*overrides: str, run_dir: Path, cache_dir: Path) -> str:
    """The message of the error an in-process run with these overrides raises."""
    with pytest.raises(Exception) as info:  # Hydra's composition errors and ddist's alike
        run_pipeline(*overrides, run_dir=run_dir, cache_dir=cache_dir)
    return str(info.value)


def test_bad_input_is_one_clear_error_without_traceback(tmp_path, cache_dir):
    """The command line turns a ddist error into one paragraph, exit 2, no traceback."""
    proc = run_ddist("pipeline=random", "ipc=0", run_dir=tmp_path / "run", cache_dir=cache_dir, check=False)
    assert proc.returncode == 2
    assert "ipc must be an integer >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "override, needle",
    [
        ("dataset=nosuch", "Available options in 'dataset'"),
        ("pipeline=nosuch", "Available options in 'pipeline'"),
        ("ipc=1000", "Set ipc <="),
        ("evaluate.students=[nosuchnet]", "convnet"),
        ("teacher.checkpoint=/nonexistent/teacher.pt", "teacher.checkpoint"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, cache_dir, override, needle):
    pipeline = [] if override.startswith("pipeline=") else ["pipeline=random"]
    assert needle in pipeline_error(*pipeline, override, run_dir=tmp_path / "run", cache_dir=cache_dir)


def test_missing_data_root_names_the_option(tmp_path, cache_dir):
    with pytest.raises(DdistError, match="dataset.root"):
        run_pipeline(
            "pipeline=random",
            "dataset=cifar10",
            f"dataset.root={tmp_path}/nothing",
            run_dir=tmp_path / "run",
            cache_dir=cache_dir,
        )


def test_corrupt_or_mismatched_teacher_checkpoint_is_a_clear_error(tmp_path, cache_dir):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(DdistError, match="teacher.checkpoint"):
        run_pipeline(f"teacher.checkpoint={corrupt}", run_dir=tmp_path / "r1", cache_dir=cache_dir)
    assert corrupt.read_bytes() == b"not a checkpoint"

    # a valid checkpoint of another architecture (the cached tiny teacher, loaded into a wider model)
    run_pipeline("pipeline=random", "ipc=1", "pipeline.stages=[squeeze]", run_dir=tmp_path / "r2", cache_dir=cache_dir)
    teacher = tiny_teacher(cache_dir)
    before = teacher.read_bytes()
    with pytest.raises(DdistError, match="does not fit"):
        run_pipeline(
            f"teacher.checkpoint={teacher}", "teacher.model.width=32", run_dir=tmp_path / "r3", cache_dir=cache_dir
        )
    assert teacher.read_bytes() == before


def test_an_existing_checkpoint_is_used_and_measured(tmp_path, cache_dir):
    squeeze_only = ["pipeline=random", "ipc=1", "pipeline.stages=[squeeze]"]
    first = run_pipeline(*squeeze_only, run_dir=tmp_path / "r1", cache_dir=cache_dir)
    teacher = tiny_teacher(cache_dir)
    given = run_pipeline(
        *squeeze_only, f"teacher.checkpoint={teacher}", run_dir=tmp_path / "r2", cache_dir=tmp_path / "empty_cache"
    )
    assert given["teacher_acc"] == pytest.approx(first["teacher_acc"])
    assert not list((tmp_path / "empty_cache").glob("teacher/*/teacher.pt"))


def test_a_failed_run_keeps_an_earlier_result(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_pipeline("pipeline=random", "ipc=1", run_dir=run_dir, cache_dir=cache_dir)
    before = (run_dir / "results.json").read_bytes()
    with pytest.raises(DdistError, match="evaluate.lr"):
        run_pipeline(
            "pipeline=random",
            "ipc=1",
            "evaluate.lr=1e30",
            "evaluate.optimizer=sgd",
            "evaluate.momentum=0",
            run_dir=run_dir,
            cache_dir=cache_dir,
        )
    assert (run_dir / "results.json").read_bytes() == before


def test_console_script_is_the_same_entry_point(tmp_path):
    script = Path(sys.executable).with_name("ddist")
    proc = subprocess.run(
        [str(script), "--cfg", "job", "dataset=cifar10"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: cifar10" in proc.stdout and "name: deda" in proc.stdout


@pytest.mark.slow
def test_cfg_job_resolve_and_a_multirun_cfg_print_the_config_or_one_line(tmp_path, cache_dir):
    """`--cfg job --resolve` prints the resolved config (no run: no output directory); `-m ... --cfg job`
    is one clear error, not Hydra's ValueError traceback."""
    resolved = run_ddist("--cfg=job", "--resolve", "ipc=1", run_dir=tmp_path, cache_dir=cache_dir, tiny=False)
    assert "output_dir: null" in resolved.stdout and f"cache_dir: {cache_dir}" in resolved.stdout
    assert resolved.stderr == ""
    swept = run_ddist("-m", "--cfg=job", "ipc=1,2", run_dir=tmp_path, cache_dir=cache_dir, tiny=False, check=False)
    assert swept.returncode == 2
    assert swept.stderr.startswith("ddist: error: give one of -m") and "Traceback" not in swept.stderr
    assert len(swept.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_help_lists_the_groups_options_and_tab_completes_nested_experiments(tmp_path, cache_dir):
    """`--help` lists what `group=option` accepts (no `*_schema` entries of the ConfigStore, no 300 lines
    of config); `experiment=<TAB>` completes to the nested experiment names."""
    helped = run_ddist("--help", run_dir=tmp_path, cache_dir=cache_dir, tiny=False).stdout
    assert "schema" not in helped and len(helped.splitlines()) < 80
    assert "dataset: cifar10, cifar100, digits, folder," in helped and "deda/cifar10_ipc10" in helped

    def complete(line: str) -> list[str]:
        env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
        query = [sys.executable, "-m", "ddist", "-sc", "query=bash"]
        return subprocess.run(query, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.split()

    assert complete("ddist experiment=deda/cifar10_") == [
        "experiment=deda/cifar10_ipc10",
        "experiment=deda/cifar10_ipc50",
    ]
    assert "dataset=digits" in complete("ddist dataset=") and not any("schema" in o for o in complete("ddist dataset="))


@pytest.mark.slow
@pytest.mark.parametrize("names", [["cat", "dog"], ["a b", "ünï", "-lead"]], ids=["plain", "awkward"])
def test_a_folder_dataset_runs_from_the_command_line_with_only_its_root(names, tmp_path, cache_dir):
    """The README's "any train/<class>/" dataset: `dataset=folder dataset.root=...` and nothing else about the
    data (num_classes and classes come from the folders); a class folder named "-lead" is never read as an option."""
    from test_data import write_class_folders

    write_class_folders(tmp_path / "data", names)
    run_dir = tmp_path / "run"
    proc = run_ddist(
        "dataset=folder", f"dataset.root={tmp_path / 'data'}", "ipc=1", run_dir=run_dir, cache_dir=cache_dir
    )
    assert "Traceback" not in proc.stderr
    results = read_results(run_dir)
    assert results["dataset"] == "folder" and results["ipc"] == 1
    assert len(results["students"][0]["accs"]) == 1
    distilled = load_file(str(next((run_dir / "distilled").glob("*.safetensors"))))
    assert sorted(distilled["labels"].tolist()) == list(range(len(names)))
