"""The one place that picks the training loader: DALI by default, the torch loader as a logged fallback."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

import torch

from facescale.data.errors import DataError
from facescale.data.loader import FaceLoader, build_loader
from facescale.data.occlusion import with_occlusion
from facescale.data.shards import load_manifest

if TYPE_CHECKING:
    from facescale.config import FaceScaleConfig

logger = logging.getLogger(__name__)


def dali_unavailable() -> str | None:
    """``None`` when DALI and its PyTorch plugin import, else the reason they do not."""
    try:
        importlib.import_module("nvidia.dali")
        importlib.import_module("nvidia.dali.plugin.pytorch")
    except Exception as exn:  # ImportError, or OSError/RuntimeError from a broken native library
        return f"{type(exn).__name__}: {exn}"
    return None


def resolve_decode_device(decode_device: str, use_gpu: bool, device: torch.device | None) -> tuple[str, int | None]:
    """``(decode device, CUDA device index)`` for DALI's decoder.

    Args:
        decode_device: ``data.decode_device``: ``"auto"``, ``"cpu"`` or ``"mixed"``.
        use_gpu: ``scaling.use_gpu``; ``"auto"`` decodes with nvJPEG (``"mixed"``) exactly when it is set.
        device: The worker's torch device.

    Raises:
        DataError: ``"mixed"`` on a worker without a CUDA device.
    """
    on_cuda = device is not None and device.type == "cuda"
    if decode_device == "auto":
        decode_device = "mixed" if use_gpu and on_cuda else "cpu"
    if decode_device == "cpu":
        return "cpu", None
    if not on_cuda:
        raise DataError(f"data.decode_device=mixed decodes on the worker's GPU, but the worker runs on {device}; "
                        "set scaling.use_gpu: true or data.decode_device: cpu")  # fmt: skip
    assert device is not None
    return "mixed", device.index if device.index is not None else torch.cuda.current_device()


def build_train_loader(
    cfg: FaceScaleConfig, rank: int, world_size: int, device: torch.device | None = None
) -> FaceLoader:
    """Build this rank's training loader as ``cfg.data`` says; the training loop calls only this.

    ``data.loader: auto`` builds ``DaliFaceLoader`` (shards on ``s3://`` through the node-local shard cache) unless
    DALI does not import; then it builds the torch loader, logs a warning with the reason and sets it as the
    loader's ``fallback_reason`` (``None`` when the loader is the one asked for). ``data.loader: dali`` that cannot
    be honoured is an error naming the reason.

    Args:
        cfg: The run config (reads ``data.*``, ``train.batch_size``, ``train.seed``, ``scaling.use_gpu``).
        rank: This rank.
        world_size: Number of ranks.
        device: The worker's torch device (``mixed`` decoding uses its GPU; a CUDA device gets pinned batches).

    Returns:
        A ``FaceLoader``: ``epoch_samples(epoch, start_step, resume)``, ``local_position()``, ``stats``,
        ``fallback_reason``; inside an ``OcclusionLoader`` (the loader as ``.inner``) when
        ``data.augment.occlusion.p > 0``.

    Raises:
        ManifestError, ShardError, DataError: From the loader chosen (no manifest, stale index, too few samples),
            ``data.loader: dali`` without a working DALI, or a shard cache that cannot be used (``ShardCacheError``:
            ``data.cache_dir`` not writable, ``data.cache_bytes`` too small).
    """
    data = cfg.data
    occlusion = data.augment.occlusion  # erases regions of either loader's batches (data/occlusion.py says why here)
    pin = device is not None and device.type == "cuda"
    common = {"batch_size": cfg.train.batch_size, "rank": rank, "world_size": world_size, "seed": cfg.train.seed,
              "on_error": data.on_error, "pin_memory": pin}  # fmt: skip
    manifest = load_manifest(data.root)
    reason = None
    if data.loader in ("auto", "dali"):
        reason = dali_unavailable()
        if reason is None:
            from facescale.data.dali_loader import build_dali_loader  # imports DALI: only once it is known to work

            decode_device, device_id = resolve_decode_device(data.decode_device, cfg.scaling.use_gpu, device)
            loader = build_dali_loader(manifest, num_threads=max(1, data.num_workers), decode_device=decode_device,
                                       device_id=device_id, cache_dir=data.cache_dir, cache_bytes=data.cache_bytes,
                                       **common)  # fmt: skip
            logger.info("rank %d: DALI loader (%s decode, %d threads%s), %d steps per epoch", rank, decode_device,
                        loader.num_threads, f", shards cached in {loader.shard_cache.root}" if loader.shard_cache
                        else "", loader.steps_per_epoch)  # fmt: skip
            return with_occlusion(loader, occlusion.p, occlusion.regions, cfg.train.seed)
        if data.loader == "dali":
            raise DataError(f"data.loader=dali, but DALI cannot be used here: {reason}; install nvidia-dali (and its "
                            "PyTorch plugin), or set data.loader: auto (falls back to torch) or torch")  # fmt: skip
        logger.warning("rank %d: data.loader=auto falls back to the torch loader: %s", rank, reason)
    torch_loader = build_loader(manifest, num_workers=data.num_workers, **common)
    torch_loader.fallback_reason = reason
    return with_occlusion(torch_loader, occlusion.p, occlusion.regions, cfg.train.seed)
