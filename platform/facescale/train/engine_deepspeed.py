"""The DeepSpeed ZeRO engine of the backbone (see :mod:`facescale.train.engine` for the interface and its rules)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import math
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from facescale.config import TrainConfig
from facescale.parallel.dist import free_loopback_port
from facescale.train.engine_base import (
    _DTYPES,
    BackboneEngine,
    EngineError,
    _cpu_fp32,
    _rank0,
    build_backbone_optimizer,
)

log = logging.getLogger("facescale.train.engine")


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group; a single process without one gets a 1-rank group on the loopback."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    log.info("no process group: starting a 1-rank %s group on 127.0.0.1 for DeepSpeed", backend)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_loopback_port()}", rank=0, world_size=1)


def bind_device(device: torch.device, zero_stage: int) -> int:
    """Makes ``device`` the current one and returns its index for DeepSpeed; ``LOCAL_RANK`` stays the launcher's.

    ``LOCAL_RANK`` is the worker's rank on its node (Ray Train and torchrun set it); the CUDA index is its GPU among
    those the process sees. They differ under Ray Train when ``CUDA_VISIBLE_DEVICES`` is not shared across a node's
    workers (every worker then sees its one GPU as ``cuda:0``) or with several GPUs per worker. DeepSpeed 0.19.8
    reads ``LOCAL_RANK`` as a device index: its engine places the module on ``cuda:<args.device_rank>``, else
    ``cuda:LOCAL_RANK`` (runtime/engine.py, ``_set_distributed_vars``), so the index is passed as ``device_rank``;
    and ZeRO-3 alone also builds tensors on ``cuda:LOCAL_RANK`` with no override (runtime/zero/
    partition_parameters.py ``Init``: ``local_device``; runtime/zero/utils.py ``assert_ints_same_as_other_ranks``,
    run by the parameter coordinator in the first steps). Overwriting ``LOCAL_RANK`` would lie to everything else
    that reads it, so ZeRO-3 with a mismatch is refused with the fix instead.

    Args:
        device: This worker's training device.
        zero_stage: The ZeRO stage of ``train.deepspeed``.

    Returns:
        The device index DeepSpeed must use (0 on the CPU).

    Raises:
        EngineError: ZeRO-3 on a GPU whose index is not ``LOCAL_RANK``.
    """
    if device.type != "cuda":
        os.environ.setdefault("LOCAL_RANK", "0")
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_device(index)  # before initialize: DeepSpeed allocates on the current device
    local_rank = os.environ.setdefault("LOCAL_RANK", str(index))  # only a default: the launcher's value wins
    if zero_stage == 3 and int(local_rank) != index:
        raise EngineError(f"train.deepspeed.zero_stage 3 on cuda:{index} with LOCAL_RANK={local_rank}: DeepSpeed's "
                          "ZeRO-3 places partitioned parameters on cuda:LOCAL_RANK. Give each worker one GPU and "
                          "leave Ray Train's CUDA_VISIBLE_DEVICES sharing on (its default), or use zero_stage <= 2")
    return index


class DeepSpeedEngine(BackboneEngine):
    """DeepSpeed ZeRO stage 0-3 around the backbone, with a torch SGD or AdamW (master weights and state in fp32).

    The accumulation boundary is set explicitly per micro-batch (``set_gradient_accumulation_boundary``), so
    DeepSpeed reduces and steps exactly where the loop says, and ``step`` is called once per optimizer step.
    Stage 0 runs in fp32 only (its bf16/fp16 optimizers are a different code path; use DDP's bf16 autocast).
    """

    def __init__(self, backbone: nn.Module, device: torch.device, train: TrainConfig,
                 ds_config: dict[str, Any]) -> None:
        self.precision = train.deepspeed.resolved_precision(train.bf16)
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        if self.zero_stage == 0 and self.precision != "fp32":
            raise EngineError(f"train.deepspeed.zero_stage 0 with precision {self.precision}: use zero_stage >= 1, "
                              "or train.engine ddp (bf16 autocast)")
        # The accelerator follows the device, never the machine: a CPU run on a GPU node stays on the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        device_rank = bind_device(device, self.zero_stage)
        import deepspeed  # here, not at module level: it takes seconds and prints warnings
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != device.type:
            raise EngineError(f"DeepSpeed's accelerator is {get_accelerator().device_name()!r} but the backbone is "
                              f"on {device} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r})")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines repeat the config per rank
        _skip_cpu_shm_op(device)
        # A client torch optimizer (SGD or AdamW): DeepSpeed's own "optimizer" config block would pick its fused Adam,
        # which JIT-compiles for minutes. ZeRO wraps it and steps it on the fp32 master partitions.
        optimizer = build_backbone_optimizer(backbone.parameters(), train)
        # args.device_rank: DeepSpeed's engine sets and uses this device instead of cuda:LOCAL_RANK (engine.py,
        # _set_distributed_vars); no args.local_rank, which it would check against LOCAL_RANK.
        self.model, _, _, _ = deepspeed.initialize(args=argparse.Namespace(device_rank=device_rank), model=backbone,
                                                   optimizer=optimizer, config=ds_config, dist_init_required=False)
        super().__init__(backbone, optimizer, train)
        self._dtype = self.input_dtype = _DTYPES[self.precision]

    def _micro_batch_context(self, last: bool) -> contextlib.AbstractContextManager:
        # NOTE: ZeRO-1 and stage 0 reduce only in the backward of the boundary micro-batch; ZeRO-2/3 reduce-scatter
        # every micro-batch's gradients into the owning rank's partition (that is what partitions them).
        self.model.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # DeepSpeed holds bf16/fp16 module weights itself; the input must match them.
        return self.model(images.to(self._dtype)).float()

    def backward(self, loss: torch.Tensor) -> None:
        # Divided here, as in DDP, rather than by DeepSpeed (scale_wrt_gas): one rule for both engines.
        self.model.backward(loss / self.accum_steps, scale_wrt_gas=False)

    @property
    def loss_scale(self) -> float:
        return float(getattr(self.model.optimizer, "loss_scale", 1.0)) if self.precision == "fp16" else 1.0

    def _compute_grad_norm(self) -> torch.Tensor:
        opt = self.model.optimizer
        if self.zero_stage == 0:  # fp32 only: the boundary backward all-reduced the module's gradients
            return torch.nn.utils.get_total_norm([p.grad for p in self.backbone.parameters() if p.grad is not None])
        from deepspeed.runtime.utils import combine_grad_norm_groups

        # NOTE: each call all-reduces (SUM) the squared norms of this rank's gradient partition over the data-parallel
        # group -- the same norm DeepSpeed's own step computes for clipping, read before the step.
        if self.zero_stage in (1, 2):
            scaled = opt.scaled_global_norm()
        else:
            scaled = combine_grad_norm_groups(opt._get_norm_groups())
        # DeepSpeed masks a non-finite partial norm to -1 (mask_nan_or_inf_with_val_inplace). Kept on the device: the
        # training step reads it on the host only once per logging window.
        scaled = scaled.float()
        return torch.where(scaled < 0, torch.full_like(scaled, float("inf")), scaled / self.loss_scale)

    def step(self, finite: bool | None = None) -> bool:
        self._require_boundary("step()")
        if finite is None and self.precision != "fp16":
            finite = math.isfinite(self.grad_norm())
        if self.precision != "fp16" and not finite:
            # DeepSpeed skips such a step itself only where its config checks overflow (bf16.check_grad_overflow):
            # refusing it here holds for every stage, precision and expert override.
            self.skip_step()
            return False
        self.model.step()  # fp16: DeepSpeed's loss scaler skips an overflowing step and lowers the scale
        self._done()
        return bool(self.model.was_step_applied())

    def skip_step(self) -> None:
        opt = self.model.optimizer
        opt.zero_grad(set_to_none=True)
        self.model.zero_grad()
        # The reduced gradient partitions live outside param.grad; DeepSpeed's own overflow branch drops them the same
        # way (stage_1_and_2.py / stage3.py step), leaving the fp32 master weights and the SGD state untouched.
        if self.zero_stage in (1, 2):
            opt._release_preflattened_grad_buffers()
            for k in list(opt.averaged_gradients):
                opt.averaged_gradients[k] = None
                opt.all_grad_tensors[k] = None
        elif self.zero_stage == 3:
            opt.averaged_gradients = {}
        self._done()

    def _has_optimizer_state(self) -> bool:
        return bool(self._state_keys) and any(self._state_keys[0] in s for s in self.optimizer.state.values())

    def _frozen(self, p: nn.Parameter) -> contextlib.AbstractContextManager:
        """Context in which a parameter DeepSpeed does not train (no fp32 master) is whole on every rank."""
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters([p], modifier_rank=0)  # NOTE: all-gather; rank 0's edit wins
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        params = dict(self.backbone.named_parameters())
        buffers = dict(self.backbone.named_buffers())
        backbone: dict[str, torch.Tensor] = {}
        for name in self.backbone.state_dict().keys():  # the order and the set (persistent buffers) of state_dict
            p = params.get(name)
            if p is None:
                backbone[name] = _cpu_fp32(_rank0(buffers[name]))
            elif p.requires_grad and self.zero_stage > 0:
                # NOTE: collective under ZeRO -- all-reduce (stage 1/2) or all-gather (stage 3) of the fp32 master.
                backbone[name] = _cpu_fp32(safe_get_full_fp32_param(p))
            else:  # stage 0, or frozen (e.g. iresnet's features.weight): the module holds the fp32 value
                with self._frozen(p):
                    backbone[name] = _cpu_fp32(p)
        opt_state: dict[str, dict[str, torch.Tensor]] = {}
        if self._has_optimizer_state():  # torch optimizers create their state at the first step, on every rank alike
            step = self._step_count()
            for name, p in params.items():
                if not p.requires_grad:
                    continue
                # NOTE: collective for each key (ZeRO gathers the partitions of the parameter's state).
                full = {k: safe_get_full_optimizer_state(p, k) for k in self._state_keys if k != "step"}
                opt_state[name] = {k: _cpu_fp32(v if v is not None else self.optimizer.state[p][k])
                                   for k, v in full.items()}
                if step is not None:
                    opt_state[name]["step"] = step.clone()
        return {"backbone": backbone, "optimizer": {"state": opt_state, "param_groups": self._param_groups_state()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        saved, opt = state["backbone"], state["optimizer"]
        self._check_backbone_keys(saved, opt["state"])
        device = torch.device(self.model.device)
        params = dict(self.backbone.named_parameters())
        for name, b in self.backbone.named_buffers():
            if name in saved:
                b.data.copy_(saved[name].to(b.device, b.dtype))
        for name, p in params.items():
            value = saved[name].to(device, torch.float32)
            if p.requires_grad and self.zero_stage > 0:
                safe_set_full_fp32_param(p, value)  # this rank's slice of the fp32 master (no communication)
            else:
                with self._frozen(p):
                    p.data.copy_(value.to(p.dtype))
        self._refresh_module_weights()
        if opt["state"]:
            self._ensure_optimizer_state()
            for name, p in params.items():
                if not p.requires_grad:
                    continue
                entry = opt["state"].get(name, {})
                for key in self._state_keys:
                    if key == "step":
                        continue  # one count per flat partition, set below
                    # A parameter that had no state (no gradient yet) starts from zeros, as SGD would.
                    value = entry[key].to(device, torch.float32) if key in entry else torch.zeros_like(saved[name],
                                                                                                        device=device)
                    if self.zero_stage == 0:
                        self.optimizer.state[p][key] = value.clone()
                    else:
                        safe_set_full_optimizer_state(p, value, key)
            steps = [entry["step"] for entry in opt["state"].values() if "step" in entry]
            if "step" in self._state_keys and steps:
                # Every parameter steps together, so the saved counts agree; the largest is the one that did.
                count = max(steps, key=float).detach().to("cpu", torch.float32)
                for state in self.optimizer.state.values():
                    state["step"] = count.clone()
        self._load_param_groups(opt["param_groups"])

    def _refresh_module_weights(self) -> None:
        """Copies the fp32 masters into the module's (possibly low-precision, possibly partitioned) weights."""
        opt = self.model.optimizer
        if self.zero_stage in (1, 2):
            opt.update_lp_params()  # NOTE: all-gathers the updated partitions, as after a step
        elif self.zero_stage == 3:
            for sub_group in range(len(opt.fp16_groups)):
                opt._reassign_or_swap_out_partitioned_parameters(sub_group)

    def _step_count(self) -> torch.Tensor | None:
        """AdamW's step count (a CPU fp32 scalar, the same in every flat partition); None for SGD."""
        if "step" not in self._state_keys:
            return None
        counts = [s["step"] for s in self.optimizer.state.values() if "step" in s]
        return _cpu_fp32(torch.as_tensor(counts[0])) if counts else None

    def _ensure_optimizer_state(self) -> None:
        """Creates zero optimizer state before the first step (torch makes it lazily), linked to DeepSpeed's
        fragments (only tensors shaped like a partition are linked: AdamW's 0-d ``step`` is set per partition)."""
        if not self._state_keys or self._has_optimizer_state():
            return
        opt = self.model.optimizer
        if self.zero_stage == 0:
            flats = [p for g in self.optimizer.param_groups for p in g["params"]]
        elif self.zero_stage in (1, 2):
            flats = list(opt.single_partition_of_fp32_groups)
        else:
            flats = list(opt.fp32_partitioned_groups_flat)
        for flat in flats:
            self.optimizer.state[flat] = {key: torch.tensor(0.0) if key == "step" else torch.zeros_like(flat)
                                          for key in self._state_keys}
        if self.zero_stage in (1, 2):
            opt._lazy_init_hp_params_optimizer_state()


def _skip_cpu_shm_op(device: torch.device) -> None:
    """Skips the JIT build (~30 s, then cached) of DeepSpeed's CPU shared-memory all-reduce op.

    DeepSpeed builds it whenever its CPU accelerator starts a comm backend, but only inference tensor parallelism
    calls it (``inference_all_reduce``); training collectives go through the gloo process group either way.
    """
    if device.type != "cpu":
        return
    # NOTE: not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports torch under the name `torch`, so that
    # attribute path yields the torch package; sys.modules holds DeepSpeed's comm module itself.
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
