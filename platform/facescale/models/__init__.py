"""Face-recognition backbones behind a name registry.

Use :func:`build_backbone` with a name from :func:`list_backbones`; every backbone maps aligned
``[B, 3, 112, 112]`` face crops to ``[B, embedding_size]`` embeddings.
"""

# Importing the model modules registers their constructors.
from . import iresnet, mobilefacenet, vargfacenet, vit  # noqa: F401
from .registry import DuplicateBackboneError, UnknownBackboneError, build_backbone, list_backbones, register_backbone

__all__ = [
    "DuplicateBackboneError",
    "UnknownBackboneError",
    "build_backbone",
    "list_backbones",
    "register_backbone",
]
