"""Partial FC on real gloo process groups (2 and 3 ranks on 127.0.0.1) against single-process references.

Every multi-rank test spawns fresh processes; assertions run inside the ranks (a failure on any rank fails the
test with that rank's traceback). References are computed in the ranks too, from the same seeded global data.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from facescale.checkpoint import load_partial_fc, save_partial_fc
from facescale.heads.config import MarginConfig, build_margin
from facescale.parallel import PartialFC, SparseRowAdamW, SparseRowSGD
from facescale.parallel.partial_fc import init_centers
from gloo_ranks import spawn

MARGINS = ["arcface", "cosface", "magface", "curricularface"]


def _global_batch(seed: int, num_rows: int, dim: int, num_classes: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # norms around 15 * sqrt(dim) ~ 60: inside MagFace's [l_a, u_a] = [10, 110], so its margin has a gradient
    emb = torch.randn(num_rows, dim, generator=g, dtype=dtype) * 15
    labels = torch.randint(0, num_classes, (num_rows,), generator=g)
    return emb, labels


def _reference_loss(margin, emb, labels, centers, needs_norms):
    cos = F.linear(F.normalize(emb), F.normalize(centers)).clamp(-1, 1)
    kwargs = {"norms": emb.norm(dim=1)} if needs_norms else {}
    loss = F.cross_entropy(margin(cos, labels, **kwargs), labels)
    if needs_norms:
        loss = loss + margin.regularizer(kwargs["norms"]).mean()
    return loss


def _close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=0.0)


# ------------------------------------------------------------------------- sample_rate 1.0 == full softmax
def _equivalence_worker(rank: int, world_size: int) -> None:
    dim, num_classes, local_batch = 16, 37, 4
    full_centers = init_centers(num_classes, 0, num_classes, dim, seed=3).double()
    for name in MARGINS:
        pfc = PartialFC(build_margin(MarginConfig(type=name)), dim, num_classes, seed=3).double()
        ref_margin = build_margin(MarginConfig(type=name)).double()
        start, end = pfc.class_start, pfc.class_start + pfc.num_local
        assert torch.equal(pfc.weight.detach(), full_centers[start:end]), "initial centers depend on world size"
        ref_centers = full_centers.clone().requires_grad_()
        for step in range(2):  # two steps: CurricularFace's t must evolve identically
            emb, labels = _global_batch(100 + step, local_batch * world_size, dim, num_classes)
            local = slice(rank * local_batch, (rank + 1) * local_batch)
            local_emb = emb[local].clone().requires_grad_()
            pfc.weight.grad = None
            loss = pfc(local_emb, labels[local])
            loss.backward()
            ref_emb = emb.clone().requires_grad_()
            ref_centers.grad = None
            ref = _reference_loss(ref_margin, ref_emb, labels, ref_centers, name == "magface")
            ref.backward()
            _close(loss.detach(), ref.detach())
            # the module returns world_size * d(loss)/d(local embeddings): DDP's average makes it exact
            _close(local_emb.grad / world_size, ref_emb.grad[local])
            _close(pfc.weight.grad, ref_centers.grad[start:end])
        if name == "curricularface":
            t = pfc.margin_loss.t.reshape(1)
            gathered = [torch.zeros_like(t) for _ in range(world_size)]
            dist.all_gather(gathered, t)
            assert all(torch.equal(x, t) for x in gathered), "t differs between ranks"
            _close(pfc.margin_loss.t, ref_margin.t)

    # fp32 end to end, relative error of whole tensors
    pfc = PartialFC(build_margin(MarginConfig(type="arcface")), dim, num_classes, seed=3)
    emb, labels = _global_batch(7, local_batch * world_size, dim, num_classes, torch.float32)
    local = slice(rank * local_batch, (rank + 1) * local_batch)
    local_emb = emb[local].clone().requires_grad_()
    loss = pfc(local_emb, labels[local])
    loss.backward()
    ref_centers = full_centers.float().requires_grad_()
    ref_emb = emb.clone().requires_grad_()
    ref = _reference_loss(build_margin(MarginConfig(type="arcface")), ref_emb, labels, ref_centers, False)
    ref.backward()
    start, end = pfc.class_start, pfc.class_start + pfc.num_local
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    pairs = ((local_emb.grad / world_size, ref_emb.grad[local]), (pfc.weight.grad, ref_centers.grad[start:end]))
    for got, want in pairs:
        assert (got - want).norm() <= 1e-5 * want.norm()

    # a DDP-wrapped backbone gets the full-batch gradient
    torch.manual_seed(0)
    backbone = torch.nn.Linear(8, dim).double()
    ref_backbone = torch.nn.Linear(8, dim).double()
    ref_backbone.load_state_dict(backbone.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(backbone)
    pfc = PartialFC(build_margin(MarginConfig(type="arcface")), dim, num_classes, seed=3).double()
    x = torch.randn(local_batch * world_size, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, labels = _global_batch(8, local_batch * world_size, dim, num_classes)
    local = slice(rank * local_batch, (rank + 1) * local_batch)
    pfc(ddp(x[local] * 10), labels[local]).backward()
    _reference_loss(build_margin(MarginConfig(type="arcface")), ref_backbone(x * 10), labels, full_centers,
                    False).backward()
    _close(backbone.weight.grad, ref_backbone.weight.grad)
    _close(backbone.bias.grad, ref_backbone.bias.grad)


@pytest.mark.parametrize("world_size", [2, 3])
def test_full_softmax_equivalence(world_size):
    spawn(_equivalence_worker, world_size)


# ------------------------------------------------------------------------------------ sample_rate < 1
def _sampling_worker(rank: int, world_size: int) -> None:
    dim, num_classes, local_batch, rate = 16, 40, 4, 0.3
    margin = build_margin(MarginConfig(type="arcface"))
    pfc = PartialFC(margin, dim, num_classes, sample_rate=rate, seed=11).double()
    assert pfc.num_sample == int(rate * pfc.num_local) == 6
    full_centers = init_centers(num_classes, 0, num_classes, dim, seed=11).double()
    local = slice(rank * local_batch, (rank + 1) * local_batch)
    batches = [_global_batch(200 + i, local_batch * world_size, dim, num_classes) for i in range(3)]
    # a batch whose 8 labels are all in rank 0's block: more positives than num_sample there
    batches.append((batches[0][0], torch.arange(0, 16, 2)))
    history = []
    for emb, labels in batches:
        local_emb = emb[local].clone().requires_grad_()
        pfc.weight.grad = None
        loss = pfc(local_emb, labels[local])
        loss.backward()
        rows = pfc.last_sampled_rows
        history.append(rows.clone())
        classes = pfc.class_start + rows
        in_block = labels[(labels >= pfc.class_start) & (labels < pfc.class_start + pfc.num_local)]
        assert set(in_block.tolist()) <= set(classes.tolist()), "a positive class was not sampled"
        assert rows.numel() == max(pfc.num_sample, in_block.unique().numel())
        assert torch.equal(rows, rows.unique()), "sampled rows must be sorted and unique"
        # reference: full softmax over the union of every rank's sampled centers
        gathered = [None] * world_size
        dist.all_gather_object(gathered, classes)
        sampled = torch.cat(gathered)
        ref_centers = full_centers[sampled].clone().requires_grad_()
        ref_emb = emb.clone().requires_grad_()
        ref_labels = torch.searchsorted(sampled, labels)
        ref = _reference_loss(build_margin(MarginConfig(type="arcface")).double(), ref_emb, ref_labels,
                              ref_centers, False)
        ref.backward()
        _close(loss.detach(), ref.detach())
        _close(local_emb.grad / world_size, ref_emb.grad[local])
        grad = pfc.weight.grad
        assert grad.is_sparse and torch.equal(grad._indices()[0], rows)
        offset = sum(g.numel() for g in gathered[:rank])
        _close(grad._values(), ref_centers.grad[offset:offset + rows.numel()])
    assert history[-1].numel() == 8 and rank != 0 or history[-1].numel() >= 6

    # restart: a new module with the saved state samples what the uninterrupted one sampled
    replay = PartialFC(build_margin(MarginConfig(type="arcface")), dim, num_classes, sample_rate=rate, seed=11)
    state = pfc.state_dict()
    state["_extra_state"] = {"sampler_step": 2}
    replay.load_state_dict(state)
    emb, labels = batches[2]
    replay(emb[local].float(), labels[local])
    assert torch.equal(replay.last_sampled_rows, history[2])
    assert replay.sampler_step == 3


def _sparse_state_worker(rank: int, world_size: int) -> None:
    dim, num_classes, local_batch = 64, 60, 2
    for make_opt in (lambda p: SparseRowSGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, state_dtype="bf16"),
                     lambda p: SparseRowSGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, state_dtype="int8"),
                     lambda p: SparseRowAdamW(p, lr=1e-2, weight_decay=0.05)):
        pfc = PartialFC(build_margin(MarginConfig(type="cosface")), dim, num_classes, sample_rate=0.2, seed=1)
        opt = make_opt(pfc.parameters())
        for step in range(4):
            emb, labels = _global_batch(300 + step, local_batch * world_size, dim, num_classes, torch.float32)
            weight_before = pfc.weight.detach().clone()
            state_before = {k: v.clone() for k, v in opt.state[pfc.weight].items()}
            opt.zero_grad()
            pfc(emb[rank * local_batch:(rank + 1) * local_batch], labels[rank * local_batch:(rank + 1) * local_batch]
                ).backward()
            opt.step()
            untouched = torch.ones(pfc.num_local, dtype=torch.bool)
            untouched[pfc.last_sampled_rows] = False
            assert untouched.sum() > 0
            assert torch.equal(pfc.weight.detach()[untouched], weight_before[untouched])
            assert not torch.equal(pfc.weight.detach()[~untouched], weight_before[~untouched])
            for key, value in opt.state[pfc.weight].items():
                if key in state_before and value.dim():
                    assert torch.equal(value[untouched], state_before[key][untouched]), key


def _bad_input_worker(rank: int, world_size: int) -> None:
    pfc = PartialFC(build_margin(MarginConfig(type="arcface")), 8, 40)
    labels = torch.tensor([1, 2, 3]) if rank == 0 else torch.tensor([4, 40, 5])
    with pytest.raises(ValueError, match=r"label 40 .*num_classes=40"):
        pfc(torch.randn(3, 8), labels)
    with pytest.raises(ValueError, match=r"label -1 .*num_classes=40"):
        pfc(torch.randn(3, 8), torch.tensor([-1, 2, 3]))
    size = 4 if rank == 0 else 3
    with pytest.raises(ValueError, match=r"same batch size on every rank.*\[4, 3\]"):
        pfc(torch.randn(size, 8), torch.zeros(size, dtype=torch.long))
    # the group is still usable after the refusals
    assert torch.isfinite(pfc(torch.randn(3, 8), torch.tensor([1, 2, 3])))


def _sampling_suite(rank: int, world_size: int) -> None:
    _sampling_worker(rank, world_size)
    _sparse_state_worker(rank, world_size)
    _bad_input_worker(rank, world_size)


def test_sampling_sparse_state_and_bad_input():
    spawn(_sampling_suite, 2)


# ------------------------------------------------------------------------------ reshardable checkpoints
CKPT_DIM, CKPT_CLASSES, CKPT_BATCH = 32, 53, 12  # global batch divisible by 1, 2 and 3 ranks


def _ckpt_pairs():
    """Two setups: bf16-momentum SGD with CurricularFace (sample_rate 1), int8 AdamW with ArcFace (0.5)."""
    sgd_pfc = PartialFC(build_margin(MarginConfig(type="curricularface")), CKPT_DIM, CKPT_CLASSES, seed=5)
    adam_pfc = PartialFC(build_margin(MarginConfig(type="arcface")), CKPT_DIM, CKPT_CLASSES, sample_rate=0.5, seed=5)
    return {"sgd": (sgd_pfc, SparseRowSGD(sgd_pfc.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4,
                                                  state_dtype="bf16")),
            "adamw": (adam_pfc, SparseRowAdamW(adam_pfc.parameters(), lr=0.01, weight_decay=0.05))}


def _ckpt_step(pfc, opt, step: int, rank: int, world_size: int) -> float:
    emb, labels = _global_batch(400 + step, CKPT_BATCH, CKPT_DIM, CKPT_CLASSES, torch.float32)
    local = slice(rank * CKPT_BATCH // world_size, (rank + 1) * CKPT_BATCH // world_size)
    opt.zero_grad()
    loss = pfc(emb[local], labels[local])
    loss.backward()
    opt.step()
    return loss.item()


def _gather_full(pfc, opt) -> dict[str, torch.Tensor]:
    mine = {"weight": pfc.weight.detach().clone(), **{k: v.clone() for k, v in opt.state[pfc.weight].items()}}
    if not dist.is_initialized():
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    scalars = {k for k, v in mine.items() if not v.dim()}
    assert all(torch.equal(p[k], mine[k]) for p in parts for k in scalars), "scalar state differs between ranks"
    return {k: mine[k] if k in scalars else torch.cat([p[k] for p in parts]) for k in mine}


def _ckpt_save_worker(rank: int, world_size: int, directory: str) -> None:
    for name, (pfc, opt) in _ckpt_pairs().items():
        for step in range(3):
            _ckpt_step(pfc, opt, step, rank, world_size)
        save_partial_fc(pfc, opt, os.path.join(directory, name), rank)
        expected = _gather_full(pfc, opt)
        t = pfc.margin_loss.t.clone() if name == "sgd" else None
        losses = [_ckpt_step(pfc, opt, step, rank, world_size) for step in (3, 4)]
        if rank == 0:
            torch.save({"state": expected, "losses": losses, "t": t}, os.path.join(directory, f"{name}_expected.pt"))


def _ckpt_load_worker(rank: int, world_size: int, directory: str) -> None:
    for name, (pfc, opt) in _ckpt_pairs().items():
        load_partial_fc(pfc, opt, os.path.join(directory, name))
        expected = torch.load(os.path.join(directory, f"{name}_expected.pt"))
        got = _gather_full(pfc, opt)
        assert got.keys() == expected["state"].keys()
        for key, value in expected["state"].items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{name}: {key} differs"
        assert pfc.sampler_step == 3
        if name == "sgd":  # sample_rate 1: the next steps must give the uninterrupted run's losses
            assert torch.equal(pfc.margin_loss.t, expected["t"])
            losses = [_ckpt_step(pfc, opt, step, rank, world_size) for step in (3, 4)]
            for got_loss, want in zip(losses, expected["losses"]):
                assert abs(got_loss - want) <= 1e-5 * abs(want), (losses, expected["losses"])
    if world_size == 1:
        other = PartialFC(build_margin(MarginConfig(type="arcface")), CKPT_DIM, CKPT_CLASSES + 1)
        with pytest.raises(ValueError, match=rf"num_classes={CKPT_CLASSES}\b.*num_classes={CKPT_CLASSES + 1}"):
            load_partial_fc(other, None, os.path.join(directory, "sgd"))
        other = PartialFC(build_margin(MarginConfig(type="arcface")), 16, CKPT_CLASSES)
        with pytest.raises(ValueError, match=rf"embedding_size={CKPT_DIM}\b.*embedding_size=16"):
            load_partial_fc(other, None, os.path.join(directory, "sgd"))
        other = PartialFC(build_margin(MarginConfig(type="arcface")), CKPT_DIM, CKPT_CLASSES)
        with pytest.raises(ValueError, match=r"margin state \['t'\].*CombinedMarginLoss has \[\]"):
            load_partial_fc(other, None, os.path.join(directory, "sgd"))
        pfc = PartialFC(build_margin(MarginConfig(type="curricularface")), CKPT_DIM, CKPT_CLASSES)
        before = pfc.weight.detach().clone()
        wrong = SparseRowSGD(pfc.parameters(), lr=0.1, state_dtype="int8")
        with pytest.raises(ValueError, match="state does not match"):
            load_partial_fc(pfc, wrong, os.path.join(directory, "sgd"))
        assert torch.equal(pfc.weight.detach(), before), "a refused checkpoint must not change the module"


@pytest.fixture(scope="module")
def saved_on_two_ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pfc_ckpt")
    spawn(_ckpt_save_worker, 2, str(directory))
    manifest = (directory / "sgd" / "partial_fc.json").read_text()
    assert '"num_classes": 53' in manifest and '"sampler_step": 3' in manifest
    return directory


def test_checkpoint_from_2_ranks_loads_on_1(saved_on_two_ranks):
    _ckpt_load_worker(0, 1, str(saved_on_two_ranks))  # one rank: in this process, without a process group


def test_checkpoint_from_2_ranks_loads_on_3(saved_on_two_ranks):
    spawn(_ckpt_load_worker, 3, str(saved_on_two_ranks))


# ------------------------------------------------------------------- optimizers and errors in one process
def _dense_run(make_opt, steps=4):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(10, 128))
    opt = make_opt([param])
    for step in range(steps):
        param.grad = torch.randn(10, 128, generator=torch.Generator().manual_seed(step))
        opt.step()
    return param.detach()


def test_sparse_optimizers_match_torch_on_dense_gradients():
    ours = _dense_run(lambda p: SparseRowSGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3, state_dtype="fp32"))
    torch.testing.assert_close(ours, _dense_run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3)))
    ours = _dense_run(lambda p: SparseRowAdamW(p, lr=0.01, weight_decay=0.1, state_dtype="fp32",
                                               second_moment="full"))
    torch.testing.assert_close(ours, _dense_run(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)))
    # low-precision state stays close over a few steps
    bf16 = _dense_run(lambda p: SparseRowSGD(p, lr=0.1, momentum=0.9, state_dtype="bf16"))
    int8 = _dense_run(lambda p: SparseRowSGD(p, lr=0.1, momentum=0.9, state_dtype="int8"))
    exact = _dense_run(lambda p: SparseRowSGD(p, lr=0.1, momentum=0.9, state_dtype="fp32"))
    assert (bf16 - exact).abs().max() < 1e-2 and (int8 - exact).abs().max() < 2e-2


@pytest.mark.parametrize("name", ["sgd", "adamw-full", "adamw-row"])
def test_catch_up_equals_dense_optimizer_at_constant_lr(name):
    """Rows brought up to date before use (as PartialFC does) follow a dense optimizer fed gradients that are zero
    outside the sampled rows: torch's SGD / AdamW, or (row-wise v has no torch twin) the same optimizer on dense
    gradients, which updates every row every step."""
    torch.manual_seed(0)
    start = torch.randn(50, 64)
    sparse_param, dense_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    if name == "sgd":
        sparse = SparseRowSGD([sparse_param], lr=0.1, momentum=0.9, weight_decay=5e-3, state_dtype="fp32")
        dense = torch.optim.SGD([dense_param], lr=0.1, momentum=0.9, weight_decay=5e-3)
    elif name == "adamw-full":  # the replay neglects eps against sqrt(v): make it negligible here
        sparse = SparseRowAdamW([sparse_param], lr=0.01, eps=1e-12, weight_decay=0.1, state_dtype="fp32",
                                second_moment="full")
        dense = torch.optim.AdamW([dense_param], lr=0.01, eps=1e-12, weight_decay=0.1)
    else:
        sparse = SparseRowAdamW([sparse_param], lr=0.01, weight_decay=0.1, state_dtype="fp32")
        dense = SparseRowAdamW([dense_param], lr=0.01, weight_decay=0.1, state_dtype="fp32")
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        rows = torch.randperm(50, generator=g)[:5].sort().values
        values = torch.randn(5, 64, generator=g)
        sparse.catch_up_rows(sparse_param, rows)
        torch.testing.assert_close(sparse_param.detach()[rows], dense_param.detach()[rows])
        sparse_param.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (50, 64), check_invariants=True)
        dense_param.grad = torch.zeros(50, 64).index_copy_(0, rows, values)
        sparse.step()
        dense.step()
    sparse.catch_up_rows(sparse_param)
    torch.testing.assert_close(sparse_param.detach(), dense_param.detach())


def test_optimizer_state_dict_keeps_storage_dtype_and_works_with_schedulers():
    param = torch.nn.Parameter(torch.randn(6, 64))
    opt = SparseRowSGD([param], lr=0.1, state_dtype="int8")
    param.grad = torch.randn(6, 64).to_sparse()
    opt.step()
    state = opt.state_dict()
    again = SparseRowSGD([param], lr=0.1, state_dtype="int8")
    again.load_state_dict(state)
    assert again.state[param]["momentum_q"].dtype == torch.int8
    assert torch.equal(again.state[param]["momentum_q"], opt.state[param]["momentum_q"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(again, lambda step: 0.5)
    again.step()
    scheduler.step()
    assert again.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="state does not match"):
        SparseRowSGD([param], lr=0.1, state_dtype="bf16").load_state_dict(state)


def test_single_process_errors():
    pfc = PartialFC(build_margin(MarginConfig(type="arcface")), 8, 10)
    with pytest.raises(ValueError, match=r"label 10 \(on rank 0\) is outside \[0, num_classes=10\)"):
        pfc(torch.randn(2, 8), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"embeddings must be \[batch, 8\]"):
        pfc(torch.randn(2, 7), torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(build_margin(MarginConfig(type="arcface")), 8, 10, sample_rate=0.0)


@pytest.mark.parametrize("center_dtype", ["fp32", "bf16"])
def test_backward_computes_only_the_gradients_asked_for(center_dtype):
    """Frozen centers get no gradient and the embeddings the same one; embeddings without a gradient leave the
    centers' gradient as it was (``ShardCosine.backward`` skips the products nobody needs)."""
    def run(freeze_centers: bool, embeddings_grad: bool):
        pfc = PartialFC(build_margin(MarginConfig(type="arcface")), 16, 40, sample_rate=0.5, seed=1,
                        center_dtype=center_dtype)
        pfc.weight.requires_grad_(not freeze_centers)
        g = torch.Generator().manual_seed(2)
        emb = torch.randn(6, 16, generator=g).requires_grad_(embeddings_grad)
        pfc(emb, torch.randint(0, 40, (6,), generator=g)).backward()
        return emb.grad, pfc.weight.grad

    emb_grad, center_grad = run(False, True)
    assert emb_grad is not None and center_grad is not None and center_grad._nnz() == 20
    frozen_emb_grad, frozen_center_grad = run(True, True)
    assert frozen_center_grad is None and torch.equal(frozen_emb_grad, emb_grad)
    _, alone = run(False, False)
    assert torch.equal(alone.to_dense(), center_grad.to_dense())


# ------------------------------------------------------------------------------------------------ planner
def test_parse_count():
    from facescale.parallel.plan import parse_count

    assert parse_count("10M") == 10_000_000
    assert parse_count("100k") == 100_000
    assert parse_count("1.5M") == 1_500_000
    assert parse_count("5000000") == 5_000_000
    for bad in ("ten", "1.5", "-3", "0"):
        with pytest.raises(ValueError, match="count"):
            parse_count(bad)


def test_plan_components_and_cli(capsys):
    import argparse

    from facescale.parallel.plan import add_plan_arguments, estimate, run_plan

    report = estimate(10_000_000, 64, 128, 0.1, 512)
    assert report.num_local == 156_250 and report.num_sampled == 15_625 and report.global_batch == 8192
    assert report.centers_bytes == 156_250 * 2048
    assert report.bytes_per_identity <= 3 * 1024  # the classifier budget, optimizer state included
    assert report.comm_bytes["all_gather embeddings"] == 63 * 128 * 512 * 4
    dense = estimate(10_000_000, 64, 128, 0.1, 512, dense=True)
    assert dense.peak_bytes > report.peak_bytes and dense.bytes_per_identity == 2 * 2048
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args("--identities 10M --world-size 64 --batch-size 128 --sample-rate 0.1 --embedding 512"
                             .split())
    assert run_plan(args) == 0
    out = capsys.readouterr().out
    assert "10,000,000 identities on 64 ranks" in out and "all_gather embeddings" in out and "peak" in out
    assert run_plan(parser.parse_args("--identities 10M --world-size 2 --batch-size 128 --memory-gib 1".split())) == 1
