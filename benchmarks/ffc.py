"""F²C / FFC (``classifier.type: ffc``) against Partial FC (rate 0.1): per-rank memory and step time at 1 M and 10 M
identities on 2 gloo ranks, and held-out verification on the demo's synthetic task at equal steps.

    python benchmarks/ffc.py                        # everything (about 10 minutes on 2 idle cores)
    python benchmarks/ffc.py --parts speed          # only the memory / step-time table
    python benchmarks/ffc.py --parts verification --steps 100 --variants ffc partial_fc

Writes benchmarks/results/ffc.json and the ``ffc`` section of BENCHMARKS.md.

Speed and memory: the classifier alone, as ``benchmarks/partial_fc.py`` measures Partial FC (whose helpers run the
Partial FC rows here, in the same way): fresh processes, one per rank, one thread each, random embeddings; memory =
the peak resident set (VmHWM) of a rank minus its resident set after a tiny warm-up run. An FFC step is
``update_pool`` (a stand-in gallery of one D x D layer on random features, all-gather, LRU) + loss forward +
backward + ``ema_update``, on a pool first filled to capacity (a full pool is the steady state; an empty one would
be cheaper). The gallery network's forward over the identity batch is not in it (the backbone is not in Partial
FC's step either); the verification part measures it in the real loop (the ``gallery`` phase).

Verification: the real training loop (``facescale.train.loop.run_worker``, one worker, in this process) on the
demo's synthetic identities (``configs/demo.yaml``'s ``synth`` block, 400 identities), demo's margin and schedule,
the demo student's backbone (iresnet_nano) to keep it to minutes, evaluated on the held-out ``verification.bin``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "platform"))
import partial_fc as pfc_bench  # noqa: E402  (its helpers: memory reading, Partial FC rows, the 10M guard)
from _report import RESULTS, ROOT, machine, table, update_section, write_json  # noqa: E402

from facescale.heads.config import MarginConfig, build_margin  # noqa: E402
from facescale.heads.ffc import FFCClassifier  # noqa: E402
from facescale.parallel.dist import all_gather_rows  # noqa: E402
from facescale.parallel.ffc_plan import estimate_ffc  # noqa: E402
from facescale.train.context import WorkerContext  # noqa: E402

GIB = pfc_bench.GIB
POOL_FRACTION = 0.01  # the paper's largest pool: 1 % of the identities


# ------------------------------------------------------------------------------- speed and memory (classifier)
def _ffc_config(identities: int, batch_size: int) -> dict[str, Any]:
    """FFC beside ``partial_fc._config``: the same embedding, margin and batch; gallery K x n = the probe batch."""
    return {"identities": identities, "pool_size": math.ceil(POOL_FRACTION * identities), "batch_size": batch_size,
            "ids_per_batch": batch_size // 2, "images_per_id": 2, "embedding": 512, "margin": "arcface",
            "warmup": 1, "steps": 5}


def _build_ffc(cfg: dict[str, Any], identities: int, pool_size: int) -> tuple[FFCClassifier, torch.nn.Module]:
    d = cfg["embedding"]
    gallery, probe = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, d, bias=False)  # stand-in networks
    ffc = FFCClassifier(build_margin(MarginConfig(type=cfg["margin"])), gallery, d, identities, pool_size,
                        gather_rows=lambda t: all_gather_rows(t, None))
    ffc.init_gallery(probe)
    return ffc, probe


def _gallery_batch(cfg: dict[str, Any], identities: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """K random identities x n random features (the stand-in gallery's input), labels grouped [id0 x n, ...]."""
    k, n = cfg["ids_per_batch"], cfg["images_per_id"]
    ids = torch.randint(0, identities, (k,), generator=g)
    return torch.randn(k * n, cfg["embedding"], generator=g), ids.repeat_interleave(n)


def _fill(ffc: FFCClassifier, cfg: dict[str, Any], identities: int, g: torch.Generator) -> int:
    """Enqueues gallery batches until every slot holds an identity; returns the number of batches."""
    batches = 0
    while ffc.num_filled < ffc.pool_size:
        ffc.update_pool(*_gallery_batch(cfg, identities, g))
        batches += 1
    return batches


def _ffc_steps(ffc: FFCClassifier, probe: torch.nn.Module, cfg: dict[str, Any], identities: int, count: int,
               g: torch.Generator) -> tuple[list[float], float]:
    times, loss = [], float("nan")
    for _ in range(count):
        images, gallery_labels = _gallery_batch(cfg, identities, g)
        embeddings = torch.randn(cfg["batch_size"], cfg["embedding"], generator=g).requires_grad_()
        labels = torch.randint(0, identities, (cfg["batch_size"],), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        ffc.update_pool(images, gallery_labels)
        out = ffc(embeddings, labels)
        out.backward()
        ffc.ema_update(probe)
        times.append(time.perf_counter() - t0)
        loss = float(out.detach())
    return times, loss


def _ffc_worker(rank: int, world_size: int, port: int, cfg: dict[str, Any], out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=10))
    g = torch.Generator().manual_seed(100 + rank)
    # A tiny run first: library code pages and runtime buffers touched on first use are not the classifier's.
    tiny = _build_ffc(cfg, 4096, 256)
    _fill(tiny[0], cfg, 4096, g)
    _ffc_steps(*tiny, cfg, 4096, 2, g)
    del tiny
    base = pfc_bench._status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    t0 = time.perf_counter()
    ffc, probe = _build_ffc(cfg, cfg["identities"], cfg["pool_size"])
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fill_batches = _fill(ffc, cfg, cfg["identities"], g)
    fill_s = time.perf_counter() - t0
    ffc.stats()  # the in-pool count starts with the timed steps
    times, loss = _ffc_steps(ffc, probe, cfg, cfg["identities"], cfg["warmup"] + cfg["steps"], g)
    status = pfc_bench._status()
    timed = sorted(times[cfg["warmup"]:])
    mine = {"rank": rank, "init_s": init_s, "fill_s": fill_s, "fill_batches": fill_batches,
            "step_s": timed[len(timed) // 2], "peak_bytes": status["VmHWM"] - base,
            "persistent_rss_bytes": status["VmRSS"] - base, "process_peak_bytes": status["VmHWM"],
            "baseline_bytes": base, "pool_tensor_bytes": ffc.queue.nbytes, "loss": loss,
            "in_pool_fraction": ffc.stats()["classifier/in_pool_fraction"]}
    pfc_bench.report_ranks(mine, rank, world_size, out_path)


def run_ffc(cfg: dict[str, Any], world_size: int = 2) -> list[dict[str, Any]]:
    """One FFC configuration on ``world_size`` fresh gloo ranks; per-rank measurements."""
    return pfc_bench.run_config(cfg, world_size, worker=_ffc_worker)


def _ffc_plan(cfg: dict[str, Any]):
    return estimate_ffc(cfg["pool_size"], 2, cfg["batch_size"], identities=cfg["identities"],
                        ids_per_batch=cfg["ids_per_batch"], images_per_id=cfg["images_per_id"],
                        embedding_size=cfg["embedding"])


def _saved_pfc_big() -> dict[str, Any] | None:
    """The 10M Partial FC entry of benchmarks/results/partial_fc.json (same script, same machine), if measured."""
    path = RESULTS / "partial_fc.json"
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    entry = payload.get("big")
    if not entry or "ranks" not in entry:
        return None
    when = (payload.get("updated", {}).get("big") or payload["machine"])["date"]
    return {**entry, "reused_from": f"benchmarks/results/partial_fc.json ({when})"}


def speed(reuse_pfc_big: bool, kept_pfc: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows: Partial FC rate 0.1 and FFC (pool 1 %) at 1M (batch 128) and 10M (batch 64, as partial_fc.py's).

    ``kept_pfc``: Partial FC rows of an earlier run, kept instead of measuring them again (``--keep-pfc``).
    """
    rows = list(kept_pfc or [])
    if not rows:
        rows = _pfc_rows(reuse_pfc_big)
    big = pfc_bench.BIG_CONFIG
    return rows + _ffc_rows(big["batch_size"])


def _pfc_rows(reuse_pfc_big: bool) -> list[dict[str, Any]]:
    rows = []
    pfc_1m = pfc_bench._config(1_000_000, 0.1)
    print("run  Partial FC 1M, rate 0.1", flush=True)
    entry = {"method": "partial_fc", "config": pfc_1m, "label": f"Partial FC 0.1, {pfc_bench._label(pfc_1m)}",
             "plan_peak_bytes": pfc_bench.plan_for(pfc_1m).peak_bytes, "loadavg_before": os.getloadavg()[0],
             "ranks": pfc_bench.run_config(pfc_1m)}
    entry["loadavg_after"] = os.getloadavg()[0]
    rows.append(entry)
    big = pfc_bench.BIG_CONFIG
    label = f"Partial FC 0.1, {pfc_bench._label(big)}"
    saved = _saved_pfc_big() if reuse_pfc_big else None
    if saved is not None:
        print(f"reuse Partial FC 10M from {saved['reused_from']}", flush=True)
        rows.append({**saved, "method": "partial_fc", "label": label})
    else:
        rows.append({**pfc_bench.measure_guarded(big, label), "method": "partial_fc"})
    return rows


def _ffc_rows(big_batch: int) -> list[dict[str, Any]]:
    rows = []
    for identities, batch in ((1_000_000, 128), (10_000_000, big_batch)):
        cfg = _ffc_config(identities, batch)
        print(f"run  FFC {identities:,}, pool {cfg['pool_size']:,}, batch {batch}", flush=True)
        entry = {"method": "ffc", "config": cfg, "label": f"FFC pool {POOL_FRACTION:.0%} ({cfg['pool_size']:,})",
                 "plan_peak_bytes": _ffc_plan(cfg).peak_bytes, "loadavg_before": os.getloadavg()[0],
                 "ranks": run_ffc(cfg)}
        entry["loadavg_after"] = os.getloadavg()[0]
        worst = max(entry["ranks"], key=lambda r: r["peak_bytes"])
        print(f"     step {worst['step_s']:.3f}s  peak/rank {worst['peak_bytes'] / GIB:.3f} GiB "
              f"(plan {entry['plan_peak_bytes'] / GIB:.3f})", flush=True)
        rows.append(entry)
    return rows


# ---------------------------------------------------------------------------- verification on the synthetic task
VARIANTS = {
    "partial_fc": ["classifier.type=partial_fc", "classifier.sample_rate=0.1"],
    "ffc": ["classifier.type=ffc", "classifier.ffc.pool_size=0.1", "classifier.ffc.ids_per_batch=16",
            "classifier.ffc.images_per_id=2"],
    "ffc_pool25": ["classifier.type=ffc", "classifier.ffc.pool_size=0.25", "classifier.ffc.ids_per_batch=16",
                   "classifier.ffc.images_per_id=2"],
    "ffc_m09": ["classifier.type=ffc", "classifier.ffc.pool_size=0.1", "classifier.ffc.ids_per_batch=16",
                "classifier.ffc.images_per_id=2", "classifier.ffc.momentum=0.9"],
    "linear": ["classifier.type=linear"],
}
LABELS = {"partial_fc": "Partial FC, rate 0.1", "ffc": "FFC, pool 10 % (40 ids), gallery 16 x 2",
          "ffc_pool25": "FFC, pool 25 % (100 ids), gallery 16 x 2",
          "ffc_m09": "FFC, pool 10 %, gallery 16 x 2, gallery momentum 0.9",
          "linear": "full softmax (linear), reference"}


def _synth(root: Path) -> Path:
    """The demo's synthetic set (configs/demo.yaml's ``synth``), written once under ``root``."""
    from facescale.config import load_config
    from facescale.data.synth import synthesize

    s = load_config(str(ROOT / "configs" / "demo.yaml"), []).synth
    data = root / f"synth-{s.identities}-{s.images_per_identity}-{s.seed}"
    if not (data / "manifest.json").exists():
        print(f"synthesize the demo's set into {data}", flush=True)
        synthesize(data, identities=s.identities, images_per_identity=s.images_per_identity, seed=s.seed,
                   difficulty=s.difficulty, held_out_identities=s.held_out_identities, num_pairs=s.num_pairs,
                   samples_per_shard=s.samples_per_shard, progress=False)
    return data


@dataclass
class _Recording(WorkerContext):
    """Keeps what the loop reports (as tests/recording_context.py)."""

    reports: list[dict[str, Any]] = field(default_factory=list)

    def report(self, metrics: dict[str, Any]) -> None:
        self.reports.append(dict(metrics))


def _timed(method: Any, spent: dict[str, float], name: str) -> Any:
    def wrapper(self: FFCClassifier, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return method(self, *args)
        finally:
            spent[name] += time.perf_counter() - t0

    return wrapper


def _train(variant: str, data: Path, tmp: Path, steps: int, backbone: str,
           eval_every: int | None) -> dict[str, Any]:
    import facescale.train.loop as loop
    from facescale.config import dump_config, load_config
    from facescale.tracking.mlflow_run import start_run

    run = tmp / variant
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), [
        f"data.root={data}", f"data.val_bins=[{data / 'verification.bin'}]", "data.loader=torch",
        "data.num_workers=1", f"model.backbone={backbone}", "scaling.num_workers=1", "scaling.cpus_per_worker=2",
        f"train.max_steps={steps}", f"train.eval_every={eval_every or 'null'}", f"train.log_every={steps // 5}",
        "train.checkpoint_every=null", "train.system_metrics_interval_s=null", f"tracking.uri=sqlite:///{run}.db",
        f"tracking.artifact_root={run}-artifacts", "tracking.log_model=false", *VARIANTS[variant]])
    run_id = start_run(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root, None, {},
                       dump_config(cfg))
    ctx = _Recording(0, 1, 0, 0, torch.device("cpu"), str(run))
    spent = {"update_pool": 0.0, "ema_update": 0.0}
    originals = {name: getattr(FFCClassifier, name) for name in spent}
    for name, original in originals.items():  # times the gallery work of the loop (FFC runs only call them)
        setattr(FFCClassifier, name, _timed(original, spent, name))
    t0 = time.perf_counter()
    try:
        loop.run_worker(ctx, {"config": cfg.model_dump(mode="json"), "run_id": run_id,
                              "tracking_uri": cfg.tracking.uri})
    finally:
        for name, original in originals.items():
            setattr(FFCClassifier, name, original)
    wall_s = time.perf_counter() - t0
    name = next(k for k in ctx.reports[-1] if k.startswith("val/") and k.endswith("/accuracy"))
    evals = [{"step": r["step"], "accuracy": r[name], "accuracy_std": r[name.replace("accuracy", "accuracy_std")]}
             for r in ctx.reports[:-1] if name in r]
    summary = json.loads(ctx.reports[-1]["summary"])
    windows = [r for r in ctx.reports[:-1] if "train/loss" in r]
    return {"variant": variant, "label": LABELS[variant], "overrides": VARIANTS[variant], "evals": evals,
            "final_accuracy": ctx.reports[-1][name], "final_accuracy_std": ctx.reports[-1][name.replace(
                "accuracy", "accuracy_std")], "loss_last_window": windows[-1]["train/loss"],
            "in_pool_fraction": [r.get("classifier/in_pool_fraction") for r in windows],
            "step_ms_mean": summary["step_ms_mean"], "breakdown": summary["breakdown"],
            "gallery_ms_per_step": {k: 1000 * v / steps for k, v in spent.items()},
            "time_gallery_ms": [r.get("time/gallery_ms") for r in windows], "wall_s": wall_s,
            "gallery_stats": {k: v for k, v in ctx.reports[-1].items() if k.startswith("gallery/")}}


def verification(steps: int, variants: list[str], backbone: str, data_root: Path | None,
                 eval_every: int | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ffc-bench-") as tmp:
        data = _synth(data_root or Path(tmp))
        results = []
        for variant in variants:
            print(f"train {variant}: {steps} steps", flush=True)
            before = os.getloadavg()[0]
            r = _train(variant, data, Path(tmp), steps, backbone, eval_every)
            r["loadavg_before"], r["loadavg_after"] = before, os.getloadavg()[0]
            print(f"      held-out accuracy {100 * r['final_accuracy']:.2f} %  step {r['step_ms_mean']:.0f} ms  "
                  f"wall {r['wall_s']:.0f} s", flush=True)
            results.append(r)
    return {"steps": steps, "eval_every": eval_every, "backbone": backbone, "batch_size": 64, "results": results}


# ------------------------------------------------------------------------------------------------- the report
def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f}" if num_bytes >= 0.01 * GIB else f"{num_bytes / (1 << 20):.0f} MiB"


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = ["## F²C / FFC against Partial FC (`benchmarks/ffc.py`)", ""]
    rows = []
    for e in payload.get("speed") or []:
        cfg = e["config"]
        head = [f"{cfg['identities']:,}", e["label"], cfg["batch_size"]]
        if "skipped" in e:
            rows.append(head + ["skipped", "-", _gib(e["plan_peak_bytes"]), "-", e["skipped"]])
            continue
        worst = max(e["ranks"], key=lambda r: r["peak_bytes"])
        slow = max(r["step_s"] for r in e["ranks"])
        load = (f"{e['loadavg_before']:.1f} / {e['loadavg_after']:.1f}" if "loadavg_after" in e else "-")
        note = f"reused: {e['reused_from']}" if "reused_from" in e else ""
        if e["method"] == "ffc":
            r0 = e["ranks"][0]
            note = (f"pool filled in {r0['fill_batches']} batches ({r0['fill_s']:.0f} s); in-pool probes "
                    f"{100 * r0['in_pool_fraction']:.1f} %")
        rows.append(head + [f"{slow:.3f}", _gib(worst["peak_bytes"]), _gib(e["plan_peak_bytes"]), load, note])
    if rows:
        lines += [f"**Per-rank memory and step time, classifier alone** (2 gloo ranks on 127.0.0.1, one thread each, "
                  f"{m['cores']} cores, torch {m['torch']}, {_when(payload, 'speed')}; embedding 512, ArcFace; "
                  "Partial FC: sample rate 0.1, `benchmarks/partial_fc.py`'s own runs (SGD momentum, int8 state; "
                  "bf16 centers at 10M, as there); FFC: a pool of 1 % of the identities, gallery K x 2 = the probe "
                  "batch per rank, the pool filled to capacity before timing. Step = Partial FC's forward + "
                  "backward + optimizer, FFC's `update_pool` (stand-in one-layer gallery on random features, "
                  "all-gather, LRU) + loss forward + backward + `ema_update` of that layer; median of the timed "
                  "steps after 1 warm-up. The gallery backbone's forward over the identity batch is in neither "
                  "(the verification runs below time it: `gallery ms`). Peak = a rank's VmHWM minus its resident "
                  "set after a tiny warm-up run; plan = `facescale plan` (`--classifier ffc --pool-size 0.01` for "
                  "FFC). Load average (1 min) before / after: other jobs shared the 2 cores.", "",
                  table(["identities", "classifier", "batch/rank", "step s", "peak GiB/rank", "plan GiB/rank",
                         "load avg", "note"], rows)]
        lines += _speed_reading(payload["speed"])
    ver = payload.get("verification")
    if ver:
        results = ver["results"]
        lines += ["", f"**Held-out verification on the synthetic task** (the demo's data: `configs/demo.yaml`'s "
                  f"`synth`, 400 training identities, 2,000 held-out pairs of 200 other identities; the demo's "
                  f"margin and schedule, backbone {ver['backbone']}, batch {ver['batch_size']}, "
                  f"{ver['steps']} optimizer steps for every classifier, one worker with 2 threads, the real "
                  f"training loop; {_when(payload, 'verification')}). Accuracy = 10-fold verification accuracy on "
                  "the held-out pairs (mean ± std over folds). Step = mean optimizer step of the run (gallery work "
                  "included), gallery = `update_pool` (gallery forward over the identity batch, pool) + "
                  "`ema_update` per step, timed around those calls; "
                  "in-pool = the share of probes whose identity was in the pool (last window). Other jobs shared "
                  "the 2 cores: times are indicative, accuracies are not affected.", ""]
        vrows = []
        for r in results:
            mid = ", ".join(f"{e['step']}: {100 * e['accuracy']:.2f}" for e in r["evals"] if e["step"] < ver["steps"])
            gallery = sum(r["gallery_ms_per_step"].values()) if r["variant"].startswith("ffc") else None
            in_pool = [f for f in r["in_pool_fraction"] if f is not None]
            accuracy = f"{100 * r['final_accuracy']:.2f} ± {100 * r['final_accuracy_std']:.2f}"
            vrows.append([r["label"], *([mid or "-"] if ver.get("eval_every") else []), accuracy,
                          f"{r['loss_last_window']:.3f}", f"{r['step_ms_mean']:.0f}",
                          f"{gallery:.0f}" if gallery is not None else "-",
                          f"{100 * in_pool[-1]:.1f} %" if in_pool else "-",
                          f"{r['loadavg_before']:.1f} / {r['loadavg_after']:.1f}"])
        lines.append(table(["classifier", *(["accuracy % before"] if ver.get("eval_every") else []),
                            f"accuracy % at step {ver['steps']}",
                            "train loss (last window)", "step ms", "gallery ms", "in-pool", "load avg"], vrows))
        by = {r["variant"]: r for r in results}
        if "ffc" in by and "partial_fc" in by:
            gap = 100 * (by["ffc"]["final_accuracy"] - by["partial_fc"]["final_accuracy"])
            lines += ["", f"At {ver['steps']} steps FFC (pool 10 %) is {gap:+.2f} points against Partial FC (rate "
                      "0.1) on the held-out pairs. The train losses are each classifier's own (FFC's mixes the "
                      "in-pool softmax with the out-of-pool penalty), not comparable across rows. Step times were "
                      "taken under different loads (see the last column)."]
    return "\n".join(lines)


def _speed_reading(entries: list[dict[str, Any]]) -> list[str]:
    """One sentence per size: FFC's step and peak against Partial FC's, as ratios."""
    measured = {(e["method"], e["config"]["identities"]): e for e in entries if "ranks" in e}
    parts = []
    for n in sorted({k[1] for k in measured}):
        if ("ffc", n) in measured and ("partial_fc", n) in measured:
            f, p = measured[("ffc", n)]["ranks"], measured[("partial_fc", n)]["ranks"]
            step = max(r["step_s"] for r in p) / max(r["step_s"] for r in f)
            peak = max(r["peak_bytes"] for r in p) / max(r["peak_bytes"] for r in f)
            parts.append(f"at {n / 1e6:.0f}M identities FFC's step is {step:.1f}x shorter and its peak {peak:.1f}x "
                         "smaller per rank")
    if not parts:
        return []
    return ["", "Reading: " + "; ".join(parts) + " (step ratios under the loads shown, which differ from row to "
            "row). FFC's memory grows here only because the pool is 1 % of the identities (the pool, "
            "`2 x pool x 512` fp32, is 41 MB at 1M and 410 MB at 10M); a fixed `pool_size` keeps it flat. Its step "
            "grows with the pool (the probe batch against every prototype, two views). Not in these numbers: in "
            "training, FFC also runs the gallery network forward over its identity batch every step (about a fifth "
            "of the step in the verification runs below)."]


def _when(payload: dict[str, Any], part: str) -> str:
    m = payload.get("updated", {}).get(part) or payload["machine"]
    return f"measured {m['date']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["speed", "verification"], default=["speed", "verification"])
    parser.add_argument("--steps", type=int, default=100, help="verification: optimizer steps of every run")
    parser.add_argument("--eval-every", type=int, default=None, help="verification: also evaluate every N steps")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--backbone", default="iresnet_nano", help="verification: the backbone (demo student's)")
    parser.add_argument("--data", type=Path, default=None, help="verification: keep the synthetic set here")
    parser.add_argument("--measure-pfc-big", action="store_true",
                        help="re-measure Partial FC at 10M (~17 GiB for both ranks) instead of reusing "
                        "benchmarks/results/partial_fc.json's measurement")
    parser.add_argument("--keep-pfc", action="store_true", help="speed: keep the Partial FC rows of ffc.json")
    parser.add_argument("--render", action="store_true", help="rewrite the BENCHMARKS.md section and exit")
    args = parser.parse_args()
    path = RESULTS / "ffc.json"
    payload = json.loads(path.read_text()) if path.exists() else {"machine": machine()}
    if not args.render:
        for part in args.parts:
            if part == "speed":
                kept = [e for e in payload.get("speed") or [] if e["method"] == "partial_fc"] if args.keep_pfc else None
                payload["speed"] = speed(reuse_pfc_big=not args.measure_pfc_big, kept_pfc=kept)
            else:
                new = verification(args.steps, args.variants, args.backbone, args.data, args.eval_every)
                old = payload.get("verification") or {}
                if all(old.get(k) == new[k] for k in ("steps", "eval_every", "backbone", "batch_size")):
                    # the same setup: keep the variants not run this time (order: VARIANTS)
                    by_name = {r["variant"]: r for r in old["results"]} | {r["variant"]: r for r in new["results"]}
                    new["results"] = [by_name[v] for v in VARIANTS if v in by_name]
                payload["verification"] = new
            payload.setdefault("updated", {})[part] = machine()
            write_json("ffc", payload)
    update_section("ffc", markdown(payload))


if __name__ == "__main__":
    main()
