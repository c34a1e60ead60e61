"""The training checkpoint restores backbone, classifier, optimizer, progress and RNG as one object."""

import json

import pytest
import torch

from facescale.heads import CombinedMarginLoss, NormalizedLinearClassifier
from facescale.models import build_backbone
from facescale.train.checkpoint import TrainCheckpoint, TrainProgress
from facescale.train.schedule import lr_at


def make_state(seed):
    torch.manual_seed(seed)
    backbone = build_backbone("iresnet_tiny", 16)
    head = NormalizedLinearClassifier(CombinedMarginLoss(16.0, 1.0, 0.0, 0.2), 16, 7)
    opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    return backbone, head, {"sgd": opt}


def one_step(backbone, head, opts, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 112, 112, generator=g), torch.randint(0, 7, (4,), generator=g)
    loss = head(backbone(x), y)
    opts["sgd"].zero_grad()
    loss.backward()
    opts["sgd"].step()
    return loss.item()


def test_round_trip_continues_identically(tmp_path):
    backbone, head, opts = make_state(0)
    one_step(backbone, head, opts, 1)
    progress = TrainProgress(step=1, epoch=0, step_in_epoch=1, world_size=2)
    TrainCheckpoint(backbone, head, opts, progress).save(tmp_path, rank=0)
    torch.manual_seed(1234)
    expected_rand = torch.rand(3)
    expected_loss = one_step(backbone, head, opts, 2)

    backbone2, head2, opts2 = make_state(99)  # different init: everything must come from the checkpoint
    restored = TrainCheckpoint(backbone2, head2, opts2, TrainProgress()).load(tmp_path, rank=0)
    assert (restored.step, restored.step_in_epoch, restored.world_size) == (1, 1, 2)
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(3), expected_rand)
    assert one_step(backbone2, head2, opts2, 2) == pytest.approx(expected_loss, rel=1e-6)
    for a, b in zip(backbone.state_dict().values(), backbone2.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_incomplete_checkpoint_refused(tmp_path):
    backbone, head, opts = make_state(0)
    with pytest.raises(FileNotFoundError, match="no progress.json"):
        TrainCheckpoint(backbone, head, opts, TrainProgress()).load(tmp_path, rank=0)
    TrainCheckpoint(backbone, head, opts, TrainProgress()).save(tmp_path, rank=0)
    meta = json.loads((tmp_path / "progress.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "progress.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        TrainCheckpoint(backbone, head, opts, TrainProgress()).load(tmp_path, rank=0)


def test_lr_schedule_warmup_then_poly():
    assert lr_at(0, 100, 0.1, warmup_steps=10) == pytest.approx(0.01)
    assert lr_at(9, 100, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(10, 100, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(55, 100, 0.1, warmup_steps=10, power=2.0) == pytest.approx(0.1 * 0.5 ** 2)
    assert lr_at(100, 100, 0.1, warmup_steps=10) == 0.0
    lrs = [lr_at(s, 100, 0.1, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
