"""Margin losses against hand computations (values and gradients) and the single-rank classifier."""

import math

import pytest
import torch

from facescale.heads import CombinedMarginLoss, NormalizedLinearClassifier
from facescale.heads.config import MarginConfig, build_margin


def _target_and_grad(loss_fn, cos_value):
    logits = torch.tensor([[cos_value, 0.1, -0.2]], dtype=torch.float64, requires_grad=True)
    out = loss_fn(logits, torch.tensor([0]))
    out[0, 0].backward()
    return out.detach(), logits.grad


@pytest.mark.parametrize("c", [0.9, 0.3, -0.5])
def test_arcface_value_and_exact_gradient(c):
    s, m = 64.0, 0.5
    out, grad = _target_and_grad(CombinedMarginLoss(s, 1.0, m, 0.0), c)
    theta = math.acos(c)
    assert out[0, 0].item() == pytest.approx(s * math.cos(theta + m), rel=1e-9)
    # d/dc s*cos(acos(c) + m) = s * sin(theta + m) / sin(theta)
    assert grad[0, 0].item() == pytest.approx(s * math.sin(theta + m) / math.sin(theta), rel=1e-6)
    # other logits: scaled, gradient only through the target column here
    assert out[0, 1].item() == pytest.approx(s * 0.1)
    assert grad[0, 1].item() == 0.0


def test_arcface_fallback_when_theta_plus_m_exceeds_pi():
    s, m = 64.0, 0.5
    c = math.cos(math.pi - 0.2)  # theta = pi - 0.2, theta + m > pi
    out, grad = _target_and_grad(CombinedMarginLoss(s, 1.0, m, 0.0), c)
    assert out[0, 0].item() == pytest.approx(s * (c - m * math.sin(m)), rel=1e-9)
    assert grad[0, 0].item() == pytest.approx(s, rel=1e-9)


def test_straight_through_value_equal_gradient_identity():
    s, m, c = 64.0, 0.5, 0.6
    out, grad = _target_and_grad(CombinedMarginLoss(s, 1.0, m, 0.0, straight_through=True), c)
    assert out[0, 0].item() == pytest.approx(s * math.cos(math.acos(c) + m), rel=1e-9)
    assert grad[0, 0].item() == pytest.approx(s)


def test_cosface_value_and_gradient():
    out, grad = _target_and_grad(build_margin(MarginConfig(type="cosface", s=30.0)), 0.7)
    assert out[0, 0].item() == pytest.approx(30.0 * (0.7 - 0.4))
    assert grad[0, 0].item() == pytest.approx(30.0)


def test_multiplicative_margin():
    out, _ = _target_and_grad(CombinedMarginLoss(10.0, 2.0, 0.0, 0.0), 0.8)
    assert out[0, 0].item() == pytest.approx(10.0 * math.cos(2 * math.acos(0.8)), rel=1e-6)


def test_ignore_label_rows_untouched_and_input_not_modified():
    logits = torch.tensor([[0.5, 0.2], [0.3, 0.4]])
    before = logits.clone()
    out = CombinedMarginLoss(2.0, 1.0, 0.5, 0.0)(logits, torch.tensor([-1, 1]))
    assert torch.equal(logits, before)
    assert torch.allclose(out[0], 2.0 * before[0])
    assert out[1, 1].item() == pytest.approx(2.0 * math.cos(math.acos(0.4) + 0.5), rel=1e-6)


def test_invalid_margins_rejected():
    with pytest.raises(ValueError, match="s must be positive"):
        CombinedMarginLoss(0.0)
    with pytest.raises(ValueError, match="m1 >= 1"):
        CombinedMarginLoss(64, 0.5, 0.0, 0.0)


def test_linear_classifier_loss_and_label_check():
    torch.manual_seed(0)
    head = NormalizedLinearClassifier(CombinedMarginLoss(16.0, 1.0, 0.0, 0.35), 8, 5)
    emb = torch.randn(4, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 4])
    loss = head(emb, labels)
    cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(head.weight).T
    logits = 16.0 * cos.detach().clone()
    logits[torch.arange(4), labels] -= 16.0 * 0.35
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    with pytest.raises(ValueError, match=r"label 5 is outside \[0, num_classes=5\)"):
        head(emb, torch.tensor([0, 1, 2, 5]))


# ------------------------------------------------------------- the linear classifier's label check, 2 gloo ranks
def _collective_label_worker(rank: int, world_size: int) -> None:
    from facescale.config import FaceScaleConfig
    from facescale.train.components import build_classifier

    cfg = FaceScaleConfig.model_validate({"model": {"embedding_size": 8}})
    head = build_classifier(cfg, 10, torch.device("cpu"))  # DDP-wrapped, with the builder's collectives
    assert isinstance(head, torch.nn.parallel.DistributedDataParallel)
    labels = torch.tensor([1, 2, 3]) if rank == 0 else torch.tensor([4, 10, 5])
    with pytest.raises(ValueError, match=r"label 10 is outside \[0, num_classes=10\) \(on rank 1\)"):
        head(torch.randn(3, 8), labels)
    # batch sizes may differ under DDP; a negative label on rank 0 stops rank 1 too
    size = 2 if rank == 0 else 4
    labels = torch.tensor([-3, 0]) if rank == 0 else torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"label -3 is outside .* \(on rank 0\)"):
        head(torch.randn(size, 8), labels)
    # the group is still usable: a good batch trains on both ranks
    head(torch.randn(3, 8), torch.tensor([0, 9, 4])).backward()


@pytest.mark.timeout(90)
def test_linear_classifier_label_check_is_collective():
    from gloo_ranks import spawn

    spawn(_collective_label_worker, 2)
