"""The per-worker training loop, the same under either launcher (Ray Train or torchrun; ``train/context.py``).

It reads as named steps: load micro-batches → to the device → optimizer step (``facescale.train.step``) → report →
checkpoint. Rank checks live in the :class:`~facescale.tracking.mlflow_run.Tracker` and the objects of
``observe.py``; who this worker is and where it reports come from its :class:`~facescale.train.context.WorkerContext`.

Recovery: checkpoints are committed to the run's storage (``facescale.checkpoint.store``) every
``train.checkpoint_every`` steps. When a worker dies, Ray Train (``scaling.max_failures``) restarts the worker
group, and every worker resumes from the newest committed checkpoint of the run: backbone and its optimizer (the
engine's), classifier and its optimizer (Partial FC by class range), progress, RNG and each rank's data position.
The same happens when the run is started again under the same Ray Train run name, also on another number of
workers (elastic resume; see :func:`_rescale_position`). Under torchrun nothing restarts a worker; a run continues
from its checkpoints through ``train.resume_from``.

Host syncs: one per step (the step's non-finite flags, ``train/step.py``) and one per logging window (the losses and
the gradient norm, :func:`_mean_over_ranks`); the phase breakdown adds its own only under ``train.step_breakdown_sync``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from facescale import storage
from facescale.checkpoint.format import TrainCheckpoint, TrainProgress, is_sharded, load_backbone_state, unwrap
from facescale.checkpoint.store import CheckpointStore, local_copy, resolve_checkpoint
from facescale.config import FaceScaleConfig
from facescale.data import build_train_loader
from facescale.distill.cache import TeacherCache
from facescale.parallel.dist import all_reduce_, barrier, rank_and_world_size
from facescale.tracking.mlflow_run import Tracker
from facescale.train.components import build_bare_backbone, build_classifier, build_classifier_optimizer
from facescale.train.context import WorkerContext
from facescale.train.engine import build_engine
from facescale.train.observe import StepLogger, StepTimer, SystemMonitor, Verifier, format_summary
from facescale.train.schedule import lr_at
from facescale.train.step import (
    STOP_TAG,
    NonFiniteError,
    StepOutcome,
    any_rank,
    first_nonfinite,
    to_device,
    train_step,
)

log = logging.getLogger("facescale.train")

MicroBatch = tuple[torch.Tensor, torch.Tensor, list[str]]


def _mean_over_ranks(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Global means of this rank's scalars (host floats or 0-d device tensors), read on the host in one go.

    The loop calls it once per logging window with the step's losses and gradient norm: the window's host read.
    """
    names = sorted(values)
    device = next((v.device for v in values.values() if torch.is_tensor(v)), torch.device("cpu"))
    local = torch.stack([torch.as_tensor(values[n], dtype=torch.float64, device=device) for n in names])
    _, world_size = rank_and_world_size(None)
    # NOTE: all-reduce SUM of each rank's scalars, divided by world size: the logged losses are global means (the
    # gradient norm is the same on every rank). parallel.dist puts the tensor where the group's backend takes it.
    totals = all_reduce_(local, dist.ReduceOp.SUM, None).tolist()
    return {n: v / world_size for n, v in zip(names, totals)}


def _batches(loader: Any, progress: TrainProgress, teacher: TeacherCache | None = None) -> Iterator[MicroBatch]:
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
                teacher: TeacherCache | None = None) -> Iterator[list[MicroBatch]]:
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
            for batch in _batches(loader, progress, teacher):
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


def _rescale_position(progress: TrainProgress, world_size: int, accum: int) -> None:
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


def _init_backbone(engine: Any, cfg: FaceScaleConfig) -> None:
    """Starts from another run's backbone weights (``train.init_from``), refusing a different architecture.

    ``train.init_from`` is a local directory or an ``s3://`` prefix holding ``model.pt`` (fetched here).
    """
    source = cfg.train.init_from
    with tempfile.TemporaryDirectory(prefix="facescale-init-") as tmp:
        local = source
        if storage.is_s3_url(source):
            local = tmp
            storage.download_file(f"{source.rstrip('/')}/model.pt", Path(tmp) / "model.pt")
        elif "://" in source:
            raise ValueError(f"train.init_from: {source} is neither a local directory nor an s3:// URI")
        state, arch = load_backbone_state(local)
    want = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size}
    if arch and arch != want:
        raise ValueError(f"train.init_from: {source} holds {arch}, this run trains {want}")
    unwrap(engine.backbone).load_state_dict(state)


def _barrier() -> None:
    barrier(None)  # names the worker's GPU under NCCL (see barrier's docstring)


def _commit_checkpoint(ckpt: TrainCheckpoint, store: CheckpointStore, rank: int, device: torch.device,
                       metrics: dict[str, Any] | None = None) -> str:
    """Writes and commits a checkpoint, unless a weight is non-finite: such a checkpoint is never written.

    Checkpoints are not registered with Ray Train: its run snapshot would point at checkpoints that the store's
    retention deletes, and Ray refuses to restart such a run. The final checkpoint's manifest carries the run's
    final metrics instead (``metrics``, rank 0's), which the driver reads back (``train/launch.py``).
    """
    step = ckpt.progress.step
    bad = first_nonfinite({"backbone": unwrap(ckpt.backbone), "classifier": unwrap(ckpt.classifier)})
    if any_rank(bad is not None, device=device)[0]:
        where = f"{bad} on rank {rank}" if bad else "a weight on another rank"
        raise NonFiniteError(f"refusing to write the checkpoint of step {step}: {where} is NaN/inf; the last "
                             f"committed checkpoint is {store.latest() or 'none'}")
    meta = {"step": step, "epoch": ckpt.progress.epoch, "world_size": ckpt.progress.world_size, **ckpt.arch}
    if metrics is not None:
        meta["metrics"] = json.loads(json.dumps(metrics, default=float))  # numpy scalars as plain numbers
    return store.save(step, lambda directory: ckpt.save(directory, rank), meta=meta)


def _resume_point(store: CheckpointStore, cfg: FaceScaleConfig) -> str | None:
    """The run's own newest committed checkpoint (a restart), else ``train.resume_from`` (a checkpoint or run)."""
    latest = store.latest()
    if latest is not None:
        return latest
    if cfg.train.resume_from:
        found = resolve_checkpoint(cfg.train.resume_from)
        if found is None:
            raise FileNotFoundError(f"train.resume_from: {cfg.train.resume_from} holds no committed checkpoint")
        return found
    return None


def _full_precision_backbone(engine: Any, cfg: FaceScaleConfig, device: torch.device) -> torch.nn.Module:
    """The backbone in fp32 with all its weights, for verification and model logging. COLLECTIVE when it gathers.

    Under DDP that is the engine's own module. Under DeepSpeed the module may hold bf16/fp16 weights or (ZeRO-3)
    only a partition of them: then the engine's gathered fp32 state is loaded into a fresh copy.
    """
    module = engine.backbone
    if cfg.train.engine == "ddp":
        return module
    state = engine.state_dict()["backbone"]
    copy = build_bare_backbone(cfg, device)
    copy.load_state_dict(state)
    return copy


def train_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point on each worker. ``payload``: resolved config, MLflow run, the run's storage root."""
    from facescale.train.context import ray_context

    run_worker(ray_context(payload["run_root"], bool(payload["config"]["scaling"]["use_gpu"])), payload)


def _nonfinite_policy(outcome: StepOutcome, step: int, consecutive_bad: int, progress: TrainProgress,
                      cfg: FaceScaleConfig, rank: int, store: CheckpointStore) -> int:
    """Counts a non-finite step and stops the run when the policy says so; returns the consecutive count.

    Raises:
        NonFiniteError: Under ``train.nonfinite=stop``, or after ``train.max_consecutive_nonfinite`` in a row.
    """
    if outcome.nonfinite is None:
        return 0
    consecutive_bad += 1
    progress.nonfinite_skipped += 1
    msg = f"non-finite step {step}: {outcome.nonfinite} (rank {rank})"
    if cfg.train.nonfinite == "stop" or consecutive_bad >= cfg.train.max_consecutive_nonfinite:
        why = ("train.nonfinite=stop" if cfg.train.nonfinite == "stop"
               else f"{consecutive_bad} in a row (train.max_consecutive_nonfinite)")
        raise NonFiniteError(f"{msg}; stopping ({why}); the last committed checkpoint is {store.latest() or 'none'}")
    log.warning("%s; update skipped (train.nonfinite=skip, %d so far)", msg, progress.nonfinite_skipped)
    return consecutive_bad


def _cpu_capability() -> str:
    """ATen's CPU kernel level (``AVX512``, ``AVX2``, ...), with oneDNN's cap when ``DNNL_MAX_CPU_ISA`` sets one."""
    capability = torch.backends.cpu.get_cpu_capability()
    cap = os.environ.get("DNNL_MAX_CPU_ISA")
    return f"{capability} (DNNL_MAX_CPU_ISA={cap})" if cap else capability


def run_worker(ctx: WorkerContext, payload: dict[str, Any]) -> None:
    """The training loop of one worker, whichever launcher started it.

    Args:
        ctx: Who this worker is, its device, the run's storage root and where it reports (``train/context.py``).
        payload: ``config`` (the resolved config as JSON), ``run_id`` and ``tracking_uri`` of the MLflow run.
    """
    from facescale.console import configure_worker_logging  # quiet library loggers; per-step lines off stdout

    configure_worker_logging(ctx.launcher, verbose=bool(payload.get("verbose")))
    cfg = FaceScaleConfig.model_validate(payload["config"])
    rank, world_size, device = ctx.rank, ctx.world_size, ctx.device
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    np.random.seed(cfg.train.seed + rank)
    accum = cfg.train.grad_accum_steps
    faults = cfg.train.inject_faults

    loader = build_train_loader(cfg, rank, world_size, device)
    engine = build_engine(cfg, build_bare_backbone(cfg, device), device)
    classifier = build_classifier(cfg, loader.manifest.num_classes, device)
    classifier_opt = build_classifier_optimizer(cfg, classifier)
    replicated = {} if is_sharded(classifier) else {"classifier": classifier_opt}
    progress = TrainProgress(world_size=world_size)
    arch = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size}
    ckpt = TrainCheckpoint(engine.backbone, classifier, replicated, progress, arch=arch, engine=engine)
    store = CheckpointStore(ctx.run_root, rank, world_size, _barrier, keep_last=cfg.train.keep_checkpoints)

    resumed_from = _resume_point(store, cfg)
    if resumed_from is not None:
        with local_copy(resumed_from, wanted=ckpt.files_for_rank(rank)) as directory:  # only this rank's share
            ckpt.load(directory, rank)
        progress.resumes += 1
        log.info("rank %d resumed at step %d (epoch %d, micro-batch %d) from %s", rank, progress.step,
                 progress.epoch, progress.step_in_epoch, resumed_from)
        _rescale_position(progress, world_size, accum)
    elif cfg.train.init_from:
        _init_backbone(engine, cfg)
    progress.world_size = world_size
    total_steps = planned_total_steps(cfg, progress, loader.steps_per_epoch)
    teacher = (TeacherCache(cfg.distill.teacher_cache, cfg.data.root, shards=loader.local_shards(progress.epoch))
               if cfg.distill.teacher_cache else None)  # fmt: skip
    if teacher is not None and teacher.embedding_size != cfg.model.embedding_size:
        raise ValueError(f"distill.teacher_cache: teacher embeddings are {teacher.embedding_size}-d, "
                         f"model.embedding_size is {cfg.model.embedding_size}")

    tracker = Tracker(payload["tracking_uri"], payload["run_id"], rank)
    tracker.set_tag("facescale.loader", type(loader).__name__)
    # Same config, same data, same machine: the same numbers, bit for bit (tests/test_determinism.py). Across
    # machines the CPU kernels differ with the instruction set (oneDNN's convolutions use AVX-512 where there is
    # one, unless DNNL_MAX_CPU_ISA caps it), so the run records which ones it had.
    tracker.set_tag("facescale.cpu_capability", _cpu_capability())
    if getattr(loader, "fallback_reason", None):  # data.loader: auto fell back to torch: say why, in the run
        tracker.set_tag("facescale.loader_fallback", loader.fallback_reason)
    logger = StepLogger(tracker, rank, cfg.train.batch_size * world_size * accum, total_steps,
                        logged_through=tracker.last_step("train/loss"))
    timer = StepTimer(device, sync=cfg.train.step_breakdown_sync)
    monitor = SystemMonitor(tracker, ctx.local_rank, ctx.node_rank, cfg.train.system_metrics_interval_s,
                            resumed=resumed_from is not None)
    verifier = Verifier(cfg, tracker, rank, device)
    engine.backbone.train()
    classifier.train()
    metrics: dict[str, Any] = {}
    first_step, consecutive_bad, last_checkpoint = progress.step, 0, resumed_from
    groups = step_groups(loader, progress, accum, teacher)
    head, head_epoch = unwrap(classifier), None
    try:
        while progress.step < total_steps:
            with timer.phase("data_wait"):  # load micro-batches (+ cached teacher embeddings)
                group = next(groups)
            if progress.epoch != head_epoch and hasattr(head, "set_epoch"):  # an epoch starts (or a resume)
                head_epoch = progress.epoch
                head.set_epoch(head_epoch)  # sub-center cleaning switches on at its epoch
            # uint8 to the device, normalised there; the copies are asynchronous, and the step's one host read
            # completes them before the next batch is loaded (so a loader may reuse its pinned buffers).
            micro = [to_device(images, labels, teacher.lookup(keys) if teacher is not None else None, device,
                               engine.input_dtype) for images, labels, keys in group]
            lr = lr_at(progress.step, total_steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.lr_power)
            engine.set_lr(lr)
            for group_ in classifier_opt.param_groups:
                group_["lr"] = lr
            step_number = progress.step + 1
            poison = "loss" if step_number in faults.nonfinite_loss_steps and rank == faults.rank else None
            outcome = train_step(engine, classifier, classifier_opt, micro, cfg, timer, device, poison)  # step
            progress.step = step_number
            consecutive_bad = _nonfinite_policy(outcome, step_number, consecutive_bad, progress, cfg, rank, store)
            if faults.nonfinite_weights_step == step_number and rank == faults.rank:
                with torch.no_grad():
                    next(engine.backbone.parameters()).fill_(float("nan"))
            timer.step_done()
            logger.step_done()
            if progress.step % cfg.train.log_every == 0 or progress.step == total_steps:  # report
                window = _mean_over_ranks({**outcome.losses, "grad_norm": outcome.grad_norm})  # the host read
                extra = {**timer.flush(), "train/grad_norm": window.pop("grad_norm"),
                         "train/nonfinite_skipped": progress.nonfinite_skipped,
                         **(head.stats() if hasattr(head, "stats") else {})}
                metrics = logger.flush(progress.step, window, lr, extra)
                metrics["step"] = progress.step
                if cfg.train.eval_every and progress.step % cfg.train.eval_every == 0:
                    metrics.update(verifier.run(_full_precision_backbone(engine, cfg, device), progress.step))
                    engine.backbone.train()
                every = cfg.train.checkpoint_every
                if every and progress.step % every == 0 and progress.step < total_steps:  # the last one: below
                    last_checkpoint = metrics["checkpoint"] = _commit_checkpoint(ckpt, store, rank, device)
                ctx.report(metrics)
                timer.restart_clock()
                logger.restart_clock()

        final = _full_precision_backbone(engine, cfg, device)
        with tempfile.TemporaryDirectory() as plots:
            metrics.update(verifier.run(final, progress.step, plot_dir=Path(plots)))
        metrics.update({f"data/{k}": v for k, v in getattr(loader, "stats", {}).items()})
        tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("data/")}, progress.step)
        if cfg.tracking.log_model:
            model_id = tracker.log_model(final, metadata=arch)
            if model_id:
                metrics["model_id"] = model_id
        last_checkpoint = store.checkpoint_uri(progress.step)  # committed below, with the final metrics
        timer.flush()
        summary = {"steps": progress.step, "steps_this_attempt": progress.step - first_step,
                   "samples": progress.step * cfg.train.batch_size * world_size * accum,
                   "samples_per_s_median": float(np.median(logger.samples_per_s)) if logger.samples_per_s else 0.0,
                   "step_ms_mean": 1000 * timer.total.get("step", 0.0) / max(timer.total_steps, 1),
                   "breakdown": timer.breakdown(), "nonfinite_skipped": progress.nonfinite_skipped,
                   "resumed_from": resumed_from, "resumes": progress.resumes, "last_checkpoint": last_checkpoint}
        if rank == 0:
            log.info("%s", format_summary(summary))
        tracker.log_dict(summary, "summary.json")
        tracker.log_metrics({"train/nonfinite_skipped": progress.nonfinite_skipped,
                             **{f"time/share_{k}": v for k, v in summary["breakdown"].items()}}, progress.step)
        metrics.update({"step": progress.step, "checkpoint": last_checkpoint, "summary": json.dumps(summary)})
        _commit_checkpoint(ckpt, store, rank, device, metrics=metrics)
        ctx.report(metrics)
    except NonFiniteError as err:
        # A deliberate stop, not a failure to retry (a restart would meet the same values again): every rank took
        # the same decision; rank 0 records why in the MLflow run, and the driver raises it (train/launch.py,
        # train/torchrun.py).
        log.error("%s", err)
        tracker.set_tag(STOP_TAG, str(err))
        ctx.report({"step": progress.step})
    finally:
        monitor.finish()
