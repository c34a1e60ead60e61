"""Builds the pieces the loop trains from the config tree: the bare backbone, the classifier and its optimizer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facescale.config import FaceScaleConfig
from facescale.heads import NormalizedLinearClassifier
from facescale.heads.config import build_margin
from facescale.models import build_backbone
from facescale.parallel import PartialFC, build_partial_fc_optimizer


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP when a process group is up (Ray Train sets one up); the bare module otherwise."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return module
    if torch.distributed.get_world_size() == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def build_bare_backbone(cfg: FaceScaleConfig, device: torch.device) -> nn.Module:
    """The backbone named in the config, on ``device``, unwrapped (the engine wraps it: DDP or DeepSpeed)."""
    return build_backbone(cfg.model.backbone, cfg.model.embedding_size, **cfg.model.backbone_kwargs()).to(device)


def build_classifier(cfg: FaceScaleConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The classifier named by ``classifier.type`` (replicated ones are DDP-wrapped)."""
    margin = build_margin(cfg.classifier.margin)
    c = cfg.classifier
    subcenter_kwargs = {"subcenters": c.subcenters, "drop_after_epochs": c.drop_non_dominant_after_epochs,
                        "drop_angle_deg": c.drop_angle_deg}
    if c.type == "linear":
        from facescale.parallel.dist import all_gather_rows, all_reduce_

        # NOTE: the label check (all-gather) and AdaFace / sub-center statistics (all-reduce sum) span the default
        # group, the DDP one; both are the identity without a process group.
        head = NormalizedLinearClassifier(
            margin, cfg.model.embedding_size, num_classes, **subcenter_kwargs,
            gather_rows=lambda t: all_gather_rows(t, None),
            global_sum=lambda t: all_reduce_(t.clone(), torch.distributed.ReduceOp.SUM, None)).to(device)
        return wrap_ddp(head, device)
    if c.type == "partial_fc":
        # Sharded, not replicated: never inside DDP. Seeded like the rest of the run.
        return PartialFC(margin, cfg.model.embedding_size, num_classes, sample_rate=c.sample_rate,
                         seed=cfg.train.seed, inter_class_filter=c.inter_class_filter,
                         sparse_grad=not c.dense_state, device=device, center_dtype=c.center_dtype,
                         **subcenter_kwargs)
    raise ValueError(f"classifier.type {c.type!r} is not supported")


def build_classifier_optimizer(cfg: FaceScaleConfig, classifier: nn.Module) -> torch.optim.Optimizer:
    """The classifier's own optimizer, of the kind ``train.optimizer`` names (sgd or adamw, same lr and decay as
    the backbone, as in arcface_torch): torch SGD/AdamW for a replicated head, the sparse row optimizer for Partial FC.

    The backbone's optimizer belongs to the engine (``facescale.train.engine``). Partial FC's state is sharded and
    saved by the classifier itself (``attach_optimizer``); a replicated head's is saved by rank 0.
    """
    t = cfg.train
    if isinstance(classifier, PartialFC):
        c = cfg.classifier
        pfc_opt = build_partial_fc_optimizer(classifier.parameters(), t.optimizer, lr=t.lr, momentum=t.momentum,
                                             weight_decay=t.weight_decay, betas=t.betas, state_dtype=c.state_dtype,
                                             second_moment=c.second_moment, dense=c.dense_state)
        classifier.attach_optimizer(pfc_opt)
        return pfc_opt
    if t.optimizer == "adamw":
        return torch.optim.AdamW(classifier.parameters(), lr=t.lr, betas=t.betas, eps=t.eps,
                                 weight_decay=t.weight_decay)
    return torch.optim.SGD(classifier.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
