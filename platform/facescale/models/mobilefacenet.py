"""MobileFaceNet: a MobileNetV2-style backbone with a global depthwise-conv (GDC) embedding head.

Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on Mobile Devices",
CCBR 2018 (arXiv:1804.07573). Inverted-residual bottlenecks with PReLU; instead of global average pooling the
7×7 map is reduced by a *global depthwise convolution* (a 7×7 depthwise conv with no padding), which lets the
network weight the face regions differently; a linear layer and BN then give the embedding.

The registered ``mobilefacenet`` is the widely trained ArcFace-toolbox configuration: the paper's layout
(stride-2 stem, depthwise conv, bottleneck stages of 1+4 / 1+6 / 1+2 units) with the stage widths doubled
(``scale=2``: 128/256/256 instead of 64/128/128) and the bottleneck expansion widths kept at the paper's
values, a 512-channel GDC and a 512-d linear embedding — about 2.06 M parameters. ``scale=1`` gives the
paper's widths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import ConvBNAct, build_features_bn, init_weights
from .registry import register_backbone

__all__ = ["Bottleneck", "GDCHead", "MobileFaceNet"]


class Bottleneck(nn.Module):
    """Inverted residual: 1×1 expand (PReLU) → 3×3 depthwise(stride, PReLU) → 1×1 linear projection.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        expanded_channels: Channels of the depthwise stage.
        stride: Depthwise stride.

    The identity shortcut is added when the shape is preserved (stride 1 and ``in_channels == out_channels``).
    """

    def __init__(self, in_channels: int, out_channels: int, expanded_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBNAct(in_channels, expanded_channels, 1),
            ConvBNAct(expanded_channels, expanded_channels, 3, stride, groups=expanded_channels),
            ConvBNAct(expanded_channels, out_channels, 1, act=False),
        )
        self.use_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the bottleneck, with the identity shortcut when shapes match."""
        out = self.body(x)
        return out + x if self.use_shortcut else out


class GDCHead(nn.Module):
    """Global depthwise conv (7×7, linear) → flatten → linear (no bias) → BN1d.

    Args:
        channels: Channels of the 7×7 input map.
        embedding_size: Length of the output embedding.
    """

    def __init__(self, channels: int, embedding_size: int) -> None:
        super().__init__()
        self.gdc = ConvBNAct(channels, channels, 7, 1, padding=0, groups=channels, act=False)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(channels, embedding_size, bias=False)
        self.features = build_features_bn(embedding_size, fix_scale=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a ``[B, C, 7, 7]`` feature map to ``[B, embedding_size]``."""
        return self.features(self.linear(self.flatten(self.gdc(x))))


class MobileFaceNet(nn.Module):
    """MobileFaceNet backbone.

    Args:
        embedding_size: Length of the output embedding.
        blocks: Units in the four stages (stem depthwise, 56→28, 28→14, 14→7); the first unit of the last three
            stages down-samples, the others are residual.
        scale: Width multiplier on the stage channels (64/128/128 at ``scale=1``).
        gdc_channels: Channels of the 1×1 conv before the GDC head.

    Raises:
        ValueError: If ``blocks`` does not have four positive entries or ``scale`` is not positive.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        gdc_channels: int = 512,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"MobileFaceNet needs 4 positive stage sizes, got blocks={list(blocks)}")
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        c1, c2, c3 = 64 * scale, 128 * scale, 128 * scale
        stem_dw: nn.Module
        if blocks[0] == 1:
            stem_dw = ConvBNAct(c1, c1, 3, groups=c1)
        else:
            stem_dw = nn.Sequential(*[Bottleneck(c1, c1, 128) for _ in range(blocks[0])])
        self.stem = nn.Sequential(ConvBNAct(3, c1, 3, stride=2), stem_dw)
        # (in, out, expanded width of the down-sampling unit, expanded width of the residual units, residual units)
        plan = [(c1, c1, 128, 128, blocks[1]), (c1, c2, 256, 256, blocks[2]), (c2, c3, 512, 256, blocks[3])]
        stages: list[nn.Module] = []
        for in_ch, out_ch, down_width, width, num_units in plan:
            units = [Bottleneck(in_ch, out_ch, down_width, stride=2)]
            # The paper counts the down-sampling unit in ``n``; ``blocks`` counts only the residual units after it.
            units += [Bottleneck(out_ch, out_ch, width) for _ in range(num_units)]
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.conv_sep = ConvBNAct(c3, gdc_channels, 1)
        self.head = GDCHead(gdc_channels, embedding_size)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, 3, 112, 112]`` images to ``[B, embedding_size]`` embeddings."""
        return self.head(self.conv_sep(self.stages(self.stem(x))))


@register_backbone
def mobilefacenet(embedding_size: int = 512, **kwargs: object) -> MobileFaceNet:
    """MobileFaceNet at ``scale=2`` with a 512-d GDC head, ≈2.06 M parameters at embedding 512."""
    return MobileFaceNet(embedding_size=embedding_size, **kwargs)  # type: ignore[arg-type]
