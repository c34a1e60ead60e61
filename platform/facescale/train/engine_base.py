"""What both backbone engines share: the interface (:class:`BackboneEngine`), its errors, the backbone optimizer and
the engine-independent checkpoint layout (full fp32 backbone, optimizer state by parameter name).

``facescale.train.engine`` (DDP, and the factory) and ``facescale.train.engine_deepspeed`` (ZeRO) both build on it,
so neither imports the other at module level.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from facescale.config import TrainConfig
from facescale.parallel.dist import broadcast_

log = logging.getLogger("facescale.train.engine")

# SGD and AdamW hyperparameters that checkpoints carry per param group (the tensors live in "state").
_HPARAMS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "betas", "eps", "amsgrad")
# Per-parameter state tensors of each optimizer; AdamW's "step" is a 0-d count, the others have the parameter's shape.
_STATE_KEYS = {"sgd": ("momentum_buffer",), "adamw": ("step", "exp_avg", "exp_avg_sq")}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EngineError(RuntimeError):
    """An engine used out of order, or a state that does not fit the backbone (names the key)."""


def build_backbone_optimizer(params: Any, train: TrainConfig) -> torch.optim.Optimizer:
    """The backbone's optimizer named by ``train.optimizer``: torch SGD or torch AdamW, in both engines.

    Plain torch implementations (foreach), never DeepSpeed's fused ones, which JIT-compile for minutes on first use.
    AdamW decays the weights decoupled from the gradient (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019): ``w -= lr * weight_decay * w`` before the Adam update; SGD adds ``weight_decay * w``
    to the gradient. Every parameter decays alike, as in arcface_torch.

    Args:
        params: The backbone's parameters.
        train: ``train``: optimizer, lr, momentum (sgd), betas and eps (adamw), weight_decay.

    Returns:
        The optimizer.
    """
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, betas=train.betas, eps=train.eps,
                                 weight_decay=train.weight_decay)
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def _state_keys(train: TrainConfig) -> tuple[str, ...]:
    if train.optimizer == "sgd" and train.momentum == 0:
        return ()  # SGD keeps no state without momentum
    return _STATE_KEYS[train.optimizer]


def _state_tensor(key: str, value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A saved optimizer state tensor placed as the optimizer keeps it for ``p``."""
    if key == "step":  # AdamW's count: a CPU fp32 scalar (torch's layout unless capturable/fused)
        return value.detach().to("cpu", torch.float32).clone()
    return value.to(p.device, p.dtype).clone()


def _cpu_fp32(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.float() if t.is_floating_point() else t).cpu().clone()


def _rank0(buffer: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of a buffer, on every rank.

    NOTE: broadcast from rank 0. BatchNorm running stats drift apart per rank (ZeRO never syncs them; DDP
    broadcasts rank 0's at each forward, then every rank updates its own), so states save rank 0's everywhere.
    """
    return broadcast_(buffer.detach().clone(), 0, None)


class BackboneEngine:
    """The interface the loop trains the backbone through (see the module docstring for the call order).

    Attributes:
        backbone: The bare backbone (unwrapped) for eval, export and state dicts.
        accum_steps: Micro-batches per optimizer step.
        optimizer: The torch SGD or AdamW optimizer of the backbone (``train.optimizer``).
        input_dtype: The dtype ``forward`` wants its images in: the dtype the model runs in.
    """

    input_dtype: torch.dtype = torch.float32

    def __init__(self, backbone: nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig) -> None:
        self.backbone = backbone
        self.optimizer = optimizer
        self.accum_steps = train.grad_accum_steps
        self.grad_clip = train.grad_clip
        self.optimizer_name = train.optimizer
        self._state_keys = _state_keys(train)
        self._at_boundary = False  # inside or after the last micro-batch of this optimizer step
        self._norm: torch.Tensor | None = None  # cached grad norm of this optimizer step

    def set_lr(self, lr: float) -> None:
        """Sets the learning rate of every param group (the loop's schedule, once per optimizer step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Wraps forward AND backward of one micro-batch; ``last`` marks the one whose backward reduces grads."""
        self._norm = None
        self._at_boundary = last
        with self._micro_batch_context(last):
            yield

    def _micro_batch_context(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _require_boundary(self, what: str) -> None:
        if not self._at_boundary:
            raise EngineError(f"{what} needs the gradients of a whole step: call it after the backward of "
                              "micro_batch(last=True)")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's fp32 embeddings of ``images`` (low-precision casts happen inside)."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagates ``loss / accum_steps`` through the whole graph (classifier included)."""
        raise NotImplementedError

    @property
    def loss_scale(self) -> float:
        """The factor the classifier's gradients carry beyond ``1/accum_steps`` (fp16 loss scaling); else 1.0.

        Read it after ``backward`` and before ``step`` (a dynamic scale changes in ``step``).
        """
        return 1.0

    def grad_norm(self) -> float:
        """Global L2 norm of the backbone's gradients of this step (the same on every rank); inf/nan if any is not
        finite. Call after the last micro-batch's backward; collective under DeepSpeed (every rank calls it)."""
        return float(self.grad_norm_tensor())

    def grad_norm_tensor(self) -> torch.Tensor:
        """:meth:`grad_norm` as a 0-d fp32 tensor on the training device, without reading it on the host."""
        self._require_boundary("grad_norm()")
        if self._norm is None:
            self._norm = self._compute_grad_norm()
        return self._norm

    def _compute_grad_norm(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self, finite: bool | None = None) -> bool:
        """Clips to ``train.grad_clip``, updates and zeroes the gradients; False when no update was applied.

        A step whose gradient norm is not finite is never applied (its gradients are dropped, as ``skip_step``);
        under fp16 DeepSpeed's loss scaler decides and lowers its scale. Collective under DeepSpeed.

        Args:
            finite: Whether this step's gradient norm is finite, when the caller already knows (the training step
                reads one fused flag for the whole step); None reads the norm here (a host sync on a GPU).
        """
        raise NotImplementedError

    def skip_step(self) -> None:
        """Drops the accumulated gradients; weights and optimizer state stay bitwise unchanged."""
        raise NotImplementedError

    def _done(self) -> None:
        self._norm = None
        self._at_boundary = False

    def state_dict(self) -> dict[str, Any]:
        """COLLECTIVE. World-size and engine independent: full fp32 backbone and optimizer state by parameter name.

        Returns:
            ``{"backbone": state_dict (params + buffers, unwrapped names, fp32),
            "optimizer": {"state": {param_name: {"momentum_buffer": Tensor}}, "param_groups": [hyperparameters]}}``
            with every tensor on the CPU (AdamW: ``{"step", "exp_avg", "exp_avg_sq"}`` per parameter).
        """
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """COLLECTIVE. Loads a ``state_dict()`` saved by either engine on any world size."""
        raise NotImplementedError

    # -- helpers shared by both engines ----------------------------------------------------------------------
    def _param_groups_state(self) -> list[dict[str, Any]]:
        return [{k: g[k] for k in _HPARAMS if k in g} for g in self.optimizer.param_groups]

    def _load_param_groups(self, groups: list[dict[str, Any]]) -> None:
        if len(groups) != len(self.optimizer.param_groups):
            raise EngineError(f"optimizer.param_groups: the state has {len(groups)} groups, this backbone's "
                              f"optimizer has {len(self.optimizer.param_groups)}")
        for target, saved in zip(self.optimizer.param_groups, groups):
            target.update({k: v for k, v in saved.items() if k in _HPARAMS})

    def _check_backbone_keys(self, saved: dict[str, Any], opt_state: dict[str, Any]) -> None:
        want = set(self.backbone.state_dict().keys())
        missing, unexpected = sorted(want - set(saved)), sorted(set(saved) - want)
        if missing or unexpected:
            raise EngineError(f"backbone state does not fit {type(self.backbone).__name__}: missing keys "
                              f"{missing[:5]}, unexpected keys {unexpected[:5]}")
        params = {name for name, _ in self.backbone.named_parameters()}
        unknown = sorted(set(opt_state) - params)
        if unknown:
            raise EngineError(f"optimizer.state names parameters this backbone does not have: {unknown[:5]}")
        saved_keys = {k for entry in opt_state.values() for k in entry}
        if saved_keys and not saved_keys <= set(self._state_keys):
            raise EngineError(f"optimizer.state holds {sorted(saved_keys)}, not the state of this run's "
                              f"train.optimizer {self.optimizer_name!r} ({list(self._state_keys)}): resume with the "
                              "optimizer the checkpoint was saved with, or start from it with train.init_from")
