"""Occlusion-aware training on the synthetic task: held-out accuracy on clean and occluded pairs, with and without
``data.augment.occlusion``.

    python benchmarks/occlusion.py [--steps 300] [--p 0.5] [--seeds 0]

One synthetic set (``facescale data synth`` with ``occluded_pairs``): training identities, and held-out identities
in two verification sets with the same pairs, ``verification.bin`` (clean) and ``verification_occluded.bin`` (one
face of every pair behind sunglasses, a face mask or a patch, ``facescale.data.synth.OCCLUDERS``). The same
backbone is trained for the same steps from the same seed with the augmentation off and on (the loader from
``build_train_loader``, so the factory's wrapper runs, torch loader, one process); both are evaluated on both sets
(10-fold accuracy, embeddings of image + flip). Also times ``erase`` on a batch. Writes
benchmarks/results/occlusion.json and the ``occlusion`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import RESULTS, machine, table, update_section, write_json  # noqa: E402

from facescale.config import load_config  # noqa: E402
from facescale.data import build_train_loader, synthesize  # noqa: E402
from facescale.data.occlusion import REGIONS, draw_occlusions, erase  # noqa: E402
from facescale.data.synth import OCCLUDED_VERIFICATION_NAME, VERIFICATION_NAME  # noqa: E402
from facescale.eval.verification import verify_model  # noqa: E402
from facescale.train.components import build_bare_backbone, build_classifier, build_classifier_optimizer  # noqa: E402
from facescale.train.engine import build_engine  # noqa: E402
from facescale.train.observe import StepTimer  # noqa: E402
from facescale.train.schedule import lr_at  # noqa: E402
from facescale.train.step import to_device, train_step  # noqa: E402

SYNTH = {"identities": 200, "images_per_identity": 16, "difficulty": 0.25, "held_out_identities": 100,
         "num_pairs": 600, "occluded_pairs": 600, "samples_per_shard": 400, "seed": 0}  # fmt: skip
BACKBONE, EMBEDDING, BATCH = "iresnet_nano", 128, 64


def train_and_verify(root: Path, steps: int, p: float, seed: int) -> dict[str, Any]:
    """Train ``steps`` steps with occlusion probability ``p``; accuracy on the clean and the occluded pairs."""
    cfg = load_config(None, [
        f"data.root={root}", "data.loader=torch", "data.num_workers=1", f"data.augment.occlusion.p={p}",
        f"model.backbone={BACKBONE}", f"model.embedding_size={EMBEDDING}", "classifier.type=linear",
        "classifier.margin.type=cosface", "classifier.margin.s=30", f"train.batch_size={BATCH}", "train.lr=0.2",
        "train.lr_power=1.0", "train.warmup_steps=30", f"train.seed={seed}"])  # fmt: skip
    torch.manual_seed(seed)
    cpu = torch.device("cpu")
    loader = build_train_loader(cfg, rank=0, world_size=1, device=cpu)
    engine = build_engine(cfg, build_bare_backbone(cfg, cpu), cpu)
    classifier = build_classifier(cfg, loader.manifest.num_classes, cpu)
    classifier_opt = build_classifier_optimizer(cfg, classifier)
    timer = StepTimer(cpu)
    batches = (b for epoch in range(10**6) for b in loader.epoch_samples(epoch))
    t0, losses = time.perf_counter(), []
    engine.backbone.train()
    classifier.train()
    for step in range(steps):
        images, labels, _ = next(batches)
        lr = lr_at(step, steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.lr_power)
        engine.set_lr(lr)
        for group in classifier_opt.param_groups:
            group["lr"] = lr
        micro = [to_device(images, labels, None, cpu, engine.input_dtype)]
        outcome = train_step(engine, classifier, classifier_opt, micro, cfg, timer, cpu)
        losses.append(float(outcome.losses["loss"]))
    train_s = time.perf_counter() - t0
    model = getattr(engine.backbone, "module", engine.backbone).eval()
    result: dict[str, Any] = {"p": p, "seed": seed, "train_s": round(train_s, 1),
                              "final_loss": round(statistics.mean(losses[-20:]), 3)}  # fmt: skip
    for name, bin_name in (("clean", VERIFICATION_NAME), ("occluded", OCCLUDED_VERIFICATION_NAME)):
        r = verify_model(model, root / bin_name, batch_size=128)
        result[name] = {"accuracy": round(100 * r["accuracy_mean"], 2), "std": round(100 * r["accuracy_std"], 2)}
    return result


def time_erase(batch: int, repeats: int = 20) -> float:
    """Median milliseconds of ``draw_occlusions`` + ``erase`` (p=0.5, all regions) on a uint8 host batch."""
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, 3, 112, 112), dtype=np.uint8))
    keys = [f"{i:07d}" for i in range(batch)]
    times = []
    for epoch in range(repeats):
        t0 = time.perf_counter()
        erase(images, draw_occlusions(keys, 0.5, REGIONS, 0, epoch))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--p", type=float, default=0.5, help="occlusion probability of the augmented run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a fair share of a shared machine)")
    parser.add_argument("--name", default="occlusion", help="results/<name>.json; the section shows every "
                        "results/occlusion*.json")
    parser.add_argument("--from-json", action="store_true", help="only rewrite the BENCHMARKS.md section from "
                        "benchmarks/results/occlusion*.json")
    args = parser.parse_args()
    if args.from_json:
        update_section("occlusion", section())
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        synthesize(root, progress=False, **SYNTH)
        runs = [train_and_verify(root, args.steps, p, seed) for seed in args.seeds for p in (0.0, args.p)]
    erase_ms = {str(b): round(time_erase(b), 3) for b in (64, 512)}  # JSON keys
    payload = {"machine": machine(), "synth": SYNTH, "backbone": BACKBONE, "embedding_size": EMBEDDING,
               "batch_size": BATCH, "steps": args.steps, "regions": list(REGIONS), "runs": runs,
               "erase_ms_per_batch": erase_ms, "wall_s": round(time.perf_counter() - t_start, 1),
               "load_average_1min_end": round(os.getloadavg()[0], 1)}  # fmt: skip
    write_json(args.name, payload)
    update_section("occlusion", section())
    print(report(payload))


def section() -> str:
    """The BENCHMARKS.md section: one table per results/occlusion*.json, fewest steps first."""
    by_steps: dict[int, dict[str, Any]] = {}
    for path in sorted(RESULTS.glob("occlusion*.json")):  # runs of the same length (other seeds) share a table
        payload = json.loads(path.read_text())
        if (merged := by_steps.get(payload["steps"])) is None:
            by_steps[payload["steps"]] = payload
        else:
            merged["runs"] = merged["runs"] + payload["runs"]
            merged["wall_s"] += payload["wall_s"]
            merged["load_average_1min_end"] = max(merged["load_average_1min_end"], payload["load_average_1min_end"])
    payloads = [by_steps[steps] for steps in sorted(by_steps)]
    caveat = ("The generator's own training images already hold occluders of the same kinds (at difficulty 0.25: "
              "sunglasses on 3.75 %, a face mask on 2.5 %, one or two patches anywhere in the frame on 16.9 %), so "
              "the baseline has seen them; the occluded set adds one, placed on the inner face, per pair.")
    return ("## Occlusion-aware training (synthetic task, CPU)\n\n" + caveat + "\n\n"
            + "\n\n".join(map(report, payloads)))


def report(payload: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    m, s, runs = payload["machine"], payload["synth"], payload["runs"]
    seeds = sorted({r["seed"] for r in runs})

    def delta(which: str) -> float:
        on = [r[which]["accuracy"] for r in runs if r["p"] > 0]
        off = [r[which]["accuracy"] for r in runs if r["p"] == 0]
        return statistics.mean(on) - statistics.mean(off)
    rows = [[f"{r['p']:g}", r["seed"], f"{r['clean']['accuracy']:.2f} ± {r['clean']['std']:.2f}",
             f"{r['occluded']['accuracy']:.2f} ± {r['occluded']['std']:.2f}",
             f"{r['clean']['accuracy'] - r['occluded']['accuracy']:.2f}", r["final_loss"], r["train_s"]]
            for r in runs]  # fmt: skip
    return (f"### {payload['steps']} steps\n\n"
            f"`python benchmarks/occlusion.py --steps {payload['steps']} --seeds {' '.join(map(str, seeds))}` — "
            f"{m['cores']} cores shared with other "
            f"jobs (1-min load average at the end up to {payload['load_average_1min_end']}), torch {m['torch']}, "
            f"{m['threads']} torch thread(s), {m['date']}; {payload['wall_s']:.0f} s in all. Synthetic set: "
            f"{s['identities']} identities × {s['images_per_identity']} images, difficulty {s['difficulty']}; "
            f"held out: {s['held_out_identities']} identities, {s['num_pairs']} pairs, the same pairs again with one "
            f"face of each occluded (sunglasses, face mask or patch: `verification_occluded.bin`). "
            f"`{payload['backbone']}`, embedding {payload['embedding_size']}, CosFace s=30, batch "
            f"{payload['batch_size']}, {payload['steps']} steps, the same seed with and without "
            f"`data.augment.occlusion` (p as below, all regions: {', '.join(payload['regions'])}). "
            "Accuracy: 10-fold verification, % ± std over folds (a fold holds 60 pairs, so one pair is 1.7 "
            "points of a fold).\n\n"
            + table(["occlusion p", "seed", "clean pairs", "occluded pairs", "clean − occluded", "final loss",
                     "train s"], rows)
            + f"\n\nWith the augmentation against without, mean over seeds: clean pairs {delta('clean'):+.2f}, "
            f"occluded pairs {delta('occluded'):+.2f} points. `draw_occlusions` + `erase` (p 0.5, host uint8): "
            f"{payload['erase_ms_per_batch']['64']} ms per batch of 64, {payload['erase_ms_per_batch']['512']} ms per "
            "batch of 512.")


if __name__ == "__main__":
    main()
