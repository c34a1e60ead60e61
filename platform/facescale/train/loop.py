"""The per-worker training loop that Ray Train runs on every worker.

It reads as named steps: load batch → forward → classifier loss → backward → step → report. Rank checks live
in the :class:`~facescale.tracking.mlflow_run.Tracker` and :class:`StepLogger`, not in the loop.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from facescale.config import FaceScaleConfig
from facescale.data import build_train_loader
from facescale.distill.cache import TeacherCache
from facescale.distill.loss import angular_distillation_loss
from facescale.eval.plots import plot_roc
from facescale.eval.verification import verify_model
from facescale.tracking.mlflow_run import Tracker
from facescale.train.checkpoint import TrainCheckpoint, TrainProgress, load_backbone_state, unwrap
from facescale.train.components import build_classifier, build_model, build_optimizers, replicated_optimizers
from facescale.train.schedule import lr_at

log = logging.getLogger("facescale.train")


def _mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized():
        return values
    names = sorted(values)
    t = torch.tensor([values[n] for n in names], dtype=torch.float64)
    # NOTE: all-reduce SUM of each rank's scalar losses, divided by world size: the logged losses are global means.
    dist.all_reduce(t)
    return {n: float(v) / dist.get_world_size() for n, v in zip(names, t.tolist())}


class StepLogger:
    """Progress lines (samples/s, loss, lr) on rank 0 and per-step metrics to MLflow."""

    def __init__(self, tracker: Tracker, rank: int, global_batch: int, total_steps: int) -> None:
        self.tracker, self.rank, self.global_batch, self.total_steps = tracker, rank, global_batch, total_steps
        self._t0, self._steps = time.perf_counter(), 0

    def step_done(self) -> None:
        self._steps += 1

    def flush(self, step: int, losses: dict[str, float], lr: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        metrics = {f"train/{name}": value for name, value in losses.items()}
        metrics.update({"train/lr": lr, "train/samples_per_s": self._steps * self.global_batch / elapsed})
        self._t0, self._steps = time.perf_counter(), 0
        self.tracker.log_metrics(metrics, step)
        if self.rank == 0:
            parts = "".join(f"  {name} {value:.4f}" for name, value in losses.items() if name != "loss")
            log.info("step %d/%d  loss %.4f%s  lr %.5f  %.1f samples/s", step, self.total_steps, losses["loss"],
                     parts, lr, metrics["train/samples_per_s"])
        return metrics


class Verifier:
    """Runs the verification sets on rank 0 and logs accuracy, threshold and the ROC plot."""

    def __init__(self, cfg: FaceScaleConfig, tracker: Tracker, rank: int, device: torch.device) -> None:
        self.bins = [Path(p) for p in cfg.data.val_bins]
        self.batch_size = cfg.train.eval_batch_size
        self.tracker, self.rank, self.device = tracker, rank, device
        self._cache: dict[str, Any] = {}

    def run(self, backbone: nn.Module, step: int, plot_dir: Path | None = None) -> dict[str, float]:
        if self.rank != 0 or not self.bins:
            return {}
        metrics, curves = {}, {}
        for path in self.bins:
            res = verify_model(backbone, path, self.batch_size, self.device, cache=self._cache)
            name = path.stem
            curves[name] = res
            metrics[f"val/{name}/accuracy"] = res["accuracy_mean"]
            metrics[f"val/{name}/accuracy_std"] = res["accuracy_std"]
            metrics[f"val/{name}/threshold"] = res["best_threshold"]
            log.info("step %d  verification %s: %.2f%% ± %.2f  threshold %.2f", step, name,
                     100 * res["accuracy_mean"], 100 * res["accuracy_std"], res["best_threshold"])
        self.tracker.log_metrics(metrics, step)
        if plot_dir is not None:
            png = plot_roc(curves, plot_dir / "roc.png", title=f"Verification ROC at step {step}")
            self.tracker.log_artifact(png, "plots")
            for name, res in curves.items():  # the curve itself, so pipelines can overlay generations
                self.tracker.log_dict({"step": step, **{k: _plain(res[k]) for k in _CURVE_KEYS}},
                                      f"verification/{name}.json")
        return metrics


_CURVE_KEYS = ("accuracy_mean", "accuracy_std", "best_threshold", "fpr", "tpr")


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _init_backbone(backbone: nn.Module, cfg: FaceScaleConfig) -> None:
    """Starts from another run's backbone weights (``train.init_from``), refusing a different architecture."""
    import ray.train

    source = cfg.train.init_from
    with ray.train.Checkpoint(source).as_directory() as local:  # a local directory, or a URI (s3://) fetched here
        state, arch = load_backbone_state(local)
    want = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size}
    if arch and arch != want:
        raise ValueError(f"train.init_from: {source} holds {arch}, this run trains {want}")
    unwrap(backbone).load_state_dict(state)


def _batches(loader: Any, progress: TrainProgress) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """``(images, labels, keys)`` of the current epoch from the saved position on (seen batches are not decoded)."""
    resume = progress.local_loader_position
    for batch in loader.epoch_samples(progress.epoch, start_step=progress.step_in_epoch, resume=resume):
        progress.local_loader_position = loader.local_position()  # after this batch: what a checkpoint now saves
        yield batch


def train_step(backbone: nn.Module, classifier: nn.Module, optimizers: dict[str, Any], images: torch.Tensor,
               labels: torch.Tensor, cfg: FaceScaleConfig, teacher: torch.Tensor | None = None) -> dict[str, float]:
    """One optimizer step: forward → classifier loss (+ distillation) → backward → clip → step.

    Returns:
        This rank's ``loss`` and, when distilling, its parts ``cls_loss`` and ``distill_loss``.
    """
    # Gradients are dropped before the forward, so the previous step's (at sample rate 1.0 a dense center
    # gradient) are not alive during this one -- the peak the `facescale plan` estimate assumes.
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
        embeddings = backbone(images)
    cls_loss = classifier(embeddings.float(), labels)
    losses = {"cls_loss": cls_loss}
    loss = cls_loss
    if teacher is not None:  # L = L_margin + alpha * L_distill (VarGFaceNet, section 3.3)
        losses["distill_loss"] = angular_distillation_loss(embeddings.float(), teacher, cfg.distill.form)
        loss = cls_loss + cfg.distill.alpha * losses["distill_loss"]
    loss.backward()
    if cfg.train.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), cfg.train.grad_clip)
    for opt in optimizers.values():
        opt.step()
    out = {"loss": float(loss.detach())}
    if teacher is not None:
        out.update({name: float(value.detach()) for name, value in losses.items()})
    return out


def _set_lr(optimizers: dict[str, Any], lr: float) -> None:
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["lr"] = lr


def _save_and_report(ckpt: TrainCheckpoint, rank: int, metrics: dict[str, Any]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save(tmp, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{ckpt.progress.step:08d}")


def train_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point on each worker. ``payload``: resolved config, MLflow run id and tracking URI."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = FaceScaleConfig.model_validate(payload["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    np.random.seed(cfg.train.seed + rank)

    loader = build_train_loader(cfg, rank, world_size, device)
    total_steps = cfg.train.max_steps or loader.steps_per_epoch * cfg.train.epochs
    backbone = build_model(cfg, device)
    classifier = build_classifier(cfg, loader.manifest.num_classes, device)
    optimizers = build_optimizers(cfg, backbone, classifier)
    progress = TrainProgress(world_size=world_size)
    arch = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size}
    ckpt = TrainCheckpoint(backbone, classifier, replicated_optimizers(optimizers), progress, arch=arch)
    # Ray's own checkpoint (a restart after a failure) wins over the configured starting point.
    resume = ray.train.get_checkpoint()
    if resume is None and cfg.train.resume_from:
        resume = ray.train.Checkpoint(cfg.train.resume_from)
    if resume is not None:
        with resume.as_directory() as d:
            ckpt.load(d, rank)
        log.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, progress.step, progress.epoch,
                 progress.step_in_epoch)
    elif cfg.train.init_from:
        _init_backbone(backbone, cfg)
    progress.world_size = world_size
    teacher = TeacherCache(cfg.distill.teacher_cache, cfg.data.root) if cfg.distill.teacher_cache else None
    if teacher is not None and teacher.embedding_size != cfg.model.embedding_size:
        raise ValueError(f"distill.teacher_cache: teacher embeddings are {teacher.embedding_size}-d, "
                         f"model.embedding_size is {cfg.model.embedding_size}")

    tracker = Tracker(payload["tracking_uri"], payload["run_id"], rank)
    logger = StepLogger(tracker, rank, cfg.train.batch_size * world_size, total_steps)
    verifier = Verifier(cfg, tracker, rank, device)
    backbone.train()
    classifier.train()
    metrics: dict[str, Any] = {}
    while progress.step < total_steps:
        for images, labels, keys in _batches(loader, progress):  # load batch (+ cached teacher embeddings)
            targets = teacher.lookup(keys).to(device) if teacher is not None else None
            lr = lr_at(progress.step, total_steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.lr_power)
            _set_lr(optimizers, lr)
            loss = train_step(backbone, classifier, optimizers, images.to(device), labels.to(device), cfg, targets)
            if not np.isfinite(loss["loss"]):
                raise FloatingPointError(f"non-finite loss {loss} at step {progress.step + 1} (rank {rank})")
            progress.step += 1
            progress.step_in_epoch += 1
            logger.step_done()
            if progress.step % cfg.train.log_every == 0 or progress.step == total_steps:  # report
                metrics = logger.flush(progress.step, _mean_over_ranks(loss), lr)
                metrics["step"] = progress.step
                if cfg.train.eval_every and progress.step % cfg.train.eval_every == 0:
                    metrics.update(verifier.run(unwrap(backbone), progress.step))
                    backbone.train()
                if cfg.train.checkpoint_every and progress.step % cfg.train.checkpoint_every == 0:
                    _save_and_report(ckpt, rank, metrics)
                else:
                    ray.train.report(metrics)
            if progress.step >= total_steps:
                break
        else:
            progress.epoch += 1
            progress.step_in_epoch = 0

    with tempfile.TemporaryDirectory() as plots:
        metrics.update(verifier.run(unwrap(backbone), progress.step, plot_dir=Path(plots)))
    metrics.update({f"data/{k}": v for k, v in getattr(loader, "stats", {}).items()})
    tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("data/")}, progress.step)
    if cfg.tracking.log_model:
        model_id = tracker.log_model(unwrap(backbone), metadata=arch)
        if model_id:
            metrics["model_id"] = model_id
    metrics["step"] = progress.step
    _save_and_report(ckpt, rank, metrics)
