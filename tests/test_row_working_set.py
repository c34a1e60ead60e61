"""The sampled-row working set of the sparse row optimizers (``facescale/parallel/row_optimizer.py``) and the kept
step buffers: the step writes each sampled row once, yet gives the same bits as gathering from storage; a forward
without a step writes nothing; accumulated micro-batches and two forwards before one backward stay correct."""

from __future__ import annotations

import pickle

import pytest
import torch

from facescale.heads.config import MarginConfig, build_margin
from facescale.parallel import PartialFC, SparseRowAdamW, build_partial_fc_optimizer
from facescale.parallel.row_state import KeptStorage, put_rows

CLASSES, DIM, BATCH = 600, 64, 16


def _setup(center_dtype: str = "fp32", state_dtype: str = "int8",
           name: str = "sgd") -> tuple[PartialFC, torch.optim.Optimizer]:
    pfc = PartialFC(build_margin(MarginConfig(type="arcface")), DIM, CLASSES, sample_rate=0.2, seed=3,
                    center_dtype=center_dtype)
    opt = build_partial_fc_optimizer(pfc.parameters(), name, lr=0.5, momentum=0.9, weight_decay=5e-4,
                                     state_dtype=state_dtype)
    pfc.attach_optimizer(opt)
    return pfc, opt


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, DIM, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def _train(pfc: PartialFC, opt: torch.optim.Optimizer, steps: range, drop_working_set: bool = False) -> None:
    for step in steps:
        opt.zero_grad(set_to_none=True)
        embeddings, labels = _batch(step)
        pfc(embeddings, labels).backward()
        if drop_working_set:  # forces the step to gather from storage, as after accumulated micro-batches
            opt._working.clear()
        opt.step()


def _state(pfc: PartialFC, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {"weight": pfc.weight.detach().clone(), **{k: v.clone() for k, v in opt.state[pfc.weight].items()}}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("center_dtype, state_dtype, name", [("fp32", "int8", "sgd"), ("bf16", "int8", "sgd"),
                                                            ("fp32", "fp32", "sgd"), ("bf16", "int8", "adamw")])
def test_the_working_set_step_gives_the_bits_of_the_stored_path(center_dtype, state_dtype, name):
    working, stored = _setup(center_dtype, state_dtype, name), _setup(center_dtype, state_dtype, name)
    _train(*working, range(6))
    _train(*stored, range(6), drop_working_set=True)
    # The rows really were sampled and caught up (a no-op comparison would pass on untouched centers too).
    assert not torch.equal(working[0].weight, _setup(center_dtype, state_dtype, name)[0].weight)
    assert int(working[1].state[working[0].weight]["step"]) == 6
    _assert_bitwise_equal(_state(*working), _state(*stored))


def test_the_cosine_fills_the_working_set_chunk_by_chunk(monkeypatch):
    """With chunks of 16 rows, the forward asks for the working set chunk by chunk, in order, and leaves it filled
    (so the step takes the working set, not the stored path); the bits equal the stored path's."""
    import facescale.parallel.partial_fc_ops as ops
    import facescale.parallel.row_optimizer as row_optimizer

    monkeypatch.setattr(ops, "CPU_CHUNK_BYTES", 16 * DIM * 4)
    monkeypatch.setattr(row_optimizer, "CPU_STEP_CHUNK_BYTES", 16 * DIM * 4)
    working, stored = _setup(), _setup()
    ends: list[int] = []
    fill = row_optimizer.SparseRowOptimizer._fill_working_set

    def recording(self, ws, end):
        ends.append(end)
        fill(self, ws, end)

    cls = row_optimizer.SparseRowOptimizer
    stepped: list[int] = []
    stored_step = cls._step_stored
    cls._fill_working_set = recording
    cls._step_stored = lambda self, *a: stepped.append(1) or stored_step(self, *a)
    try:
        _train(*working, range(4))
    finally:
        cls._fill_working_set, cls._step_stored = fill, stored_step
    rows = working[0].num_sample
    assert ends[:-(-rows // 16)] == [min(end, rows) for end in range(16, rows + 16, 16)]  # step 0's chunks, in order
    assert working[1].__dict__.get("_working") == {}  # each set filled, then taken by its step
    assert stepped == []  # the working set's step every time, never the fallback
    _train(*stored, range(4), drop_working_set=True)  # the same 16-row chunks, from the stored rows
    _assert_bitwise_equal(_state(*working), _state(*stored))


def test_a_working_set_left_unfilled_falls_back_to_the_stored_rows(monkeypatch):
    """A working set that was never filled to the end (a forward cut short) is not stepped on: the step gathers
    from the stored rows, which nothing has written, and gives the stored path's bits."""
    import facescale.parallel.partial_fc_ops as ops
    import facescale.parallel.row_optimizer as row_optimizer

    monkeypatch.setattr(ops, "CPU_CHUNK_BYTES", 16 * DIM * 4)  # several chunks: one can be left unfilled
    monkeypatch.setattr(row_optimizer, "CPU_STEP_CHUNK_BYTES", 16 * DIM * 4)
    lazy, stored = _setup(), _setup()
    _train(*lazy, range(2))
    _train(*stored, range(2), drop_working_set=True)
    embeddings, labels = _batch(2)
    lazy[1].zero_grad(set_to_none=True)
    lazy[0](embeddings, labels).backward()
    weight = lazy[0].weight
    rows = lazy[1]._working[weight].rows
    grad = weight.grad
    _, fill = lazy[1].prepare_rows_lazily(weight, rows)  # a new set for the same rows, filled only in part
    fill(rows.numel() // 2)
    assert lazy[1]._working[weight].pending is not None
    weight.grad = grad
    lazy[1].step()
    stored[1].zero_grad(set_to_none=True)
    stored[0](embeddings, labels).backward()
    stored[1]._working.clear()
    stored[1].step()
    _assert_bitwise_equal(_state(*lazy), _state(*stored))


def test_a_forward_without_a_step_writes_nothing():
    pfc, opt = _setup()
    _train(pfc, opt, range(3))
    before = _state(pfc, opt)
    embeddings, labels = _batch(10)
    pfc(embeddings, labels).backward()  # rows gathered and caught up in the working set, then the step is skipped
    opt.zero_grad(set_to_none=True)
    _assert_bitwise_equal(_state(pfc, opt), before)
    # The rows a skipped step caught up are caught up again, to the same values, when next used.
    _train(pfc, opt, range(11, 13))
    assert int(opt.state[pfc.weight]["step"]) == 5


def test_accumulated_micro_batches_sum_their_gradients():
    """Two micro-batches (two working sets, the first one's storage reused by the second) accumulate the exact sum
    of their gradients, and the step after them -- whose rows are no working set's -- gathers from storage."""
    accumulated, parts = _setup(), _setup()
    _train(*accumulated, range(2))
    _train(*parts, range(2))
    accumulated[1].zero_grad(set_to_none=True)
    for step in (20, 21):
        accumulated[0](*_batch(step)).backward()
    total = accumulated[0].weight.grad.coalesce().to_dense()
    separate = []
    for step in (20, 21):
        parts[1].zero_grad(set_to_none=True)
        parts[0](*_batch(step)).backward()
        separate.append(parts[0].weight.grad.coalesce().to_dense().clone())
    assert separate[0].abs().sum() > 0 and not torch.equal(separate[0], separate[1])
    assert torch.equal(total, separate[0] + separate[1])
    before = accumulated[0].weight.detach().clone()
    accumulated[1].step()
    moved = (accumulated[0].weight != before).any(dim=1)
    assert torch.equal(moved, total.abs().sum(dim=1) > 0)  # exactly the rows of both micro-batches were updated


def test_two_forwards_before_one_backward_keep_their_own_rows():
    """The kept working-set storage is not reused while a graph still holds the rows handed to it."""
    (pfc, opt), twin = _setup(), _setup()
    _train(pfc, opt, range(2))
    _train(*twin, range(2))
    opt.zero_grad(set_to_none=True)
    (pfc(*_batch(30)) + pfc(*_batch(31))).backward()
    grads = pfc.weight.grad.coalesce().to_dense()
    twin[1].zero_grad(set_to_none=True)
    twin[0](*_batch(30)).backward()
    twin[0](*_batch(31)).backward()
    assert torch.equal(grads, twin[0].weight.grad.coalesce().to_dense())


def test_kept_buffers_change_no_result():
    kept, fresh = _setup(), _setup()
    fresh[1].keep_buffers = False
    fresh[0].grad_buffer = fresh[0].logits_buffer = None  # fresh cosines and center gradient every step
    _train(*kept, range(2))
    weight_storage = kept[1]._kept[kept[0].weight]["weight"].storage.data_ptr()
    _train(*kept, range(2, 5))
    _train(*fresh, range(5))
    _assert_bitwise_equal(_state(*kept), _state(*fresh))
    # The kept storage really was reused: the same working-set rows, and the last gradient in the kept buffer.
    assert kept[1]._kept[kept[0].weight]["weight"].storage.data_ptr() == weight_storage
    assert kept[0].weight.grad._values().data_ptr() == kept[0].grad_buffer.storage.data_ptr()
    assert kept[0].logits_buffer.storage is not None and fresh[0].logits_buffer is None


def test_kept_storage_is_handed_out_again_only_when_nothing_holds_it():
    kept = KeptStorage()
    first = kept.take((4, 8), torch.float32, torch.device("cpu"))
    first.fill_(7.0)
    view = first[1:]
    del first
    second = kept.take((4, 8), torch.float32, torch.device("cpu"))  # a view still holds the storage: fresh
    assert second.data_ptr() != view.data_ptr() - 8 * 4 and bool((view == 7.0).all())
    del view
    ptr = second.data_ptr()
    del second
    again = kept.take((2, 8), torch.float32, torch.device("cpu"))  # free, and big enough: the same storage
    assert again.data_ptr() == ptr and again.shape == (2, 8) and again._base is None and again.is_contiguous()
    del again
    bigger = kept.take((8, 8), torch.bfloat16, torch.device("cpu"))
    assert bigger.dtype == torch.bfloat16 and kept.storage.nbytes() == 4 * 8 * 4  # 128 bytes still suffice
    del bigger
    assert kept.take((9, 8), torch.float32, torch.device("cpu")).untyped_storage().nbytes() == 9 * 8 * 4


def test_a_center_gradient_kept_past_zero_grad_is_not_overwritten():
    pfc, opt = _setup()
    _train(pfc, opt, range(2))
    kept_grad = pfc.weight.grad  # the caller keeps it (logging, a second optimizer, ...)
    copy = kept_grad.coalesce().to_dense().clone()
    _train(pfc, opt, range(2, 4))
    assert torch.equal(kept_grad.coalesce().to_dense(), copy)
    assert pfc.weight.grad._values().data_ptr() != kept_grad._values().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_put_rows_scatters_whole_rows(dtype):
    target = torch.arange(40 * 16).reshape(40, 16).to(dtype)
    rows = torch.tensor([3, 7, 8, 39])
    values = (-torch.arange(4 * 16).reshape(4, 16) - 1).to(dtype)
    want = target.clone()
    want[rows] = values
    put_rows(target, rows, values)
    assert torch.equal(target, want)
    put_rows(target, slice(0, 2), 5)
    assert bool((target[:2] == 5).all()) and torch.equal(target[2:], want[2:])


@pytest.mark.parametrize("width", [16, 14, 3])  # fp32 rows of 64, 56, 12 bytes: 16-byte, 8-byte words, elements
def test_put_rows_moves_every_bit_pattern(width):
    """Rows scattered as wider words keep their exact bits: NaN payloads, signalling NaNs, -0, subnormals."""
    bits = torch.randint(-2**31, 2**31 - 1, (30, width), generator=torch.Generator().manual_seed(3), dtype=torch.int64)
    special = torch.tensor([0x7FA00001, 0x7FC12345, -0x80000000, 0x00000001, 0x7F800000, -0x00400001])
    bits[0, :special.numel() if width >= special.numel() else width] = special[:width]
    values = bits.to(torch.int32).view(torch.float32)[:5]
    target = torch.zeros(30, width)
    rows = torch.tensor([1, 4, 9, 17, 29])
    put_rows(target, rows, values)
    assert torch.equal(target[rows].view(torch.int32), values.view(torch.int32))
    assert not target[[0, 2, 3]].view(torch.int32).any()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_copied_optimizer_keeps_its_storage_settings(name):
    """torch's Optimizer pickles only defaults, state and param_groups; the sparse optimizers' settings go too."""
    pfc, opt = _setup("bf16", "fp32", name)
    opt.set_rounding_key(pfc.weight, 11, 0)
    opt.catch_up = False
    _train(pfc, opt, range(2))
    copy = pickle.loads(pickle.dumps(opt))
    assert copy.state_dtype == "fp32" and copy.catch_up is False
    assert list(copy._rounding_keys.values()) == [(11, 0)]
    assert "_working" not in copy.__dict__ and "_kept" not in copy.__dict__
    if name == "adamw":
        assert copy.second_moment == opt.second_moment


@pytest.mark.parametrize("center_dtype", ["fp32", "bf16"])
def test_the_step_leaves_the_gradient_as_it_was(center_dtype):
    """The fused SGD update reads the gradient (weight decay added on the fly) and never writes it."""
    pfc, opt = _setup(center_dtype)
    _train(pfc, opt, range(2))
    opt.zero_grad(set_to_none=True)
    embeddings, labels = _batch(2)
    pfc(embeddings, labels).backward()
    before = pfc.weight.grad.coalesce().to_dense().clone()
    weight = pfc.weight.detach().clone()
    opt.step()
    assert torch.equal(pfc.weight.grad.coalesce().to_dense(), before)
    assert not torch.equal(pfc.weight.detach(), weight)  # the step did update the sampled rows


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("drop_working_set", [False, True])
def test_state_caught_up_by_the_step_follows_the_dense_optimizer(name, drop_working_set):
    """The forward catches up only the sampled rows' weight; the step catches up their state (the working set's
    path, and the stored path when the set is dropped). Fed the same gradients, the centers and their state follow
    a dense optimizer that moves every row every step (fp32 state: no quantisation in between): torch's SGD, or for
    AdamW with row-wise v (whose replay is exact; it has no torch twin) the same optimizer on dense gradients."""
    pfc = PartialFC(build_margin(MarginConfig(type="arcface")), DIM, CLASSES, sample_rate=0.2, seed=3)
    dense_weight = torch.nn.Parameter(pfc.weight.detach().clone())
    if name == "sgd":
        opt = build_partial_fc_optimizer(pfc.parameters(), "sgd", lr=0.5, momentum=0.9, weight_decay=5e-4,
                                         state_dtype="fp32")
        dense = torch.optim.SGD([dense_weight], lr=0.5, momentum=0.9, weight_decay=5e-4)
        pairs = {"momentum": "momentum_buffer"}
    else:
        opt = SparseRowAdamW(pfc.parameters(), lr=0.01, weight_decay=0.1, state_dtype="fp32")
        dense = SparseRowAdamW([dense_weight], lr=0.01, weight_decay=0.1, state_dtype="fp32")
        pairs = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
    pfc.attach_optimizer(opt)
    for step in range(12):
        opt.zero_grad(set_to_none=True)
        pfc(*_batch(step)).backward()
        dense_weight.grad = pfc.weight.grad.coalesce().to_dense()
        if drop_working_set:
            opt._working.clear()
        opt.step()
        dense.step()
    state = opt.state[pfc.weight]
    behind = state["last_step"] < 12
    assert int(behind.sum()) > CLASSES // 4  # rows skipped by the last step lag behind the dense run until caught up
    assert not torch.allclose(pfc.weight.detach()[behind], dense_weight.detach()[behind], rtol=1e-3, atol=0)
    opt.catch_up_rows(pfc.weight)
    torch.testing.assert_close(pfc.weight.detach(), dense_weight.detach(), rtol=1e-5, atol=1e-7)
    for ours, theirs in pairs.items():
        torch.testing.assert_close(state[ours], dense.state[dense_weight][theirs], rtol=1e-5, atol=1e-7)
