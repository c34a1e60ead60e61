"""Determinism: the same seed gives the same bytes and the same losses, and another seed does not.

What makes a run repeatable on one machine (checked here): the synthetic generator derives every image from
``(seed, identity, sample)`` and encodes it with a pinned simplejpeg; loaders order shards from the manifest (never a
directory listing) and draw shard order, shuffle buffers and flips from ``(seed, epoch, rank/split)`` generators;
DALI's reader gets its seed from the same key; the worker sets ``torch.manual_seed(train.seed)`` and
``torch.set_num_threads(scaling.cpus_per_worker)`` before building anything. The 2-worker (gloo) path through Ray
is compared with an uninterrupted reference run in tests/test_train_ray.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import facescale.train.loop as loop
from facescale.config import dump_config, load_config
from facescale.data.synth import synthesize
from facescale.tracking.mlflow_run import start_run
from recording_context import RecordingContext


def _synth(root: Path, seed: int) -> dict[str, str]:
    synthesize(root, identities=5, images_per_identity=4, seed=seed, difficulty=0.2, held_out_identities=3,
               num_pairs=6, samples_per_shard=8, progress=False)
    def content(p: Path) -> bytes:  # the manifest's created_at is the clock's, not the generator's
        if p.name != "manifest.json":
            return p.read_bytes()
        manifest = json.loads(p.read_text())
        manifest.pop("created_at", None)
        return json.dumps(manifest, sort_keys=True).encode()

    return {str(p.relative_to(root)): hashlib.sha256(content(p)).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_generator_writes_identical_bytes_for_the_same_seed(tmp_path: Path) -> None:
    first, again, other = _synth(tmp_path / "a", 0), _synth(tmp_path / "b", 0), _synth(tmp_path / "c", 1)
    assert len(first) >= 4 and any(name.endswith(".tar") for name in first)  # shards, index, manifest, pairs
    assert first == again, "same seed, different bytes"
    assert set(other) == set(first)
    shards = [n for n in first if n.endswith(".tar")]
    assert all(other[n] != first[n] for n in shards), "another seed must give other images"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det")
    synthesize(root, identities=7, images_per_identity=8, seed=0, difficulty=0.2, held_out_identities=2,
               num_pairs=4, samples_per_shard=8, progress=False)
    return root


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # the worker sets its own thread count; give the test process its own back
    yield
    torch.set_num_threads(threads)


def _losses(shards: Path, tmp: Path, loader: str, seed: int) -> list[float]:
    """The per-step training losses of 10 steps of the real loop (single process, the launcher-agnostic worker)."""
    tag = f"{loader}-{seed}-{len(list(tmp.iterdir()))}"
    cfg = load_config(None, [
        f"data.root={shards}", "data.val_bins=[]", f"data.loader={loader}", "data.num_workers=1",
        "model.backbone=iresnet_nano", "model.embedding_size=32", "classifier.margin.type=cosface",
        "classifier.margin.s=16", "train.batch_size=8", "train.max_steps=10", "train.log_every=1",
        "train.checkpoint_every=100", f"train.seed={seed}", "train.system_metrics_interval_s=null",
        "scaling.cpus_per_worker=1", f"tracking.uri=sqlite:///{tmp / tag}.db",
        f"tracking.artifact_root={tmp / tag}-art", "tracking.log_model=false"])
    run_id = start_run(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root, None, {},
                       dump_config(cfg))
    ctx = RecordingContext(0, 1, 0, 0, torch.device("cpu"), str(tmp / tag))
    loop.run_worker(ctx, {"config": cfg.model_dump(mode="json"), "run_id": run_id, "tracking_uri": cfg.tracking.uri})
    losses = [r["train/loss"] for r in ctx.reports[:-1]]  # one report per step; the last repeats step 10
    assert [r["step"] for r in ctx.reports[:-1]] == list(range(1, 11))
    return losses


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_two_identical_runs_give_bitwise_identical_losses(shards: Path, tmp_path: Path, loader: str,
                                                          keep_threads: None) -> None:
    if loader == "dali":
        from facescale.data.factory import dali_unavailable

        if (reason := dali_unavailable()) is not None:
            pytest.skip(f"DALI cannot be used here: {reason}")
    first = _losses(shards, tmp_path, loader, seed=0)
    again = _losses(shards, tmp_path, loader, seed=0)
    assert first == again, f"same seed, different losses:\n{first}\n{again}"  # bitwise, not approximately
    other = _losses(shards, tmp_path, loader, seed=1)
    assert all(a != b for a, b in zip(first, other)), "another seed must give another run"
