"""Smoke and size tests for every registered backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facescale.models import UnknownBackboneError, build_backbone, list_backbones, register_backbone
from facescale.models.registry import DuplicateBackboneError

# Published sizes at embedding 512 (parameters, trainable and frozen alike).
EXPECTED_PARAMS = {
    "iresnet18": 24.0e6,
    "iresnet34": 34.1e6,
    "iresnet50": 43.6e6,
    "iresnet100": 65.2e6,
    "iresnet200": 118.8e6,
    "mobilefacenet": 2.06e6,
    "vargfacenet": 5.20e6,
    "vargfacenet_nose": 4.96e6,
}
TRAINABLE_SMOKE = ["iresnet_tiny", "mobilefacenet", "vargfacenet"]
# Forward-tested in tests/test_vit.py through vit_t (same code, 19 M parameters); the larger ViTs (76-256 M) are
# only sized here and there (meta device), to keep CI fast and light.
HEAVY = {"vit_s", "vit_b", "vit_l"}
FORWARD_SMOKE = [name for name in list_backbones() if name not in HEAVY]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_lists_every_family() -> None:
    names = list_backbones()
    assert names == sorted(names)
    assert set(EXPECTED_PARAMS) | {"iresnet_tiny", "iresnet50_se"} <= set(names)


def test_heavy_list_names_registered_backbones() -> None:
    assert HEAVY <= set(list_backbones()) and "vit_t" in FORWARD_SMOKE


@pytest.mark.parametrize("name", FORWARD_SMOKE)
def test_output_shape(name: str) -> None:
    model = build_backbone(name, embedding_size=128).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 128)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count(name: str) -> None:
    with torch.device("meta"):
        model = build_backbone(name, embedding_size=512)
    assert _num_params(model) == pytest.approx(EXPECTED_PARAMS[name], rel=0.01)


@pytest.mark.parametrize("depth", [18, 34, 50, 100, 200])
def test_se_variant_adds_only_se_parameters(depth: int) -> None:
    with torch.device("meta"):
        plain = build_backbone(f"iresnet{depth}")
        se = build_backbone(f"iresnet{depth}_se")
    se_params = sum(_num_params(m) for m in se.modules() if type(m).__name__ == "SEModule")
    assert se_params > 0
    assert _num_params(se) == _num_params(plain) + se_params


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownBackboneError) as excinfo:
        build_backbone("resnet9000")
    message = str(excinfo.value)
    assert "resnet9000" in message
    for name in list_backbones():
        assert name in message
    assert isinstance(excinfo.value, ValueError)


def test_duplicate_registration_is_rejected() -> None:
    def iresnet18(embedding_size: int = 512) -> nn.Module:  # same name as a registered backbone
        return nn.Identity()

    with pytest.raises(DuplicateBackboneError):
        register_backbone(iresnet18)


@pytest.mark.parametrize("embedding_size", [0, -1, 1.5])
def test_bad_embedding_size(embedding_size: object) -> None:
    with pytest.raises(ValueError, match="embedding_size"):
        build_backbone("iresnet_tiny", embedding_size=embedding_size)  # type: ignore[arg-type]


def test_dropout_is_passed_through() -> None:
    model = build_backbone("iresnet_tiny", dropout=0.3)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in dropouts] == [0.3]
    with pytest.raises(ValueError, match="dropout"):
        build_backbone("iresnet_tiny", dropout=1.5)


@pytest.mark.parametrize("name", TRAINABLE_SMOKE)
def test_train_step_gives_finite_grads(name: str) -> None:
    model = build_backbone(name, embedding_size=64).train()
    out = model(torch.randn(2, 3, 112, 112))
    out.pow(2).mean().backward()
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        assert param.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {pname}"
