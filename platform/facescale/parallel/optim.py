"""Sparse row optimizers for Partial FC centers: only sampled rows are read, updated or decayed.

arcface_torch's PartialFC_V2 keeps weight, gradient and momentum dense for every center: 6 KB per identity at
D=512 with SGD. Here the gradient is a sparse tensor holding only the sampled rows (see ``PartialFC``) and the
optimizer state is stored compactly for every row. Persistent bytes per identity at D=512 (centers included):

    =============================  ===============================================================  ========
    optimizer                      state per row                                                    B/id
    =============================  ===============================================================  ========
    SGD ``int8`` (default)         momentum int8 + one fp32 absmax scale per 64 values, int32 step  2048+548
    SGD ``bf16``                   momentum bf16, int32 step (``catch_up=False``: 2048+1024)        2048+1028
    SGD ``fp32``                   momentum fp32, int32 step                                        2048+2052
    AdamW ``int8`` + ``row``       exp_avg int8 (block 64), fp32 exp_avg_sq per row, int32 steps    2048+552
    AdamW ``fp32`` + ``full``      exact lazy AdamW                                                 2048+4100
    dense v2 baseline (SGD)        ``torch.optim.SGD`` on a dense gradient: weight, grad, momentum  3 x 2048
    =============================  ===============================================================  ========

Trade-offs, stated plainly:

- **Skipped rows.** Dense SGD keeps moving a center that was not sampled (momentum coasting, weight decay).
  ``SparseRowSGD(catch_up=True)`` replays those steps in closed form when the row is next sampled, before it is
  scored, so at a constant lr it equals dense SGD; under an lr schedule the replayed steps use the current lr
  (exact again if the trainer calls ``catch_up_rows`` before a step change of the lr). ``catch_up=False`` and
  ``SparseRowAdamW`` are lazy: skipped rows simply wait, and weight decay reaches sampled rows only.
- **Low-precision state.** The update of the current step uses the full-precision state; only what is stored is
  rounded (to nearest). bf16 keeps 8 mantissa bits; int8 keeps 1/127 of each 64-value block's largest magnitude.
- **Row-wise second moment** (AdamW ``second_moment="row"``): one mean-square per center instead of one per
  coordinate, as in row-wise AdaGrad for large embedding tables; per-row step counts give correct bias correction
  for rows sampled for the first time late in training.

The measured effect on accuracy (a synthetic task, against dense fp32) is in BENCHMARKS.md
(``benchmarks/partial_fc.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

StateDtype = Literal["fp32", "bf16", "int8"]
SecondMoment = Literal["full", "row"]
QUANT_BLOCK = 64
# Rows updated at once; bounds the fp32 temporaries of a step (~3 x 8 MB at D=512).
STEP_CHUNK_BYTES = 8 << 20
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _block_size(width: int) -> int:
    return QUANT_BLOCK if width % QUANT_BLOCK == 0 else width


def state_bytes_per_row(optimizer: str, embedding_size: int, state_dtype: StateDtype | None = None,
                        second_moment: SecondMoment = "row", dense: bool = False, catch_up: bool = True) -> int:
    """Bytes of optimizer state per class center (the planner's and the benchmark's shared truth)."""
    d = embedding_size
    if dense:
        return 4 * d * (1 if optimizer == "sgd" else 2)
    dtype = state_dtype or default_state_dtype(optimizer)
    first = {"fp32": 4 * d, "bf16": 2 * d, "int8": d + 4 * (d // _block_size(d))}[dtype]
    if optimizer == "sgd":
        return first + (4 if catch_up else 0)
    second = 4 if second_moment == "row" else d * (4 if dtype == "fp32" else 2)
    return first + second + 4


def default_state_dtype(optimizer: str) -> StateDtype:
    """int8 block-quantised momentum / first moment: the most compact, and as accurate as fp32 here (BENCHMARKS)."""
    return "int8"


def _alloc(shape: tuple[int, int], dtype: StateDtype, like: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """Zero state ``name`` for ``shape`` rows in the storage ``dtype``."""
    rows, width = shape
    if dtype == "int8":
        blocks = width // _block_size(width)
        return {f"{name}_q": torch.zeros(shape, dtype=torch.int8, device=like.device),
                f"{name}_scale": torch.zeros((rows, blocks), dtype=torch.float32, device=like.device)}
    return {name: torch.zeros(shape, dtype=_FLOAT_DTYPES[dtype], device=like.device)}


def _read(state: dict[str, torch.Tensor], name: str, rows: torch.Tensor | slice) -> torch.Tensor:
    """fp32 copy of ``state[name]`` at ``rows``."""
    if f"{name}_q" in state:
        q, scale = state[f"{name}_q"][rows], state[f"{name}_scale"][rows]
        blocks = scale.shape[1]
        return (q.float().view(q.shape[0], blocks, -1) * scale.unsqueeze(2)).view(q.shape[0], -1)
    return state[name][rows].float()


def _write(state: dict[str, torch.Tensor], name: str, rows: torch.Tensor | slice, values: torch.Tensor) -> None:
    """Stores fp32 ``values`` into ``state[name]`` at ``rows`` (rounding to the storage dtype)."""
    if f"{name}_q" in state:
        blocks = state[f"{name}_scale"].shape[1]
        grouped = values.view(values.shape[0], blocks, -1)
        scale = grouped.abs().amax(dim=2) / 127.0
        q = (grouped / scale.clamp_min(1e-30).unsqueeze(2)).round_().clamp_(-127, 127).to(torch.int8)
        state[f"{name}_q"][rows] = q.view(values.shape[0], -1)
        state[f"{name}_scale"][rows] = scale
    else:
        state[name][rows] = values.to(state[name].dtype)


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
    """Shared machinery: chunked row iteration, compact state, dtype-preserving ``load_state_dict``."""

    @staticmethod
    def _chunks(p: torch.Tensor, rows: torch.Tensor | None) -> Iterable[tuple[torch.Tensor | slice, slice]]:
        """(index into p's rows, slice into the gradient's rows) per chunk of rows."""
        count = p.shape[0] if rows is None else rows.numel()
        chunk = max(1, STEP_CHUNK_BYTES // (p[0].numel() * 4))
        for start in range(0, count, chunk):
            part = slice(start, min(start + chunk, count))
            yield (part if rows is None else rows[part]), part

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
    decay), at the current lr. ``PartialFC`` does this for the rows it samples, before scoring them (attach the
    optimizer with ``pfc.attach_optimizer``); ``catch_up_rows(p)`` does it for every row, e.g. before exporting
    centers. At a constant lr the result equals ``torch.optim.SGD`` (dampening 0, no Nesterov) on dense
    gradients that are zero outside the sampled rows, up to the rounding of the stored momentum; under a
    schedule the missed steps use the lr of the step that catches them up. Costs an int32 per row.
    With ``catch_up=False`` skipped rows simply wait (lazy momentum), as TF's LazyAdam does.

    Args:
        params: Parameters (the Partial FC centers) or parameter groups.
        lr: Learning rate (the trainer's scheduler sets ``param_groups[i]["lr"]``).
        momentum: Momentum factor.
        weight_decay: L2 penalty added to the gradient of sampled rows only.
        state_dtype: Storage of the momentum: ``"int8"`` (block-quantised, default), ``"bf16"`` or ``"fp32"``.
        catch_up: Replay skipped momentum steps when a row is sampled again.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 state_dtype: StateDtype = "int8", catch_up: bool = True) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"need lr >= 0, 0 <= momentum < 1, weight_decay >= 0; got {lr}, {momentum}, "
                             f"{weight_decay}")
        if state_dtype not in ("fp32", "bf16", "int8"):
            raise ValueError(f"state_dtype must be fp32, bf16 or int8, got {state_dtype!r}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.state_dtype, self.catch_up = state_dtype, catch_up

    def state_layout(self, p: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if not any(g["momentum"] for g in self.param_groups if any(q is p for q in g["params"])):
            return {}
        zeros = _alloc((1, p[0].numel()), self.state_dtype, p, "momentum")
        layout = {k: ((p.shape[0], *v.shape[1:]), v.dtype) for k, v in zeros.items()}
        if self.catch_up:
            layout["last_step"] = ((p.shape[0],), torch.int32)
            layout["step"] = ((), torch.int64)
        return layout

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    @staticmethod
    def _coast(state: dict[str, torch.Tensor], index: torch.Tensor | slice, weight: torch.Tensor, buf: torch.Tensor,
               step: int, group: dict[str, Any]) -> None:
        """Applies to fp32 rows ``weight``/``buf`` the dense SGD steps with zero gradient missed since ``last_step``.

        One such step is linear in (w, m): ``m' = mu m + wd w``, ``w' = w - lr m'``, i.e. ``[w; m] <- A [w; m]``
        with ``A = [[1 - lr wd, -lr mu], [wd, mu]]``; k missed steps apply ``A^k`` (by repeated squaring).
        """
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        skipped = step - state["last_step"][index].long()
        state["last_step"][index] = step
        if not bool((skipped > 0).any()):
            return
        power = torch.eye(2, dtype=torch.float64).repeat(skipped.numel(), 1, 1)
        base = torch.tensor([[1.0 - lr * wd, -lr * mu], [wd, mu]], dtype=torch.float64)
        while bool((skipped > 0).any()):
            power = torch.where((skipped & 1).bool()[:, None, None], power @ base, power)
            base, skipped = base @ base, skipped >> 1
        power = power.float()
        old_weight = weight.clone()
        weight.mul_(power[:, 0, 0, None]).add_(buf * power[:, 0, 1, None])
        buf.mul_(power[:, 1, 1, None]).add_(old_weight * power[:, 1, 0, None])

    @torch.no_grad()
    def catch_up_rows(self, p: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Brings ``rows`` of ``p`` (all when ``None``) up to date with the momentum steps they missed.

        ``PartialFC`` calls this for the rows it is about to score (so logits see what dense SGD would have);
        call it with ``rows=None`` before reading every center, e.g. to evaluate or export them.
        """
        state = self.state.get(p)
        group = self._group_of(p)
        if not state or "step" not in state or not group["momentum"]:
            return
        step, flat = int(state["step"]), p.view(p.shape[0], -1)
        for index, _ in self._chunks(p, rows):
            weight = flat[index].float()
            buf = _read(state, "momentum", index)
            self._coast(state, index, weight, buf, step, group)
            _write(state, "momentum", index, buf)
            flat[index] = weight.to(p.dtype)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Updates the rows present in each parameter's gradient."""
        loss = torch.enable_grad()(closure)() if closure is not None else None
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, values = _sampled_rows(p.grad)
                flat = p.view(p.shape[0], -1)
                state = self._state_for(p)
                catch_up = momentum and "step" in state
                values = values.view(values.shape[0], -1)
                for index, part in self._chunks(p, rows):
                    grad = values[part].float()  # may be a view of p.grad: never written
                    weight = flat[index].float()
                    if weight_decay:
                        grad = grad.add(weight, alpha=weight_decay)  # out of place: p.grad stays as it was
                    if momentum:
                        buf = _read(state, "momentum", index)
                        if catch_up:  # a no-op for rows PartialFC already caught up before scoring them
                            self._coast(state, index, weight, buf, int(state["step"]), group)
                            state["last_step"][index] = int(state["step"]) + 1
                        grad = buf.mul_(momentum).add_(grad)
                        _write(state, "momentum", index, grad)
                    flat[index] = weight.add_(grad, alpha=-lr).to(p.dtype)
                if catch_up:
                    state["step"] += 1
        return loss


class SparseRowAdamW(_SparseRowOptimizer):
    """Lazy AdamW (decoupled weight decay) over the rows present in a sparse gradient.

    Args:
        params: Parameters (the Partial FC centers) or parameter groups.
        lr: Learning rate.
        betas: Moment decay rates.
        eps: Denominator term.
        weight_decay: Decoupled decay, applied to sampled rows only.
        state_dtype: Storage of the first moment: ``"int8"`` (default), ``"bf16"`` or ``"fp32"``.
        second_moment: ``"row"`` (one fp32 mean-square per row, default) or ``"full"`` (per coordinate; bf16,
            or fp32 when ``state_dtype="fp32"``).
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, state_dtype: StateDtype = "int8",
                 second_moment: SecondMoment = "row") -> None:
        if lr < 0 or not all(0 <= b < 1 for b in betas) or eps <= 0 or weight_decay < 0:
            raise ValueError(f"need lr >= 0, 0 <= betas < 1, eps > 0, weight_decay >= 0; got {lr}, {betas}, {eps}, "
                             f"{weight_decay}")
        if state_dtype not in ("fp32", "bf16", "int8") or second_moment not in ("full", "row"):
            raise ValueError(f"bad state_dtype {state_dtype!r} or second_moment {second_moment!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.state_dtype, self.second_moment = state_dtype, second_moment

    def state_layout(self, p: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, width = p.shape[0], p[0].numel()
        layout = {k: ((rows, *v.shape[1:]), v.dtype)
                  for k, v in _alloc((1, width), self.state_dtype, p, "exp_avg").items()}
        if self.second_moment == "row":
            layout["exp_avg_sq"] = ((rows,), torch.float32)
        else:
            layout["exp_avg_sq"] = ((rows, width), torch.float32 if self.state_dtype == "fp32" else torch.bfloat16)
        layout["row_step"] = ((rows,), torch.int32)
        return layout

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Updates the rows present in each parameter's gradient."""
        loss = torch.enable_grad()(closure)() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, values = _sampled_rows(p.grad)
                flat = p.view(p.shape[0], -1)
                state = self._state_for(p)
                values = values.view(values.shape[0], -1)
                for index, part in self._chunks(p, rows):
                    grad = values[part].float()  # may be a view of p.grad: never written
                    steps = state["row_step"][index] + 1
                    state["row_step"][index] = steps
                    steps = steps.double().unsqueeze(1)
                    exp_avg = _read(state, "exp_avg", index).mul_(beta1).add_(grad, alpha=1 - beta1)
                    _write(state, "exp_avg", index, exp_avg)
                    if self.second_moment == "row":
                        sq = state["exp_avg_sq"][index].mul(beta2).add_(grad.square().mean(1), alpha=1 - beta2)
                        state["exp_avg_sq"][index] = sq
                        sq = sq.unsqueeze(1)
                    else:
                        sq = state["exp_avg_sq"][index].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                        state["exp_avg_sq"][index] = sq.to(state["exp_avg_sq"].dtype)
                    bias1 = (1 - beta1 ** steps).float()
                    bias2 = (1 - beta2 ** steps).float()
                    denom = (sq / bias2).sqrt_().add_(eps)
                    weight = flat[index].float().mul_(1 - lr * weight_decay)
                    flat[index] = weight.addcdiv_(exp_avg / bias1, denom, value=-lr).to(p.dtype)
        return loss


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
        catch_up: SGD: replay the momentum steps a row missed when it is sampled again.

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
                          second_moment=second_moment)
