"""One optimizer step over ``train.grad_accum_steps`` micro-batches, with the non-finite policy.

The step reads as named phases: forward (backbone) → classifier loss (+ distillation) → backward, once per
micro-batch; then the non-finite check, and the optimizer steps of the backbone engine and of the classifier.

Gradient accumulation (insightface's arcface_torch gets both of these wrong, its issue #1996): the engine divides
each micro-batch's loss by the number of micro-batches before backward, so the accumulated gradient is the mean
over the whole step, for the backbone and for the classifier alike; and the learning-rate schedule advances once
per optimizer step, not per micro-batch (the loop calls ``lr_at`` with the optimizer-step count).

Host syncs (DESIGN.md: none in the hot path beyond one per logging window): the step keeps its losses and the
gradient norm on the device and reads ONE value on the host, the fused non-finite flags of the whole step
(:func:`nonfinite_flags`), which every rank needs anyway to take the same decision. The losses and the norm are
read by the loop once per logging window. Only a non-finite step reads more, to say what was not finite.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from facescale.config import FaceScaleConfig
from facescale.data.transforms import normalize_images
from facescale.heads.distillation import angular_distillation_loss
from facescale.parallel.dist import all_reduce_, all_reduce_values
from facescale.train.observe import StepTimer

if TYPE_CHECKING:
    from facescale.checkpoint.format import TrainProgress

log = logging.getLogger("facescale.train")

STOP_TAG = "facescale.stop_reason"  # MLflow tag naming why a run stopped on non-finite values

DeviceMicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (images, labels, teacher embeddings)


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss, gradient or weight under ``train.nonfinite: stop``, or weights a checkpoint must not hold."""


@dataclass
class StepOutcome:
    """What one optimizer step did. Tensors stay on the device: read them on the host once per logging window."""

    losses: dict[str, torch.Tensor]  # 0-d: this rank's mean over the micro-batches ("loss", + parts when distilling)
    grad_norm: torch.Tensor  # 0-d: global backbone gradient norm before clipping
    applied: bool  # False: the update was skipped (non-finite under "skip", or the fp16 loss scaler)
    nonfinite: str | None = None  # why the step was non-finite, naming what was


def to_device(images: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype) -> DeviceMicroBatch:
    """One host micro-batch as the step takes it: uint8 images normalised on ``device`` in the model's ``dtype``.

    Every copy is ``non_blocking``: from the loaders' pinned batches it overlaps with the device's work, and none
    waits for the device.

    Args:
        images: uint8 ``[B, 3, H, W]`` (pinned when CUDA is available).
        labels: int64 ``[B]``.
        teacher: Cached teacher embeddings ``[B, D]``, or None.
        device: The training device.
        dtype: The model's input dtype (``engine.input_dtype``).
    """
    return (normalize_images(images, device, dtype), labels.to(device, non_blocking=True),
            teacher.to(device, non_blocking=True) if teacher is not None else None)


def any_rank(*flags: bool, device: torch.device | None = None) -> list[bool]:
    """Each flag, True when it is set on any rank (every rank must call this, in the same order).

    Args:
        *flags: This rank's flags.
        device: Unused, kept for existing callers: ``facescale.parallel.dist`` picks the device the process
            group takes (the CPU under gloo or ``cpu:gloo,cuda:nccl``, the current GPU under NCCL alone).

    Returns:
        One bool per flag, the same on every rank.
    """
    del device
    # NOTE: all-reduce MAX of each rank's non-finite flags: every rank must take the same decision (skip or step),
    # or the next collective would pair mismatched operations and hang.
    reduced = all_reduce_values([1.0 if f else 0.0 for f in flags], dist.ReduceOp.MAX, None)
    return [v > 0 for v in reduced]


def _grads(module: nn.Module) -> list[torch.Tensor]:
    """The module's gradient values (a sparse gradient's stored values)."""
    return [p.grad._values() if p.grad.is_sparse else p.grad for p in module.parameters() if p.grad is not None]


def nonfinite_flags(micro_losses: torch.Tensor, classifier: nn.Module, grad_norm: torch.Tensor) -> tuple[bool, bool]:
    """``(loss non-finite, gradient non-finite)`` on any rank: the step's one host read.

    Both flags are computed on the device (each loss, each classifier gradient, the backbone's gradient norm, which
    is non-finite when any backbone gradient is), reduced over the ranks on the device, and read in one go.

    Args:
        micro_losses: ``[n]`` this rank's loss of each micro-batch (detached).
        classifier: The classifier whose gradients (this rank's shard for Partial FC) are checked.
        grad_norm: The backbone's global gradient norm (0-d, the same on every rank).

    Returns:
        The two flags, the same on every rank.
    """
    device = micro_losses.device
    grads_ok = [torch.isfinite(grad_norm.to(device)), *(torch.isfinite(g).all() for g in _grads(classifier))]
    flags = torch.stack([~torch.isfinite(micro_losses).all(), ~torch.stack(grads_ok).all()]).float()
    # NOTE: all-reduce MAX of each rank's two non-finite flags, on the device: every rank must take the same
    # decision (skip or step), or the next collective would pair mismatched operations and hang.
    loss_bad, grads_bad = all_reduce_(flags, dist.ReduceOp.MAX, None).tolist()  # the one host read of the step
    return loss_bad > 0, grads_bad > 0


def _nonfinite_reasons(micro_losses: torch.Tensor, classifier: nn.Module, grad_norm: torch.Tensor,
                       loss_bad: bool) -> str:
    """What was not finite on this rank, for the log and the stop message (host reads: a non-finite step only)."""
    n = micro_losses.numel()
    reasons = [f"loss {v} in micro-batch {i + 1}/{n}" for i, v in enumerate(micro_losses.tolist())
               if not math.isfinite(v)]
    if loss_bad and not reasons:
        reasons.append("non-finite loss on another rank")
    if not all(bool(torch.isfinite(g).all()) for g in _grads(classifier)):
        reasons.append("classifier gradient")
    norm = float(grad_norm)
    if not math.isfinite(norm):
        reasons.append(f"backbone gradient norm {norm}")
    return "; ".join(reasons) or "non-finite gradient on another rank"


def _scale_grads(module: nn.Module, factor: float) -> None:
    for g in _grads(module):
        g.mul_(factor)


def train_step(engine: Any, classifier: nn.Module, classifier_opt: torch.optim.Optimizer,
               micro_batches: list[DeviceMicroBatch], cfg: FaceScaleConfig, timer: StepTimer,
               device: torch.device, poison: str | None = None) -> StepOutcome:
    """One optimizer step: for each micro-batch forward → classifier loss (+ distillation) → backward; then step.

    Args:
        engine: The backbone engine (``facescale.train.engine``): DDP or DeepSpeed.
        classifier: Linear head (DDP) or Partial FC (sharded, outside the engine).
        classifier_opt: The classifier's own optimizer.
        micro_batches: ``(images, labels, teacher embeddings or None)`` on the device (:func:`to_device`), images
            in ``engine.input_dtype``; ``grad_accum_steps`` of them.
        cfg: The run's config (distillation weight, non-finite policy).
        timer: Step-time breakdown.
        device: The training device (unused here: ``facescale.parallel.dist`` puts the non-finite flags on the
            process group's device; kept so callers need not change).
        poison: Fault injection for tests of the non-finite policy: ``"loss"`` makes this rank's loss NaN.

    Returns:
        The step's losses and gradient norm (device tensors) and whether the update was applied.
    """
    n = len(micro_batches)
    micro_losses: list[torch.Tensor] = []
    parts_sum: dict[str, torch.Tensor] = {}  # distillation: the loss's parts, summed over micro-batches
    for i, (images, labels, teacher) in enumerate(micro_batches):
        last = i == n - 1
        no_sync = classifier.no_sync() if (not last and hasattr(classifier, "no_sync")) else contextlib.nullcontext()
        with engine.micro_batch(last), no_sync:
            with timer.phase("backbone_fwd"):
                embeddings = engine.forward(images)
            with timer.phase("classifier"):
                cls_loss = classifier(embeddings, labels)
                parts = {"cls_loss": cls_loss}
                loss = cls_loss
                if teacher is not None:  # L = L_margin + alpha * L_distill (VarGFaceNet, section 3.3)
                    parts["distill_loss"] = angular_distillation_loss(embeddings, teacher, cfg.distill.form)
                    loss = cls_loss + cfg.distill.alpha * parts["distill_loss"]
                if poison == "loss":
                    loss = loss * float("nan")
            with timer.phase("backward"):
                # Every rank runs backward even on a non-finite loss: the gradient all-reduce inside it is a
                # collective, and the decision to skip is taken together afterwards.
                engine.backward(loss)
        micro_losses.append(loss.detach())
        if teacher is not None:
            for name, part in parts.items():
                parts_sum[name] = parts_sum[name] + part.detach() if name in parts_sum else part.detach()

    with timer.phase("optimizer"):
        grad_norm = engine.grad_norm_tensor()
        stacked = torch.stack(micro_losses)
        losses = {"loss": stacked.mean(), **{name: total / n for name, total in parts_sum.items()}}
        loss_bad, grads_bad = nonfinite_flags(stacked, classifier, grad_norm)
        # fp16: gradients that overflow while every loss is finite are the loss scaler's business -- DeepSpeed's
        # step skips the update and lowers the scale; it is not a non-finite step of the policy.
        overflow = grads_bad and not loss_bad and getattr(engine, "precision", "fp32") == "fp16"
        if (loss_bad or grads_bad) and not overflow:
            reasons = _nonfinite_reasons(stacked, classifier, grad_norm, loss_bad)
            engine.skip_step()
            classifier_opt.zero_grad(set_to_none=True)
            return StepOutcome(losses, grad_norm, applied=False, nonfinite=reasons)
        scale = engine.loss_scale  # fp16: the classifier's gradients carry DeepSpeed's loss scale too
        applied = engine.step(finite=not grads_bad)
        if applied:
            if scale != 1.0:
                _scale_grads(classifier, 1.0 / scale)
            classifier_opt.step()
        classifier_opt.zero_grad(set_to_none=True)
    return StepOutcome(losses, grad_norm, applied=applied)


def apply_nonfinite_policy(outcome: StepOutcome, step: int, consecutive_bad: int, progress: TrainProgress,
                           cfg: FaceScaleConfig, rank: int, last_committed: Callable[[], str | None]) -> int:
    """Counts a non-finite step and stops the run when ``train.nonfinite`` says so; returns the consecutive count.

    Every rank holds the same verdict (the step's flags are all-reduced), so every rank raises or skips alike.

    Args:
        last_committed: The newest committed checkpoint (named in the stop message), read only when stopping.

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
        raise NonFiniteError(f"{msg}; stopping ({why}); the last committed checkpoint is {last_committed() or 'none'}")
    log.warning("%s; update skipped (train.nonfinite=skip, %d so far)", msg, progress.nonfinite_skipped)
    return consecutive_bad


def first_nonfinite(named: dict[str, nn.Module]) -> str | None:
    """The first parameter or buffer (``"<module>.<name>"``) with a NaN/inf value, or None."""
    for prefix, module in named.items():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{prefix}.{name}"
    return None
