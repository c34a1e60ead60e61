"""Compact storage of the sparse optimizers' per-row state: layouts, int8 block quantisation, bf16 rounding.

Each optimizer state tensor is stored per class center in fp32, bf16, or int8 with one fp32 absmax scale per
``QUANT_BLOCK`` values (1/127 of each block's largest magnitude); readers get fp32 rows back and writers round fp32
rows to the storage dtype. Persistent bytes per identity at D=512 (centers included):

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
- **Step buffers.** :func:`scratch` temporaries live for one optimizer call; :class:`KeptStorage` keeps a tensor's
  storage from step to step (the working set here, the logits and center gradient in Partial FC).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch

StateDtype = Literal["fp32", "bf16", "int8"]
SecondMoment = Literal["full", "row"]
QUANT_BLOCK = 64
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_ROUND_BLOCK_ELEMENTS = 1 << 20



def _hash32(x: torch.Tensor) -> torch.Tensor:
    """In place, a 32-bit integer mix of int64 ``x`` holding values in [0, 2^32) (T. Mueller's xorshift-multiply
    hash; the constant is below 2^31 so the int64 products never overflow)."""
    x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


@functools.lru_cache(maxsize=8)
def _column_bits(key_hi: int, width: int, device: torch.device) -> torch.Tensor:
    """The 16-bit column hashes of one write's key (the same for every chunk of that write: cached; read only)."""
    bits = _hash32(torch.arange(width, dtype=torch.int64, device=device) ^ key_hi)
    return bits.bitwise_and_(_MASK16).to(torch.int32)


def stochastic_round_bf16(values: torch.Tensor, key: int, global_rows: torch.Tensor) -> torch.Tensor:
    """fp32 ``values [R, C]`` rounded to bf16 stochastically: up (in magnitude) with probability equal to the
    dropped fraction of a bf16 step, so ``E[round(x)] = x`` exactly (for finite values below bf16's max).

    The 16 random bits of element (r, c) are a 16-bit hash of (``key``, ``global_rows[r]``) XOR a 16-bit hash of
    (``key``, c): uniform for every element (XOR with a uniform row hash is a bijection of any column's bits), which
    is all unbiasedness needs, for one XOR per element. (Until 2026-12-02: bits 14..29 of the sum of two 30-bit hashes,
    which took a shift and a mask more per element: 356 against 180 us per 1024 x 512 chunk here.) The same value,
    key and row always round the same, whatever the chunking or world size.

    Args:
        values: fp32 rows to store.
        key: 63-bit seed of this write (e.g. ``mix_seed(seed, step, salt)``).
        global_rows: int64 ``[R]`` row ids that do not depend on the sharding.

    Returns:
        A bf16 tensor of the same shape.
    """
    key_lo, key_hi = key & _MASK32, (key >> 32) & _MASK32
    row_bits = _hash32((global_rows.to(torch.int64) & _MASK32) ^ key_lo).bitwise_and_(_MASK16).to(torch.int32)
    col_bits = _column_bits(key_hi, values.shape[1], values.device)
    values = values.contiguous()
    out = torch.empty(values.shape, dtype=torch.bfloat16, device=values.device)
    block = max(1, _ROUND_BLOCK_ELEMENTS // max(1, values.shape[1]))  # bounds the int32 temporary (~4 MB)
    for start in range(0, values.shape[0], block):
        rows = slice(start, start + block)
        count = row_bits[rows].numel()
        noise = scratch("round_noise", (count, values.shape[1]), torch.int32, values.device)
        torch.bitwise_xor(row_bits[rows].unsqueeze(1), col_bits, out=noise)
        # Sign-magnitude: adding r in [0, 2^16) to the low bits then truncating them rounds |x| up with probability
        # (low bits) / 2^16 -- the fraction of the bf16 step -- for either sign; truncation then converts exactly.
        bits = noise.add_(values[rows].view(torch.int32)).bitwise_and_(-65536)
        out[rows] = bits.view(torch.float32)
    return out


_BUFFERS: contextvars.ContextVar[dict[str, torch.Tensor] | None] = contextvars.ContextVar("row_buffers", default=None)


@contextlib.contextmanager
def chunk_buffers(buffers: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Inside, :func:`scratch` hands out one buffer per name, reused chunk after chunk, freed on exit (kept in
    ``buffers`` when given, for a later ``chunk_buffers(buffers)``).

    A fresh ~8 MB temporary per chunk costs page faults on CPU (glibc hands freed heap tops back to the kernel, which
    zeroes the pages again on the next touch): about as much as the arithmetic on it. The optimizers' chunk loops
    run inside this context."""
    token = _BUFFERS.set({} if buffers is None else buffers)
    try:
        yield
    finally:
        _BUFFERS.reset(token)


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``shape`` tensor: a view of the named buffer of the active :func:`chunk_buffers` (grown
    when too small), or a fresh tensor outside one. Valid until the same name is asked for again."""
    buffers, count = _BUFFERS.get(), math.prod(shape)
    if buffers is None:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = buffers.get(name)
    if buf is None or buf.numel() < count or buf.dtype != dtype or buf.device != device:
        buf = buffers[name] = torch.empty(count, dtype=dtype, device=device)
    return buf[:count].view(shape)


class KeptStorage:
    """One tensor's storage kept from step to step (as CUDA's caching allocator keeps GPU memory): on CPU a fresh
    ~100 MB tensor pays its page faults again every step, ~40 ms per 100 MB here. The peak is unchanged (the tensor
    exists at the peak anyway); what a rank holds between steps grows by it (``PlanReport.resident_bytes``).

    The storage is handed out again only when nothing else holds it (its use count is 1: this object's reference):
    a gradient still in ``.grad``, a graph that saved the tensor, a caller that kept it -- any of them makes the next
    :meth:`take` allocate a fresh storage instead, which is kept from then on.
    """

    def __init__(self) -> None:
        self.storage: torch.UntypedStorage | None = None

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles of the module do not carry the storage
        return {"storage": None}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous ``shape`` tensor on the kept storage when it is free, else on a fresh one."""
        nbytes = math.prod(shape) * dtype.itemsize
        kept = self.storage
        if kept is not None and (kept.device != torch.device(device) or kept.nbytes() < nbytes):
            self.storage = kept = None  # the old one first: never both held
        if kept is None or torch._C._storage_Use_Count(kept._cdata) > 1:
            self.storage = kept = torch.UntypedStorage(nbytes, device=device)
        return torch.empty(0, dtype=dtype, device=device).set_(kept, 0, shape)

    @staticmethod
    def take_or_new(kept: KeptStorage | None, shape: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
        """``kept.take(...)``, or a plain ``torch.empty`` without a ``kept``."""
        return torch.empty(shape, dtype=dtype, device=device) if kept is None else kept.take(shape, dtype, device)

    def release(self) -> None:
        """Drops the kept storage (the next :meth:`take` allocates it again)."""
        self.storage = None


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


def take_rows(tensor: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """``tensor[rows]``; for an index tensor as ``index_select`` (a gather of whole rows, about twice as fast as
    advanced indexing on CPU)."""
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)


def take_fp32_rows(tensor: torch.Tensor, rows: torch.Tensor | slice, name: str) -> torch.Tensor:
    """fp32 ``tensor[rows]`` that the caller may overwrite: a view for a slice of an fp32 tensor (writes go to the
    tensor), else a copy in the :func:`scratch` buffer ``name``."""
    if isinstance(rows, slice):
        block = tensor[rows]
        if block.dtype == torch.float32:
            return block
        return scratch(name, tuple(block.shape), torch.float32, block.device).copy_(block)
    shape = (rows.numel(), *tensor.shape[1:])
    out = scratch(name, shape, torch.float32, tensor.device)
    if tensor.dtype == torch.float32:
        return torch.index_select(tensor, 0, rows, out=out)
    return out.copy_(tensor.index_select(0, rows))


def put_rows(tensor: torch.Tensor, rows: torch.Tensor | slice, values: torch.Tensor | int | float) -> None:
    """``tensor[rows] = values`` (converted to ``tensor``'s dtype); for an index tensor as ``index_copy_`` /
    ``index_fill_`` (a scatter of whole rows, faster than advanced-index assignment on CPU). Writing a slice onto
    itself (``values`` a view of ``tensor[rows]``) is skipped."""
    if isinstance(rows, slice):
        target = tensor[rows]
        if torch.is_tensor(values) and values.data_ptr() == target.data_ptr() and values.stride() == target.stride():
            return
        target.copy_(values) if torch.is_tensor(values) else target.fill_(values)
    elif torch.is_tensor(values):
        values = values.to(tensor.dtype).contiguous()
        word = _scatter_word(tensor, values)
        if word is not None:
            tensor, values = tensor.view(word), values.view(word)
        tensor.index_copy_(0, rows, values)
    else:
        tensor.index_fill_(0, rows, values)


def _scatter_word(tensor: torch.Tensor, values: torch.Tensor) -> torch.dtype | None:
    """The widest word whole rows of ``tensor`` can be scattered as (``index_copy_`` copies element by element, so
    fewer, wider elements move the same bytes faster): 16 bytes (viewed as complex128, only ever copied, never
    computed on, so every bit pattern survives) or 8 (int64); ``None`` when the rows allow neither. Measured on
    this project's 2-core box (50k random rows of 512): fp32 rows 27 ms as int64, 21 ms as 16-byte words; int8
    rows 32 ms as int8, 9.6 ms as int64, 8.3 ms as 16-byte words. ``values``: the contiguous rows to write."""
    if tensor.dim() != 2 or not tensor.is_contiguous():
        return None
    row_bytes = tensor.shape[1] * tensor.dtype.itemsize
    for word in (torch.complex128, torch.int64):
        if tensor.dtype.itemsize < word.itemsize and row_bytes % word.itemsize == 0 and \
                tensor.data_ptr() % word.itemsize == 0 and values.data_ptr() % word.itemsize == 0:
            return word
    return None


def read_state_rows(state: dict[str, torch.Tensor], name: str, rows: torch.Tensor | slice) -> torch.Tensor:
    """fp32 copy of ``state[name]`` at ``rows``."""
    if f"{name}_q" in state:
        q, scale = take_rows(state[f"{name}_q"], rows), take_rows(state[f"{name}_scale"], rows)
        blocks = scale.shape[1]
        # Convert, then scale in place: the same values as the promoting int8 * fp32 product, and about 3x faster on
        # CPU (the mixed-dtype kernel is slow); the fp32 copy is the result itself.
        values = scratch(f"read_{name}", tuple(q.shape), torch.float32, q.device).copy_(q)
        return values.view(q.shape[0], blocks, -1).mul_(scale.unsqueeze(2)).view(q.shape[0], -1)
    return take_rows(state[name], rows).float()


def write_state_rows(state: dict[str, torch.Tensor], name: str, rows: torch.Tensor | slice,
                     values: torch.Tensor) -> None:
    """Stores fp32 ``values`` into ``state[name]`` at ``rows`` (rounding to the storage dtype). ``values`` is a
    temporary of the caller's and may be overwritten (int8 is quantised in place: one pass fewer)."""
    if f"{name}_q" in state:
        blocks = state[f"{name}_scale"].shape[1]
        grouped = values.view(values.shape[0], blocks, -1)
        # max |x| per block as the max of |x| in a reused chunk buffer: exactly vector_norm(ord=inf), ~25x faster on
        # CPU (and ~20 % faster than max(max x, -min x), two reductions, here).
        magnitude = torch.abs(grouped, out=scratch(f"abs_{name}", tuple(grouped.shape), grouped.dtype, grouped.device))
        scale = magnitude.amax(dim=2) / 127.0
        # Multiplied by the scale's reciprocal (a multiply pass is ~2x faster than a divide on CPU): |x| * fl(1 / s)
        # with s = fl(max|x| / 127) is at most 127 * (1 + 3 * 2^-24) (three roundings), which rounds to at most 127:
        # no clamp pass.
        inverse = scale.clamp_min(1e-30).reciprocal_().unsqueeze(2)
        q = grouped.mul_(inverse).round_().view(values.shape[0], -1)
        if not isinstance(rows, slice):  # a slice converts while it copies; a scatter needs int8 rows first
            q = scratch(f"write_{name}", tuple(q.shape), torch.int8, q.device).copy_(q)
        put_rows(state[f"{name}_q"], rows, q)
        put_rows(state[f"{name}_scale"], rows, scale)
    else:
        put_rows(state[name], rows, values)
