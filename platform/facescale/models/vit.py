"""Vision Transformers for 112×112 faces, as insightface's arcface_torch defines them (``backbones/vit.py``).

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", ICLR 2021
(arXiv:2010.11929), in the face-recognition form of arcface_torch (An et al., "Partial FC", CVPR 2022, and its
WebFace42M ViT baselines):

* a 9×9 / stride-9 patch embedding of the 112×112 crop (12×12 = 144 patches; the last 4 pixel rows and columns
  are not seen, as in arcface_torch), a learned position embedding and no class token;
* pre-norm blocks (LayerNorm → 8-head attention, LayerNorm → MLP with ratio 4 and ReLU6), qkv without bias,
  stochastic depth growing linearly from 0 to ``drop_path`` over the blocks;
* the *feature head* keeps the spatial layout instead of pooling: the final LayerNorm's ``[B, 144, D]`` tokens
  are flattened and mapped ``Linear(144·D → D) → BN → Linear(D → embedding) → BN`` (BN eps 2e-5, no biases);
* during training only, a random ``mask_ratio`` of the patch tokens is dropped per sample before the blocks
  (MAE-style shuffling, He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022) and refilled
  with a learned mask token after the final norm, so the head always sees 144 tokens.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
a GPU, the same math on the CPU and in ONNX). arcface_torch forces the attention matrix to fp32 under fp16
autocast; under bf16 (this project's low precision) the exponent range makes that unnecessary.

Sizes at embedding 512 (parameters): ``vit_t`` 19.14 M, ``vit_s`` 76.02 M, ``vit_b`` 113.83 M, ``vit_l`` 255.68 M
-- most of it in the first head layer (144·D·D). ``activation_checkpointing`` recomputes each block in the
backward pass (``torch.utils.checkpoint``), trading about one extra forward for activation memory; arcface_torch
turns it on for ``vit_b`` and larger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import DropPath
from .registry import register_backbone

__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "VisionTransformer"]

IMAGE_SIZE = 112
PATCH_SIZE = 9
NUM_HEADS = 8
MLP_RATIO = 4.0
FEATURE_BN_EPS = 2e-5  # arcface_torch's head BatchNorm eps (as in its IResNets)


class Mlp(nn.Module):
    """Linear (D → hidden) → ReLU6 → Linear (hidden → D), arcface_torch's transformer MLP."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP token-wise to ``[B, N, D]``."""
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; qkv without bias (arcface_torch's ``qkv_bias=False``), output projection with.

    Args:
        dim: Token width; must be divisible by ``num_heads``.
        num_heads: Attention heads.
    """

    def __init__(self, dim: int, num_heads: int = NUM_HEADS) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the ``N`` tokens of ``[B, N, D]``; scale ``1/sqrt(D / num_heads)``."""
        b, n, d = x.shape
        # [B, N, 3·D] → [3, B, heads, N, D/heads]
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + dp(attn(ln(x)))``, then ``x + dp(mlp(ln(x)))``.

    Args:
        dim: Token width.
        drop_path: Stochastic-depth probability of both residual branches.
    """

    def __init__(self, dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * MLP_RATIO))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``[B, N, D]`` tokens."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution → ``[B, num_patches, D]`` tokens (row-major patch order).

    Args:
        dim: Token width.
        image_size: Input height and width.
        patch_size: Patch side and stride.
    """

    def __init__(self, dim: int, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        self.image_size = image_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, 3, H, W]`` images (``H = W = image_size``) to ``[B, num_patches, D]``."""
        if not torch.jit.is_tracing() and x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"ViT input must be [B, 3, {self.image_size}, {self.image_size}], got {list(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """The arcface_torch face ViT (see the module docstring).

    Args:
        embedding_size: Length of the output embedding.
        dim: Token width.
        depth: Number of transformer blocks.
        mask_ratio: Fraction of patch tokens dropped per sample in training (``[0, 1)``); never in eval.
        drop_path: Stochastic-depth rate of the last block (linear from 0 at the first); never in eval.
        activation_checkpointing: Recompute each block in the backward pass (training with gradients only).

    Raises:
        ValueError: If ``mask_ratio`` or ``drop_path`` is outside ``[0, 1)``.
    """

    def __init__(self, embedding_size: int = 512, dim: int = 512, depth: int = 12, mask_ratio: float = 0.1,
                 drop_path: float = 0.1, activation_checkpointing: bool = False) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.dim = dim
        self.mask_ratio = mask_ratio
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = PatchEmbed(dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        # Without masking the mask token never gets a gradient; frozen, DDP and ZeRO do not wait for one (it stays
        # in the state dict, so checkpoints load across mask ratios).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim), requires_grad=mask_ratio > 0)
        # Stochastic-depth decay rule: linear from 0 to drop_path (Python floats: no tensor on the meta device).
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=FEATURE_BN_EPS),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=FEATURE_BN_EPS),
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_vit_weights)

    def _random_masking(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` of each sample's tokens; returns them and the un-shuffling index."""
        b, n, d = x.shape
        num_keep = max(int(n * (1.0 - self.mask_ratio)), 1)
        # Per-sample random permutation by sorting noise: the first num_keep of it are kept.
        shuffle = torch.rand(b, n, device=x.device).argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        kept = x.gather(1, shuffle[:, :num_keep, None].expand(-1, -1, d))
        return kept, restore

    def _unmask(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Append mask tokens for the dropped positions and put every token back in patch order."""
        b, kept, d = x.shape
        fill = self.mask_token.to(x.dtype).expand(b, restore.shape[1] - kept, d)
        return torch.cat([x, fill], dim=1).gather(1, restore[..., None].expand(-1, -1, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, 3, 112, 112]`` images to ``[B, embedding_size]`` embeddings."""
        x = self.patch_embed(x) + self.pos_embed
        restore = None
        if self.training and self.mask_ratio > 0:
            x, restore = self._random_masking(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            # Non-reentrant checkpointing keeps the RNG state, so drop-path draws the same mask when recomputed.
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        x = self.norm(x)
        if restore is not None:
            x = self._unmask(x, restore)
        return self.feature(x.flatten(1))


def _init_vit_weights(module: nn.Module) -> None:
    # arcface_torch (after timm): truncated-normal(0.02) linear weights, zero biases, unit LayerNorm; the patch
    # convolution keeps PyTorch's default init, BatchNorm its unit/zero init.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@register_backbone
def vit_t(embedding_size: int = 512, **kwargs: object) -> VisionTransformer:
    """ViT-T: width 256, 12 blocks, mask 0.1, drop-path 0.1 (arcface_torch ``vit_t``), ≈19.14 M parameters."""
    kwargs = {"mask_ratio": 0.1, "drop_path": 0.1, **kwargs}
    return VisionTransformer(embedding_size, dim=256, depth=12, **kwargs)  # type: ignore[arg-type]


@register_backbone
def vit_s(embedding_size: int = 512, **kwargs: object) -> VisionTransformer:
    """ViT-S: width 512, 12 blocks, mask 0.1, drop-path 0.1 (arcface_torch ``vit_s``), ≈76.02 M parameters."""
    kwargs = {"mask_ratio": 0.1, "drop_path": 0.1, **kwargs}
    return VisionTransformer(embedding_size, dim=512, depth=12, **kwargs)  # type: ignore[arg-type]


@register_backbone
def vit_b(embedding_size: int = 512, **kwargs: object) -> VisionTransformer:
    """ViT-B: width 512, 24 blocks, mask 0.1, drop-path 0.1 (arcface_torch ``vit_b``), ≈113.83 M parameters."""
    kwargs = {"mask_ratio": 0.1, "drop_path": 0.1, **kwargs}
    return VisionTransformer(embedding_size, dim=512, depth=24, **kwargs)  # type: ignore[arg-type]


@register_backbone
def vit_l(embedding_size: int = 512, **kwargs: object) -> VisionTransformer:
    """ViT-L: width 768, 24 blocks, mask 0.05, drop-path 0.05 (arcface_torch ``vit_l_dp005_mask_005``, its only
    ViT-L), ≈255.68 M parameters."""
    kwargs = {"mask_ratio": 0.05, "drop_path": 0.05, **kwargs}
    return VisionTransformer(embedding_size, dim=768, depth=24, **kwargs)  # type: ignore[arg-type]
