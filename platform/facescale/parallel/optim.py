"""Sparse row optimizers for Partial FC centers: only sampled rows are read, updated or decayed.

arcface_torch's PartialFC_V2 keeps weight, gradient and momentum dense for every center: 6 KB per identity at
D=512 with SGD. Here the gradient is a sparse tensor holding only the sampled rows (see ``PartialFC``) and the
optimizer state is stored compactly for every row (the formats, and the bytes per identity of each optimizer
setting, are in :mod:`facescale.parallel.row_state`).

Trade-offs, stated plainly:

- **Skipped rows.** Dense SGD keeps moving a center that was not sampled (momentum coasting, weight decay).
  ``SparseRowSGD(catch_up=True)`` replays those steps in closed form when the row is next sampled, before it is
  scored, so at a constant lr it equals dense SGD; under an lr schedule the replayed steps use the current lr
  (exact again if the trainer calls ``catch_up_rows`` before a step change of the lr). ``catch_up=False`` and
  ``SparseRowAdamW`` are lazy: skipped rows simply wait, and weight decay reaches sampled rows only.
- **Low-precision state and bf16 centers**: rounded to nearest, or stochastically for bf16 centers
  (``PartialFC(center_dtype="bf16")``); how, and why, is in :mod:`facescale.parallel.row_state`.
- **Row-wise second moment** (AdamW ``second_moment="row"``): one mean-square per center instead of one per
  coordinate, as in row-wise AdaGrad for large embedding tables; per-row step counts give correct bias correction
  for rows sampled for the first time late in training.

The measured effect on accuracy (a synthetic task, against dense fp32) is in BENCHMARKS.md
(``benchmarks/partial_fc.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from facescale.parallel.row_optimizer import STEP_CHUNK_BYTES as STEP_CHUNK_BYTES  # re-exported for the planner
from facescale.parallel.row_optimizer import SparseRowOptimizer
from facescale.parallel.row_state import (
    SecondMoment,
    StateDtype,
    default_state_dtype,
    put_rows,
    read_state_rows,
    row_state_layout,
    take_rows,
    write_state_rows,
)

# Re-exported: the memory planner imports it from here.
from facescale.parallel.row_state import state_bytes_per_row as state_bytes_per_row


class SparseRowSGD(SparseRowOptimizer):
    """SGD with momentum and coupled weight decay, applied only to the rows present in a sparse gradient.

    With ``catch_up`` (default) a row skipped for k steps is brought up to date before it is next used: it gets
    in closed form the k steps dense SGD would have taken with a zero gradient (momentum coasting and weight
    decay: ``[w; m] <- A^k [w; m]`` with ``A = [[1 - lr wd, -lr mu], [wd, mu]]``), at the current lr.
    ``PartialFC`` does this for the rows it samples, before scoring them (``pfc.attach_optimizer(opt)``). At a
    constant lr the result equals ``torch.optim.SGD`` (dampening 0, no Nesterov) on dense gradients that are zero
    outside the sampled rows, up to the rounding of the stored momentum. With ``catch_up=False`` skipped rows
    wait (lazy momentum; weight decay only on sampled rows).

    Args:
        params: Parameters (the Partial FC centers) or parameter groups.
        lr: Learning rate (the trainer's scheduler sets ``param_groups[i]["lr"]``).
        momentum: Momentum factor (> 0).
        weight_decay: L2 penalty added to the gradient.
        state_dtype: Storage of the momentum: ``"int8"`` (block-quantised, default), ``"bf16"`` or ``"fp32"``.
        catch_up: Replay the dense steps a row missed before it is used again.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 state_dtype: StateDtype = "int8", catch_up: bool = True) -> None:
        if lr < 0 or not 0 < momentum < 1 or weight_decay < 0:
            raise ValueError(f"need lr >= 0, 0 < momentum < 1, weight_decay >= 0; got {lr}, {momentum}, "
                             f"{weight_decay}")
        if state_dtype not in ("fp32", "bf16", "int8"):
            raise ValueError(f"state_dtype must be fp32, bf16 or int8, got {state_dtype!r}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.state_dtype, self.catch_up = state_dtype, catch_up

    def state_layout(self, p: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return row_state_layout("sgd", p.shape[0], p[0].numel(), self.state_dtype)

    def _read_rows(self, state: dict[str, torch.Tensor], index: Any) -> list[torch.Tensor]:
        return [read_state_rows(state, "momentum", index)]

    def _write_rows(self, state: dict[str, torch.Tensor], index: Any, rows: list[torch.Tensor]) -> None:
        write_state_rows(state, "momentum", index, rows[0])

    def _coast_plan(self, skipped: torch.Tensor, last: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Per row ``[w_w, w_m, m_w, m_m, c_w, c_m]``, ``[R, 6]`` fp32: the entries of ``A^k`` (k = the row's skipped
        steps) and the coefficients that give the caught-up momentum from the caught-up weight, ``m' = c_w w' + c_m m``.

        A^k once per distinct k (a few dozen values at most), by repeated squaring in fp64 -- the same bits for a
        given k whatever other rows are in the batch, so a plan for a whole working set equals per-chunk plans.
        From ``w' = w_w w + w_m m`` and ``m' = m_w w + m_m m``: ``m' = (m_w / w_w) w' + (m_m - w_m m_w / w_w) m``
        (``c_m`` is det(A^k) / w_w = mu^k / w_w; no cancellation, as ``w_w`` stays near 1 for the k that occur; a
        ``w_w`` that underflows to 0 -- a row decayed to nothing -- gives m' = 0)."""
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        counts, which = torch.unique(skipped, return_inverse=True)
        power = torch.eye(2, dtype=torch.float64).repeat(counts.numel(), 1, 1)
        base = torch.tensor([[1.0 - lr * wd, -lr * mu], [wd, mu]], dtype=torch.float64)
        while bool((counts > 0).any()):
            power = torch.where((counts & 1).bool()[:, None, None], power @ base, power)
            base, counts = base @ base, counts >> 1
        w_w, w_m, m_w, m_m = power.view(-1, 4).unbind(1)
        safe = torch.where(w_w == 0, 1.0, w_w)
        c_w = torch.where(w_w == 0, 0.0, m_w / safe)
        c_m = torch.where(w_w == 0, 0.0, m_m - w_m * c_w)
        return torch.stack([w_w, w_m, m_w, m_m, c_w, c_m], dim=1).float()[which]

    def _coast_weight(self, weight: torch.Tensor, rows: list[torch.Tensor], plan: torch.Tensor,
                      group: dict[str, Any]) -> None:
        weight.mul_(plan[:, 0, None]).addcmul_(rows[0], plan[:, 1, None])

    def _coast_state(self, weight: torch.Tensor, rows: list[torch.Tensor], plan: torch.Tensor,
                     group: dict[str, Any]) -> None:
        # From the caught-up weight: Partial FC's forward catches up the weight alone, and the step does this just
        # before the update, so the momentum is not stored (for int8: quantised) in between.
        rows[0].mul_(plan[:, 5, None]).addcmul_(weight, plan[:, 4, None])

    def _update_rows(self, weight: torch.Tensor, grad: torch.Tensor, rows: list[torch.Tensor],
                     group: dict[str, Any], t: int) -> torch.Tensor:
        (buf,) = rows
        # torch's fused SGD kernel (CPU and CUDA): g = grad + wd * w, buf = momentum * buf + g, w -= lr * buf, in one
        # pass over the rows instead of three (measured here on 1024 x 512 fp32 rows: 87 vs 193 us); ``grad`` is
        # only read (p.grad stays as it was). buf is never "first": a row's momentum starts at zero, so the first
        # update gives buf = g, as torch.optim.SGD's first step does.
        torch._fused_sgd_([weight], [grad], [buf], weight_decay=group["weight_decay"], momentum=group["momentum"],
                          lr=group["lr"], dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
        return weight


class SparseRowAdamW(SparseRowOptimizer):
    """AdamW (decoupled weight decay) over the rows present in a sparse gradient.

    With ``catch_up`` (default) a skipped row first gets the k zero-gradient steps dense AdamW would have taken
    (moments decaying, the normalised first moment still moving the row, weight decay), as a closed-form sum over
    at most 200 steps (later terms are below (beta1/sqrt(beta2))^200, about 1e-9), at the current lr. Exact for
    ``second_moment="row"``; ``"full"`` neglects ``eps`` against sqrt(v) in the replayed steps. Bias correction
    uses the global step, as ``torch.optim.AdamW`` does. ``catch_up=False`` is lazy (TF LazyAdam).

    Args:
        params: Parameters (the Partial FC centers) or parameter groups.
        lr: Learning rate.
        betas: Moment decay rates.
        eps: Denominator term.
        weight_decay: Decoupled decay.
        state_dtype: Storage of the first moment: ``"int8"`` (default), ``"bf16"`` or ``"fp32"``.
        second_moment: ``"row"`` (one fp32 mean-square per row, default) or ``"full"`` (per coordinate; bf16,
            or fp32 when ``state_dtype="fp32"``).
        catch_up: Replay the dense steps a row missed before it is used again.
    """

    REPLAY_LIMIT = 200

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, state_dtype: StateDtype = "int8", second_moment: SecondMoment = "row",
                 catch_up: bool = True) -> None:
        if lr < 0 or not all(0 <= b < 1 for b in betas) or eps <= 0 or weight_decay < 0:
            raise ValueError(f"need lr >= 0, 0 <= betas < 1, eps > 0, weight_decay >= 0; got {lr}, {betas}, {eps}, "
                             f"{weight_decay}")
        if state_dtype not in ("fp32", "bf16", "int8") or second_moment not in ("full", "row"):
            raise ValueError(f"bad state_dtype {state_dtype!r} or second_moment {second_moment!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.state_dtype, self.second_moment, self.catch_up = state_dtype, second_moment, catch_up

    def state_layout(self, p: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return row_state_layout("adamw", p.shape[0], p[0].numel(), self.state_dtype, self.second_moment)

    def _read_rows(self, state: dict[str, torch.Tensor], index: Any) -> list[torch.Tensor]:
        return [read_state_rows(state, "exp_avg", index), take_rows(state["exp_avg_sq"], index).float()]

    def _write_rows(self, state: dict[str, torch.Tensor], index: Any, rows: list[torch.Tensor]) -> None:
        write_state_rows(state, "exp_avg", index, rows[0])
        put_rows(state["exp_avg_sq"], index, rows[1])

    def _coast_plan(self, skipped: torch.Tensor, last: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Per row ``[skipped, last]`` (int64): the replay depends on the row's own steps only."""
        return torch.stack([skipped, last], dim=1)

    def _coast_weight(self, weight: torch.Tensor, rows: list[torch.Tensor], plan: torch.Tensor,
                      group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        skipped, last = plan.unbind(1)
        exp_avg, exp_avg_sq = rows
        decay = 1.0 - lr * wd
        replayed = skipped.clamp(max=self.REPLAY_LIMIT)
        row_scale = exp_avg_sq.double().sqrt() if exp_avg_sq.dim() == 1 else None
        total = torch.zeros(skipped.numel(), dtype=torch.float64)  # sum_j decay^(k-j) * step size of missed step j
        for j in range(1, int(replayed.max()) + 1):
            t = (last + j).double()
            bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
            if row_scale is not None:
                size = lr * beta1 ** j / bias1 / (beta2 ** (j / 2) * row_scale / bias2.sqrt() + eps)
            else:
                size = lr * beta1 ** j * bias2.sqrt() / (bias1 * beta2 ** (j / 2))
            total = torch.where(j <= replayed, decay * total + size, total)
        total = (total * decay ** (skipped - replayed).double()).float().unsqueeze(1)
        direction = exp_avg if row_scale is not None else exp_avg / exp_avg_sq.sqrt().clamp_min(1e-30)
        weight.mul_((decay ** skipped.double()).float().unsqueeze(1)).sub_(direction * total)

    def _coast_state(self, weight: torch.Tensor, rows: list[torch.Tensor], plan: torch.Tensor,
                     group: dict[str, Any]) -> None:
        (beta1, beta2), skipped = group["betas"], plan[:, 0].double()
        exp_avg, exp_avg_sq = rows
        exp_avg.mul_((beta1 ** skipped).float().unsqueeze(1))
        exp_avg_sq.mul_((beta2 ** skipped).float().view((-1,) if exp_avg_sq.dim() == 1 else (-1, 1)))

    def _update_rows(self, weight: torch.Tensor, grad: torch.Tensor, rows: list[torch.Tensor],
                     group: dict[str, Any], t: int) -> torch.Tensor:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
        exp_avg, exp_avg_sq = rows
        weight.mul_(1 - lr * weight_decay)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        if exp_avg_sq.dim() == 1:
            exp_avg_sq.mul_(beta2).add_(grad.square().mean(1), alpha=1 - beta2)
            denom = (exp_avg_sq / bias2).sqrt_().add_(eps).unsqueeze(1)
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias2 ** 0.5).add_(eps)
        return weight.addcdiv_(exp_avg, denom, value=-lr / bias1)


def build_partial_fc_optimizer(params: Iterable[Any], name: str, lr: float, momentum: float = 0.9,
                               weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                               state_dtype: StateDtype | None = None, second_moment: SecondMoment = "row",
                               dense: bool = False, catch_up: bool = True) -> torch.optim.Optimizer:
    """Optimizer for the Partial FC centers (their own optimizer, separate from the DDP backbone's).

    Args:
        params: The centers (``pfc.parameters()``).
        name: ``"sgd"`` or ``"adamw"``.
        lr: Initial learning rate.
        momentum: SGD momentum.
        weight_decay: SGD: L2 on sampled rows; AdamW: decoupled decay on sampled rows.
        betas: AdamW betas.
        state_dtype: Storage of the momentum / first moment; ``None`` picks the default for ``name``.
        second_moment: AdamW second moment, ``"row"`` or ``"full"``.
        dense: The arcface_torch v2 baseline: ``torch.optim.SGD``/``AdamW`` with dense fp32 state (pair it with
            ``PartialFC(sparse_grad=False)``).
        catch_up: Replay the dense steps a row missed before it is used again (see the optimizers).

    Returns:
        The optimizer.
    """
    if name not in ("sgd", "adamw"):
        raise ValueError(f"Partial FC optimizer must be 'sgd' or 'adamw', got {name!r}")
    if dense:
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    dtype = state_dtype or default_state_dtype(name)
    if name == "sgd":
        return SparseRowSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, state_dtype=dtype,
                            catch_up=catch_up)
    return SparseRowAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, state_dtype=dtype,
                          second_moment=second_moment, catch_up=catch_up)
