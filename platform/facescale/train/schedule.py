"""Learning-rate schedule: linear warm-up, then polynomial decay to zero (InsightFace's PolyScheduler shape)."""

from __future__ import annotations


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, power: float = 2.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up ramps linearly from ``base_lr / warmup_steps`` to ``base_lr``; afterwards
    ``base_lr * (1 - progress) ** power`` with progress measured over the post-warm-up steps.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return base_lr * (1.0 - progress) ** power
