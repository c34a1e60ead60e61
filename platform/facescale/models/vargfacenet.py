"""VarGFaceNet: a lightweight face backbone built from variable-group convolutions.

Yan et al., "VarGFaceNet: An Efficient Variable Group Convolutional Neural Network for Lightweight Face
Recognition", ICCV Workshops 2019 (arXiv:1910.04985), building on Zhang et al., "VarGNet: Variable Group
Convolutional Neural Network for Efficient Embedded Computing" (arXiv:1907.05653).

Layout (width multiplier 1.25 applied to the base widths 32/64/128/256, as in the authors' reference code):

* head: conv3×3 stride 1 (3 → 40) with no down-sampling, then a VarG unit with a projection shortcut that
  down-samples 112 → 56;
* three stages of 3 / 7 / 4 units at 80 / 160 / 320 channels; the first unit of each stage is the
  down-sampling branch-merge unit (two parallel separable convs summed), the rest are residual VarG units with
  SE gating (reduction 4);
* embedding block: 1×1 conv 320 → 1024, 7×7 variable-group conv (128 groups) to 1×1, 1×1 conv 1024 → 512,
  then FC + BN (scale fixed at 1) to the embedding.

Every variable-group conv gives each group 8 input channels. Activations are per-channel PReLU throughout.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNAct, SEModule, build_features_bn, build_variable_group_conv, init_weights
from .registry import register_backbone

__all__ = ["VarGBlock", "VarGEmbedding", "VarGFaceNet", "VarGMergeBlock", "VarGSeparableConv"]


class VarGSeparableConv(nn.Sequential):
    """Variable-group conv3×3 (×``factor`` channels) → BN → PReLU → pointwise conv → BN (→ PReLU).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the variable-group conv.
        factor: Channel expansion of the variable-group conv.
        channels_per_group: Input channels per group of the variable-group conv.
        act_out: End with a PReLU; off when the output feeds a sum.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        factor: int = 2,
        channels_per_group: int = 8,
        act_out: bool = True,
    ) -> None:
        mid = in_channels * factor
        layers: list[nn.Module] = [
            build_variable_group_conv(in_channels, mid, 3, stride, channels_per_group),
            nn.BatchNorm2d(mid),
            nn.PReLU(mid),
            ConvBNAct(mid, out_channels, 1, act=act_out),
        ]
        super().__init__(*layers)


class VarGBlock(nn.Module):
    """Residual VarG unit: two separable convs (→ SE) + shortcut → PReLU.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first separable conv and of the projection shortcut.
        factor: Channel expansion of the variable-group convs.
        channels_per_group: Input channels per group of the variable-group convs.
        use_se: Gate the residual branch with squeeze-and-excitation.
        se_reduction: Squeeze ratio of the SE module.
        project_shortcut: Use a separable-conv shortcut instead of the identity (needed when the shape changes).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        factor: int = 2,
        channels_per_group: int = 8,
        use_se: bool = True,
        se_reduction: int = 4,
        project_shortcut: bool = False,
    ) -> None:
        super().__init__()
        if not project_shortcut and (stride != 1 or in_channels != out_channels):
            raise ValueError("VarGBlock: an identity shortcut needs stride 1 and in_channels == out_channels")
        self.residual = nn.Sequential(
            VarGSeparableConv(in_channels, out_channels, stride, factor, channels_per_group),
            VarGSeparableConv(out_channels, out_channels, 1, factor, channels_per_group, act_out=False),
        )
        self.se = SEModule(out_channels, se_reduction) if use_se else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if project_shortcut:
            self.shortcut = VarGSeparableConv(in_channels, out_channels, stride, factor, channels_per_group, False)
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``prelu(se(residual(x)) + shortcut(x))``."""
        return self.act(self.se(self.residual(x)) + self.shortcut(x))


class VarGMergeBlock(nn.Module):
    """Down-sampling VarG unit: two parallel separable convs are summed, refined, and added to a projection.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Down-sampling stride.
        factor: Channel expansion of the variable-group convs.
        channels_per_group: Input channels per group of the variable-group convs.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 2, factor: int = 2, channels_per_group: int = 8
    ) -> None:
        super().__init__()
        self.branch1 = VarGSeparableConv(in_channels, out_channels, stride, factor, channels_per_group, False)
        self.branch2 = VarGSeparableConv(in_channels, out_channels, stride, factor, channels_per_group, False)
        self.merge_act = nn.PReLU(out_channels)
        self.refine = VarGSeparableConv(out_channels, out_channels, 1, factor, channels_per_group, False)
        self.shortcut = VarGSeparableConv(in_channels, out_channels, stride, factor, channels_per_group, False)
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``prelu(refine(prelu(branch1(x) + branch2(x))) + shortcut(x))``."""
        merged = self.merge_act(self.branch1(x) + self.branch2(x))
        return self.act(self.refine(merged) + self.shortcut(x))


class VarGEmbedding(nn.Module):
    """Embedding block: 1×1 conv → 7×7 variable-group conv to 1×1 → 1×1 conv → FC → BN.

    Args:
        in_channels: Channels of the 7×7 input map.
        embedding_size: Length of the output embedding.
        last_channels: Width of the 1×1 expansion and of the 7×7 variable-group conv.
        channels_per_group: Input channels per group of the 7×7 conv.
    """

    def __init__(
        self, in_channels: int, embedding_size: int, last_channels: int = 1024, channels_per_group: int = 8
    ) -> None:
        super().__init__()
        self.expand = ConvBNAct(in_channels, last_channels, 1)
        self.spatial = nn.Sequential(
            build_variable_group_conv(last_channels, last_channels, 7, 1, channels_per_group, padding=0),
            nn.BatchNorm2d(last_channels),
        )
        self.reduce = ConvBNAct(last_channels, last_channels // 2, 1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(last_channels // 2, embedding_size)
        self.features = build_features_bn(embedding_size, fix_scale=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a ``[B, C, 7, 7]`` feature map to ``[B, embedding_size]``."""
        return self.features(self.fc(self.flatten(self.reduce(self.spatial(self.expand(x))))))


class VarGFaceNet(nn.Module):
    """VarGFaceNet backbone.

    Args:
        embedding_size: Length of the output embedding.
        use_se: Use SE gating in the residual VarG units.
        width_multiplier: Multiplier on the base widths 32/64/128/256.
        units: Units per stage, including the down-sampling unit.
        channels_per_group: Input channels per group of every variable-group conv.
        last_channels: Width of the embedding block.
        se_reduction: Squeeze ratio of the SE modules.
    """

    _BASE_WIDTHS = (32, 64, 128, 256)

    def __init__(
        self,
        embedding_size: int = 512,
        use_se: bool = True,
        width_multiplier: float = 1.25,
        units: tuple[int, int, int] = (3, 7, 4),
        channels_per_group: int = 8,
        last_channels: int = 1024,
        se_reduction: int = 4,
    ) -> None:
        super().__init__()
        widths = [int(w * width_multiplier) for w in self._BASE_WIDTHS]
        g = channels_per_group
        self.stem = nn.Sequential(
            ConvBNAct(3, widths[0], 3, 1),
            VarGBlock(widths[0], widths[0], 2, 1, g, use_se, se_reduction, project_shortcut=True),
        )
        stages: list[nn.Module] = []
        for num_units, in_ch, out_ch in zip(units, widths[:-1], widths[1:]):
            blocks: list[nn.Module] = [VarGMergeBlock(in_ch, out_ch, 2, 2, g)]
            blocks += [VarGBlock(out_ch, out_ch, 1, 2, g, use_se, se_reduction) for _ in range(num_units - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.embedding = VarGEmbedding(widths[-1], embedding_size, last_channels, g)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, 3, 112, 112]`` images to ``[B, embedding_size]`` embeddings."""
        return self.embedding(self.stages(self.stem(x)))


@register_backbone
def vargfacenet(embedding_size: int = 512, **kwargs: object) -> VarGFaceNet:
    """VarGFaceNet with SE gating, ≈5.20 M parameters at embedding 512."""
    return VarGFaceNet(embedding_size=embedding_size, use_se=True, **kwargs)  # type: ignore[arg-type]


@register_backbone
def vargfacenet_nose(embedding_size: int = 512, **kwargs: object) -> VarGFaceNet:
    """VarGFaceNet without SE gating, ≈4.96 M parameters at embedding 512."""
    return VarGFaceNet(embedding_size=embedding_size, use_se=False, **kwargs)  # type: ignore[arg-type]
