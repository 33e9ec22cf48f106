"""The report on fabricated results.json files, including an unfinished job and a missing grid cell."""

import csv
import json

import pytest
from omegaconf import OmegaConf

from ddist import report


def _write_run(path, method, ipc, seed, acc, analysis=None, timings=None, dataset="digits"):
    path.mkdir(parents=True)
    (path / ".hydra").mkdir()
    results = {
        "method": method,
        "dataset": dataset,
        "ipc": ipc,
        "seed": seed,
        "teacher_acc": 0.95,
        "students": [{"name": "convnet", "protocol": "soft", "accs": [acc], "acc_mean": acc, "acc_std": 0.0}],
        "timings": timings or {"squeeze": 1.0, "evaluate": 2.0},
        "peak_memory_mb": {"squeeze": 100.0 + seed, "evaluate": 50.0},
    }
    (path / "results.json").write_text(json.dumps(results))
    if analysis is not None:
        (path / "analysis.json").write_text(json.dumps(analysis))


@pytest.fixture()
def sweep(tmp_path):
    """A multirun over method {random, deda} x ipc {1, 10} x seed {0, 1}, with two holes."""
    root = tmp_path / "multirun"
    n = 0
    for method, base in (("random", 0.5), ("deda", 0.7)):
        for ipc in (1, 10):
            for seed in (0, 1):
                job = root / f"{n}_pipeline={method},ipc={ipc},seed={seed}"
                n += 1
                if (method, ipc, seed) == ("deda", 10, 1):
                    # The job started (Hydra wrote .hydra/) but never finished.
                    (job / ".hydra").mkdir(parents=True)
                    (job / ".hydra" / "overrides.yaml").write_text("- pipeline=deda\n- ipc=10\n- seed=1\n")
                    continue
                if (method, ipc, seed) == ("random", 10, 1):
                    continue  # no directory at all: only the grid says it is missing
                acc = base + 0.1 * (ipc == 10) + 0.02 * seed
                analysis = {
                    "prototype_distance": {"synthetic": 0.1 * (seed + 1)},
                    "spectrum": {"synthetic": {"effective_rank": 3.0, "decay_slope": -1.0}},
                    "fd_teacher": 2.0,
                }
                _write_run(job, method, ipc, seed, acc, analysis=analysis)
    return root


def test_rows_missing_runs_and_files(sweep, tmp_path):
    out = tmp_path / "report"
    rows, collected, missing = report.build_report([sweep], out)
    by_key = {(r["method"], r["ipc"]): r for r in rows}
    assert set(by_key) == {("random", 1), ("random", 10), ("deda", 1), ("deda", 10)}

    deda1 = by_key[("deda", 1)]
    assert deda1["seeds"] == 2
    assert deda1["acc_mean"] == pytest.approx(0.71)  # mean of 0.70 and 0.72
    assert deda1["acc_std"] == pytest.approx(0.0141421, abs=1e-6)  # sample std of the two seeds
    assert deda1["random_acc"] == pytest.approx(0.51)
    assert deda1["ior"] == pytest.approx(0.20)
    assert deda1["proto_dist"] == pytest.approx(0.15)
    assert deda1["erank"] == pytest.approx(3.0) and deda1["fd_teacher"] == pytest.approx(2.0)
    assert deda1["time_s"] == pytest.approx(3.0)
    assert deda1["peak_mem_mb"] == pytest.approx(101.0)  # the larger of the seeds' peaks
    assert deda1["lrs"] is None  # robust scores were not run

    deda10 = by_key[("deda", 10)]  # one seed finished
    assert deda10["seeds"] == 1 and deda10["acc_std"] == 0.0
    assert deda10["acc_mean"] == pytest.approx(0.80)
    assert deda10["random_acc"] == pytest.approx(0.60)  # random ipc 10 has only seed 0

    assert set(missing) == {("digits", "deda", 10, 1), ("digits", "random", 10, 1)}
    assert [overrides for _, overrides in collected.incomplete] == ["pipeline=deda ipc=10 seed=1"]

    md = (out / "report.md").read_text()
    assert "no run for dataset=digits method=random ipc=10 seed=1" in md
    assert "unfinished job (no results.json)" in md and "pipeline=deda ipc=10 seed=1" in md
    assert "| deda | 1 | convnet | soft | 2 | 71.0 ± 1.4 | 51.0 | +20.0 | 0.200 |" in md
    assert str(tmp_path) not in md  # relative paths only: the report moves with its runs

    with open(out / "report.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 4
    assert csv_rows[0]["method"] == "random"  # the baseline comes first within an IPC
    assert all(not r["runs"].startswith("/") for r in csv_rows)

    plot = out / "acc_vs_ipc_digits.png"
    assert plot.stat().st_size > 1000


def test_newer_duplicate_wins_and_broken_files_are_listed(tmp_path):
    _write_run(tmp_path / "a", "sre2l", 10, 0, 0.4)
    _write_run(tmp_path / "b", "sre2l", 10, 0, 0.6)
    import os

    os.utime(tmp_path / "a" / "results.json", (1, 1))  # a is older
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text("{not json")
    rows, collected, missing = report.build_report([tmp_path], tmp_path / "out")
    assert [r["acc_mean"] for r in rows] == [pytest.approx(0.6)]
    assert collected.duplicates == [tmp_path / "a"]
    assert [p.parent.name for p, _ in collected.unreadable] == ["c"]
    assert missing == []
    assert "unreadable" in (tmp_path / "out" / "report.md").read_text()


def test_cli_writes_report(sweep, tmp_path, capsys):
    assert report.main([str(sweep), "--out", str(tmp_path / "r")]) == 0
    assert "runs ->" in capsys.readouterr().out
    assert (tmp_path / "r" / "report.md").is_file()
    assert report.main([str(tmp_path / "does-not-exist")]) == 2


def test_cli_refuses_a_directory_without_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no runs under" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "empty" / "report.md").exists()  # no report that says every run has a result


def test_cli_names_an_out_path_under_a_file(sweep, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert report.main([str(sweep), "--out", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(tmp_path / "file" / "sub") in err and "Traceback" not in err


def test_runs_of_one_cell_under_two_protocols_are_two_rows_not_duplicates(tmp_path):
    for protocol, acc in (("soft", 0.9), ("hard", 0.6)):
        _write_run(tmp_path / protocol, "random", 10, 0, acc)
        results = json.loads((tmp_path / protocol / "results.json").read_text())
        results["students"][0]["protocol"] = protocol
        (tmp_path / protocol / "results.json").write_text(json.dumps(results))
    rows, collected, _ = report.build_report([tmp_path], tmp_path / "out")
    assert {r["protocol"]: r["acc_mean"] for r in rows} == pytest.approx({"soft": 0.9, "hard": 0.6})
    assert collected.duplicates == []


def test_a_sweep_over_overrides_gives_one_row_per_point_and_a_plot(tmp_path):
    eta, kernel = "diffusion.sample.cgs.eta_dpp", "diffusion.sample.cgs.kernel"
    points = [("zt", "0", 0.5, 0.9), ("zt", "10", 0.3, 0.8), ("teacher", "0", 0.5, 0.9), ("teacher", "10", 0.2, 0.7)]
    for n, (k, e, ssim, sample_acc) in enumerate(points):
        for seed in (0, 1):
            job = tmp_path / "sweep" / f"{n}_{seed}"
            _write_run(job, "cgs", 10, seed, 0.8 + 0.01 * seed, analysis={"ssim": {"synthetic": ssim + 0.1 * seed}})
            results = json.loads((job / "results.json").read_text())
            results["overrides"] = [f"{eta}={e}", f"++{kernel}={k}", f"seed={seed}"]
            results["diffusion"] = {"teacher_acc_on_samples": sample_acc}
            (job / "results.json").write_text(json.dumps(results))
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "sweep"), "--out", str(out), "--sweep", eta, kernel]) == 0
    rows, collected, _ = report.build_report([tmp_path / "sweep"], out, (eta, kernel))
    assert collected.duplicates == []  # sweep points are not duplicates of each other
    by_point = {(r["sweep_values"][kernel], r["sweep_values"][eta]): r for r in rows}
    assert set(by_point) == {(k, e) for k, e, _, _ in points}
    teacher10 = by_point[("teacher", "10")]
    assert teacher10["seeds"] == 2 and teacher10["ssim"] == pytest.approx(0.25)
    assert teacher10["sample_acc"] == pytest.approx(0.7)
    assert (out / "sweep_digits.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| cgs (eta_dpp=10, kernel=teacher) | 10 |" in md and "sweep_digits.png" in md
    # without --sweep the same runs are one cell, the older ones superseded
    rows, collected, _ = report.build_report([tmp_path / "sweep"], tmp_path / "plain")
    assert len(rows) == 1 and len(collected.duplicates) == 6


def test_rows_show_their_shared_overrides_and_na_at_ipc_1(tmp_path):
    for seed in (0, 1):
        job = tmp_path / f"j{seed}"
        analysis = {"ssim": {"synthetic": 0.0}, "feature_cosine": {"synthetic": 0.0}}
        _write_run(job, "deda", 1, seed, 0.7, analysis=analysis)
        results = json.loads((job / "results.json").read_text())
        results["overrides"] = [
            "pipeline=deda",
            "ipc=1",
            f"seed={seed}",
            "recover.iterations=150",
            f"paths.cache_dir=/tmp/c{seed}",
            "evaluate.epochs=100" if seed else "x=1",
        ]
        (job / "results.json").write_text(json.dumps(results))
    rows, _, _ = report.build_report([tmp_path], tmp_path / "out")
    (row,) = rows
    assert row["overrides"] == "recover.iterations=150"  # shared by both seeds, not in a column
    md = (tmp_path / "out" / "report.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| deda | 1 |"))
    assert "| n/a | n/a |" in line and "0.000" not in line and "`recover.iterations=150`" in line


def _saved_figures(monkeypatch) -> list:
    """The matplotlib figures saved from now on (still inspectable after plt.close)."""
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig

    def record(self, *args, **kwargs):
        saved.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def test_the_sweep_plot_labels_its_points_and_drops_empty_panels(tmp_path, monkeypatch):
    from ddist.report.plots import plot_sweep

    saved = _saved_figures(monkeypatch)
    rows = [
        {"dataset": "digits", "method": "deda", "student": "convnet", "protocol": "soft", "sweep_values": {"r": v}}
        | {"ssim": 0.1 * v, "spec_slope": -1.0, "acc_mean": 0.5, "sample_acc": None}  # recover: no sample accuracy
        for v in (0, 0.1, 1)
    ]
    plot_sweep(rows, ("r",), tmp_path)
    (fig,) = saved
    assert [ax.get_title() for ax in fig.axes] == [
        "within-class SSIM",
        "feature spectrum decay slope",
        "student accuracy (%)",
    ]
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.1", "1"]


def test_analyse_figures_name_the_run(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddist.report.figures import prototype_figure, run_title

    saved = _saved_figures(monkeypatch)
    cfg = OmegaConf.create({"pipeline": {"name": "deda"}, "dataset": {"name": "digits"}, "ipc": 1, "seed": 3})
    pd = {"synthetic": 0.0, "real_same_ipc": 0.0, "synthetic_per_class": [0.0, 0.0]}
    pd |= {"real_same_ipc_per_class": [0.0, 0.0], "note": "IPC 1"}
    prototype_figure(plt, tmp_path / "pd.png", pd, ["0", "1"], run_title(cfg))
    title = saved[0].axes[0].get_title()
    assert "deda on digits, IPC 1, seed 3" in title and "0 at IPC 1" in title, title
