"""Where the worker's data comes from, step by step: micro-batch groups from the saved epoch position, the run's
length in optimizer steps, the position's mapping onto another world size, and FFC's identity-based gallery stream.

Each function keeps ``TrainProgress`` (``facescale.checkpoint.format``) up to date as batches are taken, so a
checkpoint written at any step saves the data position that belongs to it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from facescale.checkpoint.format import TrainProgress
from facescale.config import AugmentConfig, FaceScaleConfig
from facescale.data import build_train_loader
from facescale.train.hooks import TeacherSource

log = logging.getLogger("facescale.train")

MicroBatch = tuple[torch.Tensor, torch.Tensor, list[str]]


def epoch_batches(loader: Any, progress: TrainProgress, teacher: TeacherSource | None = None) -> Iterator[MicroBatch]:
    """``(images, labels, keys)`` of the current epoch from the saved position on (seen batches are not decoded).

    ``teacher``, when given, first selects the teacher embeddings of the shards this rank reads in the epoch.
    """
    if teacher is not None:
        teacher.select(loader.local_shards(progress.epoch))  # this rank holds only its share (DESIGN.md)
    resume = progress.local_loader_position
    for batch in loader.epoch_samples(progress.epoch, start_step=progress.step_in_epoch, resume=resume):
        progress.local_loader_position = loader.local_position()  # after this batch: what a checkpoint now saves
        yield batch


def step_groups(loader: Any, progress: TrainProgress, accum: int,
                teacher: TeacherSource | None = None) -> Iterator[list[MicroBatch]]:
    """Groups of ``accum`` micro-batches, one per optimizer step, endlessly over epochs.

    ``progress.step_in_epoch`` counts micro-batches. An epoch ends after ``steps_per_epoch // accum`` groups: the
    last ``steps_per_epoch % accum`` micro-batches of an epoch are not used (one optimizer step never spans epochs).
    """
    usable = (loader.steps_per_epoch // accum) * accum
    if usable == 0:
        raise ValueError(f"train.grad_accum_steps={accum} exceeds the {loader.steps_per_epoch} batches of an epoch")
    while True:
        group: list[MicroBatch] = []
        if progress.step_in_epoch < usable:
            for batch in epoch_batches(loader, progress, teacher):
                progress.step_in_epoch += 1
                group.append(batch)
                if len(group) == accum:
                    yield group
                    group = []
                if progress.step_in_epoch >= usable:
                    break
        progress.epoch += 1
        progress.step_in_epoch = 0


def planned_total_steps(cfg: FaceScaleConfig, progress: TrainProgress, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run: ``train.max_steps``, or what the remaining epochs hold at this world size.

    ``steps_per_epoch`` is the loader's (micro-batches). After an elastic resume the remaining epochs are counted at
    the new world size, so the run still ends after ``train.epochs`` epochs.
    """
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = steps_per_epoch // cfg.train.grad_accum_steps
    remaining = (cfg.train.epochs - progress.epoch) * per_epoch - progress.step_in_epoch // cfg.train.grad_accum_steps
    return progress.step + max(remaining, 0)


def rescale_position(progress: TrainProgress, world_size: int, accum: int) -> None:
    """Maps the epoch position of a checkpoint saved on another world size onto this one (elastic resume).

    The position is kept as the number of samples consumed in the epoch, rounded down to whole optimizer steps at
    the new size. Ranks read other samples than before, so within this one epoch some samples may be seen twice
    and others not at all; from the next epoch on, coverage is as in any run of this size.
    """
    saved = progress.world_size
    if saved == world_size:
        return
    micro = progress.step_in_epoch * saved // world_size
    log.info("elastic resume: checkpoint saved on %d workers, continuing on %d; epoch %d position %d -> %d "
             "micro-batches", saved, world_size, progress.epoch, progress.step_in_epoch, micro - micro % accum)
    progress.step_in_epoch = micro - micro % accum
    progress.local_loader_position = {}
    progress.world_size = world_size


def gallery_batches(cfg: FaceScaleConfig, rank: int, world_size: int, device: torch.device,
                     epoch: int) -> tuple[Iterator[MicroBatch], dict[str, int]]:
    """FFC's identity-based gallery batches from ``epoch`` on, endlessly: ``(images, labels, keys)`` and the counts.

    A second loader over the same shards (``data.*`` as the probe's, so DALI/torch and ``s3://`` alike), shuffled
    with its own seed, regrouped into ``classifier.ffc.ids_per_batch`` x ``images_per_id`` batches by
    :class:`~facescale.data.identity_batches.IdentityBatcher`; the counts (its ``stats``: batches, samples seen,
    used, evicted unused) are logged as ``gallery/*``. Not checkpointed (see ``train/loop.py``'s docstring).
    """
    from facescale.data.identity_batches import IdentityBatcher

    ffc = cfg.classifier.ffc
    seed = cfg.train.seed + 7919  # another shuffle of the same shards than the probe's (any fixed offset would do)
    # Its own shuffle, and no occlusion augmentation: the pool's prototypes stand for whole, clean faces.
    gallery_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed}),
                                         "data": cfg.data.model_copy(update={"augment": AugmentConfig()})})
    loader = build_train_loader(gallery_cfg, rank, world_size, device)

    def epochs() -> Iterator[MicroBatch]:
        e = epoch
        while True:
            yield from loader.epoch_samples(e)
            e += 1

    batcher = IdentityBatcher(epochs(), ffc.ids_per_batch, ffc.images_per_id, seed=seed + rank)
    return iter(batcher), batcher.stats
