"""Builds the pieces the loop trains: backbone, classifier and their optimizers, from the config tree."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facescale.config import FaceScaleConfig
from facescale.heads import NormalizedLinearClassifier
from facescale.heads.config import build_margin
from facescale.models import build_backbone


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP when a process group is up (Ray Train sets one up); the bare module otherwise."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return module
    if torch.distributed.get_world_size() == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def build_model(cfg: FaceScaleConfig, device: torch.device) -> nn.Module:
    """The backbone named in the config, on ``device``, DDP-wrapped when distributed."""
    kwargs: dict[str, Any] = {}
    if cfg.model.dropout:
        kwargs["dropout"] = cfg.model.dropout
    backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size, **kwargs).to(device)
    return wrap_ddp(backbone, device)


def build_classifier(cfg: FaceScaleConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The classifier named by ``classifier.type`` (replicated ones are DDP-wrapped)."""
    margin = build_margin(cfg.classifier.margin)
    if cfg.classifier.type == "linear":
        head = NormalizedLinearClassifier(margin, cfg.model.embedding_size, num_classes).to(device)
        return wrap_ddp(head, device)
    raise ValueError(f"classifier.type {cfg.classifier.type!r} is not supported")


def build_optimizers(cfg: FaceScaleConfig, backbone: nn.Module, classifier: nn.Module) -> dict[str, Any]:
    """SGD (momentum, weight decay) over backbone and replicated classifier parameters."""
    params = [{"params": list(backbone.parameters()), "name": "backbone"},
              {"params": list(classifier.parameters()), "name": "classifier"}]
    sgd = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                          weight_decay=cfg.train.weight_decay)
    return {"sgd": sgd}
