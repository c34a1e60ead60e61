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

from facescale.parallel.partial_fc import mix_seed
from facescale.parallel.row_state import (
    SecondMoment,
    StateDtype,
    default_state_dtype,
    read_state_rows,
    row_state_layout,
    stochastic_round_bf16,
    take_rows,
    write_state_rows,
)

# Re-exported: the memory planner imports it from here.
from facescale.parallel.row_state import state_bytes_per_row as state_bytes_per_row

# Rows updated at once; bounds the fp32 temporaries of a step (~3 x 8 MB at D=512).
STEP_CHUNK_BYTES = 8 << 20

# Salts of the rounding keys: the write of an optimizer step and the write of a catch-up between steps.
_ROUND_STEP, _ROUND_CATCH_UP = 0x5752, 0xC47C


def _sampled_rows(grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(rows, values) of a gradient; rows ``None`` for a dense gradient (every row)."""
    if not grad.is_sparse:
        return None, grad
    rows, values = grad._indices()[0], grad._values()
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        # Accumulated micro-batches leave duplicates; coalescing sums them (and copies, only in that case).
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
    return rows, values


class _SparseRowOptimizer(torch.optim.Optimizer):
    """Shared machinery: chunked rows, compact state, catch-up of skipped rows, dtype-preserving state loading.

    Subclasses keep ``step`` (optimizer steps taken) and ``last_step`` (per row: the step its weight and state
    are current at) and implement ``_read_rows``/``_write_rows``/``_coast``.
    """

    catch_up = True

    @staticmethod
    def _chunks(p: torch.Tensor, rows: torch.Tensor | None) -> Iterable[tuple[torch.Tensor | slice, slice]]:
        """(index into p's rows, slice into the gradient's rows) per chunk of rows."""
        count = p.shape[0] if rows is None else rows.numel()
        chunk = max(1, STEP_CHUNK_BYTES // (p[0].numel() * 4))
        for start in range(0, count, chunk):
            part = slice(start, min(start + chunk, count))
            yield (part if rows is None else rows[part]), part

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _read_rows(self, state: dict[str, torch.Tensor], index: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    def _write_rows(self, state: dict[str, torch.Tensor], index: Any, rows: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _coast(self, weight: torch.Tensor, rows: list[torch.Tensor], skipped: torch.Tensor, last: torch.Tensor,
               group: dict[str, Any]) -> None:
        """Applies in place the ``skipped`` zero-gradient dense steps after step ``last`` (per row)."""
        raise NotImplementedError

    def _update_rows(self, weight: torch.Tensor, grad: torch.Tensor, rows: list[torch.Tensor],
                     group: dict[str, Any], t: int) -> torch.Tensor:
        """The update rule on fp32 rows: changes ``rows`` (state) in place, returns the new weight rows."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Updates the rows present in each parameter's gradient with the subclass's ``_update_rows``."""
        loss = torch.enable_grad()(closure)() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, values = _sampled_rows(p.grad)
                values = values.view(values.shape[0], -1)
                flat = p.view(p.shape[0], -1)
                state = self._state_for(p)
                t = int(state["step"]) + 1
                for index, part in self._chunks(p, rows):
                    grad = values[part].float()  # may be a view of p.grad: never written
                    weight = take_rows(flat, index).float()
                    state_rows = list(self._read_rows(state, index))
                    if self.catch_up:  # a no-op for rows PartialFC already brought up to date
                        self._bring_up_to_date(state, index, weight, state_rows, group)
                    state["last_step"][index] = t
                    weight = self._update_rows(weight, grad, state_rows, group, t)
                    self._write_rows(state, index, state_rows)
                    self._store_rows(p, flat, index, weight, t, _ROUND_STEP)
                state["step"] += 1
        return loss

    def _bring_up_to_date(self, state: dict[str, torch.Tensor], index: Any, weight: torch.Tensor,
                          rows: list[torch.Tensor], group: dict[str, Any]) -> bool:
        """Replays missed steps on the fp32 rows; False when every row was already current."""
        step = int(state["step"])
        last = take_rows(state["last_step"], index).long()
        skipped = step - last
        if not bool((skipped > 0).any()):
            return False
        state["last_step"][index] = step
        self._coast(weight, rows, skipped, last, group)
        return True

    @torch.no_grad()
    def catch_up_rows(self, p: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Brings ``rows`` of ``p`` (all when ``None``) up to date with the dense steps they missed.

        ``PartialFC`` calls this for the rows it is about to score, so their logits see what dense training would
        have; call it with ``rows=None`` before reading every center (evaluate, export) or before a step change
        of the lr (the missed steps are replayed at the current lr).
        """
        state = self.state.get(p)
        group = self._group_of(p)
        if not state or "step" not in state or not self.catch_up or not group.get("momentum", True):
            return
        flat = p.view(p.shape[0], -1)
        for index, _ in self._chunks(p, rows):
            weight, state_rows = take_rows(flat, index).float(), self._read_rows(state, index)
            if self._bring_up_to_date(state, index, weight, state_rows, group):
                # Writes only when something changed: a current row keeps its version (autograd checks it).
                self._write_rows(state, index, state_rows)
                self._store_rows(p, flat, index, weight, int(state["step"]), _ROUND_CATCH_UP)

    def set_rounding_key(self, p: torch.Tensor, seed: int, row_offset: int) -> None:
        """Keys the stochastic rounding of a bf16 parameter: ``seed`` and the global id of its row 0 (Partial FC
        passes its seed and ``class_start * K``, so the rounding does not depend on the world size). Unset: 0, 0."""
        if not hasattr(self, "_rounding_keys"):
            self._rounding_keys: dict[torch.Tensor, tuple[int, int]] = {}
        self._rounding_keys[p] = (int(seed), int(row_offset))

    def _store_rows(self, p: torch.Tensor, flat: torch.Tensor, index: Any, weight: torch.Tensor, step: int,
                    salt: int) -> None:
        """Writes fp32 rows back: exact for fp32, stochastically rounded (keyed by seed, step, row) for bf16."""
        if p.dtype != torch.bfloat16:
            flat[index] = weight.to(p.dtype)
            return
        seed, offset = getattr(self, "_rounding_keys", {}).get(p, (0, 0))
        if isinstance(index, slice):
            local = torch.arange(index.start, index.stop, dtype=torch.int64, device=weight.device)
        else:
            local = index.to(torch.int64)
        flat[index] = stochastic_round_bf16(weight, mix_seed(seed, step, salt), local + offset)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads hyperparameters and state, keeping the state's storage dtype (torch would cast it to fp32)."""
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            if saved_id in saved_state:
                state = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in saved_state[saved_id].items()}
                self.check_state(p, state)
                self.state[p] = state

    def state_layout(self, p: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Expected ``{key: (shape, dtype)}`` of ``p``'s state under this optimizer's settings."""
        raise NotImplementedError

    def check_state(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """Refuses state whose keys, shapes or dtypes differ from this optimizer's settings."""
        expected = self.state_layout(p)
        found = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        if found != expected:
            raise ValueError(f"{type(self).__name__} state does not match its settings: expected {expected}, "
                             f"found {found} (a checkpoint saved with another optimizer or state_dtype?)")

    def _state_for(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            for key, (shape, dtype) in self.state_layout(p).items():
                state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
        return state


class SparseRowSGD(_SparseRowOptimizer):
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

    def _coast(self, weight: torch.Tensor, rows: list[torch.Tensor], skipped: torch.Tensor, last: torch.Tensor,
               group: dict[str, Any]) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        buf = rows[0]
        power = torch.eye(2, dtype=torch.float64).repeat(skipped.numel(), 1, 1)
        base = torch.tensor([[1.0 - lr * wd, -lr * mu], [wd, mu]], dtype=torch.float64)
        while bool((skipped > 0).any()):  # A^k by repeated squaring, k per row
            power = torch.where((skipped & 1).bool()[:, None, None], power @ base, power)
            base, skipped = base @ base, skipped >> 1
        power = power.float()
        old_weight = weight.clone()
        weight.mul_(power[:, 0, 0, None]).add_(buf * power[:, 0, 1, None])
        buf.mul_(power[:, 1, 1, None]).add_(old_weight * power[:, 1, 0, None])

    def _update_rows(self, weight: torch.Tensor, grad: torch.Tensor, rows: list[torch.Tensor],
                     group: dict[str, Any], t: int) -> torch.Tensor:
        (buf,) = rows
        if group["weight_decay"]:
            grad = grad.add(weight, alpha=group["weight_decay"])  # out of place: p.grad stays as it was
        buf.mul_(group["momentum"]).add_(grad)
        return weight.add_(buf, alpha=-group["lr"])


class SparseRowAdamW(_SparseRowOptimizer):
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
        state["exp_avg_sq"][index] = rows[1].to(state["exp_avg_sq"].dtype)

    def _coast(self, weight: torch.Tensor, rows: list[torch.Tensor], skipped: torch.Tensor, last: torch.Tensor,
               group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
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
        exp_avg.mul_((beta1 ** skipped.double()).float().unsqueeze(1))
        shape = (-1,) if exp_avg_sq.dim() == 1 else (-1, 1)
        exp_avg_sq.mul_((beta2 ** skipped.double()).float().view(shape))

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
