"""``facescale plan`` against measured memory: Partial FC on 2 gloo ranks at several sizes (goal: within 10 %).

    python benchmarks/plan_vs_measured.py [--quick]

Measured = a rank's peak resident set (VmHWM) minus its resident set after a tiny warm-up run (library pages and
runtime buffers touched on first use are not the classifier's); persistent = resident set between steps minus
the same baseline. Writes benchmarks/results/plan_vs_measured.json and the ``plan`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, table, update_section, write_json  # noqa: E402
from partial_fc import GIB, _config, plan_for, run_config  # noqa: E402

CASES = [
    ("1M, rate 0.1", _config(1_000_000, 0.1)),
    ("2M, rate 0.1", _config(2_000_000, 0.1)),
    ("4M, rate 0.1", _config(4_000_000, 0.1)),
    ("1M, rate 1.0 (logit-bound)", _config(1_000_000, 1.0)),
    ("1M, rate 0.1, dense v2 baseline", _config(1_000_000, 0.1, dense=True)),
]
QUICK_CASES = [("200k, rate 0.1", _config(200_000, 0.1)), ("400k, rate 0.1", _config(400_000, 0.1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes only")
    args = parser.parse_args()
    results = []
    for name, cfg in QUICK_CASES if args.quick else CASES:
        plan = plan_for(cfg)
        ranks = run_config(cfg)
        worst = max(ranks, key=lambda r: r["peak_bytes"])
        persistent = max(r["persistent_rss_bytes"] for r in ranks)
        entry = {"case": name, "config": cfg, "plan_peak_bytes": plan.peak_bytes,
                 "plan_persistent_bytes": plan.persistent_bytes, "measured_peak_bytes": worst["peak_bytes"],
                 "measured_persistent_bytes": persistent,
                 "peak_error": worst["peak_bytes"] / plan.peak_bytes - 1,
                 "persistent_error": persistent / plan.persistent_bytes - 1, "ranks": ranks}
        print(f"{name:34s} plan {plan.peak_bytes / GIB:6.2f} GiB  measured {worst['peak_bytes'] / GIB:6.2f} GiB  "
              f"({entry['peak_error']:+.1%})", flush=True)
        results.append(entry)
    payload = {"machine": machine(), "results": results}
    write_json("plan_vs_measured", payload)
    if args.quick:
        return
    m = payload["machine"]
    rows = [[r["case"], f"{r['plan_persistent_bytes'] / GIB:.2f}", f"{r['measured_persistent_bytes'] / GIB:.2f}",
             f"{r['persistent_error']:+.1%}", f"{r['plan_peak_bytes'] / GIB:.2f}",
             f"{r['measured_peak_bytes'] / GIB:.2f}", f"{r['peak_error']:+.1%}"] for r in results]
    within = all(abs(r["peak_error"]) <= 0.10 for r in results)
    md = "\n".join([
        "## Memory plan vs measured (`benchmarks/plan_vs_measured.py`)", "",
        f"`facescale.parallel.plan.estimate` against 2 gloo ranks ({m['cores']} cores, torch {m['torch']}, "
        f"{m['date']}), batch 128 per rank, embedding 512, ArcFace, SGD with the default int8 state unless noted. "
        "Measured per rank (the larger of the two): resident set between steps (persistent) and peak resident set "
        "(VmHWM), both minus the rank's resident set after a tiny warm-up run. "
        f"Goal: peak within 10 % -- {'met for every case' if within else 'NOT met for every case'}.", "",
        table(["case", "plan persistent GiB", "measured", "error", "plan peak GiB", "measured", "error"], rows),
    ])
    update_section("plan", md)


if __name__ == "__main__":
    main()
