"""F²C / FFC (Wang et al., CVPR 2022): identity-based batches, the dynamic class pool and its loss, on hand-built
inputs, and on 2 real gloo ranks."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from facescale.config import FaceScaleConfig
from facescale.data.identity_batches import IdentityBatcher
from facescale.heads.ffc import FFCClassifier
from facescale.heads.margin import CombinedMarginLoss
from facescale.parallel.backbone_memory import BACKBONE_MEMORY
from facescale.parallel.ffc_plan import estimate_ffc
from facescale.parallel.plan import add_plan_arguments, backbone_terms, run_plan
from facescale.train.components import build_classifier, build_classifier_optimizer


def _stream(labels_per_batch: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Micro-batches whose uint8 images hold their sample index mod 256 (all pixels) and keys name it: s0, s1, ..."""
    out, index = [], 0
    for labels in labels_per_batch:
        idx = torch.arange(index, index + len(labels))
        images = (idx % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
        out.append((images, torch.tensor(labels, dtype=torch.int64), [f"s{i}" for i in idx.tolist()]))
        index += len(labels)
    return out


def _groups(batch: tuple[torch.Tensor, torch.Tensor, list[str]], n: int) -> dict[int, list[str]]:
    images, labels, keys = batch
    # The images are the samples the keys name, in the same order (uint8: the index modulo 256).
    assert images[:, 0, 0, 0].tolist() == [int(k[1:]) % 256 for k in keys]
    groups = {}
    for g in range(0, len(keys), n):
        assert labels[g:g + n].unique().numel() == 1  # [id0 x n, id1 x n, ...]
        groups[int(labels[g])] = keys[g:g + n]
    assert len(groups) * n == len(keys)  # K distinct identities
    return groups


def test_identity_batcher_groups_oldest_samples_of_each_identity() -> None:
    batcher = IdentityBatcher(_stream([[0, 1, 0, 2], [1, 3, 2, 3]]), ids_per_batch=2, images_per_id=2, seed=0)
    batches = list(batcher)
    assert len(batches) == 2
    for images, labels, _ in batches:
        assert images.shape == (4, 3, 2, 2) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    groups = {**_groups(batches[0], 2), **_groups(batches[1], 2)}
    assert groups == {0: ["s0", "s2"], 1: ["s1", "s4"], 2: ["s3", "s6"], 3: ["s5", "s7"]}
    assert batcher.stats == {"batches": 2, "samples_seen": 8, "samples_used": 8, "samples_evicted_unused": 0,
                             "samples_buffered": 0}


def test_identity_batcher_counts_evictions_from_a_full_buffer() -> None:
    # Buffer of 4: samples s0..s4 of five identities arrive, then identities 0 and 1 fill up from s5..s8; each
    # arrival past 4 buffered samples evicts the oldest one (s0, s1, s2, s3, s4), which is counted.
    stream = _stream([[0, 1, 2, 3], [4, 0, 1], [0, 1]])
    batcher = IdentityBatcher(stream, ids_per_batch=2, images_per_id=2, buffer_samples=4, seed=3)
    batches = list(batcher)
    assert len(batches) == 1
    assert _groups(batches[0], 2) == {0: ["s5", "s7"], 1: ["s6", "s8"]}
    assert batcher.stats == {"batches": 1, "samples_seen": 9, "samples_used": 4, "samples_evicted_unused": 5,
                             "samples_buffered": 0}


def test_identity_batcher_is_seeded_and_conserves_samples() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 40, (50, 8), generator=gen).tolist()

    def run(seed: int) -> tuple[list[list[str]], dict[str, int]]:
        batcher = IdentityBatcher(_stream(labels), ids_per_batch=3, images_per_id=2, buffer_samples=24, seed=seed)
        out = []
        for batch in batcher:
            assert batch[0].shape[0] == 6
            _groups(batch, 2)
            out.append(batch[2])
        return out, batcher.stats

    first, stats = run(0)
    assert run(0) == (first, stats)
    assert run(1)[0] != first
    assert stats["batches"] == len(first) > 10
    assert stats["samples_seen"] == 400
    assert stats["samples_seen"] == stats["samples_used"] + stats["samples_evicted_unused"] + stats["samples_buffered"]
    assert stats["samples_evicted_unused"] > 0


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"ids_per_batch": 0, "images_per_id": 2}, "ids_per_batch=0"),
    ({"ids_per_batch": 2, "images_per_id": 0}, "images_per_id=0"),
    ({"ids_per_batch": 4, "images_per_id": 3, "buffer_samples": 11}, "buffer_samples=11"),
])
def test_identity_batcher_refuses_bad_arguments(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        IdentityBatcher([], **kwargs)


# -- the pool and its loss ---------------------------------------------------------------------------------------

D = 4


def _identity_gallery(dim: int = D) -> torch.nn.Module:
    """A gallery whose features are its inputs: the pool's rows are the (normalised) images the test chose."""
    gallery = torch.nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        gallery.weight.copy_(torch.eye(dim))
    return gallery


def _ffc(pool_size: int, num_classes: int = 20, top_k: int | None = 2, s: float = 16.0, m2: float = 0.5,
         gather=None) -> FFCClassifier:
    return FFCClassifier(CombinedMarginLoss(s=s, m2=m2), _identity_gallery(), D, num_classes, pool_size,
                         top_k=top_k, gather_rows=gather)


def _features(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_pool_update_dual_queue_and_lru_eviction() -> None:
    ffc = _ffc(pool_size=3)
    steps = [[5, 5, 7, 7], [9, 9, 5, 5], [3, 3, 9, 9], [4, 3, 3, 3]]
    feats = [_features(4, seed) for seed in range(4)]
    for labels, f in zip(steps[:2], feats[:2], strict=True):
        ffc.update_pool(f, torch.tensor(labels))
    # Step 1: 5 -> slot 0 (rows 0, 1), 7 -> slot 1. Step 2: 9 -> slot 2, 5's two new features overwrite both rows.
    assert ffc.pool_labels() == {7: 1, 9: 2, 5: 0}  # least recently used first
    q = ffc.queue
    torch.testing.assert_close(q[:, 0], feats[1][2:4])
    torch.testing.assert_close(q[:, 1], feats[0][2:4])
    torch.testing.assert_close(q[:, 2], feats[1][0:2])
    # Step 3: the pool is full; 3 evicts the least recently used identity, 7, and takes its slot 1.
    ffc.update_pool(feats[2], torch.tensor(steps[2]))
    assert ffc.pool_labels() == {5: 0, 3: 1, 9: 2}
    torch.testing.assert_close(q[:, 1], feats[2][0:2])
    torch.testing.assert_close(q[:, 2], feats[2][2:4])
    assert ffc.stats()["classifier/pool_evictions"] == 1.0
    # Step 4: 4 (one image) evicts 5 from slot 0: row 0 is 4's feature, row 1 still 5's, so the second view uses
    # row 0 there. 3's three features go to rows 0, 1, 0: the last one written wins row 0.
    ffc.update_pool(feats[3], torch.tensor(steps[3]))
    assert ffc.pool_labels() == {9: 2, 4: 0, 3: 1}
    torch.testing.assert_close(q[0, 0], feats[3][0])
    torch.testing.assert_close(q[1, 0], feats[1][3])  # stale: 5's
    torch.testing.assert_close(q[:, 1], feats[3][[3, 2]])
    first, second = ffc.prototypes()
    torch.testing.assert_close(second[0], feats[3][0])
    torch.testing.assert_close(second[1:], q[1, 1:])
    torch.testing.assert_close(first, q[0])
    stats = ffc.stats()
    assert stats["classifier/pool_evictions"] == 1.0 and stats["classifier/pool_evictions_total"] == 2.0
    assert stats["classifier/pool_fill"] == 1.0


def _hand_loss(probes: np.ndarray, labels: list[int], views: list[np.ndarray], slot_of: dict[int, int],
               s: float, m2: float, k: int) -> float:
    """The FFC loss in numpy: per view, mean ArcFace cross-entropy of the in-pool probes + mean over the
    out-of-pool probes of their top-k cosines clipped at 0; the mean of the two views."""
    probes = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    total = 0.0
    for view in views:
        cos = probes @ view.T
        ce, pen = [], []
        for i, label in enumerate(labels):
            if label in slot_of:
                t = slot_of[label]
                logits = s * cos[i].copy()
                logits[t] = s * np.cos(np.arccos(cos[i, t]) + m2)
                ce.append(np.log(np.exp(logits).sum()) - logits[t])
            else:
                pen.append(np.clip(np.sort(cos[i])[::-1][:k], 0, None).mean())
        total += 0.5 * ((np.mean(ce) if ce else 0.0) + (np.mean(pen) if pen else 0.0))
    return total


def test_loss_matches_a_hand_computation_for_in_pool_and_out_of_pool_probes() -> None:
    ffc = _ffc(pool_size=4, top_k=2, s=16.0, m2=0.5)
    ffc.update_pool(_features(6, 10), torch.tensor([2, 2, 8, 8, 11, 11]))
    ffc.update_pool(_features(2, 11), torch.tensor([13, 2]))  # 13: one image (row 1 falls back to row 0)
    probes = torch.randn(6, D, generator=torch.Generator().manual_seed(12), dtype=torch.float64).float()
    labels = [2, 8, 13, 11, 0, 19]  # 0 and 19 are not in the pool
    probes.requires_grad_(True)
    loss = ffc(probes, torch.tensor(labels))
    views = [v.numpy() for v in ffc.prototypes()]
    expected = _hand_loss(probes.detach().double().numpy(), labels, [v.astype(np.float64) for v in views],
                          ffc.pool_labels(), 16.0, 0.5, 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert probes.grad is not None and torch.isfinite(probes.grad).all() and probes.grad[4].abs().sum() > 0
    assert ffc.stats()["classifier/in_pool_fraction"] == pytest.approx(4 / 6)
    # Out of the pool only: just the penalty; a pool all at negative cosines contributes nothing (clipped at 0).
    away = -ffc.queue[0, :1].clone()
    only_out = ffc(away, torch.tensor([1]))
    first, second = ffc.prototypes()
    cos = torch.stack([(F.normalize(away) @ v.T).topk(2).values.clamp_min(0).mean() for v in (first, second)])
    torch.testing.assert_close(only_out, cos.mean())
    # A probe at negative cosines to every prototype: no penalty (clipped at 0).
    positive = _ffc(pool_size=4, top_k=2)
    positive.update_pool(_features(4, 13).abs(), torch.tensor([3, 3, 4, 4]))
    assert positive(-torch.ones(1, D), torch.tensor([7])).item() == 0.0


def _loss_the_old_way(ffc: FFCClassifier, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: FFCClassifier.forward as it was before the [B, F] selection, the second view built as rows
    ``where(row1_valid[:, None], queue[1, :F], queue[0, :F])`` (an [F, D] copy) and each view's cosines taken."""
    filled = ffc.num_filled
    valid = torch.from_numpy(ffc._row1_valid[:filled])
    first = ffc.queue[0, :filled]
    targets = ffc._targets(labels)
    in_pool = targets != -1
    num_in = in_pool.sum()
    num_out = labels.numel() - num_in
    probes = F.normalize(embeddings.float(), dim=1)
    loss = probes.sum() * 0.0
    for view in (first, torch.where(valid[:, None], ffc.queue[1, :filled], first)):
        cos = F.linear(probes, view).clamp(-1.0, 1.0)
        ce = F.cross_entropy(ffc.margin(cos, targets).float(), targets, ignore_index=-1, reduction="sum")
        hard = cos.topk(min(ffc.top_k, filled), dim=1).values.clamp_min(0.0).mean(dim=1)
        penalty = torch.where(in_pool, torch.zeros_like(hard), hard).sum()
        loss = loss + 0.5 * (ce / num_in.clamp_min(1) + penalty / num_out.clamp_min(1))
    return loss


class _NonViewShapes(TorchDispatchMode):
    """Records the shape of every tensor an op outside the view ops (slice, select, ...) makes."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("steps", [
    [[1, 1, 2, 3, 3, 4], [5, 6]],  # mixed: 3 has row 1; 2, 4, 5 one image; 6 evicted 1 (slot 0's row 1 is stale)
    [[1, 2, 3, 4, 5]],  # no slot's row 1 valid: the second view is the first
    [[1, 1, 2, 2, 3, 3]],  # every slot's row 1 valid
])
def test_loss_and_gradient_equal_the_old_prototype_rows_and_copy_no_pool(steps: list[list[int]]) -> None:
    ffc = _ffc(pool_size=5, top_k=2)
    for seed, labels in enumerate(steps):
        ffc.update_pool(_features(len(labels), 20 + seed), torch.tensor(labels))
    embeddings = torch.randn(7, D, generator=torch.Generator().manual_seed(21))
    labels = torch.tensor([1, 2, 3, 4, 5, 6, 9])  # 9 is never in the pool; 1 left it in the mixed case
    got_e, want_e = embeddings.clone().requires_grad_(True), embeddings.clone().requires_grad_(True)
    with _NonViewShapes() as ops:
        got = ffc(got_e, labels)
    want = _loss_the_old_way(ffc, want_e, labels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    got.backward()
    want.backward()
    scale = want_e.grad.abs().max()
    assert scale > 0
    # Float rounding only: the where's backward sums each probe's gradient over the two rows' matmuls separately.
    torch.testing.assert_close(got_e.grad, want_e.grad, rtol=1e-6, atol=1e-6 * float(scale))
    filled = ffc.num_filled
    assert (filled, D) not in ops.shapes, ops.shapes  # no copy of the pool's rows: [B, F] cosines and smaller
    assert (7, filled) in ops.shapes


def test_empty_pool_and_bad_labels_are_errors() -> None:
    ffc = _ffc(pool_size=3)
    with pytest.raises(RuntimeError, match="update_pool"):
        ffc(torch.randn(2, D), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="gallery label 20 is outside"):
        ffc.update_pool(_features(2, 0), torch.tensor([1, 20]))
    assert ffc.pool_labels() == {}  # nothing enqueued from a refused batch
    with pytest.raises(ValueError, match="adaface|AdaFace"):
        from facescale.heads.adaface import AdaFaceLoss

        FFCClassifier(AdaFaceLoss(), _identity_gallery(), D, 20, 3)


def test_state_dict_round_trip_restores_pool_lru_and_gallery() -> None:
    ffc = _ffc(pool_size=3)
    for seed, labels in enumerate([[1, 1, 2, 2], [3, 3, 1, 1], [4, 4, 5, 5]]):
        ffc.update_pool(_features(4, seed), torch.tensor(labels))
    with torch.no_grad():
        ffc.gallery.weight.mul_(0.5)
    buffer = io.BytesIO()
    torch.save(ffc.state_dict(), buffer)
    fresh = _ffc(pool_size=3)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert fresh.pool_labels() == ffc.pool_labels() == {1: 0, 4: 1, 5: 2}
    torch.testing.assert_close(fresh.queue, ffc.queue)
    torch.testing.assert_close(fresh.gallery.weight, ffc.gallery.weight)
    # The same next update on both: the same eviction (LRU order and per-slot rows survived the round trip).
    for module in (ffc, fresh):
        module.update_pool(_features(3, 9), torch.tensor([6, 1, 5]))
    assert fresh.pool_labels() == ffc.pool_labels() == {6: 0, 1: 1, 5: 2}
    torch.testing.assert_close(fresh.queue, ffc.queue)
    probes, labels = torch.randn(4, D), torch.tensor([6, 1, 9, 5])
    torch.testing.assert_close(fresh(probes, labels), ffc(probes, labels))
    with pytest.raises(ValueError, match="3 slots.*resolves to 4"):
        _ffc(pool_size=4).load_state_dict(ffc.state_dict(), strict=False)


# -- 2 gloo ranks ----------------------------------------------------------------------------------------------


class _TinyBackbone(torch.nn.Module):
    """conv-BN-PReLU -> linear -> BN on 3 x 8 x 8 images: the layers a face backbone has, in milliseconds."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                        torch.nn.PReLU(4), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, dim),
                                        torch.nn.BatchNorm1d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _two_rank_pools(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from facescale.parallel.dist import all_gather_rows

    torch.manual_seed(0)
    probe = _TinyBackbone()
    ddp = DistributedDataParallel(probe)
    ffc = FFCClassifier(CombinedMarginLoss(s=16.0, m2=0.5), _TinyBackbone(), 8, 16, pool_size=6, top_k=3,
                        gather_rows=lambda t: all_gather_rows(t, None))
    ffc.init_gallery(probe)
    start = [p.clone() for p in ffc.gallery.parameters()]
    opt = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for step in range(4):
        ids = [(4 * step + 2 * rank) % 16, (4 * step + 2 * rank + 1) % 16]
        ffc.update_pool(torch.randn(4, 3, 8, 8, generator=gen), torch.tensor(ids).repeat_interleave(2))
        loss = ffc(ddp(torch.randn(6, 3, 8, 8, generator=gen)), torch.randint(0, 16, (6,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ffc.ema_update(probe)
    # Step 4 enqueued identities 12, 13 (rank 0) and 14, 15 (rank 1); identities 8..11 from step 3 fill the rest.
    assert set(ffc.pool_labels()) == {10, 11, 12, 13, 14, 15}
    assert ffc.stats()["classifier/pool_evictions_total"] == 10.0
    assert any(not torch.equal(a, b) for a, b in zip(start, ffc.gallery.parameters(), strict=True))
    state = ffc.state_dict()
    extra = state.pop("_extra_state")
    flat = torch.cat([t.double().flatten() for t in state.values()]
                     + [extra[k].double() for k in ("lru_labels", "lru_slots", "next_row", "row1_valid")])
    both = all_gather_rows(flat[None], None)
    assert torch.equal(both[0], both[1]), "the ranks' pools, LRU states or gallery networks differ"
    dist.barrier()


def test_two_gloo_ranks_hold_identical_pools() -> None:
    from gloo_ranks import spawn

    spawn(_two_rank_pools, 2)


# -- config, build and plan ------------------------------------------------------------------------------------


def _cfg(**classifier) -> FaceScaleConfig:
    return FaceScaleConfig.model_validate({"classifier": {"type": "ffc", **classifier},
                                           "model": {"backbone": "iresnet_tiny", "embedding_size": 32}})


def test_build_resolves_the_pool_and_needs_no_optimizer_state() -> None:
    cfg = _cfg(ffc={"pool_size": 0.25, "ids_per_batch": 4, "momentum": 0.9, "top_k": 5},
               margin={"type": "cosface", "s": 32.0})
    head = build_classifier(cfg, 40, torch.device("cpu"))
    assert isinstance(head, FFCClassifier)
    assert (head.pool_size, head.momentum, head.top_k, head.embedding_size) == (10, 0.9, 5, 32)
    assert not any(p.requires_grad for p in head.parameters())
    opt = build_classifier_optimizer(cfg, head)
    assert opt.param_groups[0]["params"] == []
    opt.step()  # a no-op: the loop steps and zero_grads it like any classifier optimizer
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("classifier", "num_classes", "words"), [
    ({"ffc": {"pool_size": 100, "ids_per_batch": 4}}, 50, "pool_size 100 is larger than the number of identities 50"),
    ({"ffc": {"pool_size": 10, "ids_per_batch": 16}}, 50, "pool_size 10 is smaller than .* batch, 16"),
    ({"ffc": {"pool_size": 0.1, "ids_per_batch": 16}}, 50, "pool_size 5 is smaller than .* batch, 16"),
])
def test_build_refuses_a_pool_that_does_not_fit(classifier: dict, num_classes: int, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        build_classifier(_cfg(**classifier), num_classes, torch.device("cpu"))


def test_config_and_build_refuse_zero_stage_3() -> None:
    tree = {"classifier": {"type": "ffc", "ffc": {"pool_size": 8, "ids_per_batch": 2}},
            "train": {"engine": "deepspeed", "deepspeed": {"zero_stage": 3}}}
    with pytest.raises(ValidationError, match="zero_stage 3"):  # at load, before anything starts
        FaceScaleConfig.model_validate(tree)
    cfg = FaceScaleConfig.model_validate({**tree, "train": {"engine": "deepspeed", "deepspeed": {"zero_stage": 2}}})
    cfg.train.deepspeed.zero_stage = 3  # changed after validation: the builder still refuses it
    with pytest.raises(ValueError, match="zero_stage 3"):
        build_classifier(cfg, 50, torch.device("cpu"))


@pytest.mark.parametrize(("classifier", "words"), [
    ({"ffc": {"pool_size": 1.5}}, "fraction must lie in"),
    ({"ffc": {"pool_size": 0}}, "must be >= 1"),
    ({"margin": {"type": "adaface"}}, "arcface, cosface and combined, not 'adaface'"),
    ({"subcenters": 3}, "subcenters does not apply"),
    ({"ffc": {"pool_sizes": 10}}, "pool_sizes"),
])
def test_config_refuses_bad_ffc_keys(classifier: dict, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        _cfg(**classifier)
    with pytest.raises(ValidationError, match="applies only to classifier type 'ffc'"):
        FaceScaleConfig.model_validate({"classifier": {"ffc": {"pool_size": 10}}})


def _plan(capsys, argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    code = run_plan(parser.parse_args(argv.split()))
    return code, capsys.readouterr().out


def test_plan_memory_does_not_grow_with_identities(capsys) -> None:
    small = estimate_ffc(10_000, 8, 128, identities=1_000_000, embedding_size=512)
    large = estimate_ffc(10_000, 8, 128, identities=10_000_000, embedding_size=512)
    assert small.rank_peak_bytes == large.rank_peak_bytes and small.pool_bytes == 2 * 10_000 * 512 * 4
    # The persistent terms are what the classifier holds (its buffers after a first update).
    head = FFCClassifier(CombinedMarginLoss(), _identity_gallery(16), 16, 1000, 50)
    head.update_pool(_features(4, 0).repeat(1, 4), torch.tensor([1, 1, 2, 2]))
    plan = estimate_ffc(50, 1, 8, ids_per_batch=2, embedding_size=16)
    assert sum(b.numel() * b.element_size() for b in head.buffers()) == plan.pool_bytes + plan.lookup_bytes
    # A fraction of the identities; the backbone: the probe's terms as for Partial FC plus the fp32 gallery copy.
    frac = estimate_ffc(0.001, 8, 64, identities=10_000_000, backbone="iresnet50")
    params = BACKBONE_MEMORY["iresnet50"]["params"]
    assert frac.pool_size == 10_000 and frac.gallery_params_bytes == 4 * params
    assert frac.backbone_terms == backbone_terms("iresnet50", 64, 8)
    assert frac.rank_peak_bytes == frac.peak_bytes + sum(frac.backbone_terms.values())
    code, out = _plan(capsys, "--classifier ffc --pool-size 0.001 --identities 10M --world-size 8 --batch-size 64 "
                              "--backbone iresnet50 --json")
    report = json.loads(out)
    assert code == 0 and report["pool_size"] == 10_000 and report["rank_peak_bytes"] == frac.rank_peak_bytes
    code, out = _plan(capsys, "--classifier ffc --pool-size 10k --world-size 8 --batch-size 64 --memory-gib 0.01")
    assert code == 1 and "pool (2 rows per identity)" in out and "exceeds the budget" in out


@pytest.mark.parametrize(("argv", "words"), [
    ("--pool-size 2M --identities 1M", "--pool-size 2000000 is larger than the number of identities 1000000"),
    ("--pool-size 100 --identities 1M", "--pool-size 100 is smaller than .* batch, 512"),
    ("--pool-size 0.01", "needs --identities"),
    ("--identities 1M", "needs --pool-size"),
    ("--pool-size 10k --engine deepspeed --zero-stage 3", "ZeRO-3"),
    ("--pool-size 10k --fit --memory-gib 8", "--fit does not apply"),
    ("--pool-size 10k --sample-rate 0.1", "--sample-rate apply only to --classifier partial_fc"),
])
def test_plan_refuses_bad_ffc_input(capsys, argv: str, words: str) -> None:
    with pytest.raises(SystemExit, match=words):
        _plan(capsys, f"--classifier ffc --world-size 8 --batch-size 64 {argv}")
    with pytest.raises(SystemExit, match="--pool-size applies only to --classifier ffc"):
        _plan(capsys, "--identities 1M --world-size 8 --batch-size 64 --pool-size 10k")
