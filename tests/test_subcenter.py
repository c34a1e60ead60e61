"""Sub-center ArcFace: max-pooled cosines by hand, Partial FC with K=3 on 2 gloo ranks against a one-process
softmax, class-wise sampling, checkpoints saved on 2 ranks loaded on 1, and the cleaning step on a planted case."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import ValidationError

from facescale.checkpoint import load_partial_fc, save_partial_fc
from facescale.heads import CombinedMarginLoss, NormalizedLinearClassifier, SubCenters
from facescale.heads.config import ClassifierConfig, MarginConfig, build_margin
from facescale.parallel import PartialFC, SparseRowSGD
from facescale.parallel.partial_fc import init_centers
from facescale.parallel.plan import estimate, format_plan
from facescale.parallel.plan import main as plan_main
from gloo_ranks import spawn

K, DIM, CLASSES, LOCAL_BATCH = 3, 16, 29, 5


def test_max_over_subcenters_by_hand():
    g = torch.Generator().manual_seed(1)
    head = NormalizedLinearClassifier(CombinedMarginLoss(s=16.0, m1=1.0, m2=0.0, m3=0.35), 6, 4, subcenters=K)
    assert head.weight.shape == (4 * K, 6)
    emb, labels = torch.randn(5, 6, generator=g), torch.tensor([0, 3, 1, 3, 2])
    loss = head(emb, labels)
    e = emb.numpy() / np.linalg.norm(emb.numpy(), axis=1, keepdims=True)
    w = head.weight.detach().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = np.array([[max(float(e[i] @ w[c * K + k]) for k in range(K)) for c in range(4)] for i in range(5)])
    logits = cos.copy()
    logits[np.arange(5), labels.numpy()] -= 0.35
    logits *= 16.0
    want = np.mean([np.log(np.exp(row).sum()) - row[y] for row, y in zip(logits, labels.numpy())])
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # the hit counts of the batch: each sample's closest sub-center of its own class
    hits = np.zeros((4, K), dtype=np.int64)
    for i, y in enumerate(labels.tolist()):
        hits[y, int(np.argmax([e[i] @ w[y * K + k] for k in range(K)]))] += 1
    assert np.array_equal(head.subcenters.hits.numpy(), hits)
    head.eval()
    head(emb, labels)
    assert np.array_equal(head.subcenters.hits.numpy(), hits), "eval forwards must not count"


def test_config_and_plan(capsys):
    c = ClassifierConfig(type="partial_fc", subcenters=3, drop_non_dominant_after_epochs=2, drop_angle_deg=70)
    assert (c.subcenters, c.drop_non_dominant_after_epochs) == (3, 2)
    ClassifierConfig(subcenters=3, margin=MarginConfig(type="curricularface"))  # every margin type is supported
    with pytest.raises(ValidationError, match=r"classifier.drop_non_dominant_after_epochs needs classifier.subcenters"):
        ClassifierConfig(drop_non_dominant_after_epochs=2)
    with pytest.raises(ValidationError, match=r"classifier.drop_angle_deg applies only with"):
        ClassifierConfig(subcenters=3, drop_angle_deg=60)
    with pytest.raises(ValidationError):
        ClassifierConfig(subcenters=0)
    one, three = estimate(1_000_000, 8, 128, 0.1), estimate(1_000_000, 8, 128, 0.1, subcenters=3)
    assert three.centers_bytes == 3 * one.centers_bytes
    assert three.optimizer_state_bytes == 3 * one.optimizer_state_bytes
    assert three.peak_bytes > one.peak_bytes and three.num_local == one.num_local
    assert "3 sub-centers" in format_plan(three) and "sub-centers" not in format_plan(one)
    assert plan_main(["--identities", "1M", "--world-size", "8", "--batch-size", "128", "--sample-rate", "0.1",
                      "--subcenters", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["subcenters"] == 3 and report["centers_bytes"] == three.centers_bytes


def test_subcenters_refuse_bad_settings():
    with pytest.raises(ValueError, match="needs subcenters > 1"):
        PartialFC(CombinedMarginLoss(), 8, 10, drop_after_epochs=1)
    with pytest.raises(ValueError, match="needs subcenters > 1"):
        NormalizedLinearClassifier(CombinedMarginLoss(), 8, 10, drop_after_epochs=1)


# ------------------------------------------------------------------------------ Partial FC on 2 gloo ranks
def _batch(step: int, rows: int):
    g = torch.Generator().manual_seed(70 + step)
    return torch.randn(rows, DIM, generator=g, dtype=torch.float64) * 5, torch.randint(0, CLASSES, (rows,), generator=g)


def _reference(margin, emb, labels, centers):
    cos = F.linear(F.normalize(emb), F.normalize(centers)).clamp(-1, 1)
    pooled = cos.view(cos.shape[0], -1, K).max(dim=2).values
    return F.cross_entropy(margin(pooled, labels), labels)


def _planted_centers() -> torch.Tensor:
    """Unit sub-centers: class c's sub-center k points along axis (c + k) % DIM, scaled."""
    centers = torch.zeros(CLASSES * K, DIM, dtype=torch.float64)
    for c in range(CLASSES):
        for k in range(K):
            centers[c * K + k, (c + 3 * k) % DIM] = 1.0
    return centers


def _pfc_worker(rank: int, world_size: int, directory: str) -> None:
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    # sample_rate 1: the same loss and gradients as a one-process softmax over max-pooled cosines
    full = init_centers(CLASSES * K, 0, CLASSES * K, DIM, seed=9).double()
    pfc = PartialFC(build_margin(MarginConfig(type="arcface")), DIM, CLASSES, seed=9, subcenters=K).double()
    start, end = pfc.class_start * K, (pfc.class_start + pfc.num_local) * K
    assert torch.equal(pfc.weight.detach(), full[start:end]), "initial sub-centers depend on the world size"
    ref_centers = full.clone().requires_grad_()
    for step in range(2):
        emb, labels = _batch(step, LOCAL_BATCH * world_size)
        local_emb = emb[local].clone().requires_grad_()
        pfc.weight.grad = None
        loss = pfc(local_emb, labels[local])
        loss.backward()
        ref_emb = emb.clone().requires_grad_()
        ref_centers.grad = None
        ref = _reference(build_margin(MarginConfig(type="arcface")).double(), ref_emb, labels, ref_centers)
        ref.backward()
        torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(local_emb.grad / world_size, ref_emb.grad[local], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(pfc.weight.grad, ref_centers.grad[start:end], rtol=1e-5, atol=1e-12)

    # sampling picks classes and keeps their K rows together (sparse gradient, SGD, catch-up on those rows)
    pfc = PartialFC(build_margin(MarginConfig(type="cosface")), DIM, CLASSES, sample_rate=0.3, seed=9, subcenters=K)
    opt = SparseRowSGD(pfc.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, state_dtype="fp32")
    for step in range(3):
        emb, labels = _batch(10 + step, LOCAL_BATCH * world_size)
        opt.zero_grad()
        pfc(emb[local].float(), labels[local]).backward()
        rows = pfc.last_sampled_rows
        by_class = rows.view(-1, K)
        assert torch.equal(by_class, (by_class[:, :1] // K) * K + torch.arange(K)), "a class's rows were split"
        assert by_class.shape[0] >= pfc.num_sample
        in_block = labels[(labels >= pfc.class_start) & (labels < pfc.class_start + pfc.num_local)] - pfc.class_start
        assert set(in_block.tolist()) <= set((by_class[:, 0] // K).tolist()), "a positive class was not sampled"
        assert torch.equal(pfc.weight.grad._indices()[0], rows)
        opt.step()
    save_partial_fc(pfc, opt, directory, rank)
    mine = {"weight": pfc.weight.detach().clone(), "momentum": opt.state[pfc.weight]["momentum"].clone(),
            "hits": pfc.subcenters.hits.clone()}
    parts = [None] * world_size
    dist.all_gather_object(parts, mine)
    if rank == 0:
        torch.save({k: torch.cat([p[k] for p in parts]) for k in mine}, os.path.join(directory, "expected.pt"))

    # cleaning on a planted case: class 20 (on rank 1) has dominant sub-center 1; one far sample is dropped
    planted = _planted_centers()
    pfc = PartialFC(build_margin(MarginConfig(type="cosface")), DIM, CLASSES, subcenters=K,
                    drop_after_epochs=1).double()
    pfc.weight.data.copy_(planted[start:end])
    near = planted[20 * K + 1] * 4 + 0.1 * planted[20 * K]  # closest to sub-center 1 of class 20
    emb = near.repeat(LOCAL_BATCH * world_size, 1)
    labels = torch.full((LOCAL_BATCH * world_size,), 20)
    pfc.set_epoch(0)
    pfc(emb[local], labels[local])
    assert pfc.stats() == {"classifier/dropped_samples": 0.0, "classifier/dominant_only": 0.0}
    pfc.set_epoch(1)
    if pfc.class_start <= 20 < pfc.class_start + pfc.num_local:
        assert int(pfc.subcenters.dominant[20 - pfc.class_start]) == 1
    # row 3 (rank 0's) is along class 20's sub-center 0: 90 degrees from the dominant one -> dropped, although
    # sub-center 0 would have matched it perfectly; row 7 is 60 degrees away -> kept
    noise, labels2 = _batch(30, LOCAL_BATCH * world_size)
    labels2[labels2 == 20] = 21
    # every other row lies near its class's dominant center (sub-center 0: no hits) -> kept
    emb2 = planted[labels2 * K] * 3 + 0.05 * noise
    emb2[3], labels2[3] = planted[20 * K] * 3, 20
    emb2[7] = (planted[20 * K + 1] * 0.5 + planted[20 * K + 2] * math.sqrt(0.75)) * 3
    labels2[7] = 20
    loss = pfc(emb2[local], labels2[local])
    assert pfc.stats() == {"classifier/dropped_samples": 1.0, "classifier/dominant_only": 1.0}
    assert pfc.stats()["classifier/dropped_samples"] == 0.0, "stats() counts since the last call"
    # the same loss as the linear classifier with the same state, over the kept rows only
    head = NormalizedLinearClassifier(build_margin(MarginConfig(type="cosface")), DIM, CLASSES, subcenters=K,
                                      drop_after_epochs=1).double()
    head.weight.data.copy_(planted)
    head.subcenters.dominant[20] = 1
    head.subcenters.load_block(head.subcenters.hits, head.subcenters.dominant, True)
    torch.testing.assert_close(loss.detach(), head(emb2, labels2).detach(), rtol=1e-5, atol=0)
    assert head.stats()["classifier/dropped_samples"] == 1.0
    kept = torch.ones(LOCAL_BATCH * world_size, dtype=torch.bool)
    kept[3] = False
    # only dominant rows count: repeat each class's dominant row over its K rows
    dominant = torch.zeros(CLASSES, dtype=torch.long)
    dominant[20] = 1
    masked = planted[(torch.arange(CLASSES) * K + dominant).repeat_interleave(K)]
    ref = _reference(build_margin(MarginConfig(type="cosface")).double(), emb2[kept], labels2[kept], masked)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def saved_on_two_ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("subcenter_ckpt")
    spawn(_pfc_worker, 2, str(directory))
    return directory


def test_partial_fc_two_ranks(saved_on_two_ranks):
    assert (saved_on_two_ranks / "partial_fc.json").is_file()


def test_checkpoint_from_2_ranks_loads_on_1(saved_on_two_ranks):
    expected = torch.load(saved_on_two_ranks / "expected.pt")
    pfc = PartialFC(build_margin(MarginConfig(type="cosface")), DIM, CLASSES, sample_rate=0.3, subcenters=K)
    opt = SparseRowSGD(pfc.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, state_dtype="fp32")
    load_partial_fc(pfc, opt, saved_on_two_ranks)
    assert torch.equal(pfc.weight.detach(), expected["weight"])
    assert torch.equal(opt.state[pfc.weight]["momentum"], expected["momentum"])
    assert torch.equal(pfc.subcenters.hits, expected["hits"]) and int(expected["hits"].sum()) == 3 * 10
    assert pfc.sampler_step == 3
    other = PartialFC(build_margin(MarginConfig(type="cosface")), DIM, CLASSES, subcenters=2)
    with pytest.raises(ValueError, match=r"subcenters=3 .*classifier.subcenters=2"):
        load_partial_fc(other, None, saved_on_two_ranks)


def test_subcenter_state_dict_round_trip():
    sub = SubCenters(4, K, drop_after_epochs=0)
    sub.hits[2, 1] = 5
    sub.set_epoch(0)
    fresh = SubCenters(4, K, drop_after_epochs=0)
    fresh.load_state_dict(sub.state_dict())
    assert fresh.cleaning and int(fresh.dominant[2]) == 1 and torch.equal(fresh.hits, sub.hits)
