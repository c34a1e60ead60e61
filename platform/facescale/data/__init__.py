"""Data layer: the shard contract and manifest, converters, synthetic identities, and training loaders.

S3 (``facescale.storage.s3``, boto3) is not imported here: it loads only when an ``s3://`` URL is used.
"""

from facescale.data.convert import ConvertError, ConvertReport, from_folder, from_rec
from facescale.data.errors import DataError, ImageDecodeError, LabelError, ManifestError, ShardError
from facescale.data.factory import build_train_loader, dali_unavailable
from facescale.data.loader import FaceLoader, TorchFaceLoader, build_loader
from facescale.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest
from facescale.data.recordio import InsightFaceRec, RecordIOError
from facescale.data.shard_cache import ShardCacheError
from facescale.data.shard_sets import index_shard_set
from facescale.data.shards import ShardSetWriter, decode_image, iter_shard, parse_label, verify_manifest
from facescale.data.synth import VERIFICATION_NAME, synthesize
from facescale.data.transforms import normalize_images
from facescale.data.wds_index import ensure_indices

__all__ = [
    "MANIFEST_NAME",
    "VERIFICATION_NAME",
    "ConvertError",
    "ConvertReport",
    "DataError",
    "FaceLoader",
    "ImageDecodeError",
    "InsightFaceRec",
    "LabelError",
    "Manifest",
    "ManifestError",
    "RecordIOError",
    "ShardCacheError",
    "ShardError",
    "ShardInfo",
    "ShardSetWriter",
    "TorchFaceLoader",
    "build_loader",
    "build_train_loader",
    "dali_unavailable",
    "decode_image",
    "ensure_indices",
    "from_folder",
    "from_rec",
    "index_shard_set",
    "iter_shard",
    "load_manifest",
    "normalize_images",
    "parse_label",
    "synthesize",
    "verify_manifest",
]
