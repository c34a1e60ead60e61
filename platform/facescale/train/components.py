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
    """The classifier named by ``classifier.type`` (replicated ones with parameters are DDP-wrapped).

    Raises:
        ValueError: ``classifier.type: ffc`` with a pool larger than ``num_classes`` or smaller than one global
            gallery batch's identities, or with DeepSpeed ZeRO-3.
    """
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
    if c.type == "ffc":
        return _build_ffc(cfg, margin, num_classes, device)
    raise ValueError(f"classifier.type {c.type!r} is not supported")


def _build_ffc(cfg: FaceScaleConfig, margin: nn.Module, num_classes: int, device: torch.device) -> nn.Module:
    """The F²C pool with its gallery network (the probe's architecture); replicated and never DDP-wrapped."""
    from facescale.heads.ffc import FFCClassifier, check_pool_size, resolve_pool_size
    from facescale.parallel.dist import all_gather_rows, rank_and_world_size

    f = cfg.classifier.ffc
    if cfg.train.engine == "deepspeed" and cfg.train.deepspeed.zero_stage == 3:
        raise ValueError("classifier.type ffc needs the probe backbone's whole parameters on every rank for the "
                         "gallery EMA; train.deepspeed.zero_stage 3 partitions them: use zero_stage 1 or 2, or "
                         "train.engine ddp")
    _, world_size = rank_and_world_size(None)
    pool_size = resolve_pool_size(f.pool_size, num_classes)
    check_pool_size(pool_size, num_classes, f.ids_per_batch * world_size)
    # NOTE: the gallery features and labels are all-gathered over the default group, so every rank's pool is the same.
    return FFCClassifier(margin, build_bare_backbone(cfg, device), cfg.model.embedding_size, num_classes, pool_size,
                         momentum=f.momentum, top_k=f.top_k, gather_rows=lambda t: all_gather_rows(t, None)).to(device)


def build_classifier_optimizer(cfg: FaceScaleConfig, classifier: nn.Module) -> torch.optim.Optimizer:
    """The classifier's own optimizer, of the kind ``train.optimizer`` names (sgd or adamw, same lr and decay as
    the backbone, as in arcface_torch): torch SGD/AdamW for a replicated head, the sparse row optimizer for Partial FC.

    The backbone's optimizer belongs to the engine (``facescale.train.engine``). Partial FC's state is sharded and
    saved by the classifier itself (``attach_optimizer``); a replicated head's is saved by rank 0.
    """
    t = cfg.train
    if cfg.classifier.type == "ffc":
        # FFC has no trainable parameter (its gallery network is an EMA of the backbone): an optimizer over one empty
        # group, whose step() is a no-op, keeps the loop's lr setting, zero_grad and checkpointing unchanged.
        return torch.optim.SGD([{"params": [p for p in classifier.parameters() if p.requires_grad]}], lr=t.lr)
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
