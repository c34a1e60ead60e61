"""What a distilled generation costs against a plain student training of the same length.

    python benchmarks/distill.py [--steps 30] [--batch-size 64]

Three ways to run the same student steps on the same shards (torch loader, one process, all cores):

- ``plain``: the student alone (classifier loss), as the scratch stage trains;
- ``cached``: + a teacher-embedding cache lookup and the angular distillation loss -- what generations do;
- ``online``: + a teacher forward pass (image and flip) per batch -- what the cache saves.

Goal (issue 4): ``cached`` ≤ 1.1× ``plain``. Writes benchmarks/results/distill.json and the ``distill`` section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, table, update_section, write_json  # noqa: E402

from facescale.config import load_config  # noqa: E402
from facescale.data import build_loader, load_manifest, synthesize  # noqa: E402
from facescale.distill.cache import TeacherCache  # noqa: E402
from facescale.distill.cache_write import commit_cache, embed_shard  # noqa: E402
from facescale.models import build_backbone  # noqa: E402
from facescale.train.components import (  # noqa: E402
    build_bare_backbone,
    build_classifier,
    build_classifier_optimizer,
)
from facescale.train.engine import build_engine  # noqa: E402
from facescale.train.observe import StepTimer  # noqa: E402
from facescale.train.step import train_step  # noqa: E402

TEACHER, STUDENT, EMBEDDING = "iresnet_tiny", "iresnet_nano", 128


def run_mode(mode: str, root: Path, cache_dir: Path, steps: int, batch_size: int) -> dict[str, Any]:
    cfg = load_config(None, [f"data.root={root}", f"model.backbone={STUDENT}", f"model.embedding_size={EMBEDDING}",
                             "classifier.margin.type=cosface", "classifier.margin.s=30",
                             f"train.batch_size={batch_size}"])
    torch.manual_seed(0)
    loader = build_loader(root, batch_size, rank=0, world_size=1, seed=0, num_workers=1)
    cpu = torch.device("cpu")
    engine = build_engine(cfg, build_bare_backbone(cfg, cpu), cpu)
    classifier = build_classifier(cfg, loader.manifest.num_classes, cpu)
    classifier_opt = build_classifier_optimizer(cfg, classifier)
    timer = StepTimer(cpu)
    cache = TeacherCache(cache_dir, root) if mode == "cached" else None
    teacher = build_backbone(TEACHER, EMBEDDING).eval() if mode == "online" else None
    times = []
    batches = (b for epoch in range(100) for b in loader.epoch_samples(epoch))
    for _ in range(steps + 2):  # the first two steps warm up the allocator and the loader
        t0 = time.perf_counter()
        images, labels, keys = next(batches)
        targets = None
        if cache is not None:
            targets = cache.lookup(keys)
        elif teacher is not None:
            with torch.no_grad():
                targets = teacher(images) + teacher(torch.flip(images, dims=[3]))
        train_step(engine, classifier, classifier_opt, [(images, labels, targets)], cfg, timer, cpu)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[2:])
    return {"mode": mode, "step_s": round(step_s, 4), "samples_per_s": round(batch_size / step_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache_dir = Path(tmp) / "data", Path(tmp) / "cache"
        synthesize(root, identities=100, images_per_identity=12, seed=0, difficulty=0.25, held_out_identities=10,
                   num_pairs=20, samples_per_shard=400, progress=False)
        manifest = load_manifest(root)
        teacher = build_backbone(TEACHER, EMBEDDING)
        cache_dir.mkdir()
        t0 = time.perf_counter()
        for i in range(len(manifest.shards)):
            embed_shard(teacher, manifest, i, cache_dir)
        commit_cache(cache_dir, "benchmark-teacher", manifest, EMBEDDING)
        cache_build_s = time.perf_counter() - t0
        results = [run_mode(mode, root, cache_dir, args.steps, args.batch_size)
                   for mode in ("plain", "cached", "online")]
    plain = results[0]["step_s"]
    for r in results:
        r["vs_plain"] = round(r["step_s"] / plain, 3)
    payload = {"machine": machine(), "teacher": TEACHER, "student": STUDENT, "embedding_size": EMBEDDING,
               "batch_size": args.batch_size, "steps": args.steps, "cache_samples": manifest.num_samples,
               "cache_build_s": round(cache_build_s, 2), "results": results,
               "goal": "cached <= 1.1 x plain", "goal_met": results[1]["vs_plain"] <= 1.1}
    write_json("distill", payload)
    m = payload["machine"]
    load = os.getloadavg()[0]
    md = (f"## Distilled generation vs plain student step (batch {args.batch_size}, CPU)\n\n"
          f"`python benchmarks/distill.py` — {m['cores']} cores, torch {m['torch']}, {m['threads']} threads, "
          f"{m['date']}, 1-min load average at the end {load:.1f}. Student `{STUDENT}`, teacher `{TEACHER}`, "
          f"embedding {EMBEDDING}; median step time over {args.steps} steps including the loader. Building the "
          f"cache for {manifest.num_samples} samples took {cache_build_s:.1f} s (one process).\n\n"
          + table(["mode", "s / step", "samples / s", "× plain"],
                  [[r["mode"], r["step_s"], r["samples_per_s"], r["vs_plain"]] for r in results])
          + f"\n\nGoal: a cached generation ≤ 1.1× plain — {'met' if payload['goal_met'] else 'NOT met'}.")
    update_section("distill", md)
    print(md)


if __name__ == "__main__":
    main()
