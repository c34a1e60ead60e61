"""The backbone engine: how the replicated backbone trains data-parallel -- torch DDP or DeepSpeed ZeRO.

The loop drives both through one interface, one optimizer step at a time::

    for i, batch in enumerate(micro_batches):                 # engine.accum_steps of them
        with engine.micro_batch(last=i == engine.accum_steps - 1):
            loss = classifier(engine.forward(images), labels)
            engine.backward(loss)                             # divides by accum_steps first
    norm = engine.grad_norm()                                 # collective under DeepSpeed
    applied = engine.step()                                   # clip + update + zero grads

``images`` are the model input in ``engine.input_dtype`` (``facescale.data.transforms.normalize_images`` makes it
from the loaders' uint8 batches on the device). The training step keeps the norm on the device
(``grad_norm_tensor``), folds it into its one host read (the non-finite flags), and tells ``step`` the verdict
(``step(finite=...)``): the engines read nothing on the host themselves (DeepSpeed's own ZeRO step still does).

Only the backbone is in the engine. The Partial FC classifier is already sharded by class, so it stays outside
DDP's reduction and ZeRO's partitioning with its own optimizer; its gradients still flow from ``backward`` (the
same scaled loss), so they are means over the accumulated micro-batches too -- times ``loss_scale`` under fp16.

Gradient accumulation divides the loss by the number of micro-batches, so the update equals one over the whole
batch; the lr schedule steps once per optimizer step. (insightface's arcface_torch gets both wrong, see
deepinsight/insightface#1996.)

Checkpoints are engine- and world-size independent: ``state_dict()`` holds the full fp32 backbone and per-parameter
optimizer state by parameter name, so a run saved under ZeRO-2 on 2 ranks resumes under DDP on 1 and back.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facescale.config import FaceScaleConfig, TrainConfig
from facescale.train.engine_base import (  # noqa: F401  (re-exported: the engine's public surface)
    _DTYPES,
    BackboneEngine,
    EngineError,
    _cpu_fp32,
    _rank0,
    _state_tensor,
    build_backbone_optimizer,
)
from facescale.train.engine_config import build_deepspeed_config

log = logging.getLogger("facescale.train.engine")


class DDPEngine(BackboneEngine):
    """Torch DDP (the bare backbone when there is no process group or one rank); bf16 by autocast."""

    def __init__(self, backbone: nn.Module, device: torch.device, train: TrainConfig) -> None:
        super().__init__(backbone, build_backbone_optimizer(backbone.parameters(), train), train)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        device_ids = [device.index] if device.type == "cuda" else None
        self.model: nn.Module = DistributedDataParallel(backbone, device_ids=device_ids) if distributed else backbone
        self._bf16 = train.bf16
        # Autocast runs the convolutions in bf16 and would cast fp32 images to it first: normalise into bf16 directly.
        self.input_dtype = torch.bfloat16 if train.bf16 else torch.float32

    def _micro_batch_context(self, last: bool) -> contextlib.AbstractContextManager:
        # NOTE: no_sync skips DDP's gradient all-reduce: non-final micro-batches only accumulate locally, and the
        # last one's backward all-reduces (averages over ranks) the accumulated sum once.
        if isinstance(self.model, DistributedDataParallel) and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=self._bf16):
            return self.model(images).float()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.backbone.parameters() if p.grad is not None]

    def _compute_grad_norm(self) -> torch.Tensor:
        # DDP's all-reduce left the same averaged gradients on every rank: a local norm is the global one.
        return torch.nn.utils.get_total_norm(self._grads(), norm_type=2.0)

    def step(self, finite: bool | None = None) -> bool:
        norm = self.grad_norm_tensor()
        if not (math.isfinite(norm) if finite is None else finite):
            self.skip_step()
            return False
        if self.grad_clip is not None:
            # Same rule as clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1 (on the device).
            torch.nn.utils.clip_grads_with_norm_(self.backbone.parameters(), self.grad_clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._done()
        return True

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._done()

    def state_dict(self) -> dict[str, Any]:
        names = {p: n for n, p in self.backbone.named_parameters()}
        opt_state = {names[p]: {k: _cpu_fp32(s[k]) for k in self._state_keys if torch.is_tensor(s.get(k))}
                     for p, s in self.optimizer.state.items()}
        params = dict(self.backbone.named_parameters())
        backbone = {k: _cpu_fp32(v if k in params else _rank0(v)) for k, v in self.backbone.state_dict().items()}
        return {"backbone": backbone,
                "optimizer": {"state": opt_state, "param_groups": self._param_groups_state()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        opt = state["optimizer"]
        self._check_backbone_keys(state["backbone"], opt["state"])
        self.backbone.load_state_dict(state["backbone"])
        params = dict(self.backbone.named_parameters())
        self.optimizer.state.clear()
        for name, entry in opt["state"].items():
            p = params[name]
            self.optimizer.state[p] = {k: _state_tensor(k, entry[k], p) for k in self._state_keys if k in entry}
        self._load_param_groups(opt["param_groups"])


def build_engine(cfg: FaceScaleConfig, backbone: nn.Module, device: torch.device) -> BackboneEngine:
    """The engine named by ``train.engine`` around ``backbone`` (already on ``device``, same init on every rank).

    Args:
        cfg: The run's config (``train``: engine, optimizer, clipping, accumulation, precision, ``deepspeed``).
        backbone: The bare backbone module on ``device``.
        device: This rank's device (``cpu`` or ``cuda:<local rank>``).

    Returns:
        A :class:`DDPEngine` or a ``facescale.train.engine_deepspeed.DeepSpeedEngine``.
    """
    if cfg.train.engine == "ddp":
        return DDPEngine(backbone, device, cfg.train)
    if cfg.train.engine == "deepspeed":
        # A module of its own: DeepSpeed is imported only by runs that use it.
        from facescale.train.engine_deepspeed import DeepSpeedEngine, ensure_process_group

        ensure_process_group(device)
        return DeepSpeedEngine(backbone, device, cfg.train, build_deepspeed_config(cfg.train))
    raise EngineError(f"train.engine {cfg.train.engine!r} is not one of ddp, deepspeed")


