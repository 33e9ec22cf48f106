"""The report's statistics (ddist/report/stats.py) against hand-computed values, and the report's new
columns end to end: the 95% t intervals, the gain paired by seed, the "vs random" mark and the
published figures (conf/published.yaml)."""

import csv
import json
import math

import pytest

from ddist import report
from ddist.report import stats
from ddist.report.published import PUBLISHED, add_published, load_published

# t_{0.975,2} in closed form: Student's t with 2 degrees of freedom has CDF 1/2 + t / (2 sqrt(t^2 + 2)),
# so 0.975 = that gives t / sqrt(t^2 + 2) = 0.95, t^2 = 0.95^2 * 2 / (1 - 0.95^2) = 1.805 / 0.0975
# = 18.51282..., t = 4.3026527297... (tables print 4.302652729911275, which is 1.6e-10 too high).
T_975_2 = math.sqrt(1.805 / 0.0975)

METHOD = [0.52, 0.54, 0.50]
RANDOM = [0.50, 0.51, 0.49]


def test_t_quantile_is_the_closed_form():
    assert stats.t_quantile(3) == pytest.approx(T_975_2, rel=1e-12)
    assert stats.t_quantile(3) == pytest.approx(4.302652729911275, rel=1e-9)
    assert stats.t_quantile(2) == pytest.approx(12.706204736174698, rel=1e-9)  # tan(pi * 0.475), 1 d.o.f.


def test_three_seeds_by_hand():
    # mean (0.52 + 0.54 + 0.50) / 3 = 0.52; deviations 0, +0.02, -0.02: sd = sqrt(0.0008 / 2) = 0.02;
    # half-width 4.3027 * 0.02 / sqrt(3) = 0.049683: interval [0.470317, 0.569683]
    s = stats.summarize(METHOD)
    assert s.n == 3
    assert s.mean == pytest.approx(0.52)
    assert s.sd == pytest.approx(0.02)
    assert s.half_width == pytest.approx(0.0496828, abs=1e-7)
    assert (s.low, s.high) == (pytest.approx(0.4703172, abs=1e-7), pytest.approx(0.5696828, abs=1e-7))


def test_paired_gain_that_covers_zero_is_not_distinguishable():
    # differences 100 (acc - random) = [2, 3, 1] points: mean 2, sd sqrt((0 + 1 + 1) / 2) = 1,
    # half-width 4.3027 * 1 / sqrt(3) = 2.48414: [-0.48414, 4.48414] covers 0 -> n.d.
    # t = 2 / (1 / sqrt(3)) = 3.4641; two-sided p with 2 d.o.f. = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12/14) = 0.074180
    # sign test: 3 of 3 positive, p = 2 * (1/2)^3 = 0.25
    g = stats.paired(METHOD, RANDOM)
    assert g.diff.n == 3
    assert g.diff.mean == pytest.approx(2.0)
    assert g.diff.sd == pytest.approx(1.0)
    assert g.diff.half_width == pytest.approx(2.484138, abs=1e-6)
    assert (g.diff.low, g.diff.high) == (pytest.approx(-0.484138, abs=1e-6), pytest.approx(4.484138, abs=1e-6))
    assert g.t_p == pytest.approx(0.0741799, abs=1e-7)
    assert g.sign_p == pytest.approx(0.25)
    assert g.verdict == "n.d." == stats.NOT_DISTINGUISHABLE


def test_paired_gain_whose_interval_excludes_zero():
    # differences [2, 2.5, 1.5]: mean 2, sd 0.5, half-width 4.3027 * 0.5 / sqrt(3) = 1.242069:
    # [0.757931, 3.242069] -> above; t = 2 / (0.5 / sqrt(3)) = 6.9282, p = 1 - sqrt(48/50) = 0.020204
    g = stats.paired([0.52, 0.535, 0.505], RANDOM)
    assert (g.diff.low, g.diff.high) == (pytest.approx(0.757931, abs=1e-6), pytest.approx(3.242069, abs=1e-6))
    assert g.t_p == pytest.approx(0.0202041, abs=1e-7)
    assert g.sign_p == pytest.approx(0.25)
    assert g.verdict == "above"
    # the mirror image: [-2, -2.5, -1.5] lies wholly below 0
    below = stats.paired(RANDOM, [0.52, 0.535, 0.505])
    assert below.verdict == "below" and below.t_p == pytest.approx(0.0202041, abs=1e-7)


def test_one_seed_has_no_interval_and_no_p_value():
    s = stats.summarize([0.6])
    assert (s.n, s.mean, s.sd, s.half_width, s.low, s.high) == (1, 0.6, None, None, None, None)
    g = stats.paired([0.6], [0.5])
    assert g.diff.mean == pytest.approx(10.0)
    assert (g.t_p, g.sign_p, g.verdict) == (None, None, "-")


def test_sign_test_only_below_six_pairs_and_equal_differences():
    # 5 of 5 positive: p = 2 * (1/2)^5 = 0.0625; with 6 pairs the t-test alone
    five = stats.paired([0.6, 0.61, 0.62, 0.63, 0.64], [0.5] * 5)
    assert five.sign_p == pytest.approx(0.0625)
    six = stats.paired([0.6, 0.61, 0.62, 0.63, 0.64, 0.65], [0.5] * 6)
    assert six.sign_p is None and six.t_p is not None
    # one positive, one negative, one zero: the zero is dropped, 1 of 2 positive -> p = 1
    assert stats.sign_test_p([1.0, -1.0, 0.0]) == pytest.approx(1.0)
    assert stats.sign_test_p([0.0, 0.0]) is None
    # equal differences: an interval of width 0; p = 0 off zero (infinite t), 1 at zero
    same = stats.paired([0.7, 0.7], [0.5, 0.5])
    assert same.diff.half_width == 0 and same.t_p == 0.0 and same.verdict == "above"
    assert stats.paired([0.5, 0.6], [0.5, 0.6]).t_p == 1.0
    with pytest.raises(ValueError, match="pair them by seed"):
        stats.paired([0.5, 0.6], [0.5])
    with pytest.raises(ValueError):
        stats.summarize([])


# ----------------------------------------------------------------------------- the report end to end


def _write_run(path, method, seed, acc, baseline=None, ipc=10):
    """A finished run's results.json (the fields collect.py reads); baseline: the random-real accuracy
    the run evaluated beside its set at its seed (None: an older run without one)."""
    path.mkdir(parents=True)
    student = {"name": "convnet", "protocol": "soft", "accs": [acc], "acc_mean": acc, "acc_std": 0.0}
    if baseline is not None:
        student |= {"baseline_acc_mean": baseline, "baseline_acc_std": 0.0, "gain_pp": 100 * (acc - baseline)}
    results = {"method": method, "dataset": "digits", "ipc": ipc, "seed": seed, "students": [student]}
    (path / "results.json").write_text(json.dumps(results))


@pytest.fixture()
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed, (deda, sre2l, rnd) in enumerate(zip(METHOD, [0.52, 0.535, 0.505], RANDOM, strict=True)):
        _write_run(root / f"deda_{seed}", "deda", seed, deda, baseline=rnd)
        _write_run(root / f"sre2l_{seed}", "sre2l", seed, sre2l, baseline=rnd)
    _write_run(root / "minimax_0", "minimax", 0, 0.55, baseline=0.50)  # one seed
    return root


def test_the_report_shows_the_intervals_and_the_mark(runs, tmp_path):
    published = tmp_path / "published.yaml"
    published.write_text(
        "deda/digits_ipc10:\n"
        "  - {dataset: digits, method: deda, ipc: 10, student: convnet, protocol: soft, top1: 55.0,\n"
        "     paper: A et al. 2030, table: Table 9}\n"
        "  - {dataset: digits, method: deda, ipc: 10, student: resnet18, protocol: soft, top1: 60.0,\n"
        "     paper: A et al. 2030, table: Table 9}\n"
    )
    out = tmp_path / "out"
    rows, _, _ = report.build_report([runs], out, published=published)
    by_method = {r["method"]: r for r in rows}
    deda, sre2l, minimax = by_method["deda"], by_method["sre2l"], by_method["minimax"]
    assert deda["gain_n"] == 3 and deda["gain_pp"] == pytest.approx(2.0)
    assert (deda["gain_ci_low"], deda["gain_ci_high"]) == (pytest.approx(-0.484138, abs=1e-6), pytest.approx(4.484138))
    assert deda["vs_random"] == "n.d." and sre2l["vs_random"] == "above" and minimax["vs_random"] == "-"
    assert deda["published"] == pytest.approx(0.55) and "Table 9" in deda["published_source"]
    assert sre2l["published"] is None and minimax["published"] is None

    md = (out / "report.md").read_text()
    # acc 52.0 ± 2.0 (sd), random 50.0, gain +2.0, IOR 0.020, acc CI [47.0, 57.0], gain CI [-0.5, +4.5],
    # paired t p 0.074, sign p 0.250, n.d., published 55.0
    assert (
        "| deda | 10 | convnet | soft | 3 | 52.0 ± 2.0 | 50.0 | +2.0 | 0.020 | [47.0, 57.0] | [-0.5, +4.5] "
        "| 0.074 | 0.250 | n.d. | 55.0 |" in md
    )
    # sre2l: sd 0.015, half-width 4.3027 * 0.015 / sqrt(3) = 0.03726 -> [48.3, 55.7]; gain [+0.8, +3.2]
    assert "| sre2l | 10 | convnet | soft | 3 | 52.0 ± 1.5 | 50.0 | +2.0 | 0.020 | [48.3, 55.7] | [+0.8, +3.2] " in md
    assert "| 0.020 | 0.250 | above | - |" in md
    # one seed: no interval, no p-values
    assert "| minimax | 10 | convnet | soft | 1 | 55.0 ± - | 50.0 | +5.0 | 0.050 | - | - | - | - | - | - |" in md
    assert "t_{0.975,n-1} · sd/√n" in md and "not distinguishable from random real" in md
    assert "sample sd, ddof=1" in md and "One seed gives no interval" in md

    with open(out / "report.csv") as f:
        csv_rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["deda"]["gain_ci_low"]) == pytest.approx(-0.484138, abs=1e-6)
    assert float(csv_rows["deda"]["acc_ci_high"]) == pytest.approx(0.5696828, abs=1e-7)
    assert float(csv_rows["deda"]["gain_p_t"]) == pytest.approx(0.0741799, abs=1e-7)
    assert csv_rows["deda"]["vs_random"] == "n.d." and csv_rows["sre2l"]["vs_random"] == "above"
    assert float(csv_rows["deda"]["published"]) == pytest.approx(0.55)
    assert csv_rows["minimax"]["acc_ci_low"] == "" and csv_rows["minimax"]["gain_p_t"] == ""


def test_older_runs_pair_with_the_random_pipeline_by_seed(tmp_path):
    """Runs without their own baseline pair with the random pipeline's run of the same seed, whatever
    the order the runs are read in; seeds without a random run are left out of the pairs."""
    for seed, acc, rnd in ((2, 0.50, 0.49), (0, 0.52, 0.50), (1, 0.54, 0.51), (3, 0.60, None)):
        _write_run(tmp_path / f"deda_{seed}", "deda", seed, acc)
        if rnd is not None:
            _write_run(tmp_path / f"random_{seed}", "random", seed, rnd, baseline=rnd)
    rows, _, _ = report.build_report([tmp_path], tmp_path / "out", published=tmp_path / "none.yaml")
    deda = next(r for r in rows if r["method"] == "deda")
    random = next(r for r in rows if r["method"] == "random")
    assert deda["seeds"] == 4 and deda["gain_n"] == 3  # seed 3 has no random run
    assert (deda["gain_ci_low"], deda["gain_ci_high"]) == (pytest.approx(-0.484138, abs=1e-6), pytest.approx(4.484138))
    assert deda["vs_random"] == "n.d."
    assert random["vs_random"] == "baseline" and random["gain_p_t"] is None
    md = (tmp_path / "out" / "report.md").read_text()
    assert "[-0.5, +4.5] (n=3)" in md


def test_published_figures_match_on_dataset_method_ipc_and_student():
    entries = [
        {"key": "sre2l/imagenet1k_ipc10", "dataset": "imagenet1k", "method": "sre2l", "ipc": 10}
        | {"student": "resnet18", "protocol": "soft", "top1": 21.3, "paper": "P", "table": "T"}
    ]
    base = {"dataset": "imagenet1k", "method": "sre2l", "ipc": 10, "student": "resnet18", "split": "test"}
    rows = [
        dict(base),
        base | {"student": "resnet50"},
        base | {"ipc": 50},
        base | {"method": "deda"},
        base | {"dataset": "cifar10"},
        base | {"split": "val"},  # chose settings: no test result to set beside a paper's
    ]
    add_published(rows, entries)
    assert [r["published"] for r in rows] == [pytest.approx(0.213), None, None, None, None, None]
    assert rows[0]["published_source"] == "P, T (sre2l/imagenet1k_ipc10, soft)"


def test_the_published_file_is_well_formed(tmp_path):
    entries = load_published(PUBLISHED)
    assert entries, "conf/published.yaml lists no figure"
    for e in entries:
        assert 0 < e["top1"] < 100 and e["paper"] and e["table"]
        assert e["key"] == f"{e['method']}/{e['dataset']}_ipc{e['ipc']}"  # named like the experiment files
    assert load_published(tmp_path / "absent.yaml") == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("deda/digits_ipc10: {dataset: digits, method: deda, ipc: 10}\n")
    with pytest.raises(ValueError, match="deda/digits_ipc10 has no student"):
        load_published(bad)


def test_the_accuracy_plot_draws_the_interval(runs, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig

    def record(self, *args, **kwargs):
        saved.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    report.build_report([runs], tmp_path / "out")
    (fig,) = saved
    ax = fig.axes[0]
    assert "95% CI" in ax.get_ylabel() and "95% t interval" in ax.get_legend().get_title().get_text()
    # deda's bar spans the interval: 52.0 ± 4.97 points
    bars = [c for c in ax.collections if c.get_segments()]
    spans = sorted(round(abs(s[1][1] - s[0][1]) / 2, 2) for c in bars for s in c.get_segments())
    assert 4.97 in spans
