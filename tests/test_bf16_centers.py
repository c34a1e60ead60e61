"""bf16 Partial FC centers: stochastic rounding (unbiased, reproducible, world-size independent), small updates that
round-to-nearest would lose, 2 gloo ranks against one process, checkpoints across center dtypes, config errors."""

from __future__ import annotations

import logging

import pytest
import torch
from pydantic import ValidationError

from facescale.checkpoint import load_partial_fc, save_partial_fc
from facescale.heads.config import ClassifierConfig, MarginConfig, build_margin
from facescale.parallel import PartialFC, SparseRowSGD, build_partial_fc_optimizer
from facescale.parallel.row_state import stochastic_round_bf16
from gloo_ranks import spawn

BF16_STEP_AT_1 = 2.0 ** -7  # spacing of bf16 values in [1, 2)


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    # Values strictly between two bf16 neighbours, of both signs and two magnitudes; 200k independent roundings each.
    values = torch.tensor([1.0 + 0.3 * BF16_STEP_AT_1, -(1.0 + 0.7 * BF16_STEP_AT_1), 3.0e-5 * (1 + 0.45 * 2 ** -7)])
    columns = 200_000
    x = values.unsqueeze(1).expand(-1, columns).contiguous()
    rounded = stochastic_round_bf16(x, key=123, global_rows=torch.arange(3))
    assert rounded.dtype == torch.bfloat16
    for i, v in enumerate(values):
        down = v.to(torch.bfloat16)  # x is not representable: RTN picks one neighbour...
        neighbours = torch.unique(rounded[i].float())
        assert neighbours.numel() == 2, neighbours  # ...stochastic rounding lands on exactly the two neighbours
        lo, hi = float(neighbours[0]), float(neighbours[1])
        assert lo < float(v) < hi and float(down) in (lo, hi)
        frac = (float(v) - lo) / (hi - lo)
        # Mean of Bernoulli(frac) roundings: within 5 standard errors of the value (a biased rounding of this
        # sample size would be off by ~(hi - lo) * |bias|, far outside).
        bound = 5 * (hi - lo) * (frac * (1 - frac) / columns) ** 0.5
        assert abs(float(rounded[i].double().mean()) - float(v)) < bound


def test_stochastic_rounding_is_reproducible_and_keyed_by_global_row():
    x = torch.randn(10, 256)
    rows = torch.arange(100, 110)
    first = stochastic_round_bf16(x, key=7, global_rows=rows)
    assert torch.equal(first, stochastic_round_bf16(x.clone(), key=7, global_rows=rows))
    assert not torch.equal(first, stochastic_round_bf16(x, key=8, global_rows=rows))
    # The same rows written in another chunking (as on another world size) round identically.
    assert torch.equal(first[4:], stochastic_round_bf16(x[4:], key=7, global_rows=rows[4:]))
    # Representable values are left exactly as they are.
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_bf16(exact, key=7, global_rows=rows), exact.to(torch.bfloat16))


def _small_update_run(dtype: torch.dtype, steps: int = 100) -> torch.Tensor:
    p = torch.nn.Parameter(torch.ones(64, 512, dtype=dtype))
    opt = SparseRowSGD([p], lr=1e-3, momentum=0.01, state_dtype="fp32")
    grad = torch.full((64, 512), 0.1, dtype=dtype)  # lr * grad ~ 1e-4, 1/20 of half a bf16 step below 1.0
    for _ in range(steps):
        p.grad = torch.sparse_coo_tensor(torch.arange(64).unsqueeze(0), grad, p.shape, check_invariants=False)
        opt.step()
    return p.detach().float()


def test_tiny_updates_survive_in_expectation():
    # Round to nearest would lose every step: 1 - 1e-4 rounds back to 1.0 in bf16.
    assert float(torch.tensor(1.0 - 1.01e-4).to(torch.bfloat16)) == 1.0
    exact = _small_update_run(torch.float32)
    assert float(exact.mean()) < 1.0 - 0.009  # ~100 updates of ~1.01e-4 each
    bf16 = _small_update_run(torch.bfloat16)
    # Each element is a sum of 100 unbiased roundings (error per step < one bf16 step of 2^-8 below 1.0).
    assert abs(float(bf16.mean()) - float(exact.mean())) < 2e-4


# ------------------------------------------------------------------------------------- module-level runs
DIM, CLASSES, GLOBAL_BATCH, STEPS = 32, 29, 8, 3


def _build(center_dtype: str = "bf16", seed: int = 5) -> tuple[PartialFC, torch.optim.Optimizer]:
    pfc = PartialFC(build_margin(MarginConfig(type="arcface")), DIM, CLASSES, sample_rate=1.0, seed=seed,
                    center_dtype=center_dtype)
    opt = build_partial_fc_optimizer(pfc.parameters(), "sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
    pfc.attach_optimizer(opt)
    return pfc, opt


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(GLOBAL_BATCH, DIM, generator=g) * 4, torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)


def _train(pfc: PartialFC, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world_size: int = 1):
    losses = []
    for step in steps:
        emb, labels = _global_batch(step)
        per_rank = GLOBAL_BATCH // world_size
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        opt.zero_grad(set_to_none=True)
        loss = pfc(emb[local].clone().requires_grad_(), labels[local])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _two_rank_worker(rank: int, world_size: int, expected_path: str) -> None:
    expected = torch.load(expected_path)
    pfc, opt = _build()
    assert pfc.weight.dtype == torch.bfloat16
    losses = _train(pfc, opt, range(STEPS), rank, world_size)
    torch.testing.assert_close(torch.tensor(losses), expected["losses"], rtol=1e-5, atol=0.0)
    mine = expected["weight"][pfc.class_start:pfc.class_start + pfc.num_local]
    actual = pfc.weight.detach()
    # Keyed by global row, the rounding is the one the single process made; only an fp32 update that differs in
    # its last bits (the loss sums over ranks in another order) can flip a rounding, by one bf16 step.
    assert float((actual == mine).float().mean()) > 0.99
    torch.testing.assert_close(actual.float(), mine.float(), rtol=2 ** -7, atol=1e-6)


def test_two_gloo_ranks_match_one_process(tmp_path):
    pfc, opt = _build()
    losses = _train(pfc, opt, range(STEPS))
    path = tmp_path / "expected.pt"
    torch.save({"losses": torch.tensor(losses), "weight": pfc.weight.detach().clone()}, path)
    spawn(_two_rank_worker, 2, str(path))


def test_resumed_run_rounds_the_same(tmp_path):
    pfc, opt = _build()
    _train(pfc, opt, range(1))
    save_partial_fc(pfc, opt, tmp_path)
    _train(pfc, opt, range(1, 3))
    resumed, resumed_opt = _build(seed=5)
    load_partial_fc(resumed, resumed_opt, tmp_path)
    _train(resumed, resumed_opt, range(1, 3))
    assert torch.equal(resumed.weight, pfc.weight)  # bit for bit: same (seed, step, row) keys
    assert resumed.weight.dtype == torch.bfloat16


def test_checkpoint_keeps_dtype_and_logs_conversions(tmp_path, caplog):
    bf16, bf16_opt = _build("bf16")
    _train(bf16, bf16_opt, range(2))
    save_partial_fc(bf16, bf16_opt, tmp_path / "bf16")
    assert '"dtype": "bfloat16"' in (tmp_path / "bf16" / "partial_fc.json").read_text()
    with caplog.at_level(logging.WARNING, logger="facescale"):
        same, same_opt = _build("bf16")
        load_partial_fc(same, same_opt, tmp_path / "bf16")
        assert torch.equal(same.weight, bf16.weight) and not caplog.records  # same dtype: nothing to say
        wide, wide_opt = _build("fp32")
        load_partial_fc(wide, wide_opt, tmp_path / "bf16")
    assert wide.weight.dtype == torch.float32 and torch.equal(wide.weight, bf16.weight.float())  # exact widening
    assert any("bfloat16 centers; converted to float32" in r.getMessage() for r in caplog.records)
    caplog.clear()
    fp32, fp32_opt = _build("fp32")
    _train(fp32, fp32_opt, range(2))
    save_partial_fc(fp32, fp32_opt, tmp_path / "fp32")
    with caplog.at_level(logging.WARNING, logger="facescale"):
        narrow, narrow_opt = _build("bf16")
        load_partial_fc(narrow, narrow_opt, tmp_path / "fp32")
    assert narrow.weight.dtype == torch.bfloat16 and torch.equal(narrow.weight, fp32.weight.to(torch.bfloat16))
    assert any("float32 centers; converted to bfloat16" in r.getMessage() and "rounded to nearest" in r.getMessage()
               for r in caplog.records)
    # The optimizer state travels with the conversion and training continues.
    _train(narrow, narrow_opt, range(2, 3))


def test_config_and_module_errors():
    with pytest.raises(ValidationError, match="center_dtype: bf16 needs the sparse row optimizers"):
        ClassifierConfig(type="partial_fc", center_dtype="bf16", dense_state=True)
    with pytest.raises(ValidationError, match="center_dtype apply only to classifier type 'partial_fc'"):
        ClassifierConfig(type="linear", center_dtype="bf16")
    with pytest.raises(ValidationError, match="center_dtype"):
        ClassifierConfig(type="partial_fc", center_dtype="fp16")
    assert ClassifierConfig(type="partial_fc", center_dtype="bf16").center_dtype == "bf16"
    margin = build_margin(MarginConfig())
    with pytest.raises(ValueError, match="dense v2 baseline"):
        PartialFC(margin, DIM, CLASSES, center_dtype="bf16", sparse_grad=False)
    with pytest.raises(ValueError, match="center_dtype must be one of"):
        PartialFC(margin, DIM, CLASSES, center_dtype="fp16")
    pfc = PartialFC(margin, DIM, CLASSES, center_dtype="bf16")
    with pytest.raises(ValueError, match="SGD would round every update to nearest"):
        pfc.attach_optimizer(torch.optim.SGD(pfc.parameters(), lr=0.1))
