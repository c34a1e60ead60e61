"""Peak memory per rank of the teacher-embedding cache: the whole data set (W = 1) vs one rank's share (W = 2).

    python benchmarks/teacher_cache_memory.py [--shards 200] [--per-shard 1000] [--embedding 512]

A synthetic cache is written directly (random unit vectors in float16, keys ``<identity:07d>_<image:05d>`` shuffled
over the shards as the converters write them, a manifest of ``--shards`` shards): no images are encoded. Each case
runs in a fresh subprocess that imports everything first, resets its peak RSS (``/proc/self/clear_refs``), and then
opens the cache as a training worker does (``TeacherCache(..., shards=loader.local_shards(0))``) and looks a batch up;
the peak RSS (``VmHWM``) minus the RSS just before opening is the cache's cost. Cases:

- ``old``: the behaviour before per-rank shares (every shard, one concatenated matrix, a Python dict of keys);
- ``W=1``: ``TeacherCache`` holding every shard;
- ``W=2``: rank 0 selecting its epoch-0 shards of the DALI loader (``DaliFaceLoader.local_shards``);
- ``W=2, epoch 0 -> 1``: the same rank then selecting epoch 1's shards (drop, then load): the epoch-start peak.

Goal (issue 13): W=2 <= 0.6 x W=1. Writes benchmarks/results/teacher_cache_memory.json and the
``teacher_cache_memory`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, table, update_section, write_json  # noqa: E402

SEED = 0


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def build(root: Path, num_shards: int, per_shard: int, dim: int) -> None:
    """Writes a manifest (shards listed, no tar files: nothing here reads images) and a committed cache."""
    from facescale.data.manifest import Manifest, ShardInfo, digest_of
    from facescale.distill.cache_write import commit_cache, write_shard

    rng = np.random.default_rng(SEED)
    n = num_shards * per_shard
    per_identity = 20
    keys = np.array([f"{i // per_identity:07d}_{i % per_identity:05d}" for i in range(n)])[rng.permutation(n)]
    shas = [f"{i:064x}" for i in range(num_shards)]
    shards = [ShardInfo(url=f"shard-{i:06d}.tar", num_samples=per_shard, sha256=shas[i]) for i in range(num_shards)]
    manifest = Manifest(shards=shards, num_samples=n, num_classes=n // per_identity, digest=digest_of(shas),
                        creator="benchmark", created_at="2026-01-01T00:00:00+00:00")  # fmt: skip
    (root / "data").mkdir(parents=True)
    manifest.save(root / "data" / "manifest.json")
    for i in range(num_shards):
        emb = rng.standard_normal((per_shard, dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        write_shard(root / "cache", i, keys[i * per_shard:(i + 1) * per_shard], emb.astype(np.float16))
    commit_cache(root / "cache", "benchmark-teacher", manifest.with_root(root / "data"), dim)


def _old_cache(cache_dir: Path, num_shards: int) -> tuple[Any, dict[str, int]]:
    """The read side as it was before per-rank shares (facescale 0.1, distill/cache.py ``TeacherCache.__init__``)."""
    import torch

    from facescale.distill.cache import shard_file

    parts = [np.load(shard_file(cache_dir, i)) for i in range(num_shards)]
    embeddings = torch.from_numpy(np.concatenate([p["embeddings"] for p in parts]).astype(np.float16))
    keys = np.concatenate([p["keys"] for p in parts])
    rows = {str(k): i for i, k in enumerate(keys.tolist())}
    return embeddings, rows


def child(mode: str, root: Path, shards: list[list[int]]) -> dict[str, Any]:
    """One measurement in this (fresh) process: peak RSS of opening the cache, over the RSS just before."""
    import torch  # noqa: F401  -- everything a worker has imported already, before the baseline

    from facescale.data.manifest import load_manifest
    from facescale.distill.cache import TeacherCache, read_meta

    meta = read_meta(root / "cache")
    assert meta is not None
    load_manifest(root / "data")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    baseline = _status_mb("VmRSS")
    t0 = time.perf_counter()
    if mode == "old":
        embeddings, rows = _old_cache(root / "cache", meta.num_shards)
        some = list(rows)[:256]
        embeddings[[rows[k] for k in some]].float()
        held = len(rows)
    else:
        cache = TeacherCache(root / "cache", root / "data", shards=shards[0] if shards else None)
        for selection in shards[1:]:
            cache.select(selection)
        some = [k.decode() for k in cache._keys[:256]]
        cache.lookup(some)
        held = len(cache)
    seconds = time.perf_counter() - t0
    peak, now = _status_mb("VmHWM"), _status_mb("VmRSS")
    return {"mode": mode, "samples_held": held, "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
            "peak_delta_mb": round(peak - baseline, 1), "held_delta_mb": round(now - baseline, 1),
            "open_s": round(seconds, 2)}  # fmt: skip


def measure(label: str, mode: str, root: Path, shards: list[list[int]]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--root", str(root), "--select",
                          json.dumps(shards)], check=True, capture_output=True, text=True)  # fmt: skip
    return {"case": label, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--embedding", type=int, default=512)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--select", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.root), json.loads(args.select))))
        return

    from facescale.data.dali_loader import DaliFaceLoader
    from facescale.data.manifest import load_manifest

    with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build(root, args.shards, args.per_shard, args.embedding)
        build_s = time.perf_counter() - t0
        manifest = load_manifest(root / "data")
        # Rank 0 of 2, batch 128: the loader's own share computation (no file is opened to construct it).
        loader = DaliFaceLoader(manifest, [""] * len(manifest.shards), 128, rank=0, world_size=2, seed=SEED)
        epoch0, epoch1 = loader.local_shards(0), loader.local_shards(1)
        cases = [("old (whole data set, dict)", "old", []), ("W=1", "new", []), ("W=2, rank 0", "new", [epoch0]),
                 ("W=2, rank 0, epoch 0 -> 1", "new", [epoch0, epoch1])]
        results = [measure(label, mode, root, shards) for label, mode, shards in cases]
        cache_mb = sum(f.stat().st_size for f in (root / "cache").glob("shard-*.npz")) / 2**20
    w1 = results[1]["peak_delta_mb"]
    for r in results:
        r["vs_w1"] = round(r["peak_delta_mb"] / w1, 3)
    ratio = results[2]["vs_w1"]
    payload = {"machine": machine(), "samples": manifest.num_samples, "shards": args.shards,
               "embedding_size": args.embedding, "dtype": "float16", "cache_files_mb": round(cache_mb, 1),
               "build_s": round(build_s, 1), "rank0_epoch0_shards": len(epoch0),
               "rank0_epochs_0_1_shared_shards": len(set(epoch0) & set(epoch1)), "results": results,
               "goal": "W=2 <= 0.6 x W=1 (peak RSS delta)", "goal_met": ratio <= 0.6}  # fmt: skip
    write_json("teacher_cache_memory", payload)
    m = payload["machine"]
    rows = [[r["case"], f"{r['samples_held']:,}", r["baseline_rss_mb"], r["peak_rss_mb"], r["peak_delta_mb"],
             r["held_delta_mb"], r["vs_w1"], r["open_s"]] for r in results]  # fmt: skip
    md = (f"## Teacher-embedding cache: peak memory per rank (`benchmarks/teacher_cache_memory.py`)\n\n"
          f"`python benchmarks/teacher_cache_memory.py` — {m['cores']} cores, torch {m['torch']}, {m['date']}. "
          f"A synthetic cache of {manifest.num_samples:,} samples ({args.shards} shards, embedding {args.embedding}, "
          f"float16: {cache_mb:.0f} MB of shard files), each case in a fresh process: peak RSS (`VmHWM`, reset "
          "just before) minus the RSS before opening the cache (torch, numpy and facescale imported), and what "
          "stays held after a lookup. W=2: rank 0 holds the shards its DALI loader reads in epoch 0 "
          f"({len(epoch0)} of {args.shards}); epoch 0 -> 1 then selects epoch 1's ({len(set(epoch0) & set(epoch1))} "
          "shared, kept; the others dropped before the new ones load). `old` is the read side before per-rank "
          "shares: every shard, one concatenated matrix and a Python dict of keys.\n\n"
          + table(["case", "samples held", "baseline RSS MB", "peak RSS MB", "peak Δ MB", "held Δ MB", "× W=1",
                   "open s"], rows)  # fmt: skip
          + f"\n\nGoal: W=2 ≤ 0.6 × W=1 — {'met' if ratio <= 0.6 else 'NOT met'} ({ratio}).\n")
    update_section("teacher_cache_memory", md)
    print(md)


if __name__ == "__main__":
    main()
