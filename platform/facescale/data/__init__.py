"""Data layer: the shard contract and manifest, synthetic identities, and training loaders."""

from facescale.data.errors import DataError, ImageDecodeError, LabelError, ManifestError, ShardError
from facescale.data.loader import FaceLoader, TorchFaceLoader, build_loader
from facescale.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    ShardSetWriter,
    decode_image,
    iter_shard,
    load_manifest,
    parse_label,
    verify_manifest,
)
from facescale.data.synth import VERIFICATION_NAME, synthesize

__all__ = [
    "MANIFEST_NAME",
    "VERIFICATION_NAME",
    "DataError",
    "FaceLoader",
    "ImageDecodeError",
    "LabelError",
    "Manifest",
    "ManifestError",
    "ShardError",
    "ShardInfo",
    "ShardSetWriter",
    "TorchFaceLoader",
    "build_loader",
    "decode_image",
    "iter_shard",
    "load_manifest",
    "parse_label",
    "synthesize",
    "verify_manifest",
]
