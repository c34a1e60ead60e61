"""The PFE uncertainty head and the model that pairs it with a frozen backbone.

Shi & Jain, "Probabilistic Face Embeddings", ICCV 2019 (arXiv:1904.09658), sec. 3.3: a face is the Gaussian
``N(mu, diag(sigma^2))``; ``mu`` is the trained backbone's embedding, kept fixed, and a small head learns
``log sigma^2`` (one value per embedding dimension) from the backbone's last feature map. The head follows the
authors' code (seasonSH/Probabilistic-Face-Embeddings, ``models/uncertainty_module.py``):

    flatten -> FC (no bias) -> BN -> ReLU -> FC (no bias) -> BN (no affine) -> gamma * x + beta -> log(1e-6 + exp(.))

with ``gamma``, ``beta`` two scalars shared by every dimension, initialised to 1e-4 and -7 (so training starts from
``sigma^2 ~ exp(-7)`` for every face), BN decay 0.995 and epsilon 1e-3 as there.

The "last feature map" is the input of each backbone family's embedding layer, taken with a forward pre-hook that
lives only for one :meth:`PFEModel.forward_pfe` call (so the model pickles as any module does, and the embedding is
exactly what the backbone's own forward returns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from facescale.models.iresnet import IResNet
from facescale.models.mobilefacenet import MobileFaceNet
from facescale.models.vargfacenet import VarGFaceNet
from facescale.models.vit import VisionTransformer

__all__ = ["EMBEDDING_LAYERS", "PFEModel", "PFEShapeError", "UncertaintyHead", "backbone_shapes", "embedding_layer"]

# The module whose *input* is the last feature map, per backbone family (models/): IResNet's "E" output block
# (BN -> dropout -> FC -> BN) sees the 7x7 map of the last stage; MobileFaceNet's GDC head the 7x7 map of its 1x1
# conv; VarGFaceNet's embedding block the 7x7 map of the last stage; the ViT's feature MLP the flattened tokens.
EMBEDDING_LAYERS: dict[type[nn.Module], str] = {
    IResNet: "head",
    MobileFaceNet: "head",
    VarGFaceNet: "embedding",
    VisionTransformer: "feature",
}
# The authors' uncertainty module: BN decay 0.995 (torch momentum 1 - decay), epsilon 1e-3; scale/shift init.
BN_MOMENTUM = 0.005
BN_EPS = 1e-3
SCALE_INIT, SHIFT_INIT = 1e-4, -7.0
SIGMA_SQ_EPS = 1e-6
PROBE_SIZE = (112, 112)


class PFEShapeError(ValueError):
    """A backbone whose feature map or embedding size does not fit the uncertainty head; names both."""


def embedding_layer(backbone: nn.Module) -> nn.Module:
    """The backbone's embedding layer, whose input is the last feature map (see :data:`EMBEDDING_LAYERS`).

    Raises:
        PFEShapeError: A backbone of a family the head does not know.
    """
    for family, name in EMBEDDING_LAYERS.items():
        if isinstance(backbone, family):
            return getattr(backbone, name)
    known = ", ".join(f"{f.__name__} (.{n})" for f, n in EMBEDDING_LAYERS.items())
    raise PFEShapeError(f"the PFE head needs the last feature map of the backbone, but {type(backbone).__name__} is "
                        f"not a known backbone family: {known}")


def _features_and_embedding(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last feature map, embedding) of ``x``, from one forward of the backbone."""
    captured: list[torch.Tensor] = []
    handle = embedding_layer(backbone).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        embedding = backbone(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{type(backbone).__name__}: its embedding layer ran {len(captured)} times in one forward")
    return captured[0], embedding


def backbone_shapes(backbone: nn.Module) -> tuple[tuple[int, ...], int]:
    """(feature-map shape without the batch, embedding size) of a backbone, from one forward of two blank images.

    The backbone is run in eval mode (and put back in the mode it was in) without gradients.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            fmap, embedding = _features_and_embedding(backbone, torch.zeros(2, 3, *PROBE_SIZE, device=device))
    finally:
        backbone.train(was_training)
    return tuple(int(s) for s in fmap.shape[1:]), int(embedding.shape[1])


class UncertaintyHead(nn.Module):
    """``log sigma^2`` per embedding dimension from a feature map (Shi & Jain 2019; the authors' module).

    Args:
        feature_shape: Shape of one sample's feature map, e.g. ``(512, 7, 7)``; it is flattened.
        embedding_size: Number of ``log sigma^2`` outputs (the backbone's embedding size).
        hidden_size: Width of the first FC layer; None: ``embedding_size``, as the authors' code.
        bn_momentum: Momentum of both BN layers' running statistics (authors: decay 0.995, i.e. 0.005).
    """

    def __init__(self, feature_shape: Sequence[int], embedding_size: int, hidden_size: int | None = None,
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.feature_shape = tuple(int(s) for s in feature_shape)
        self.embedding_size = int(embedding_size)
        hidden = int(hidden_size or embedding_size)
        self.fc1 = nn.Linear(math.prod(self.feature_shape), hidden, bias=False)  # BN follows: no bias (slim)
        self.bn1 = nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=bn_momentum)
        self.fc2 = nn.Linear(hidden, self.embedding_size, bias=False)
        self.bn2 = nn.BatchNorm1d(self.embedding_size, eps=BN_EPS, momentum=bn_momentum, affine=False)
        # One scale and one shift for all dimensions ("Share the gamma and beta for all dimensions").
        self.scale = nn.Parameter(torch.tensor(SCALE_INIT))
        self.shift = nn.Parameter(torch.tensor(SHIFT_INIT))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map ``[B, *feature_shape]`` feature maps to ``[B, embedding_size]`` values of ``log sigma^2``.

        Raises:
            PFEShapeError: The feature maps are not of ``feature_shape``.
        """
        if tuple(features.shape[1:]) != self.feature_shape:
            raise PFEShapeError(f"the uncertainty head takes feature maps of shape {self.feature_shape}, got "
                                f"{tuple(features.shape[1:])}")
        h = F.relu(self.bn1(self.fc1(features.flatten(1))))
        log_sigma_sq = self.scale * self.bn2(self.fc2(h)) + self.shift
        # log(eps + exp(x)) keeps sigma^2 >= eps (the authors' "epsilon for numerical stableness"), written stably.
        return torch.logaddexp(log_sigma_sq, torch.full_like(log_sigma_sq, math.log(SIGMA_SQ_EPS)))


class PFEModel(nn.Module):
    """A frozen backbone and its uncertainty head, logged and loaded as one model.

    ``forward`` is the backbone's, unchanged, so every evaluation of embeddings works on it; ``forward_pfe`` gives the
    Gaussian embedding; ``forward_with_pfe`` both from one backbone pass. The backbone stays in eval mode and without
    gradients whatever ``train()`` is called with.

    Args:
        backbone: A backbone of a known family (:data:`EMBEDDING_LAYERS`), trained.
        head: The uncertainty head; it must fit the backbone's feature map and embedding size.

    Raises:
        PFEShapeError: The head does not fit the backbone (both shapes named), or the backbone family is unknown.
    """

    def __init__(self, backbone: nn.Module, head: UncertaintyHead) -> None:
        super().__init__()
        feature_shape, embedding_size = backbone_shapes(backbone)
        if (feature_shape, embedding_size) != (head.feature_shape, head.embedding_size):
            raise PFEShapeError(f"the uncertainty head does not fit the model: the head takes feature maps "
                                f"{head.feature_shape} and embedding size {head.embedding_size}; the model "
                                f"({type(backbone).__name__}) has feature maps {feature_shape} and embedding size "
                                f"{embedding_size}")
        self.backbone = backbone.eval().requires_grad_(False)
        self.head = head

    def train(self, mode: bool = True) -> PFEModel:
        """Sets the head's mode; the backbone stays frozen in eval mode (its BN statistics never move)."""
        self.training = mode
        self.head.train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's embedding of ``[B, 3, 112, 112]`` images, unchanged."""
        return self.backbone(x)

    def forward_pfe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``mu`` L2-normalised ``[B, D]``, ``sigma^2 [B, D]`` > 0) of ``[B, 3, 112, 112]`` images.

        Gradients flow into the head only (the backbone runs without them).
        """
        mu, log_sigma_sq = self.forward_log_sigma_sq(x)
        return mu, log_sigma_sq.exp()

    def forward_with_pfe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embedding, ``mu``, ``sigma^2``) of ``[B, 3, 112, 112]`` images from one forward of the backbone.

        The embedding is :meth:`forward`'s, unchanged (un-normalised: evaluation sums it over flips and reads its norm
        as a quality score); ``mu`` and ``sigma^2`` are :meth:`forward_pfe`'s (``mu`` is the normalised embedding, not
        the embedding itself). ``facescale eval --pfe`` needs all three per image; this gives them for one backbone
        pass instead of two.
        """
        embedding, log_sigma_sq = self._embedding_and_log_sigma_sq(x)
        return embedding, F.normalize(embedding.float(), dim=1), log_sigma_sq.exp()

    def forward_log_sigma_sq(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``mu`` L2-normalised, ``log sigma^2``): what the MLS loss trains on."""
        embedding, log_sigma_sq = self._embedding_and_log_sigma_sq(x)
        return F.normalize(embedding.float(), dim=1), log_sigma_sq  # the paper's mu: the normalised embedding

    def _embedding_and_log_sigma_sq(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the backbone's embedding, as :meth:`forward` returns it; ``log sigma^2`` from the head), one forward."""
        with torch.no_grad():
            fmap, embedding = _features_and_embedding(self.backbone, x)
        return embedding, self.head(fmap.float())
