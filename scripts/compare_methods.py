"""Paired comparison of two methods over seeds: the README's "what these rows say" lines.

    python scripts/compare_methods.py RUN_DIR [RUN_DIR ...] --a deda --b sre2l
    python scripts/compare_methods.py outputs/multirun/... --a deda --b sre2l --metric proto_dist

Reads every results.json under the given directories, pairs A's and B's runs that share dataset,
IPC, protocol, first student and seed, and prints per cell the per-seed differences A - B (points
for accuracy, raw for the prototype distance), their mean, the 95% Student-t interval, the paired
t-test's and the exact sign test's two-sided p-values, and the verdict: "holds" (A above B) only when
the interval lies above 0 (ddist/report/stats.py, the report's own statistics).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ddist.report.stats import ABOVE, BELOW, paired

METRICS = {
    "acc": lambda r: r["students"][0]["acc_mean"],  # a fraction; differences in points
    "proto_dist": lambda r: r["analysis"]["prototype_distance"]["synthetic"] / 100,  # raw differences
}


def cells(paths: list[Path], metric: str) -> dict[tuple, dict[str, dict[int, float]]]:
    """(dataset, ipc, protocol, student) -> method -> seed -> value."""
    out: dict[tuple, dict[str, dict[int, float]]] = {}
    for path in paths:
        for results in sorted(path.rglob("results.json")):
            r = json.loads(results.read_text())
            if not r.get("students"):
                continue
            s = r["students"][0]
            key = (r["dataset"], r["ipc"], s["protocol"], s["name"])
            out.setdefault(key, {}).setdefault(r["method"], {})[int(r["seed"])] = METRICS[metric](r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--a", required=True, help="the method claimed better (e.g. deda)")
    parser.add_argument("--b", required=True, help="the method it is compared with (e.g. sre2l, random)")
    parser.add_argument("--metric", choices=sorted(METRICS), default="acc")
    args = parser.parse_args()
    for key, methods in sorted(cells(args.paths, args.metric).items()):
        a, b = methods.get(args.a, {}), methods.get(args.b, {})
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        p = paired([a[s] for s in seeds], [b[s] for s in seeds])
        diffs = ", ".join(f"{100 * (a[s] - b[s]):+.2f}" for s in seeds)
        d = p.diff
        interval = "-" if d.low is None else f"[{d.low:+.2f}, {d.high:+.2f}]"
        t_p = "-" if p.t_p is None else f"{p.t_p:.3g}"
        sign_p = "-" if p.sign_p is None else f"{p.sign_p:.3g}"
        verdict = {ABOVE: "holds", BELOW: "reversed"}.get(p.verdict, "not shown" if p.verdict != "-" else "one seed")
        print(
            f"{' '.join(map(str, key))}: {args.a} - {args.b} over seeds {seeds}: {diffs}; "
            f"mean {d.mean:+.2f}, 95% CI {interval}, paired t p={t_p}, sign p={sign_p}: {verdict}"
        )


if __name__ == "__main__":
    main()
