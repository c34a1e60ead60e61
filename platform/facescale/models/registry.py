"""Backbone registry: register a constructor by name, build a backbone by name.

Modelled on timm's ``register_model`` / ``create_model``. A constructor is a function
``fn(embedding_size: int = 512, **kwargs) -> nn.Module`` whose ``__name__`` is the public backbone name::

    @register_backbone
    def iresnet50(embedding_size: int = 512, **kwargs) -> IResNet:
        ...

    model = build_backbone("iresnet50", embedding_size=512, dropout=0.1)

Every registered backbone takes an aligned face crop ``[B, 3, 112, 112]`` and returns ``[B, embedding_size]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = [
    "DuplicateBackboneError",
    "UnknownBackboneError",
    "build_backbone",
    "list_backbones",
    "register_backbone",
]

BackboneFn = TypeVar("BackboneFn", bound=Callable[..., nn.Module])

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


class UnknownBackboneError(ValueError):
    """Raised when a backbone name is not registered; the message lists the registered names."""


class DuplicateBackboneError(ValueError):
    """Raised when two constructors are registered under the same name."""


def register_backbone(fn: BackboneFn) -> BackboneFn:
    """Register a backbone constructor under its function name.

    Args:
        fn: Constructor ``fn(embedding_size: int = 512, **kwargs) -> nn.Module``.

    Returns:
        ``fn`` unchanged, so this can be used as a decorator.

    Raises:
        DuplicateBackboneError: If a backbone with the same name is already registered.
    """
    name = fn.__name__
    if name in _BACKBONES:
        raise DuplicateBackboneError(f"backbone {name!r} is already registered")
    _BACKBONES[name] = fn
    return fn


def list_backbones() -> list[str]:
    """Return the names of all registered backbones, sorted."""
    return sorted(_BACKBONES)


def build_backbone(name: str, embedding_size: int = 512, **kwargs: object) -> nn.Module:
    """Build a registered backbone.

    Args:
        name: Registered backbone name, e.g. ``"iresnet50"``; see :func:`list_backbones`.
        embedding_size: Length of the output embedding.
        **kwargs: Extra constructor arguments, e.g. ``dropout`` for the IResNets.

    Returns:
        The backbone, mapping ``[B, 3, 112, 112]`` images to ``[B, embedding_size]`` embeddings.

    Raises:
        UnknownBackboneError: If ``name`` is not registered.
        ValueError: If ``embedding_size`` is not a positive integer.
    """
    if name not in _BACKBONES:
        known = ", ".join(list_backbones()) or "(none registered)"
        raise UnknownBackboneError(f"unknown backbone {name!r}; registered backbones: {known}")
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size <= 0:
        raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
    return _BACKBONES[name](embedding_size=embedding_size, **kwargs)
