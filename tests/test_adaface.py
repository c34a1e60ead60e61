"""AdaFace: the formulas by hand, global norm statistics on 2 gloo ranks (Partial FC and the linear classifier),
the config keys, and the EMA through a checkpoint saved on 2 ranks and loaded on 1."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import ValidationError

from facescale.checkpoint import load_partial_fc, save_partial_fc
from facescale.heads import AdaFaceLoss, NormalizedLinearClassifier
from facescale.heads.config import MarginConfig, build_margin
from facescale.parallel import PartialFC, SparseRowSGD
from facescale.parallel.dist import all_gather_rows, all_reduce_
from facescale.parallel.partial_fc import init_centers
from gloo_ranks import spawn


def _hand_adaface(cos, labels, norms, mean, std, s, m, h):
    """numpy: AdaFace logits with the EMA (mean, std) already updated."""
    eps = 1e-3
    out = np.clip(cos, -1 + eps, 1 - eps).copy()
    a = np.clip(norms, 0.001, 100.0)
    z = np.clip(h * (a - mean) / (std + eps), -1.0, 1.0)
    for i, y in enumerate(labels):
        theta = math.acos(out[i, y])
        theta_m = min(max(theta - m * z[i], eps), math.pi - eps)
        out[i, y] = math.cos(theta_m) - (m + m * z[i])
    return out * s


def test_formulas_by_hand_and_ema_order():
    g = torch.Generator().manual_seed(0)
    cos = (torch.rand(5, 7, generator=g, dtype=torch.float64) * 2 - 1)
    cos[0, 2] = 1.0  # clamped to 1 - 1e-3
    labels = torch.tensor([2, 0, 6, 3, 3])
    norms = torch.tensor([150.0, 12.0, 20.0, 31.0, 0.0001], dtype=torch.float64)  # 150 -> 100, 1e-4 -> 1e-3
    margin = AdaFaceLoss(s=64.0, m=0.4, h=0.333, t_alpha=1.0).double()
    got = margin(cos, labels, norms=norms.clone().requires_grad_())
    clipped = np.clip(norms.numpy(), 0.001, 100.0)
    mean, std = clipped.mean(), clipped.std(ddof=1)  # t_alpha = 1: the EMA is this batch (updated first)
    assert margin.batch_mean.item() == pytest.approx(mean, rel=1e-6)
    assert margin.batch_std.item() == pytest.approx(std, rel=1e-6)
    want = _hand_adaface(cos.numpy(), labels.tolist(), norms.numpy(), mean, std, 64.0, 0.4, 0.333)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-9, atol=1e-9)
    # the scaler saturates: row 0 (norm 100) gets z = +1 -> no angular margin pull-back beyond m, g_add = 2m
    z0 = min(1.0, 0.333 * (100.0 - mean) / (std + 1e-3))
    assert z0 > 0.5

    # t_alpha = 0.5, second batch: EMA = 0.5 * batch + 0.5 * previous, then standardise with it
    margin2 = AdaFaceLoss(s=32.0, m=0.5, h=0.5, t_alpha=0.5).double()
    n1 = torch.tensor([18.0, 22.0, 30.0], dtype=torch.float64)
    n2 = torch.tensor([40.0, 10.0, 25.0], dtype=torch.float64)
    c = cos[:3, :4].clone()
    lab = torch.tensor([1, 2, 3])
    margin2(c, lab, norms=n1)
    out = margin2(c, lab, norms=n2)
    mu = 0.5 * n2.numpy().mean() + 0.5 * (0.5 * n1.numpy().mean() + 0.5 * 20.0)
    sd = 0.5 * n2.numpy().std(ddof=1) + 0.5 * (0.5 * n1.numpy().std(ddof=1) + 0.5 * 100.0)
    np.testing.assert_allclose(out.numpy(), _hand_adaface(c.numpy(), lab.tolist(), n2.numpy(), mu, sd, 32.0, 0.5, 0.5),
                               rtol=1e-9, atol=1e-9)
    # eval mode reads the EMA and leaves it alone
    margin2.eval()
    before = (margin2.batch_mean.clone(), margin2.batch_std.clone())
    margin2(c, lab, norms=n1)
    assert torch.equal(margin2.batch_mean, before[0]) and torch.equal(margin2.batch_std, before[1])
    # the norms get no gradient through the margin (detached scaler), the cosines do
    norms_leaf = n1.clone().requires_grad_()
    cos_leaf = c.clone().requires_grad_()
    F.cross_entropy(AdaFaceLoss()(cos_leaf.double(), lab, norms=norms_leaf), lab).backward()
    assert norms_leaf.grad is None and cos_leaf.grad.abs().sum() > 0


def test_config_keys_and_build():
    margin = build_margin(MarginConfig(type="adaface", s=32, m=0.3, h=0.5, t_alpha=0.1))
    assert isinstance(margin, AdaFaceLoss) and (margin.s, margin.m, margin.h, margin.t_alpha) == (32, 0.3, 0.5, 0.1)
    for key, value in (("m", 0.5), ("h", 0.2), ("t_alpha", 0.5)):
        with pytest.raises(ValidationError, match=rf"margin key '{key}' does not apply to margin type 'arcface'"):
            MarginConfig(type="arcface", **{key: value})
    for key, value in (("m2", 0.5), ("m3", 0.1), ("t_momentum", 0.5), ("l_a", 5.0), ("straight_through", True)):
        with pytest.raises(ValidationError, match=rf"margin key '{key}' does not apply to margin type 'adaface'"):
            MarginConfig(type="adaface", **{key: value})
    MarginConfig.model_validate(MarginConfig(type="adaface").model_dump())  # a dumped config loads back


# ------------------------------------------------------------------ 2 ranks == 1 rank on the same global batch
DIM, CLASSES, LOCAL_BATCH = 16, 23, 6


def _batch(step: int, rows: int):
    g = torch.Generator().manual_seed(50 + step)
    # norms spread over ~[5, 60]: the scaler is not saturated everywhere
    emb = torch.randn(rows, DIM, generator=g, dtype=torch.float64) * torch.linspace(1, 15, rows, dtype=torch.float64)[
        torch.randperm(rows, generator=g)].unsqueeze(1)
    return emb, torch.randint(0, CLASSES, (rows,), generator=g)


def _two_rank_worker(rank: int, world_size: int) -> None:
    cfg = MarginConfig(type="adaface", t_alpha=0.3)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    # Partial FC against a one-process full softmax over the global batch
    pfc = PartialFC(build_margin(cfg), DIM, CLASSES, seed=2).double()
    ref_margin = build_margin(cfg).double()
    ref_centers = init_centers(CLASSES, 0, CLASSES, DIM, seed=2).double().requires_grad_()
    start, end = pfc.class_start, pfc.class_start + pfc.num_local
    for step in range(3):
        emb, labels = _batch(step, LOCAL_BATCH * world_size)
        local_emb = emb[local].clone().requires_grad_()
        pfc.weight.grad = None
        loss = pfc(local_emb, labels[local])
        loss.backward()
        ref_emb = emb.clone().requires_grad_()
        ref_centers.grad = None
        cos = F.linear(F.normalize(ref_emb), F.normalize(ref_centers)).clamp(-1, 1)
        ref = F.cross_entropy(ref_margin(cos, labels, norms=ref_emb.norm(dim=1)), labels)
        ref.backward()
        torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(local_emb.grad / world_size, ref_emb.grad[local], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(pfc.weight.grad, ref_centers.grad[start:end], rtol=1e-5, atol=1e-12)
        for name in ("batch_mean", "batch_std"):
            torch.testing.assert_close(getattr(pfc.margin_loss, name), getattr(ref_margin, name), rtol=1e-12, atol=0)

    # linear classifier with the builder's collectives: the same EMA as one process on the global batch, and the
    # DDP average of the per-rank losses is the one-process loss
    head = NormalizedLinearClassifier(build_margin(cfg), DIM, CLASSES,
                                      gather_rows=lambda t: all_gather_rows(t, None),
                                      global_sum=lambda t: all_reduce_(t.clone(), dist.ReduceOp.SUM, None)).double()
    torch.manual_seed(0)
    weight = torch.randn(CLASSES, DIM, dtype=torch.float64)
    head.weight.data.copy_(weight)
    single = NormalizedLinearClassifier(build_margin(cfg), DIM, CLASSES).double()
    single.weight.data.copy_(weight)
    for step in range(3):
        emb, labels = _batch(10 + step, LOCAL_BATCH * world_size)
        loss = head(emb[local], labels[local]).detach()
        mean_loss = all_reduce_(loss.clone(), dist.ReduceOp.SUM, None) / world_size
        want = single(emb, labels).detach()
        torch.testing.assert_close(mean_loss, want, rtol=1e-6, atol=0)  # the head takes the CE in fp32
        for name in ("batch_mean", "batch_std"):
            torch.testing.assert_close(getattr(head.margin_loss, name), getattr(single.margin_loss, name),
                                       rtol=1e-12, atol=0)
    assert head.margin_loss.batch_mean.item() != 20.0


def _two_rank_suite(rank: int, world_size: int, directory: str) -> None:
    _two_rank_worker(rank, world_size)
    _save_worker(rank, world_size, directory)


@pytest.fixture(scope="module")
def saved_on_two_ranks(tmp_path_factory):
    """One spawn of 2 gloo ranks: the 1-rank equivalence checks, then a checkpoint of an AdaFace Partial FC."""
    directory = tmp_path_factory.mktemp("adaface_ckpt")
    spawn(_two_rank_suite, 2, str(directory))
    return directory


def test_two_ranks_match_one_rank(saved_on_two_ranks):
    assert (saved_on_two_ranks / "partial_fc.json").is_file()  # the assertions ran in the ranks


# ------------------------------------------------------------------------------ EMA through a checkpoint
def _save_worker(rank: int, world_size: int, directory: str) -> None:
    pfc = PartialFC(build_margin(MarginConfig(type="adaface", t_alpha=0.5)), DIM, CLASSES, seed=4)
    opt = SparseRowSGD(pfc.parameters(), lr=0.1, momentum=0.9, state_dtype="fp32")
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for step in range(2):
        emb, labels = _batch(20 + step, LOCAL_BATCH * world_size)
        opt.zero_grad()
        pfc(emb[local].float(), labels[local]).backward()
        opt.step()
    save_partial_fc(pfc, opt, directory, rank)
    saved = {"mean": pfc.margin_loss.batch_mean.clone(), "std": pfc.margin_loss.batch_std.clone()}
    emb, labels = _batch(22, LOCAL_BATCH * world_size)
    next_loss = pfc(emb[local].float(), labels[local]).item()
    if rank == 0:
        torch.save({**saved, "next_loss": next_loss}, os.path.join(directory, "expected.pt"))


def test_ema_survives_checkpoint_on_another_world_size(saved_on_two_ranks, tmp_path):
    expected = torch.load(saved_on_two_ranks / "expected.pt")
    pfc = PartialFC(build_margin(MarginConfig(type="adaface", t_alpha=0.5)), DIM, CLASSES, seed=4)
    opt = SparseRowSGD(pfc.parameters(), lr=0.1, momentum=0.9, state_dtype="fp32")
    assert pfc.margin_loss.batch_mean.item() == 20.0
    load_partial_fc(pfc, opt, saved_on_two_ranks)
    assert torch.equal(pfc.margin_loss.batch_mean, expected["mean"])
    assert torch.equal(pfc.margin_loss.batch_std, expected["std"])
    assert expected["mean"].item() != 20.0 and expected["std"].item() != 100.0
    emb, labels = _batch(22, LOCAL_BATCH * 2)
    assert pfc(emb.float(), labels).item() == pytest.approx(expected["next_loss"], rel=1e-5)

    # the linear classifier: the EMA is in its state dict (model.pt of the training checkpoint)
    head = NormalizedLinearClassifier(build_margin(MarginConfig(type="adaface")), DIM, CLASSES)
    head(emb.float(), labels)
    torch.save(head.state_dict(), tmp_path / "linear.pt")
    fresh = NormalizedLinearClassifier(build_margin(MarginConfig(type="adaface")), DIM, CLASSES)
    fresh.load_state_dict(torch.load(tmp_path / "linear.pt"))
    assert fresh.margin_loss.batch_mean.item() == head.margin_loss.batch_mean.item() != 20.0
    assert fresh.margin_loss.batch_std.item() == head.margin_loss.batch_std.item() != 100.0
