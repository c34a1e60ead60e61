"""The per-worker training loop, the same under either launcher (Ray Train or torchrun; ``train/context.py``).

:func:`run_worker` reads as its phases, each a function of a screenful:

1. :func:`set_up` -- seeds, the loader, the backbone engine, the classifier and its optimizer, the checkpoint;
2. :func:`resume` -- from the newest committed checkpoint, ``train.resume_from`` or ``train.init_from``; the
   run's length; the teacher embeddings (distillation) and FFC's gallery stream;
3. :func:`start_reporting` -- the MLflow tracker, step logger, phase timer, system monitor, verifier;
4. :func:`run_steps` -- per optimizer step: micro-batches → device → :func:`~facescale.train.step.train_step`
   (which owns the non-finite policy) → a logging window's report, periodic verification and checkpoint;
5. :func:`evaluate` -- the final verification and the logged model;
6. :func:`summarise` and :func:`commit` -- the run's summary, then the final checkpoint carrying its metrics.

What a caller adds without this module importing it -- the teacher of a distillation stage, a test's planted
faults -- comes in as :class:`~facescale.train.hooks.WorkerHooks`.

Recovery: checkpoints are committed to the run's storage (``facescale.checkpoint``) every
``train.checkpoint_every`` steps. When a worker dies, Ray Train (``scaling.max_failures``) restarts the worker
group, and every worker resumes from the newest committed checkpoint of the run: backbone and its optimizer (the
engine's), classifier and its optimizer (Partial FC by class range), progress, RNG and each rank's data position.
The same happens when the run is started again under the same Ray Train run name, also on another number of
workers (elastic resume; ``train/batches.py: rescale_position``). Under torchrun nothing restarts a worker; a run
continues from its checkpoints through ``train.resume_from``.

Host syncs: one per step (the step's non-finite flags, ``train/step.py``) and one per logging window (the losses and
the gradient norm, :func:`_mean_over_ranks`); the phase breakdown adds its own only under ``train.step_breakdown_sync``.

F²C / FFC (``classifier.type: ffc``; Wang et al., CVPR 2022, arXiv:2105.10375): a second loader over the same shards
with its own shuffle seed feeds identity-based batches (``train/batches.py: gallery_batches``); per optimizer step
the gallery network embeds one of them into the dynamic class pool (``update_pool``, timer phase ``"gallery"``), the
probe (the backbone) takes its step, and an applied step moves the gallery towards the probe (``ema_update``). A run
that does not resume starts the gallery as a copy of the probe (``init_gallery``, after ``train.init_from``). The
pool, its LRU state and the gallery network are in the checkpoint (the classifier's state); the gallery loader's
position is NOT: it is a stream regrouped through a buffer of up to thousands of decoded images, too big to save per
step. On resume the gallery stream restarts at the start of the resumed epoch, with the same seed, so a resumed run
embeds some identity batches again (the pool is a cache of prototypes, so it only refreshes their features).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from facescale.checkpoint.committed import local_copy
from facescale.checkpoint.format import TrainCheckpoint, TrainProgress, is_sharded, unwrap
from facescale.checkpoint.store import CheckpointStore
from facescale.config import ConfigError, FaceScaleConfig
from facescale.data import build_train_loader
from facescale.parallel.dist import all_reduce_, barrier, rank_and_world_size
from facescale.tracking.mlflow_run import Tracker
from facescale.train.batches import MicroBatch, gallery_batches, planned_total_steps, rescale_position, step_groups
from facescale.train.components import build_bare_backbone, build_classifier, build_classifier_optimizer
from facescale.train.context import WorkerContext
from facescale.train.engine import build_engine
from facescale.train.hooks import TeacherSource, WorkerHooks
from facescale.train.observe import StepLogger, StepTimer, SystemMonitor, Verifier, format_summary
from facescale.train.schedule import lr_at
from facescale.train.start import full_precision_backbone, init_backbone, resume_point
from facescale.train.step import (
    STOP_TAG,
    NonFiniteError,
    StepOutcome,
    any_rank,
    apply_nonfinite_policy,
    first_nonfinite,
    to_device,
    train_step,
)

log = logging.getLogger("facescale.train")


@dataclass
class Worker:
    """What the phases of one worker share: its place in the run, what it trains, and how it reports."""

    ctx: WorkerContext
    cfg: FaceScaleConfig
    hooks: WorkerHooks
    loader: Any
    engine: Any
    classifier: nn.Module
    classifier_opt: torch.optim.Optimizer
    progress: TrainProgress
    ckpt: TrainCheckpoint
    store: CheckpointStore
    resumed_from: str | None = None
    total_steps: int = 0
    teacher: TeacherSource | None = None
    gallery: Iterator[MicroBatch] | None = None
    gallery_stats: dict[str, int] = field(default_factory=dict)
    tracker: Tracker | None = None
    logger: StepLogger | None = None
    timer: StepTimer | None = None
    monitor: SystemMonitor | None = None
    verifier: Verifier | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    first_step: int = 0
    consecutive_bad: int = 0
    last_checkpoint: str | None = None

    @property
    def head(self) -> nn.Module:
        """The classifier without its DDP wrapper."""
        return unwrap(self.classifier)


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


def _barrier() -> None:
    barrier(None)  # names the worker's GPU under NCCL (see barrier's docstring)


def _cpu_capability() -> str:
    """ATen's CPU kernel level (``AVX512``, ``AVX2``, ...), with oneDNN's cap when ``DNNL_MAX_CPU_ISA`` sets one."""
    capability = torch.backends.cpu.get_cpu_capability()
    cap = os.environ.get("DNNL_MAX_CPU_ISA")
    return f"{capability} (DNNL_MAX_CPU_ISA={cap})" if cap else capability


# --- the phases ---------------------------------------------------------------------------------------------------


def set_up(ctx: WorkerContext, cfg: FaceScaleConfig, hooks: WorkerHooks) -> Worker:
    """Seeds this worker and builds what it trains: loader, backbone engine, classifier, optimizer, checkpoint.

    The order is the seeds' order: the same config gives the same initial weights on every rank, run after run.
    """
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    np.random.seed(cfg.train.seed + ctx.rank)
    loader = build_train_loader(cfg, ctx.rank, ctx.world_size, ctx.device)
    engine = build_engine(cfg, build_bare_backbone(cfg, ctx.device), ctx.device)
    classifier = build_classifier(cfg, loader.manifest.num_classes, ctx.device)
    classifier_opt = build_classifier_optimizer(cfg, classifier)
    replicated = {} if is_sharded(classifier) else {"classifier": classifier_opt}
    progress = TrainProgress(world_size=ctx.world_size)
    arch = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size}
    ckpt = TrainCheckpoint(engine.backbone, classifier, replicated, progress, arch=arch, engine=engine)
    store = CheckpointStore(ctx.run_root, ctx.rank, ctx.world_size, _barrier, keep_last=cfg.train.keep_checkpoints)
    return Worker(ctx, cfg, hooks, loader, engine, classifier, classifier_opt, progress, ckpt, store)


def resume(w: Worker) -> None:
    """Restores the newest committed checkpoint (or ``train.resume_from``, or starts from ``train.init_from``), then
    sizes the run and opens what the steps read besides the loader: FFC's gallery stream, the teacher embeddings.

    Raises:
        ConfigError: ``distill.teacher_cache`` set, but the launcher handed in no teacher reader.
    """
    cfg, rank, progress = w.cfg, w.ctx.rank, w.progress
    w.resumed_from = resume_point(w.store, cfg)
    if w.resumed_from is not None:
        with local_copy(w.resumed_from, wanted=w.ckpt.files_for_rank(rank)) as directory:  # only this rank's share
            w.ckpt.load(directory, rank)
        progress.resumes += 1
        log.info("rank %d resumed at step %d (epoch %d, micro-batch %d) from %s", rank, progress.step,
                 progress.epoch, progress.step_in_epoch, w.resumed_from)
        rescale_position(progress, w.ctx.world_size, cfg.train.grad_accum_steps)
    elif cfg.train.init_from:
        init_backbone(w.engine, cfg)
    if cfg.classifier.type == "ffc":  # F²C: identity batches for the gallery network (module docstring)
        if w.resumed_from is None:
            w.head.init_gallery(unwrap(w.engine.backbone))  # the gallery starts as the probe (after init_from)
        w.gallery, w.gallery_stats = gallery_batches(cfg, rank, w.ctx.world_size, w.ctx.device, progress.epoch)
    progress.world_size = w.ctx.world_size
    w.total_steps = planned_total_steps(cfg, progress, w.loader.steps_per_epoch)
    if cfg.distill.teacher_cache:
        if w.hooks.open_teacher is None:
            raise ConfigError("distill.teacher_cache is set, but this run was launched without the teacher reader: "
                              "start it with `facescale train` or a distillation pipeline (facescale.distill)")
        w.teacher = w.hooks.open_teacher(cfg, w.loader.local_shards(progress.epoch))
    w.first_step, w.last_checkpoint = progress.step, w.resumed_from


def start_reporting(w: Worker, payload: dict[str, Any]) -> None:
    """The MLflow tracker (rank 0 writes), the step logger and timer, the system monitor and the verifier."""
    cfg, rank = w.cfg, w.ctx.rank
    w.tracker = tracker = Tracker(payload["tracking_uri"], payload["run_id"], rank)
    tracker.set_tag("facescale.loader", type(getattr(w.loader, "inner", w.loader)).__name__)  # not a wrapper
    # Same config, same data, same machine: the same numbers, bit for bit (tests/test_determinism.py). Across
    # machines the CPU kernels differ with the instruction set (oneDNN's convolutions use AVX-512 where there is
    # one, unless DNNL_MAX_CPU_ISA caps it), so the run records which ones it had.
    tracker.set_tag("facescale.cpu_capability", _cpu_capability())
    if getattr(w.loader, "fallback_reason", None):  # data.loader: auto fell back to torch: say why, in the run
        tracker.set_tag("facescale.loader_fallback", w.loader.fallback_reason)
    global_batch = cfg.train.batch_size * w.ctx.world_size * cfg.train.grad_accum_steps
    w.logger = StepLogger(tracker, rank, global_batch, w.total_steps, logged_through=tracker.last_step("train/loss"))
    w.timer = StepTimer(w.ctx.device, sync=cfg.train.step_breakdown_sync)
    w.monitor = SystemMonitor(tracker, w.ctx.local_rank, w.ctx.node_rank, cfg.train.system_metrics_interval_s,
                              resumed=w.resumed_from is not None)
    w.verifier = Verifier(cfg, tracker, rank, w.ctx.device)


def _one_step(w: Worker, group: list[MicroBatch]) -> tuple[StepOutcome, float]:
    """One optimizer step on ``group``: lr, FFC's pool update, the step (with its non-finite policy), the hooks."""
    cfg, rank, device, timer, engine = w.cfg, w.ctx.rank, w.ctx.device, w.timer, w.engine
    # uint8 to the device, normalised there; the copies are asynchronous, and the step's one host read completes
    # them before the next batch is loaded (so a loader may reuse its pinned buffers).
    micro = [to_device(images, labels, w.teacher.lookup(keys) if w.teacher is not None else None, device,
                       engine.input_dtype) for images, labels, keys in group]
    lr = lr_at(w.progress.step, w.total_steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.lr_power)
    engine.set_lr(lr)
    for param_group in w.classifier_opt.param_groups:
        param_group["lr"] = lr
    step_number = w.progress.step + 1
    poison = "loss" if w.hooks.poison_loss is not None and w.hooks.poison_loss(step_number, rank) else None
    if w.gallery is not None:  # FFC: identity batch -> gallery features -> the pool (all ranks alike)
        with timer.phase("gallery"):
            g_images, g_labels, _ = next(w.gallery)
            g_images, g_labels, _ = to_device(g_images, g_labels, None, device, engine.input_dtype)
            w.head.update_pool(g_images, g_labels)
    outcome = train_step(engine, w.classifier, w.classifier_opt, micro, cfg, timer, device, poison)
    if w.gallery is not None and outcome.applied:  # the gallery follows the probe's applied updates
        with timer.phase("gallery"):
            w.head.ema_update(unwrap(engine.backbone))
    w.progress.step = step_number
    w.consecutive_bad = apply_nonfinite_policy(outcome, step_number, w.consecutive_bad, w.progress, cfg, rank,
                                               w.store.latest)
    if w.hooks.after_step is not None:
        w.hooks.after_step(step_number, rank, engine.backbone)
    return outcome, lr


def _report_window(w: Worker, outcome: StepOutcome, lr: float) -> None:
    """A logging window's end: global means (the window's host read), metrics, verification, checkpoint."""
    cfg, step = w.cfg, w.progress.step
    window = _mean_over_ranks({**outcome.losses, "grad_norm": outcome.grad_norm})
    extra = {**w.timer.flush(), "train/grad_norm": window.pop("grad_norm"),
             "train/nonfinite_skipped": w.progress.nonfinite_skipped,
             **(w.head.stats() if hasattr(w.head, "stats") else {}),
             **{f"gallery/{k}": v for k, v in w.gallery_stats.items()}}
    w.metrics = w.logger.flush(step, window, lr, extra)
    w.metrics["step"] = step
    if cfg.train.eval_every and step % cfg.train.eval_every == 0:
        w.metrics.update(w.verifier.run(full_precision_backbone(w.engine, cfg, w.ctx.device), step))
        w.engine.backbone.train()
    every = cfg.train.checkpoint_every
    if every and step % every == 0 and step < w.total_steps:  # the last one is committed by the caller
        w.last_checkpoint = w.metrics["checkpoint"] = commit(w)
    w.ctx.report(w.metrics)
    w.timer.restart_clock()
    w.logger.restart_clock()


def run_steps(w: Worker) -> None:
    """Optimizer steps until ``total_steps``: data, the step, and every ``train.log_every`` steps a report."""
    w.engine.backbone.train()
    w.classifier.train()
    groups = step_groups(w.loader, w.progress, w.cfg.train.grad_accum_steps, w.teacher)
    head_epoch = None
    while w.progress.step < w.total_steps:
        with w.timer.phase("data_wait"):  # load micro-batches (+ cached teacher embeddings)
            group = next(groups)
        if w.progress.epoch != head_epoch and hasattr(w.head, "set_epoch"):  # an epoch starts (or a resume)
            head_epoch = w.progress.epoch
            w.head.set_epoch(head_epoch)  # sub-center cleaning switches on at its epoch
        outcome, lr = _one_step(w, group)
        w.timer.step_done()
        w.logger.step_done()
        if w.progress.step % w.cfg.train.log_every == 0 or w.progress.step == w.total_steps:
            _report_window(w, outcome, lr)


def evaluate(w: Worker) -> None:
    """The final verification (with plots), the loaders' counts, and the model logged to MLflow."""
    final = full_precision_backbone(w.engine, w.cfg, w.ctx.device)
    with tempfile.TemporaryDirectory() as plots:
        w.metrics.update(w.verifier.run(final, w.progress.step, plot_dir=Path(plots)))
    w.metrics.update({f"data/{k}": v for k, v in getattr(w.loader, "stats", {}).items()})
    w.tracker.log_metrics({k: v for k, v in w.metrics.items() if k.startswith("data/")}, w.progress.step)
    if w.cfg.tracking.log_model:
        model_id = w.tracker.log_model(final, metadata=w.ckpt.arch)
        if model_id:
            w.metrics["model_id"] = model_id


def summarise(w: Worker) -> dict[str, Any]:
    """The run's summary (steps, throughput, time shares, non-finite count, resumes), logged and returned."""
    progress, timer, logger = w.progress, w.timer, w.logger
    w.last_checkpoint = w.store.checkpoint_uri(progress.step)  # committed next, with the final metrics
    timer.flush()
    accum = w.cfg.train.grad_accum_steps
    summary = {"steps": progress.step, "steps_this_attempt": progress.step - w.first_step,
               "samples": progress.step * w.cfg.train.batch_size * w.ctx.world_size * accum,
               "samples_per_s_median": float(np.median(logger.samples_per_s)) if logger.samples_per_s else 0.0,
               "step_ms_mean": 1000 * timer.total.get("step", 0.0) / max(timer.total_steps, 1),
               "breakdown": timer.breakdown(), "nonfinite_skipped": progress.nonfinite_skipped,
               "resumed_from": w.resumed_from, "resumes": progress.resumes, "last_checkpoint": w.last_checkpoint}
    if w.ctx.rank == 0:
        log.info("%s", format_summary(summary))
    w.tracker.log_dict(summary, "summary.json")
    w.tracker.log_metrics({"train/nonfinite_skipped": progress.nonfinite_skipped,
                           **{f"time/share_{k}": v for k, v in summary["breakdown"].items()}}, progress.step)
    w.metrics.update({"step": progress.step, "checkpoint": w.last_checkpoint, "summary": json.dumps(summary)})
    return summary


def commit(w: Worker, metrics: dict[str, Any] | None = None) -> str:
    """Writes and commits a checkpoint, unless a weight is non-finite: such a checkpoint is never written.

    Checkpoints are not registered with Ray Train: its run snapshot would point at checkpoints that the store's
    retention deletes, and Ray refuses to restart such a run. The final checkpoint's manifest carries the run's
    final metrics instead (``metrics``, rank 0's), which the driver reads back (``train/launch.py``).

    Raises:
        NonFiniteError: A weight is NaN/inf on some rank (every rank raises; the last committed checkpoint stays).
    """
    ckpt, rank, step = w.ckpt, w.ctx.rank, w.progress.step
    bad = first_nonfinite({"backbone": unwrap(ckpt.backbone), "classifier": unwrap(ckpt.classifier)})
    if any_rank(bad is not None, device=w.ctx.device)[0]:
        where = f"{bad} on rank {rank}" if bad else "a weight on another rank"
        raise NonFiniteError(f"refusing to write the checkpoint of step {step}: {where} is NaN/inf; the last "
                             f"committed checkpoint is {w.store.latest() or 'none'}")
    meta = {"step": step, "epoch": w.progress.epoch, "world_size": w.progress.world_size, **ckpt.arch}
    if metrics is not None:
        meta["metrics"] = json.loads(json.dumps(metrics, default=float))  # numpy scalars as plain numbers
    return w.store.save(step, lambda directory: ckpt.save(directory, rank), meta=meta)


# --- entry points -------------------------------------------------------------------------------------------------


def train_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point on each worker. ``payload``: resolved config, MLflow run, storage root, hooks."""
    from facescale.train.context import ray_context

    run_worker(ray_context(payload["run_root"], bool(payload["config"]["scaling"]["use_gpu"])), payload,
               payload.get("hooks"))


def run_worker(ctx: WorkerContext, payload: dict[str, Any], hooks: WorkerHooks | None = None) -> None:
    """The training loop of one worker, whichever launcher started it: its phases in order (module docstring).

    Args:
        ctx: Who this worker is, its device, the run's storage root and where it reports (``train/context.py``).
        payload: ``config`` (the resolved config as JSON), ``run_id`` and ``tracking_uri`` of the MLflow run.
        hooks: What the caller adds (``train/hooks.py``): the teacher reader, a test's planted faults.
    """
    from facescale.console import configure_worker_logging  # quiet library loggers; per-step lines off stdout

    configure_worker_logging(ctx.launcher, verbose=bool(payload.get("verbose")))
    w = set_up(ctx, FaceScaleConfig.model_validate(payload["config"]), hooks or WorkerHooks())
    resume(w)
    start_reporting(w, payload)
    try:
        run_steps(w)
        evaluate(w)
        summarise(w)
        commit(w, metrics=w.metrics)
        ctx.report(w.metrics)
    except NonFiniteError as err:
        # A deliberate stop, not a failure to retry (a restart would meet the same values again): every rank took
        # the same decision; rank 0 records why in the MLflow run, and the driver raises it (train/launch.py,
        # train/torchrun.py).
        log.error("%s", err)
        w.tracker.set_tag(STOP_TAG, str(err))
        ctx.report({"step": w.progress.step})
    finally:
        w.monitor.finish()
