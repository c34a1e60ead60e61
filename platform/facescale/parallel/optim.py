"""Sparse row optimizers for Partial FC centers: only sampled rows are read, updated or decayed.

arcface_torch's PartialFC_V2 keeps weight, gradient and momentum dense for every center: 6 KB per identity at
D=512 with SGD. Here the gradient is a sparse tensor holding only the sampled rows (see ``PartialFC``) and the
optimizer state is stored compactly for every row. Persistent bytes per identity at D=512 (centers included):

    =============================  ===============================================================  ========
    optimizer                      state per row                                                    B/id
    =============================  ===============================================================  ========
    SGD ``int8`` (default)         momentum int8 + one fp32 absmax scale per 64 values, int32 step  2048+548
    SGD ``int8``, bf16 centers     as above, centers stored in bf16 (stochastic rounding)           1024+548
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
- **bf16 centers** (``PartialFC(center_dtype="bf16")``): the update of a row is computed in fp32 and written back
  with *stochastic rounding* (:func:`stochastic_round_bf16`): rounded up with probability equal to the fraction
  of a bf16 step, so an update smaller than half a step (lr * grad is often ~1e-4 of a center's magnitude, below
  half of bf16's relative spacing of 2^-8..2^-7) survives in expectation instead of being rounded away (Gupta et al.,
  "Deep Learning with Limited Numerical Precision", ICML 2015; Zamirai et al., "Revisiting BFloat16 Training",
  arXiv:2010.06192). The random bits are a hash of (seed, optimizer step, global row, column) -- the global row
  rather than the rank, so a run rounds the same on any world size -- and the step is in the checkpoint, so a
  resumed run rounds the same. Centers + int8 momentum: 1024 + 548 = 1,572 B per identity at D=512.
- **Row-wise second moment** (AdamW ``second_moment="row"``): one mean-square per center instead of one per
  coordinate, as in row-wise AdaGrad for large embedding tables; per-row step counts give correct bias correction
  for rows sampled for the first time late in training.

The measured effect on accuracy (a synthetic task, against dense fp32) is in BENCHMARKS.md
(``benchmarks/partial_fc.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch

from facescale.parallel.partial_fc import mix_seed

StateDtype = Literal["fp32", "bf16", "int8"]
SecondMoment = Literal["full", "row"]
QUANT_BLOCK = 64
# Rows updated at once; bounds the fp32 temporaries of a step (~3 x 8 MB at D=512).
STEP_CHUNK_BYTES = 8 << 20
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# Salts of the rounding keys: the write of an optimizer step and the write of a catch-up between steps.
_ROUND_STEP, _ROUND_CATCH_UP = 0x5752, 0xC47C
_MASK32 = 0xFFFFFFFF
_ROUND_BLOCK_ELEMENTS = 1 << 18


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """In place, a 32-bit integer mix of int64 ``x`` holding values in [0, 2^32) (T. Mueller's xorshift-multiply
    hash; the constant is below 2^31 so the int64 products never overflow)."""
    x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def stochastic_round_bf16(values: torch.Tensor, key: int, global_rows: torch.Tensor) -> torch.Tensor:
    """fp32 ``values [R, C]`` rounded to bf16 stochastically: up (in magnitude) with probability equal to the
    dropped fraction of a bf16 step, so ``E[round(x)] = x`` exactly (for finite values below bf16's max).

    The 16 random bits of element (r, c) are a hash of (``key``, ``global_rows[r]``, c): the same value, key and
    row always round the same, whatever the chunking or the world size.

    Args:
        values: fp32 rows to store.
        key: 63-bit seed of this write (e.g. ``mix_seed(seed, step, salt)``).
        global_rows: int64 ``[R]`` row ids that do not depend on the sharding.

    Returns:
        A bf16 tensor of the same shape.
    """
    key_lo, key_hi = key & _MASK32, (key >> 32) & _MASK32
    row_bits = _hash32((global_rows.to(torch.int64) & _MASK32) ^ key_lo)
    col_bits = _hash32(torch.arange(values.shape[1], dtype=torch.int64, device=values.device) ^ key_hi)
    values = values.contiguous()
    out = torch.empty(values.shape, dtype=torch.bfloat16, device=values.device)
    block = max(1, _ROUND_BLOCK_ELEMENTS // max(1, values.shape[1]))  # bounds the int64 temporaries (~2 MB each)
    for start in range(0, values.shape[0], block):
        rows = slice(start, start + block)
        noise = _hash32(row_bits[rows].unsqueeze(1) ^ col_bits).bitwise_and_(0xFFFF).to(torch.int32)
        # Sign-magnitude: adding r in [0, 2^16) to the low bits then truncating them rounds |x| up with probability
        # (low bits) / 2^16 -- the fraction of the bf16 step -- for either sign; truncation then converts exactly.
        bits = values[rows].view(torch.int32).add(noise).bitwise_and_(-65536)
        out[rows] = bits.view(torch.float32)
    return out


def _block_size(width: int) -> int:
    return QUANT_BLOCK if width % QUANT_BLOCK == 0 else width


def default_state_dtype(optimizer: str) -> StateDtype:
    """int8 block-quantised momentum / first moment: the most compact, and as accurate as fp32 here (BENCHMARKS)."""
    return "int8"


def row_state_layout(optimizer: str, rows: int, width: int, state_dtype: StateDtype,
                     second_moment: SecondMoment = "row") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of the sparse optimizers' state for a ``[rows, width]`` parameter."""
    first = "momentum" if optimizer == "sgd" else "exp_avg"
    if state_dtype == "int8":
        layout = {f"{first}_q": ((rows, width), torch.int8),
                  f"{first}_scale": ((rows, width // _block_size(width)), torch.float32)}
    else:
        layout = {first: ((rows, width), _FLOAT_DTYPES[state_dtype])}
    if optimizer == "adamw":
        full_dtype = torch.float32 if state_dtype == "fp32" else torch.bfloat16
        layout["exp_avg_sq"] = ((rows,), torch.float32) if second_moment == "row" else ((rows, width), full_dtype)
    layout["last_step"] = ((rows,), torch.int32)
    layout["step"] = ((), torch.int64)
    return layout


def state_bytes_per_row(optimizer: str, embedding_size: int, state_dtype: StateDtype | None = None,
                        second_moment: SecondMoment = "row", dense: bool = False) -> int:
    """Bytes of optimizer state per class center (the planner's and the benchmark's shared truth)."""
    if dense:  # torch.optim.SGD momentum, or AdamW's two moments, in fp32
        return 4 * embedding_size * (1 if optimizer == "sgd" else 2)
    layout = row_state_layout(optimizer, 1, embedding_size, state_dtype or default_state_dtype(optimizer),
                              second_moment)
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values() if shape)


def _take(tensor: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """``tensor[rows]``; for an index tensor as ``index_select`` (a gather of whole rows, about twice as fast as
    advanced indexing on CPU)."""
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)


def _read(state: dict[str, torch.Tensor], name: str, rows: torch.Tensor | slice) -> torch.Tensor:
    """fp32 copy of ``state[name]`` at ``rows``."""
    if f"{name}_q" in state:
        q, scale = _take(state[f"{name}_q"], rows), _take(state[f"{name}_scale"], rows)
        blocks = scale.shape[1]
        # Convert, then scale in place: the same values as the promoting int8 * fp32 product, and about 3x faster on
        # CPU (the mixed-dtype kernel is slow); the fp32 copy is the result itself.
        values = q.to(torch.float32)
        return values.view(q.shape[0], blocks, -1).mul_(scale.unsqueeze(2)).view(q.shape[0], -1)
    return _take(state[name], rows).float()


def _write(state: dict[str, torch.Tensor], name: str, rows: torch.Tensor | slice, values: torch.Tensor) -> None:
    """Stores fp32 ``values`` into ``state[name]`` at ``rows`` (rounding to the storage dtype)."""
    if f"{name}_q" in state:
        blocks = state[f"{name}_scale"].shape[1]
        grouped = values.view(values.shape[0], blocks, -1)
        # max |x| per block without an |x| copy, as max(max x, -min x): exactly vector_norm(ord=inf), ~15x faster on
        # CPU (abs_ only turns a -0 from all-zero blocks into +0).
        scale = torch.maximum(grouped.amax(dim=2), grouped.amin(dim=2).neg_()).abs_() / 127.0
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
                    weight = _take(flat, index).float()
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
        last = _take(state["last_step"], index).long()
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
            weight, state_rows = _take(flat, index).float(), self._read_rows(state, index)
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
        return [_read(state, "momentum", index)]

    def _write_rows(self, state: dict[str, torch.Tensor], index: Any, rows: list[torch.Tensor]) -> None:
        _write(state, "momentum", index, rows[0])

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
        return [_read(state, "exp_avg", index), _take(state["exp_avg_sq"], index).float()]

    def _write_rows(self, state: dict[str, torch.Tensor], index: Any, rows: list[torch.Tensor]) -> None:
        _write(state, "exp_avg", index, rows[0])
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
