"""The machinery the sparse row optimizers (:mod:`facescale.parallel.optim`) share: chunked row updates, compact
state, catch-up of skipped rows, and the sampled-row working set that lets Partial FC read and write each sampled
row once per step.

**The working set** (``prepare_rows``). Partial FC scores a sampled subset of its centers. Before scoring, the
rows must be brought up to date (the dense steps they missed, see ``SparseRowSGD``); after the backward pass the
optimizer updates them. Done naively that is four passes over the sampled rows in memory (catch-up: gather and
scatter; step: gather and scatter) plus two gathers by the cosine. Instead, as arcface_torch's first Partial FC
kept a ``sub_weight`` and ``sub_weight_mom`` (An et al., arXiv:2010.05222), the forward gathers the sampled rows
and their state once into a working set and catches their weight up *there* (rounded exactly as a store would
round it); the cosine's forward and backward read the working set (contiguous, no gather); ``step`` catches the
state up (from the caught-up weight: nothing about the state is stored or rounded in between), updates the rows and
scatters each row once. Partial FC takes the set through ``prepare_rows_lazily``, which gathers and catches up each
chunk just before the cosine scores it. Nothing is written to the centers before ``step``, so a step that is
skipped (non-finite loss) just drops the working set: the stored rows are caught up later, in closed form, to the
same values. When the gradient's rows are not the working set's (micro-batches accumulated over several forwards),
``step`` falls back to gathering from the stored rows, catching up and rounding the same way, so both paths give
the same bits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from facescale.parallel.partial_fc import mix_seed
from facescale.parallel.row_state import (
    KeptStorage,
    chunk_buffers,
    put_rows,
    stochastic_round_bf16,
    take_fp32_rows,
    take_rows,
)

# Rows updated at once; bounds the fp32 temporaries of a step (~3 x 8 MB at D=512). On CPU the chunk is smaller,
# so that the few tensors of a chunk stay in the last-level cache across its dozen elementwise passes (measured on
# this project's 2-core box, 1M identities, rate 0.1, 2 ranks: with both this and the cosine chunk at 2 MiB instead
# of 8 MiB the step went from ~1.65x to ~1.47x its GEMM floor). GPUs keep 8 MiB: fewer kernel launches per step.
# The planner counts the larger value.
STEP_CHUNK_BYTES = 8 << 20
CPU_STEP_CHUNK_BYTES = 2 << 20

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


@dataclass
class _WorkingSet:
    """Sampled rows of one parameter, gathered and caught up by ``prepare_rows`` for the coming ``step``."""

    rows: torch.Tensor  # sorted local row ids
    weight: torch.Tensor  # [len(rows), ...] in the parameter's dtype
    state: dict[str, torch.Tensor]  # the row-state tensors at ``rows`` (same keys and dtypes) + the scalar step
    step: int  # optimizer steps taken when gathered
    version: int  # the parameter's version counter when gathered (any later write invalidates the set)
    pending: _PendingGather | None = None  # the chunks not yet gathered (``prepare_rows_lazily``); None: filled
    deferred: dict[int, Any] = field(default_factory=dict)  # first row -> plan: chunks whose state the step catches up


@dataclass
class _PendingGather:
    """What ``_fill_working_set`` needs to gather and catch up the rest of a working set, chunk by chunk."""

    p: torch.Tensor
    rows: torch.Tensor
    sources: dict[str, torch.Tensor]  # stored tensors to gather from (the parameter and its row state)
    targets: dict[str, torch.Tensor]  # the working set's tensors, by the same names
    sub_state: dict[str, torch.Tensor]
    group: dict[str, Any]
    catch_up: bool
    plan: Any = None  # the optimizer's ``_coast_plan`` for all rows
    parts: list[slice] = field(default_factory=list)
    behind: list[bool] = field(default_factory=list)  # per part: some row missed steps (its weight needs catching up)
    next_part: int = 0
    filled: int = 0  # rows [0, filled) are gathered and current
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # chunk scratch, kept across fill calls


class SparseRowOptimizer(torch.optim.Optimizer):
    """Shared machinery: chunked rows, compact state, catch-up of skipped rows, dtype-preserving state loading,
    the sampled-row working set (module docstring).

    Subclasses keep ``step`` (optimizer steps taken) and ``last_step`` (per row: the step its weight and state
    are current at) and implement ``_read_rows``/``_write_rows``/``_coast_plan``/``_coast_weight``/``_coast_state``/
    ``_update_rows``/``state_layout``.
    """

    catch_up = True
    keep_buffers = True  # keep the working set's storage from step to step (``row_state.KeptStorage``)
    # What torch's Optimizer.__getstate__ (defaults, state, param_groups) would drop from a pickle or deepcopy.
    _PICKLED_SETTINGS = ("state_dtype", "second_moment", "catch_up", "_rounding_keys")

    def __getstate__(self) -> dict[str, Any]:
        """torch's state plus the storage settings and rounding keys (not the working set or kept buffers: the
        next forward gathers them again)."""
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED_SETTINGS if k in self.__dict__})
        return state

    @staticmethod
    def _chunks(p: torch.Tensor, rows: torch.Tensor | None) -> Iterable[tuple[torch.Tensor | slice, slice]]:
        """(index into p's rows, slice into the gradient's rows) per chunk of rows."""
        count = p.shape[0] if rows is None else rows.numel()
        budget = CPU_STEP_CHUNK_BYTES if p.device.type == "cpu" else STEP_CHUNK_BYTES
        chunk = max(1, budget // (p[0].numel() * 4))
        for start in range(0, count, chunk):
            part = slice(start, min(start + chunk, count))
            yield (part if rows is None else rows[part]), part

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _read_rows(self, state: dict[str, torch.Tensor], index: Any) -> list[torch.Tensor]:
        raise NotImplementedError

    def _write_rows(self, state: dict[str, torch.Tensor], index: Any, rows: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _coast_plan(self, skipped: torch.Tensor, last: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Per row, what the replay of the ``skipped`` zero-gradient dense steps after step ``last`` needs: a tensor
        of rows, computed once for a whole working set and sliced per chunk."""
        raise NotImplementedError

    def _coast_weight(self, weight: torch.Tensor, rows: list[torch.Tensor], plan: torch.Tensor,
                      group: dict[str, Any]) -> None:
        """The replay's effect on the fp32 ``weight`` (in place), from the state ``rows`` as stored (only read);
        ``plan``: these rows' part of :meth:`_coast_plan`."""
        raise NotImplementedError

    def _coast_state(self, weight: torch.Tensor, rows: list[torch.Tensor], plan: torch.Tensor,
                     group: dict[str, Any]) -> None:
        """The replay's effect on the state ``rows`` (in place), after :meth:`_coast_weight`: from the state as
        stored and the caught-up ``weight`` (as stored too: rounded, for bf16 centers)."""
        raise NotImplementedError

    def _update_rows(self, weight: torch.Tensor, grad: torch.Tensor, rows: list[torch.Tensor],
                     group: dict[str, Any], t: int) -> torch.Tensor:
        """The update rule on fp32 rows: changes ``rows`` (state) in place, returns the new weight rows."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Updates the rows present in each parameter's gradient with the subclass's ``_update_rows``."""
        loss = torch.enable_grad()(closure)() if closure is not None else None
        with chunk_buffers():
            self._step_all()
        return loss

    def _step_all(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, values = _sampled_rows(p.grad)
                values = values.view(values.shape[0], -1)
                state = self._state_for(p)
                working = self._take_working_set(p, rows, state)
                if working is not None:
                    self._step_working_set(p, working, values, state, group)
                else:
                    self._step_stored(p, rows, values, state, group)
                state["step"] += 1

    def _step_stored(self, p: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor,
                     state: dict[str, torch.Tensor], group: dict[str, Any]) -> None:
        """The step on rows gathered from the stored centers (no working set, or not the gradient's rows)."""
        flat = p.view(p.shape[0], -1)
        t = int(state["step"]) + 1
        for index, part in self._chunks(p, rows):
            grad = take_fp32_rows(values, part, "grad")  # may be a view of p.grad: never written
            weight = take_fp32_rows(flat, index, "weight")
            state_rows = list(self._read_rows(state, index))
            plan = self._bring_up_to_date(state, index, weight, state_rows, group, weight_only=True) \
                if self.catch_up else None
            if plan is not None:
                # Rounded as the working set stores its caught-up weight, not stored: the step's store is the one write.
                weight.copy_(self._rounded(p, weight, index, t - 1, _ROUND_CATCH_UP))  # fp32: a no-op self-copy
                self._coast_state(weight, state_rows, plan, group)
            self._finish_rows(p, flat, index, weight, grad, state_rows, state, group, t)

    def _step_working_set(self, p: torch.Tensor, working: _WorkingSet, values: torch.Tensor,
                          state: dict[str, torch.Tensor], group: dict[str, Any]) -> None:
        """The step on the working set ``prepare_rows`` made: updates it chunk by chunk, scatters each row once."""
        flat, sub = p.view(p.shape[0], -1), working.weight.view(working.weight.shape[0], -1)
        t = int(state["step"]) + 1
        for part, _ in self._chunks(working.weight, None):
            grad = take_fp32_rows(values, part, "grad")
            weight = take_fp32_rows(sub, part, "weight")  # fp32: a view of the working set, updated in place
            state_rows = list(self._read_rows(working.state, part))
            plan = working.deferred.get(part.start)
            if plan is not None:  # the forward caught up this chunk's weight only
                self._coast_state(weight, state_rows, plan, group)
            self._finish_rows(p, flat, working.rows[part], weight, grad, state_rows, state, group, t)

    def _finish_rows(self, p: torch.Tensor, flat: torch.Tensor, index: torch.Tensor | slice, weight: torch.Tensor,
                     grad: torch.Tensor, state_rows: list[torch.Tensor], state: dict[str, torch.Tensor],
                     group: dict[str, Any], t: int) -> None:
        """Updates current fp32 rows and stores them and their state at ``index`` (step ``t``)."""
        weight = self._update_rows(weight, grad, state_rows, group, t)
        self._write_rows(state, index, state_rows)
        put_rows(state["last_step"], index, t)
        self._store_rows(p, flat, index, weight, t, _ROUND_STEP)

    def _bring_up_to_date(self, state: dict[str, torch.Tensor], index: Any, weight: torch.Tensor,
                          rows: list[torch.Tensor], group: dict[str, Any], weight_only: bool = False) -> Any:
        """Replays missed steps on the fp32 rows (with ``weight_only``, on the weight alone: ``_coast_state`` is left
        to the caller). Returns ``None`` when every row was already current, else these rows' plan."""
        step = int(state["step"])
        last = take_rows(state["last_step"], index).long()
        skipped = step - last
        if not bool((skipped > 0).any()):
            return None
        put_rows(state["last_step"], index, step)
        plan = self._coast_plan(skipped, last, group)
        self._coast_weight(weight, rows, plan, group)
        if not weight_only:
            self._coast_state(weight, rows, plan, group)
        return plan

    @torch.no_grad()
    def prepare_rows(self, p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Gathers the sorted local ``rows`` of ``p`` and their state into a working set, brings them up to date
        there (nothing is written to ``p`` or its state) and returns the rows ``[len(rows), ...]`` in ``p``'s dtype:
        the values the coming forward should score. The next ``step`` whose gradient covers exactly these rows
        updates the working set and writes each row once (module docstring)."""
        weight, fill = self.prepare_rows_lazily(p, rows)
        fill(rows.numel())
        return weight

    def prepare_rows_lazily(self, p: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, Callable[[int], None]]:
        """:meth:`prepare_rows` whose gather and catch-up happen on demand: returns the working set's rows (not yet
        filled) and ``fill(end)``, which fills rows ``[0, end)`` in order. Partial FC's cosine calls it chunk by
        chunk, so each chunk of rows is gathered, caught up and scored while it is in cache (the working set is read
        from memory once fewer). A step finding the set unfilled falls back to the stored rows (the same bits)."""
        self.__dict__.setdefault("_working", {}).pop(p, None)  # the previous set first: never two held at once
        pending = self._start_gather(p, rows)
        weight, sub_state = pending.targets["weight"], pending.sub_state
        self._working[p] = _WorkingSet(rows, weight, sub_state, int(sub_state["step"]), p._version, pending)
        return weight, functools.partial(self._fill_working_set, self._working[p])

    def release_buffers(self) -> None:
        """Frees the kept working-set storage (the next forward allocates it again)."""
        self.__dict__.get("_kept", {}).clear()

    def _start_gather(self, p: torch.Tensor, rows: torch.Tensor) -> _PendingGather:
        state = self._state_for(p)
        # The sampled rows' storage is kept from step to step (a fresh ~100 MB tensor costs its page faults again on
        # CPU, about as much as the gather itself); a storage a graph still holds (two forwards before one
        # backward) is not reused: KeptStorage hands out only free storage.
        kept = self.__dict__.setdefault("_kept", {}).setdefault(p, {}) if self.keep_buffers else {}

        def allocate(name: str, source: torch.Tensor) -> torch.Tensor:
            shape = (rows.numel(), *source.shape[1:])
            storage = kept.setdefault(name, KeptStorage()) if self.keep_buffers else None
            return KeptStorage.take_or_new(storage, shape, source.dtype, source.device)

        sources = {k: v for k, v in state.items() if v.dim() > 0}
        sub_state: dict[str, torch.Tensor] = {k: allocate(k, v) for k, v in sources.items()}
        weight = allocate("weight", p)
        sources["weight"], targets = p, {**sub_state, "weight": weight}
        sub_state["step"] = state["step"]
        group = self._group_of(p)
        pending = _PendingGather(p, rows, sources, targets, sub_state, group,
                                 self.catch_up and group.get("momentum", True))
        pending.parts = [part for part, _ in self._chunks(weight, None)]
        if pending.catch_up:  # the rows' last steps first: what of the replay depends on them alone is planned once
            last = torch.index_select(sources.pop("last_step"), 0, rows, out=targets["last_step"]).long()
            skipped = int(state["step"]) - last
            pending.plan = self._coast_plan(skipped, last, group)
            # Which chunks have a row behind, at once (not a test and a sync per chunk): counts up to each chunk's end.
            ends = torch.tensor([part.stop - 1 for part in pending.parts], device=rows.device)
            counts = (skipped > 0).cumsum(0)[ends]
            pending.behind = torch.diff(counts, prepend=counts.new_zeros(1)).gt(0).tolist()
        return pending

    @torch.no_grad()
    def _fill_working_set(self, working: _WorkingSet, end: int) -> None:
        """Gathers and catches up the working set's chunks, in order, until rows ``[0, end)`` are filled."""
        g = working.pending
        if g is None or g.filled >= end:
            return
        sub, step = g.targets["weight"].view(g.rows.numel(), -1), int(g.sub_state["step"])
        with chunk_buffers(g.buffers):
            while g.filled < end and g.next_part < len(g.parts):
                part = g.parts[g.next_part]
                for name, source in g.sources.items():
                    torch.index_select(source, 0, g.rows[part], out=g.targets[name][part])
                if g.catch_up and g.behind[g.next_part]:  # the chunk is still in cache
                    current, state_rows = take_fp32_rows(sub, part, "weight"), self._read_rows(g.sub_state, part)
                    plan = working.deferred[part.start] = g.plan[part]  # the state is the step's to catch up
                    self._coast_weight(current, state_rows, plan, g.group)
                    self._store_rows(g.p, sub, part, current, step, _ROUND_CATCH_UP, global_index=g.rows[part])
                g.next_part, g.filled = g.next_part + 1, part.stop
        if g.next_part == len(g.parts):
            working.pending = None  # filled: drop the gather's references (the kept storage is reused by count)

    def _take_working_set(self, p: torch.Tensor, rows: torch.Tensor | None,
                          state: dict[str, torch.Tensor]) -> _WorkingSet | None:
        """Pops ``p``'s working set; returns it when it is still current and holds exactly the gradient's rows."""
        working = self.__dict__.get("_working", {}).pop(p, None)
        if working is None or rows is None or working.step != int(state["step"]) or working.version != p._version:
            return None
        if working.pending is not None:  # never filled to the end (a forward cut short): the stored rows are current
            return None
        if working.rows.shape != rows.shape or not torch.equal(working.rows, rows):
            return None
        return working

    @torch.no_grad()
    def catch_up_rows(self, p: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Brings ``rows`` of ``p`` (all when ``None``) up to date with the dense steps they missed, in storage.

        Call it with ``rows=None`` before reading every center (evaluate, export) or before a step change of the lr
        (the missed steps are replayed at the current lr). (Partial FC's forward uses ``prepare_rows_lazily`` instead.)
        """
        state = self.state.get(p)
        group = self._group_of(p)
        if not state or "step" not in state or not self.catch_up or not group.get("momentum", True):
            return
        self.__dict__.get("_working", {}).pop(p, None)
        flat = p.view(p.shape[0], -1)
        with chunk_buffers():
            for index, _ in self._chunks(p, rows):
                weight, state_rows = take_fp32_rows(flat, index, "weight"), self._read_rows(state, index)
                if self._bring_up_to_date(state, index, weight, state_rows, group) is not None:
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
                    salt: int, global_index: Any = None) -> None:
        """Writes fp32 rows into ``flat`` at ``index``: exact for fp32, stochastically rounded for bf16, keyed by
        (seed, step, row of ``p``: ``global_index`` when ``flat`` is a working set, else ``index``)."""
        put_rows(flat, index, self._rounded(p, weight, index if global_index is None else global_index, step, salt))

    def _rounded(self, p: torch.Tensor, weight: torch.Tensor, key_index: Any, step: int, salt: int) -> torch.Tensor:
        """fp32 rows ``weight`` (rows ``key_index`` of ``p``) as :meth:`_store_rows` stores them (bf16: rounded)."""
        if p.dtype != torch.bfloat16:
            return weight
        seed, offset = getattr(self, "_rounding_keys", {}).get(p, (0, 0))
        if isinstance(key_index, slice):
            local = torch.arange(key_index.start, key_index.stop, dtype=torch.int64, device=weight.device)
        else:
            local = key_index.to(torch.int64)
        return stochastic_round_bf16(weight, mix_seed(seed, step, salt), local + offset)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads hyperparameters and state, keeping the state's storage dtype (torch would cast it to fp32)."""
        self.__dict__.get("_working", {}).clear()
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
