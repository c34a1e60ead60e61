"""The loop's bookkeeping without Ray: optimizer-step groups over epochs, the planned step count, elastic positions."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from facescale.config import load_config
from facescale.data import build_loader
from facescale.data.synth import synthesize
from facescale.train.checkpoint import TrainProgress
from facescale.train.loop import _rescale_position, planned_total_steps, step_groups


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
    _rescale_position(progress, world_size=1, accum=2)
    assert (progress.step_in_epoch, progress.world_size, progress.local_loader_position) == (8, 1, {})
    # the rest of epoch 1 (7 - 4 steps at 1 worker) and epoch 2 (7 steps)
    assert planned_total_steps(cfg, progress, steps_per_epoch=14) == 5 + (7 - 4) + 7
    assert planned_total_steps(load_config(None, ["train.max_steps=11"]), progress, 14) == 11


def test_rescaled_position_rounds_down_to_whole_steps() -> None:
    progress = TrainProgress(step=3, epoch=0, step_in_epoch=6, world_size=2, local_loader_position={"x": 1})
    _rescale_position(progress, world_size=4, accum=2)  # 6 * 2 / 4 = 3 micro-batches -> 2 (a whole step)
    assert progress.step_in_epoch == 2
    same = TrainProgress(step=3, step_in_epoch=6, world_size=2, local_loader_position={"x": 1})
    _rescale_position(same, world_size=2, accum=2)
    assert same.step_in_epoch == 6 and same.local_loader_position == {"x": 1}

