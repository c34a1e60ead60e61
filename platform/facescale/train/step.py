"""One optimizer step over ``train.grad_accum_steps`` micro-batches, with the non-finite policy.

The step reads as named phases: forward (backbone) → classifier loss (+ distillation) → backward, once per
micro-batch; then the non-finite check, and the optimizer steps of the backbone engine and of the classifier.

Gradient accumulation (insightface's arcface_torch gets both of these wrong, its issue #1996): the engine divides
each micro-batch's loss by the number of micro-batches before backward, so the accumulated gradient is the mean
over the whole step, for the backbone and for the classifier alike; and the learning-rate schedule advances once
per optimizer step, not per micro-batch (the loop calls ``lr_at`` with the optimizer-step count).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from facescale.config import FaceScaleConfig
from facescale.distill.loss import angular_distillation_loss
from facescale.parallel.dist import all_reduce_values
from facescale.train.observe import StepTimer

STOP_TAG = "facescale.stop_reason"  # MLflow tag naming why a run stopped on non-finite values


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss, gradient or weight under ``train.nonfinite: stop``, or weights a checkpoint must not hold."""


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    losses: dict[str, float]  # this rank's mean over the micro-batches
    grad_norm: float  # global backbone gradient norm before clipping
    applied: bool  # False: the update was skipped (non-finite under "skip", or the fp16 loss scaler)
    nonfinite: str | None = None  # why the step was non-finite, naming what was


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


def _grads_finite(module: nn.Module) -> bool:
    for p in module.parameters():
        g = p.grad
        if g is None:
            continue
        values = g._values() if g.is_sparse else g
        if not bool(torch.isfinite(values).all()):
            return False
    return True


def _scale_grads(module: nn.Module, factor: float) -> None:
    for p in module.parameters():
        if p.grad is not None:
            if p.grad.is_sparse:
                p.grad._values().mul_(factor)
            else:
                p.grad.mul_(factor)


def train_step(engine: Any, classifier: nn.Module, classifier_opt: torch.optim.Optimizer,
               micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], cfg: FaceScaleConfig,
               timer: StepTimer, device: torch.device, poison: str | None = None) -> StepOutcome:
    """One optimizer step: for each micro-batch forward → classifier loss (+ distillation) → backward; then step.

    Args:
        engine: The backbone engine (``facescale.train.engine``): DDP or DeepSpeed.
        classifier: Linear head (DDP) or Partial FC (sharded, outside the engine).
        classifier_opt: The classifier's own optimizer.
        micro_batches: ``(images, labels, teacher embeddings or None)`` on the device, ``grad_accum_steps`` of them.
        cfg: The run's config (distillation weight, non-finite policy).
        timer: Step-time breakdown.
        device: The training device (unused here: ``facescale.parallel.dist`` puts the non-finite flags on the
            process group's device; kept so callers need not change).
        poison: Fault injection for tests of the non-finite policy: ``"loss"`` makes this rank's loss NaN.

    Returns:
        The step's losses, gradient norm and whether the update was applied.
    """
    totals: dict[str, float] = {}
    local_bad: list[str] = []  # non-finite losses of this rank
    n = len(micro_batches)
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
        value = float(loss.detach())
        if not math.isfinite(value):
            local_bad.append(f"loss {value} in micro-batch {i + 1}/{n}")
        totals["loss"] = totals.get("loss", 0.0) + value / n
        if teacher is not None:
            for name, part in parts.items():
                totals[name] = totals.get(name, 0.0) + float(part.detach()) / n

    with timer.phase("optimizer"):
        grad_norm = float(engine.grad_norm())
        classifier_ok = _grads_finite(classifier)
        loss_bad, grads_bad = any_rank(bool(local_bad), not classifier_ok)
        grads_bad = grads_bad or not math.isfinite(grad_norm)
        # fp16: gradients that overflow while every loss is finite are the loss scaler's business -- DeepSpeed's
        # step skips the update and lowers the scale; it is not a non-finite step of the policy.
        overflow = grads_bad and not loss_bad and getattr(engine, "precision", "fp32") == "fp16"
        if (loss_bad or grads_bad) and not overflow:
            reasons = list(local_bad) or (["non-finite loss on another rank"] if loss_bad else [])
            if not classifier_ok:
                reasons.append("classifier gradient")
            if not math.isfinite(grad_norm):
                reasons.append(f"backbone gradient norm {grad_norm}")
            engine.skip_step()
            classifier_opt.zero_grad(set_to_none=True)
            return StepOutcome(totals, grad_norm, applied=False,
                               nonfinite="; ".join(reasons) or "non-finite gradient on another rank")
        scale = engine.loss_scale  # fp16: the classifier's gradients carry DeepSpeed's loss scale too
        applied = engine.step()
        if applied:
            if scale != 1.0:
                _scale_grads(classifier, 1.0 / scale)
            classifier_opt.step()
        classifier_opt.zero_grad(set_to_none=True)
    return StepOutcome(totals, grad_norm, applied=applied)


def first_nonfinite(named: dict[str, nn.Module]) -> str | None:
    """The first parameter or buffer (``"<module>.<name>"``) with a NaN/inf value, or None."""
    for prefix, module in named.items():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{prefix}.{name}"
    return None
