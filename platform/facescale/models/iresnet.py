"""Improved ResNets (IResNet / LResNet-E-IR) for 112×112 face crops.

Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019 (arXiv:1801.07698),
section 3 / "LResNet100E-IR": a ResNet adapted to 112×112 faces — a stride-1 stem, pre-activation-style
"improved residual" units (BN → conv → BN → PReLU → conv → BN) that down-sample in their second convolution,
and the "E" output block (BN → dropout → FC → BN) that keeps the 7×7 spatial layout instead of global pooling.
The SE variants (SE-LResNet-E-IR) add squeeze-and-excitation gating (Hu et al., "Squeeze-and-Excitation
Networks", CVPR 2018) after the last BN of every unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import SEModule, build_features_bn, init_weights
from .registry import register_backbone

__all__ = ["IBasicBlock", "IResNet"]

# A 112×112 input down-sampled by four stride-2 stages.
_FINAL_SPATIAL = 7


class IBasicBlock(nn.Module):
    """Improved residual unit: BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN (→ SE), plus the shortcut.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the second convolution (and of the projection shortcut).
        use_se: Gate the residual branch with squeeze-and-excitation after its last BN.
        se_reduction: Squeeze ratio of the SE module.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, use_se: bool = False, se_reduction: int = 16
    ) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.se = SEModule(out_channels, se_reduction) if use_se else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``se(residual(x)) + shortcut(x)``."""
        return self.se(self.residual(x)) + self.shortcut(x)


class IResNet(nn.Module):
    """IResNet backbone with the "E" embedding head.

    Args:
        layers: Number of units in each of the four stages.
        widths: Channels of the four stages; the stem outputs ``widths[0]`` channels.
        embedding_size: Length of the output embedding.
        dropout: Dropout probability before the embedding FC.
        use_se: Add SE gating to every unit (SE-LResNet-E-IR).
        se_reduction: Squeeze ratio of the SE modules.

    Raises:
        ValueError: If ``layers``/``widths`` do not have four entries or ``dropout`` is outside [0, 1).
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        embedding_size: int = 512,
        dropout: float = 0.0,
        use_se: bool = False,
        se_reduction: int = 16,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"IResNet needs 4 stages, got layers={list(layers)} widths={list(widths)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.PReLU(widths[0]),
        )
        stages: list[nn.Module] = []
        in_channels = widths[0]
        for num_units, out_channels in zip(layers, widths):
            units = [IBasicBlock(in_channels, out_channels, 2, use_se, se_reduction)]
            units += [IBasicBlock(out_channels, out_channels, 1, use_se, se_reduction) for _ in range(num_units - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Dropout(p=dropout),
            nn.Flatten(1),
            nn.Linear(in_channels * _FINAL_SPATIAL * _FINAL_SPATIAL, embedding_size),
        )
        self.features = build_features_bn(embedding_size, fix_scale=True)
        self.apply(init_weights)
        # init_weights resets every BN scale to 1, which is also the frozen value of the features BN.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, 3, 112, 112]`` images to ``[B, embedding_size]`` embeddings."""
        return self.features(self.head(self.stages(self.stem(x))))


def _iresnet(layers: Sequence[int], embedding_size: int, use_se: bool, **kwargs: object) -> IResNet:
    return IResNet(layers, embedding_size=embedding_size, use_se=use_se, **kwargs)  # type: ignore[arg-type]


@register_backbone
def iresnet_tiny(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """Tiny IResNet (one unit per stage, widths 8/16/32/128) for CPU demos and tests.

    Not a published architecture: it exists so examples and tests can run a real training step on a laptop.
    The narrow early stages matter most on CPU (they run at 112x112 and 56x56): measured about 3x the
    throughput of widths 16/32/64/128 with one thread.
    """
    return IResNet((1, 1, 1, 1), (8, 16, 32, 128), embedding_size=embedding_size, **kwargs)  # type: ignore[arg-type]


@register_backbone
def iresnet_nano(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """Half-width ``iresnet_tiny`` (widths 4/8/16/64): the CPU demo's distillation student.

    Not a published architecture. About 2.3x the training throughput of ``iresnet_tiny`` with one thread, so a
    demo can train a teacher and several student generations in minutes.
    """
    return IResNet((1, 1, 1, 1), (4, 8, 16, 64), embedding_size=embedding_size, **kwargs)  # type: ignore[arg-type]


@register_backbone
def iresnet18(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """IResNet-18 (2/2/2/2 units), ≈24.0 M parameters at embedding 512."""
    return _iresnet((2, 2, 2, 2), embedding_size, False, **kwargs)


@register_backbone
def iresnet34(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """IResNet-34 (3/4/6/3 units), ≈34.1 M parameters at embedding 512."""
    return _iresnet((3, 4, 6, 3), embedding_size, False, **kwargs)


@register_backbone
def iresnet50(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """IResNet-50 (3/4/14/3 units), ≈43.6 M parameters at embedding 512."""
    return _iresnet((3, 4, 14, 3), embedding_size, False, **kwargs)


@register_backbone
def iresnet100(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """IResNet-100 (3/13/30/3 units, LResNet100E-IR), ≈65.2 M parameters at embedding 512."""
    return _iresnet((3, 13, 30, 3), embedding_size, False, **kwargs)


@register_backbone
def iresnet200(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """IResNet-200 (6/26/60/6 units), ≈118.8 M parameters at embedding 512."""
    return _iresnet((6, 26, 60, 6), embedding_size, False, **kwargs)


@register_backbone
def iresnet18_se(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """IResNet-18 with SE gating in every unit (SE-LResNet18E-IR)."""
    return _iresnet((2, 2, 2, 2), embedding_size, True, **kwargs)


@register_backbone
def iresnet34_se(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """IResNet-34 with SE gating in every unit (SE-LResNet34E-IR)."""
    return _iresnet((3, 4, 6, 3), embedding_size, True, **kwargs)


@register_backbone
def iresnet50_se(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """IResNet-50 with SE gating in every unit (SE-LResNet50E-IR)."""
    return _iresnet((3, 4, 14, 3), embedding_size, True, **kwargs)


@register_backbone
def iresnet100_se(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """IResNet-100 with SE gating in every unit (SE-LResNet100E-IR)."""
    return _iresnet((3, 13, 30, 3), embedding_size, True, **kwargs)


@register_backbone
def iresnet200_se(embedding_size: int = 512, **kwargs: object) -> IResNet:
    """IResNet-200 with SE gating in every unit (SE-LResNet200E-IR)."""
    return _iresnet((6, 26, 60, 6), embedding_size, True, **kwargs)
