"""F²C / FFC in the training loop (:func:`facescale.train.loop.run_worker`, no Ray): the gallery loader's identity
batches reach the pool in order, one per step; the gallery follows the probe by EMA from a copy of it; the pool, LRU
state and gallery network are checkpointed; a run saved on 2 real gloo ranks resumes on 1 with the same pool and
gallery and continues; FFC keys and pool sizes that cannot work are refused."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import facescale.train.loop as loop
from facescale.checkpoint.committed import resolve_checkpoint, verify_checkpoint
from facescale.checkpoint.format import TrainCheckpoint, unwrap
from facescale.config import dump_config, load_config
from facescale.tracking.mlflow_run import start_run
from facescale.train.batches import gallery_batches
from facescale.train.components import build_bare_backbone
from gloo_ranks import spawn
from recording_context import RecordingContext

# tiny_data: 12 identities x 16 images. A pool of 6 identities fed 2 identities x 2 images per rank and step.
FFC = ["classifier.type=ffc", "classifier.ffc.pool_size=6", "classifier.ffc.ids_per_batch=2",
       "classifier.ffc.images_per_id=2"]


def _config(data: Path, tmp: Path, *extra: str):
    return load_config(None, [
        f"data.root={data}", "data.val_bins=[]", "data.loader=torch", "data.num_workers=0",
        "model.backbone=iresnet_nano", "model.embedding_size=32", "classifier.margin.type=cosface",
        "classifier.margin.s=16", "train.batch_size=8", "train.system_metrics_interval_s=null",
        "scaling.cpus_per_worker=1", f"tracking.uri=sqlite:///{tmp / 'mlruns.db'}",
        f"tracking.artifact_root={tmp / 'artifacts'}", "tracking.log_model=false", *FFC, *extra])


def _payload(cfg) -> dict[str, Any]:
    uri = cfg.tracking.uri
    run_id = start_run(uri, cfg.tracking.experiment, cfg.tracking.artifact_root, None, {}, dump_config(cfg))
    return {"config": cfg.model_dump(mode="json"), "run_id": run_id, "tracking_uri": uri}


def _run(cfg, run_root: Path) -> tuple[RecordingContext, dict[str, Any]]:
    ctx = RecordingContext(0, 1, 0, 0, torch.device("cpu"), str(run_root))
    loop.run_worker(ctx, _payload(cfg))
    return ctx, json.loads(verify_checkpoint(resolve_checkpoint(str(run_root)))["meta"]["metrics"]["summary"])


def _model(checkpoint: str) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / "model.pt", map_location="cpu", weights_only=False)


def _lru_replay(label_batches: list[list[int]], pool_size: int) -> list[int]:
    """The pool's identities, least recently used first, after enqueueing the batches (a hand LRU)."""
    lru: OrderedDict[int, None] = OrderedDict()
    for labels in label_batches:
        for label in labels:
            if label in lru:
                lru.move_to_end(label)
            else:
                if len(lru) == pool_size:
                    lru.popitem(last=False)
                lru[label] = None
    return list(lru)


def _params(state: dict[str, torch.Tensor], prefix: str, names: list[str]) -> list[torch.Tensor]:
    return [state[prefix + n] for n in names]


@pytest.fixture
def quiet_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the worker's thread count stays in the worker


def test_ffc_run_feeds_the_pool_one_identity_batch_per_step_and_checkpoints_it(
        tiny_data: Path, tmp_path: Path, quiet_threads: None) -> None:
    cfg = _config(tiny_data, tmp_path, "classifier.ffc.momentum=0.5", "train.max_steps=3", "train.log_every=1",
                  "train.checkpoint_every=1", "train.keep_checkpoints=5")
    ctx, summary = _run(cfg, tmp_path / "run")
    assert [r["step"] for r in ctx.reports] == [1, 2, 3, 3] and summary["steps"] == 3
    for step, report in zip([1, 2, 3], ctx.reports):
        assert math.isfinite(report["train/loss"]) and report["train/loss"] > 0
        assert report["gallery/batches"] == step and report["gallery/samples_used"] == 4 * step  # one 2 x 2 per step
        assert 0.0 <= report["classifier/in_pool_fraction"] <= 1.0
    # The gallery stream the loop reads (its own seed), rebuilt here: its first 3 batches' labels, by hand through
    # an LRU of 6, give the checkpoint's pool order (least recently used first).
    stream, _ = gallery_batches(cfg, 0, 1, torch.device("cpu"), 0)
    batches = [next(stream)[1].tolist() for _ in range(3)]
    assert all(b[0] == b[1] and b[2] == b[3] and b[0] != b[2] for b in batches)  # [id0 x 2, id1 x 2]
    expected = _lru_replay(batches, 6)
    assert ctx.reports[-1]["classifier/pool_fill"] == pytest.approx(len(expected) / 6)

    states = [_model(ctx.reports[i]["checkpoint"]) for i in (0, 1, -1)]  # steps 1, 2; 3 with the final metrics
    final = states[-1]["classifier"]
    assert final["_extra_state"]["lru_labels"].tolist() == expected
    queue = final["queue"]
    assert queue.shape == (2, 6, 32)
    filled = queue[0, final["_extra_state"]["lru_slots"]]
    assert torch.allclose(filled.norm(dim=1), torch.ones(len(expected)), atol=1e-5)  # normalised gallery features
    # Gallery = 0.5 * gallery + 0.5 * probe after each applied step, parameters only.
    names = [n for n, _ in build_bare_backbone(cfg, torch.device("cpu")).named_parameters()]
    for before, after in zip(states[:-1], states[1:]):
        g0, g1 = _params(before["classifier"], "gallery.", names), _params(after["classifier"], "gallery.", names)
        p1 = _params(after["backbone"], "", names)
        for a, b, p in zip(g0, g1, p1):
            assert torch.allclose(b, 0.5 * a + 0.5 * p, atol=1e-6)
    # The gallery started as the probe (init_gallery): after one step it is within the probe's one-step move of it,
    # where an independently initialised network would be as far away as the weights are large.
    g1, p1 = _params(states[0]["classifier"], "gallery.", names), _params(states[0]["backbone"], "", names)
    gap = torch.stack([(g - p).norm() for g, p in zip(g1, p1)]).norm()
    assert gap < 0.05 * torch.stack([p.norm() for p in p1]).norm()


def _rank_run(rank: int, world_size: int, payload: dict[str, Any], run_root: str, out: str) -> None:
    """One gloo rank of the 2-rank run; also saves what its classifier holds at each checkpoint."""
    real_save = TrainCheckpoint.save

    def save(self: TrainCheckpoint, directory, rank_: int):
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in unwrap(self.classifier).state_dict().items()}
        torch.save(state, Path(out) / f"rank{rank_}_step{self.progress.step}.pt")
        return real_save(self, directory, rank_)

    TrainCheckpoint.save = save
    ctx = RecordingContext(rank, world_size, rank, 0, torch.device("cpu"), run_root)
    loop.run_worker(ctx, payload)


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "_extra_state":
            assert {k: v.tolist() if torch.is_tensor(v) else v for k, v in a[key].items()} == \
                   {k: v.tolist() if torch.is_tensor(v) else v for k, v in b[key].items()}
        else:
            assert torch.equal(a[key], b[key]), key


def test_a_2_rank_ffc_run_resumes_on_1_rank_with_the_same_pool_and_gallery(
        tiny_data: Path, tmp_path: Path, quiet_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tiny_data, tmp_path, "train.max_steps=2", "train.log_every=2")
    spawn(_rank_run, 2, _payload(cfg), str(tmp_path / "two"), str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}_step2.pt", weights_only=False) for r in (0, 1))
    _same_state(rank0, rank1)  # the replicated pool (and gallery) is the same on both ranks
    saved = _model(resolve_checkpoint(str(tmp_path / "two")))["classifier"]
    _same_state(saved, rank0)
    # Each step's gathered labels are rank 0's identity batch, then rank 1's: by hand through the LRU of 6.
    streams = [gallery_batches(cfg, r, 2, torch.device("cpu"), 0)[0] for r in (0, 1)]
    batches = [next(streams[r])[1].tolist() for _ in range(2) for r in (0, 1)]
    assert saved["_extra_state"]["lru_labels"].tolist() == _lru_replay(batches, 6)

    restored: list[dict[str, Any]] = []
    real_load = TrainCheckpoint.load

    def load(self: TrainCheckpoint, directory, rank: int):
        progress = real_load(self, directory, rank)
        restored.append({k: v.clone() if torch.is_tensor(v) else v
                         for k, v in unwrap(self.classifier).state_dict().items()})
        return progress

    monkeypatch.setattr(TrainCheckpoint, "load", load)
    cfg = _config(tiny_data, tmp_path, "train.max_steps=3", "train.log_every=1",
                  f"train.resume_from={tmp_path / 'two'}")
    ctx, summary = _run(cfg, tmp_path / "one")
    assert (summary["steps"], summary["steps_this_attempt"], summary["resumes"]) == (3, 1, 1)
    assert summary["resumed_from"].rstrip("/").endswith("checkpoint_00000002")
    _same_state(restored[0], saved)  # on 1 rank: the 2-rank run's pool, LRU state and gallery, exactly
    after = _model(resolve_checkpoint(str(tmp_path / "one")))["classifier"]
    assert not torch.equal(after["queue"], saved["queue"])  # it went on: another identity batch enqueued
    assert ctx.reports[-1]["gallery/batches"] == 1  # the gallery stream restarted with the resumed run
    gallery = [k for k in saved if k.startswith("gallery.") and saved[k].is_floating_point()]
    assert any(not torch.equal(after[k], saved[k]) for k in gallery)  # the EMA moved on


def test_ffc_keys_and_pool_sizes_that_cannot_work_are_refused(tiny_data: Path, tmp_path: Path,
                                                              quiet_threads: None) -> None:
    for kind in ("linear", "partial_fc"):
        with pytest.raises(ValueError, match="classifier.ffc applies only to classifier type 'ffc'"):
            load_config(None, [f"classifier.type={kind}", "classifier.ffc.pool_size=6"])
    # The loop sizes the pool against the training set's identities (12 in tiny_data's manifest): 13 do not fit.
    with pytest.raises(ValueError, match="pool_size 13 is larger than the number of identities 12"):
        _run(_config(tiny_data, tmp_path, "classifier.ffc.pool_size=13"), tmp_path / "big")
