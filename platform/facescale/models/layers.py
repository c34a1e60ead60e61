"""Building blocks shared by the FaceScale backbones.

Every backbone file builds on these instead of redefining them:

* :class:`ConvBNAct` — convolution (no bias) → BatchNorm → optional PReLU, the unit that face-recognition
  backbones repeat everywhere ("linear" blocks are the same thing with the activation off).
* :class:`SEModule` — squeeze-and-excitation channel gating (Hu et al., "Squeeze-and-Excitation Networks",
  CVPR 2018).
* :func:`build_variable_group_conv` — a convolution whose number of groups follows the input width so that each
  group sees a fixed number of channels (Zhang et al., "VarGNet", 2019).
* :func:`build_features_bn` — the BatchNorm1d that closes an embedding head, optionally with its scale frozen at 1.
* :class:`DropPath` — stochastic depth on a residual branch (Huang et al., "Deep Networks with Stochastic Depth",
  ECCV 2016), as timm's ``DropPath``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBNAct", "DropPath", "SEModule", "build_features_bn", "build_variable_group_conv", "init_weights"]


class ConvBNAct(nn.Sequential):
    """Conv2d (bias-free) → BatchNorm2d → optional per-channel PReLU.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel size.
        stride: Convolution stride.
        padding: Zero padding; ``None`` means "same" padding for odd kernels (``kernel_size // 2``).
        groups: Convolution groups.
        act: Whether to end with a PReLU (``False`` gives the "linear" block of MobileFaceNet/VarGFaceNet).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        padding = kernel_size // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if act:
            layers.append(nn.PReLU(out_channels))
        super().__init__(*layers)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability ``p``.

    Kept samples are scaled by ``1 / (1 - p)`` so the expected output is unchanged; in eval mode (or at ``p = 0``)
    this is the identity. Wrap the *branch*, not the sum: ``x + drop_path(branch(x))``.

    Args:
        p: Drop probability in ``[0, 1)``.

    Raises:
        ValueError: If ``p`` is outside ``[0, 1)``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop whole samples of ``x`` (any shape ``[B, ...]``) in training; the identity otherwise."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # One Bernoulli draw per sample, broadcast over the other dimensions.
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SEModule(nn.Module):
    """Squeeze-and-excitation: global average pool → 1×1 conv (C → C/r) → PReLU → 1×1 conv (C/r → C) → sigmoid.

    The squeeze activation is a per-channel PReLU, as in the InsightFace reference implementations of
    SE-LResNet and VarGFaceNet (the original SE paper uses ReLU).

    Args:
        channels: Channels of the gated feature map.
        reduction: Squeeze ratio ``r``; the bottleneck has ``max(1, channels // r)`` channels.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.act = nn.PReLU(hidden)
        self.excite = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale each channel of ``x`` by a learned gate in (0, 1)."""
        w = self.gate(self.excite(self.act(self.squeeze(self.pool(x)))))
        return x * w


def build_variable_group_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    channels_per_group: int = 8,
    padding: int | None = None,
) -> nn.Conv2d:
    """Build a bias-free variable-group convolution (VarGNet).

    Unlike depthwise convolution (one channel per group), the number of groups is
    ``in_channels // channels_per_group`` so every group sees the same number of input channels, which keeps
    the compute per layer balanced as the width changes.

    Args:
        in_channels: Input channels; must be divisible by ``channels_per_group``.
        out_channels: Output channels; must be divisible by the resulting number of groups.
        kernel_size: Square kernel size.
        stride: Convolution stride.
        channels_per_group: Input channels seen by each group (8 in VarGFaceNet).
        padding: Zero padding; ``None`` means ``kernel_size // 2``.

    Returns:
        The convolution module.

    Raises:
        ValueError: If the channel counts do not split evenly into groups.
    """
    if channels_per_group <= 0 or in_channels % channels_per_group:
        raise ValueError(
            f"variable-group conv: in_channels={in_channels} is not divisible by "
            f"channels_per_group={channels_per_group}"
        )
    groups = in_channels // channels_per_group
    if out_channels % groups:
        raise ValueError(f"variable-group conv: out_channels={out_channels} is not divisible by groups={groups}")
    padding = kernel_size // 2 if padding is None else padding
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)


def build_features_bn(num_features: int, fix_scale: bool = True) -> nn.BatchNorm1d:
    """Build the BatchNorm1d that normalises the embedding at the end of a head.

    Args:
        num_features: Embedding size.
        fix_scale: Freeze the affine scale at 1 (``requires_grad=False``) and learn only the shift, as in the
            ArcFace reference heads; the parameter still exists, so checkpoints and parameter counts include it.

    Returns:
        The BatchNorm1d module.
    """
    bn = nn.BatchNorm1d(num_features, eps=1e-5)
    if fix_scale:
        # Constant scale: the margin losses normalise embeddings anyway, and a free scale only adds noise.
        nn.init.ones_(bn.weight)
        bn.weight.requires_grad_(False)
    return bn


def init_weights(module: nn.Module) -> None:
    """Initialise a backbone in place: Kaiming-normal convs, unit/zero BatchNorm, small-normal linear layers.

    Meant for ``model.apply(init_weights)``; it only touches the module passed in, never its children.

    Args:
        module: One module of the tree.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
