"""The loop without Ray: optimizer-step groups over epochs, the planned step count, elastic positions; and the whole
launcher-agnostic worker (:func:`run_worker`) on uint8 batches with Ray unimportable, ``train.init_from`` from a
local directory and from S3 (a real S3 API server on 127.0.0.1)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import facescale.train.loop as loop
from facescale import storage
from facescale.checkpoint.committed import resolve_checkpoint, verify_checkpoint
from facescale.checkpoint.format import TrainProgress
from facescale.config import dump_config, load_config
from facescale.data import build_loader
from facescale.data.synth import synthesize
from facescale.tracking.mlflow_run import start_run
from facescale.train.batches import planned_total_steps, rescale_position, step_groups
from facescale.train.components import build_bare_backbone
from facescale.train.engine import build_engine
from facescale.train.loop import _mean_over_ranks
from facescale.train.start import init_backbone
from recording_context import RecordingContext


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("set")
    synthesize(root, identities=7, images_per_identity=8, seed=0, difficulty=0.2, held_out_identities=2,
               num_pairs=4, samples_per_shard=8, progress=False)
    return root


def _keys(group: list) -> list[list[str]]:
    return [list(keys) for _, _, keys in group]


def test_groups_are_whole_optimizer_steps_and_never_span_epochs(shards: Path) -> None:
    loader = build_loader(shards, 8, rank=0, world_size=1, seed=0, num_workers=0)
    assert loader.steps_per_epoch == 7  # 56 samples / batch 8
    progress = TrainProgress()
    groups = list(itertools.islice(step_groups(loader, progress, accum=2), 7))
    assert all(len(g) == 2 for g in groups)
    # 7 batches per epoch hold 3 steps of 2; the 7th batch of an epoch is left out, so step 4 opens epoch 1.
    epoch0 = [k for g in groups[:3] for k in _keys(g)]
    assert epoch0 == [list(keys) for _, _, keys in itertools.islice(loader.epoch_samples(0), 6)]
    assert _keys(groups[3]) == [list(keys) for _, _, keys in itertools.islice(loader.epoch_samples(1), 2)]
    assert (progress.epoch, progress.step_in_epoch) == (2, 2)


def test_groups_resume_from_a_saved_position(shards: Path) -> None:
    loader = build_loader(shards, 8, rank=0, world_size=1, seed=0, num_workers=0)
    progress = TrainProgress()
    it = step_groups(loader, progress, accum=2)
    for _ in range(2):
        next(it)
    saved = TrainProgress(epoch=progress.epoch, step_in_epoch=progress.step_in_epoch,
                          local_loader_position=dict(progress.local_loader_position))
    expected = [_keys(next(it)) for _ in range(3)]
    resumed = step_groups(build_loader(shards, 8, rank=0, world_size=1, seed=0, num_workers=0), saved, accum=2)
    assert [_keys(next(resumed)) for _ in range(3)] == expected


def test_accumulation_larger_than_an_epoch_is_refused(shards: Path) -> None:
    loader = build_loader(shards, 8, rank=0, world_size=1, seed=0, num_workers=0)
    with pytest.raises(ValueError, match="grad_accum_steps=8 exceeds the 7 batches"):
        next(step_groups(loader, TrainProgress(), accum=8))


def test_planned_steps_count_optimizer_steps_and_survive_a_world_size_change() -> None:
    cfg = load_config(None, ["train.epochs=3", "train.grad_accum_steps=2"])
    assert planned_total_steps(cfg, TrainProgress(), steps_per_epoch=7) == 9  # 3 per epoch
    # mid-run on 2 workers (14 batches/epoch at 1 worker = 7 at 2): step 5 = epoch 1, 4 micro-batches in
    progress = TrainProgress(step=5, epoch=1, step_in_epoch=4, world_size=2)
    rescale_position(progress, world_size=1, accum=2)
    assert (progress.step_in_epoch, progress.world_size, progress.local_loader_position) == (8, 1, {})
    # the rest of epoch 1 (7 - 4 steps at 1 worker) and epoch 2 (7 steps)
    assert planned_total_steps(cfg, progress, steps_per_epoch=14) == 5 + (7 - 4) + 7
    assert planned_total_steps(load_config(None, ["train.max_steps=11"]), progress, 14) == 11


def test_rescaled_position_rounds_down_to_whole_steps() -> None:
    progress = TrainProgress(step=3, epoch=0, step_in_epoch=6, world_size=2, local_loader_position={"x": 1})
    rescale_position(progress, world_size=4, accum=2)  # 6 * 2 / 4 = 3 micro-batches -> 2 (a whole step)
    assert progress.step_in_epoch == 2
    same = TrainProgress(step=3, step_in_epoch=6, world_size=2, local_loader_position={"x": 1})
    rescale_position(same, world_size=2, accum=2)
    assert same.step_in_epoch == 6 and same.local_loader_position == {"x": 1}



# ------------------------------------------------------------------------------------------ the whole worker
class _Uint8Loader:
    """The loader contract the step takes: uint8 ``[B, 3, 112, 112]`` host batches (passed through once the loaders
    deliver them; until then their normalised floats are mapped back to the uint8 pixels they came from)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def epoch_samples(self, *args: Any, **kwargs: Any):
        for images, labels, keys in self._inner.epoch_samples(*args, **kwargs):
            if images.dtype != torch.uint8:
                images = (images * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
            yield images, labels, keys


def _worker_config(shards: Path, tmp: Path, *extra: str):
    return load_config(None, [
        f"data.root={shards}", "data.val_bins=[]", "data.loader=torch", "data.num_workers=0",
        "model.backbone=iresnet_nano", "model.embedding_size=32", "classifier.margin.type=cosface",
        "classifier.margin.s=16", "train.batch_size=8", "train.log_every=2", "train.checkpoint_every=2",
        "train.system_metrics_interval_s=null", f"tracking.uri=sqlite:///{tmp / 'mlruns.db'}",
        f"tracking.artifact_root={tmp / 'artifacts'}", "tracking.log_model=false", *extra])


def _run_worker(cfg, run_root: Path) -> tuple[RecordingContext, dict[str, Any]]:
    uri = cfg.tracking.uri
    run_id = start_run(uri, cfg.tracking.experiment, cfg.tracking.artifact_root, None, {}, dump_config(cfg))
    ctx = RecordingContext(0, 1, 0, 0, torch.device("cpu"), str(run_root))
    loop.run_worker(ctx, {"config": cfg.model_dump(mode="json"), "run_id": run_id, "tracking_uri": uri})
    final = resolve_checkpoint(str(run_root))
    return ctx, json.loads(verify_checkpoint(final)["meta"]["metrics"]["summary"])


def test_run_worker_trains_on_uint8_batches_without_ray_and_resumes(shards: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop.build_train_loader
    monkeypatch.setattr(loop, "build_train_loader", lambda *args, **kwargs: _Uint8Loader(real(*args, **kwargs)))
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` in the worker fails
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the worker's thread count stays in the worker
    ctx, summary = _run_worker(_worker_config(shards, tmp_path, "train.max_steps=4"), tmp_path / "first")
    assert [r["step"] for r in ctx.reports] == [2, 4, 4]  # two logging windows, then the final report
    assert ctx.reports[0]["checkpoint"].rstrip("/").endswith("checkpoint_00000002")
    assert summary["steps"] == 4 and summary["resumed_from"] is None
    assert ctx.reports[-1]["train/loss"] > 0 and ctx.reports[-1]["train/grad_norm"] > 0

    cfg = _worker_config(shards, tmp_path, "train.max_steps=6", f"train.resume_from={tmp_path / 'first'}")
    ctx, summary = _run_worker(cfg, tmp_path / "second")
    assert summary["resumed_from"].rstrip("/").endswith("checkpoint_00000004"), summary
    assert (summary["steps"], summary["steps_this_attempt"], summary["resumes"]) == (6, 2, 1)
    assert [r["step"] for r in ctx.reports] == [6, 6]


def test_window_means_are_read_in_one_host_read() -> None:
    values = {"loss": torch.tensor(2.5), "grad_norm": torch.tensor(7.0), "cls_loss": 1.5}
    assert _mean_over_ranks(values) == {"cls_loss": 1.5, "grad_norm": 7.0, "loss": 2.5}


def _save_backbone(directory: Path, cfg) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    backbone = build_bare_backbone(cfg, torch.device("cpu"))
    directory.mkdir(parents=True, exist_ok=True)
    arch = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size}
    torch.save({"backbone": backbone.state_dict(), "arch": arch}, directory / "model.pt")
    return backbone.state_dict()


def _init_from(source: str, cfg):
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": source})})
    torch.manual_seed(2)
    engine = build_engine(cfg, build_bare_backbone(cfg, torch.device("cpu")), torch.device("cpu"))
    init_backbone(engine, cfg)
    return engine.backbone.state_dict()


def test_init_from_a_local_directory_or_s3_without_ray(tmp_path: Path, bucket: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    cfg = load_config(None, ["model.backbone=iresnet_nano", "model.embedding_size=32"])
    saved = _save_backbone(tmp_path / "ckpt", cfg)
    storage.upload_file(tmp_path / "ckpt" / "model.pt", f"s3://{bucket}/runs/ckpt/model.pt")
    for source in [str(tmp_path / "ckpt"), f"s3://{bucket}/runs/ckpt", f"s3://{bucket}/runs/ckpt/"]:
        loaded = _init_from(source, cfg)
        assert all(torch.equal(loaded[k], v) for k, v in saved.items()), source
    other = load_config(None, ["model.backbone=iresnet_nano", "model.embedding_size=64"])
    with pytest.raises(ValueError, match="train.init_from: .* holds .*embedding_size.: 32"):
        _init_from(f"s3://{bucket}/runs/ckpt", other)
    with pytest.raises(ValueError, match="neither a local directory nor an s3:// URI"):
        _init_from("gs://bucket/ckpt", cfg)


def test_the_loop_switches_sub_center_cleaning_on_at_its_epoch_and_logs_the_counts(
        shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 56 samples / batch 8 = 7 steps per epoch: steps 1-7 are epoch 0, 8-14 epoch 1, where cleaning starts.
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    cfg = _worker_config(shards, tmp_path, "train.epochs=2", "train.checkpoint_every=null", "classifier.subcenters=2",
                         "classifier.drop_non_dominant_after_epochs=1", "classifier.drop_angle_deg=1")
    ctx, summary = _run_worker(cfg, tmp_path / "run")
    windows = [r for r in ctx.reports if "classifier/dominant_only" in r]
    assert [r["step"] for r in windows] == [2, 4, 6, 8, 10, 12, 14, 14]
    assert [r["classifier/dominant_only"] for r in windows] == [0.0] * 3 + [1.0] * 5
    assert all(r["classifier/dropped_samples"] == 0 for r in windows[:3])
    # A 1-degree limit: nearly every sample of epoch 1 is farther than that from its dominant center, so dropped.
    assert sum(r["classifier/dropped_samples"] for r in windows[3:7]) > 0.5 * 7 * 8
