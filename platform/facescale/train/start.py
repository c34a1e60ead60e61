"""Where a worker's backbone starts and what it evaluates: the checkpoint to resume from (the run's newest committed
one, else ``train.resume_from``), another run's weights (``train.init_from``), and the full-precision backbone that
verification and the logged model see."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from facescale import storage
from facescale.checkpoint.committed import resolve_checkpoint
from facescale.checkpoint.format import load_backbone_state, unwrap
from facescale.checkpoint.store import CheckpointStore
from facescale.config import FaceScaleConfig
from facescale.train.components import build_bare_backbone


def init_backbone(engine: Any, cfg: FaceScaleConfig) -> None:
    """Starts from another run's backbone weights (``train.init_from``), refusing a different architecture.

    ``train.init_from`` is a local directory or an ``s3://`` prefix holding ``model.pt`` (fetched here).
    """
    source = cfg.train.init_from
    with tempfile.TemporaryDirectory(prefix="facescale-init-") as tmp:
        local = source
        if storage.is_remote(source):
            local = tmp
            storage.download_file(storage.join(source, "model.pt"), Path(tmp) / "model.pt")
        elif "://" in source:
            raise ValueError(f"train.init_from: {source} is neither a local directory nor an s3:// URI")
        state, arch = load_backbone_state(local)
    want = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size}
    if arch and arch != want:
        raise ValueError(f"train.init_from: {source} holds {arch}, this run trains {want}")
    unwrap(engine.backbone).load_state_dict(state)


def resume_point(store: CheckpointStore, cfg: FaceScaleConfig) -> str | None:
    """The run's own newest committed checkpoint (a restart), else ``train.resume_from`` (a checkpoint or run)."""
    latest = store.latest()
    if latest is not None:
        return latest
    if cfg.train.resume_from:
        found = resolve_checkpoint(cfg.train.resume_from)
        if found is None:
            raise FileNotFoundError(f"train.resume_from: {cfg.train.resume_from} holds no committed checkpoint")
        return found
    return None


def full_precision_backbone(engine: Any, cfg: FaceScaleConfig, device: torch.device) -> torch.nn.Module:
    """The backbone in fp32 with all its weights, for verification and model logging. COLLECTIVE when it gathers.

    Under DDP that is the engine's own module. Under DeepSpeed the module may hold bf16/fp16 weights or (ZeRO-3)
    only a partition of them: then the engine's gathered fp32 state is loaded into a fresh copy.
    """
    module = engine.backbone
    if cfg.train.engine == "ddp":
        return module
    state = engine.state_dict()["backbone"]
    copy = build_bare_backbone(cfg, device)
    copy.load_state_dict(state)
    return copy
