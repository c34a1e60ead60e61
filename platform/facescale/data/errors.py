"""Typed errors of the data layer.

Every error names what the user has to look at: the manifest path, the shard, and the sample key where there is
one. The structured fields (``path``, ``shard``, ``key``) carry the same facts for code that handles the error.

All classes accept a single positional message so that ``torch.utils.data.DataLoader`` can re-raise them with
their own type in the main process when they happen in a worker (it rebuilds the exception as ``type(msg)``).
"""

from __future__ import annotations


class DataError(Exception):
    """Base class of every error raised by ``facescale.data``."""


class ManifestError(DataError):
    """A dataset manifest is missing, unreadable, or does not describe its shards.

    Args:
        message: What is wrong; should already name the manifest path.
        path: The manifest file or dataset directory concerned.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ShardError(DataError):
    """A shard, or one sample inside it, breaks the shard contract.

    Args:
        message: What is wrong; should already name the shard and, where there is one, the sample key.
        shard: URL or path of the shard.
        key: Key of the offending sample, if the problem is one sample.
    """

    def __init__(self, message: str, shard: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard
        self.key = key


class LabelError(ShardError):
    """A sample's ``.cls`` is missing, not an integer, negative, or not below ``num_classes``."""


class ImageDecodeError(ShardError):
    """A sample's ``.jpg`` cannot be decoded, or decodes to the wrong shape."""
