"""``facescale plan`` against measured memory: Partial FC on 2 gloo ranks at several sizes (goal: within 10 %).

    python benchmarks/plan_vs_measured.py [--quick]
    python benchmarks/plan_vs_measured.py --cases bf16    # only the bf16-center cases, merged into the saved JSON

Measured = a rank's peak resident set (VmHWM) minus its resident set after a tiny warm-up run (library pages and
runtime buffers touched on first use are not the classifier's); persistent = resident set between steps minus
the same baseline. Writes benchmarks/results/plan_vs_measured.json and the ``plan`` section of BENCHMARKS.md.

The 10M bf16 case (batch 64 per rank: batch 128 would not fit both ranks in this machine's memory) is the run
``benchmarks/partial_fc.py --parts big`` measures; when its saved result has the same config it is reused rather than
run twice. Cases that need more memory than is available (partial_fc.MIN_AVAILABLE_GIB) are skipped and listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import RESULTS, machine, table, update_section, write_json  # noqa: E402
from partial_fc import BIG_CONFIG, GIB, _config, measure_guarded, plan_for, run_config  # noqa: E402

CASES = [
    ("1M, rate 0.1", _config(1_000_000, 0.1)),
    ("2M, rate 0.1", _config(2_000_000, 0.1)),
    ("4M, rate 0.1", _config(4_000_000, 0.1)),
    ("1M, rate 1.0 (logit-bound)", _config(1_000_000, 1.0)),
    ("1M, rate 0.1, dense v2 baseline", _config(1_000_000, 0.1, dense=True)),
]
BF16_CASES = [
    ("1M, rate 0.1, bf16 centers", _config(1_000_000, 0.1, center_dtype="bf16")),
    ("4M, rate 0.1, bf16 centers", _config(4_000_000, 0.1, center_dtype="bf16")),
    ("10M, rate 0.1, bf16 centers, batch 64", BIG_CONFIG),
]
QUICK_CASES = [("200k, rate 0.1", _config(200_000, 0.1)), ("400k, rate 0.1", _config(400_000, 0.1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes only")
    parser.add_argument("--cases", choices=["all", "bf16"], default="all",
                        help="bf16: run only the bf16-center cases and keep the other saved rows")
    parser.add_argument("--render", action="store_true", help="rewrite the BENCHMARKS.md section from the saved JSON")
    args = parser.parse_args()
    if args.render:
        render(json.loads((RESULTS / "plan_vs_measured.json").read_text()))
        return
    today = machine()["date"]
    results = []
    cases = QUICK_CASES if args.quick else BF16_CASES if args.cases == "bf16" else CASES + BF16_CASES
    for name, cfg in cases:
        plan = plan_for(cfg)
        if cfg == BIG_CONFIG:
            saved = RESULTS / "partial_fc.json"
            big = json.loads(saved.read_text()).get("big") if saved.exists() else None
            if not (big and big["config"] == cfg and "ranks" in big):
                big = measure_guarded(cfg, name)
            if "skipped" in big:
                results.append({"case": name, "config": cfg, "skipped": big["skipped"],
                                "plan_peak_bytes": plan.peak_bytes, "plan_persistent_bytes": plan.resident_bytes})
                continue
            ranks = big["ranks"]
        else:
            ranks = run_config(cfg)
        worst = max(ranks, key=lambda r: r["peak_bytes"])
        persistent = max(r["persistent_rss_bytes"] for r in ranks)
        entry = {"case": name, "config": cfg, "date": today, "plan_peak_bytes": plan.peak_bytes,
                 "plan_persistent_bytes": plan.resident_bytes, "measured_peak_bytes": worst["peak_bytes"],
                 "measured_persistent_bytes": persistent,
                 "peak_error": worst["peak_bytes"] / plan.peak_bytes - 1,
                 "persistent_error": persistent / plan.resident_bytes - 1, "ranks": ranks}
        print(f"{name:34s} plan {plan.peak_bytes / GIB:6.2f} GiB  measured {worst['peak_bytes'] / GIB:6.2f} GiB  "
              f"({entry['peak_error']:+.1%})", flush=True)
        results.append(entry)
    if args.cases == "bf16" and not args.quick:
        saved = json.loads((RESULTS / "plan_vs_measured.json").read_text())
        names = {r["case"] for r in results}
        results = [{**r, "date": r.get("date", saved["machine"]["date"])} for r in saved["results"]
                   if r["case"] not in names] + results
    payload = {"machine": machine(), "results": results}
    write_json("plan_vs_measured", payload)
    if not args.quick:
        render(payload)


def render(payload: dict) -> None:
    """Writes the ``plan`` section of BENCHMARKS.md from a results payload."""
    results = payload["results"]
    m = payload["machine"]
    rows = [[r["case"], f"{r['plan_persistent_bytes'] / GIB:.2f}", "skipped", "-", f"{r['plan_peak_bytes'] / GIB:.2f}",
             "skipped", r["skipped"], r.get("date", m["date"])] if "skipped" in r else
            [r["case"], f"{r['plan_persistent_bytes'] / GIB:.2f}", f"{r['measured_persistent_bytes'] / GIB:.2f}",
             f"{r['persistent_error']:+.1%}", f"{r['plan_peak_bytes'] / GIB:.2f}",
             f"{r['measured_peak_bytes'] / GIB:.2f}", f"{r['peak_error']:+.1%}", r.get("date", m["date"])]
            for r in results]
    within = all(abs(r["peak_error"]) <= 0.10 for r in results if "skipped" not in r)
    md = "\n".join([
        "## Memory plan vs measured (`benchmarks/plan_vs_measured.py`)", "",
        f"`facescale.parallel.plan.estimate` against 2 gloo ranks ({m['cores']} cores, torch {m['torch']}), "
        "batch 128 per rank, embedding 512, ArcFace, SGD with the default int8 state unless noted; "
        "the 10M case is the run of the `partial_fc` section. "
        "Measured per rank (the larger of the two): resident set between steps (persistent: centers, optimizer state "
        "and the sampled-row working set kept from step to step; the plan's `resident_bytes`) and peak resident set "
        "(VmHWM), both minus the rank's resident set after a tiny warm-up run. "
        f"Goal: peak within 10 % -- {'met for every case' if within else 'NOT met for every case'}.", "",
        table(["case", "plan persistent GiB", "measured", "error", "plan peak GiB", "measured", "error", "measured on"],
              rows),
    ])
    update_section("plan", md)


if __name__ == "__main__":
    main()
