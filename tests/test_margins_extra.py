"""MagFace, CurricularFace and the PFC v2 inter-class filter against hand computations; their config keys."""

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from facescale.heads import CurricularFaceLoss, MagFaceLoss
from facescale.heads.config import ClassifierConfig, MarginConfig, build_margin
from facescale.parallel import PartialFC, filter_inter_class


def _cos(rows=4, cols=6, seed=0):
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.6 - 0.8


# ------------------------------------------------------------------------------------------------- MagFace
def test_magface_margin_and_regularizer_values():
    mag = MagFaceLoss()
    norms = torch.tensor([5.0, 10.0, 60.0, 110.0, 200.0], dtype=torch.float64)
    # linear from l_m=0.45 at l_a=10 to u_m=0.8 at u_a=110, clamped outside
    torch.testing.assert_close(mag.margin(norms), torch.tensor([0.45, 0.45, 0.625, 0.8, 0.8], dtype=torch.float64))
    a = norms.clamp(10, 110)
    torch.testing.assert_close(mag.regularizer(norms), 35.0 * (a / 110**2 + 1 / a))
    # g is decreasing on [l_a, u_a): larger norms are rewarded until u_a
    g = mag.regularizer(torch.linspace(10, 110, 50, dtype=torch.float64))
    assert bool((g[1:] < g[:-1]).all())


def test_magface_target_logit_and_norm_gradient():
    mag = MagFaceLoss(s=64.0)
    cos = _cos()
    labels = torch.tensor([1, -1, 3, 0])
    norms = torch.tensor([20.0, 50.0, 80.0, 105.0], dtype=torch.float64, requires_grad=True)
    before = cos.clone()
    out = mag(cos, labels, norms=norms)
    assert torch.equal(cos, before), "inputs must not be modified in place"
    for row, col in ((0, 1), (2, 3), (3, 0)):
        m = 0.45 + (0.8 - 0.45) / 100 * (norms[row].item() - 10)
        want = 64 * math.cos(math.acos(cos[row, col].item()) + m)
        assert out[row, col].item() == pytest.approx(want, rel=1e-9)
    untouched = torch.ones_like(cos, dtype=torch.bool)
    untouched[[0, 2, 3], [1, 3, 0]] = False
    torch.testing.assert_close(out[untouched], 64 * cos[untouched])
    out[[0, 2, 3], [1, 3, 0]].sum().backward()
    assert bool((norms.grad[[0, 2, 3]] < 0).all()), "a larger norm means a larger margin, a smaller target logit"
    assert norms.grad[1] == 0


def test_magface_needs_norms_and_checks_parameters():
    with pytest.raises(ValueError, match="norms="):
        MagFaceLoss()(_cos(), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="l_a < u_a"):
        MagFaceLoss(l_a=120.0)


# ----------------------------------------------------------------------------------------- CurricularFace
def test_curricularface_modulation_and_t_update():
    cur = CurricularFaceLoss(s=10.0, m=0.5)
    cur.t.fill_(0.3)
    cos = _cos(seed=1)
    labels = torch.tensor([0, 2, 5, 1])
    out = cur(cos, labels)
    target = cos[torch.arange(4), labels]
    assert cur.t.item() == pytest.approx(0.99 * 0.3 + 0.01 * target.float().mean().item(), rel=1e-6)
    t = cur.t.item()
    for r in range(4):
        cos_m = math.cos(math.acos(target[r].item()) + 0.5)
        for c in range(6):
            x = cos[r, c].item()
            if c == labels[r]:
                want = cos_m if x > math.cos(math.pi - 0.5) else x - math.sin(math.pi - 0.5) * 0.5
            else:
                want = x * (t + x) if x > cos_m else x
            assert out[r, c].item() == pytest.approx(10 * want, rel=1e-6, abs=1e-9)
    cur.eval()
    cur(cos, labels)
    assert cur.t.item() == t, "t must not move in eval mode"


def test_curricularface_class_blocks_match_one_block():
    """Two class blocks with a global_sum give the one-block result: the contract Partial FC relies on."""
    cos = _cos(rows=5, cols=8, seed=2)
    labels = torch.tensor([0, 7, 3, 4, 6])
    full = CurricularFaceLoss()
    seen = {}

    def spy(stats):
        seen["stats"] = stats.clone()
        return stats

    want = full(cos, labels, global_sum=spy)
    for lo, hi in ((0, 4), (4, 8)):
        block = CurricularFaceLoss()
        in_block = (labels >= lo) & (labels < hi)
        local = torch.where(in_block, labels - lo, -1)
        got = block(cos[:, lo:hi], local, global_sum=lambda stats: seen["stats"])
        torch.testing.assert_close(got, want[:, lo:hi])
        assert torch.equal(block.t, full.t)


# -------------------------------------------------------------------------------------- inter-class filter
def test_inter_class_filter_zeros_conflicting_negatives_only():
    cos = torch.tensor([[0.9, 0.5, 0.1], [0.45, 0.2, 0.95]], requires_grad=True)
    out = filter_inter_class(cos, torch.tensor([0, -1]), 0.4)
    torch.testing.assert_close(out, torch.tensor([[0.9, 0.0, 0.1], [0.0, 0.2, 0.0]]))
    out.sum().backward()
    torch.testing.assert_close(cos.grad, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))


def test_partial_fc_single_process_with_filter_matches_reference():
    margin = build_margin(MarginConfig(type="arcface"))
    pfc = PartialFC(margin, 8, 30, inter_class_filter=0.1, seed=4).double()
    emb = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 5, 9, 29, 5, 12])
    loss = pfc(emb, labels)
    cos = F.linear(F.normalize(emb), F.normalize(pfc.weight.detach())).clamp(-1, 1)
    ref = F.cross_entropy(margin(filter_inter_class(cos, labels, 0.1), labels), labels)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------------- config
def test_config_selects_new_margins_and_rejects_foreign_keys():
    mag = build_margin(MarginConfig(type="magface", l_a=5.0, lambda_g=20.0))
    assert isinstance(mag, MagFaceLoss) and mag.l_a == 5.0 and mag.lambda_g == 20.0 and mag.u_m == 0.8
    cur = build_margin(MarginConfig(type="curricularface"))
    assert isinstance(cur, CurricularFaceLoss) and cur.m == 0.5 and cur.s == 64.0
    assert build_margin(MarginConfig(type="curricularface", m2=0.4)).m == 0.4
    with pytest.raises(ValidationError, match="'l_a' does not apply to margin type 'arcface'"):
        MarginConfig(type="arcface", l_a=5.0)
    with pytest.raises(ValidationError, match="'m3' does not apply"):
        MarginConfig(type="magface", m3=0.2)
    cfg = ClassifierConfig(type="partial_fc", sample_rate=0.1, inter_class_filter=0.4, state_dtype="int8")
    assert cfg.sample_rate == 0.1 and cfg.inter_class_filter == 0.4
    with pytest.raises(ValidationError, match="sample_rate apply only to classifier type 'partial_fc'"):
        ClassifierConfig(sample_rate=0.1)
    with pytest.raises(ValidationError):
        ClassifierConfig(type="partial_fc", sample_rate=0.0)
    # a dump of the defaults loads again (keys are compared by value, not by presence)
    assert ClassifierConfig(**ClassifierConfig().model_dump()) == ClassifierConfig()
