"""Typed config of the backbone engine's DeepSpeed block, and the DeepSpeed JSON config built from the tree.

Nothing here imports torch or deepspeed: the config tree must load (and fail on a wrong key) in milliseconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from facescale.trees import merge_trees

if TYPE_CHECKING:
    from facescale.config import TrainConfig

# DeepSpeed prints a progress line every `steps_per_print` optimizer steps; the loop has its own logging.
_QUIET_STEPS_PER_PRINT = 10**9


class DeepSpeedConfig(BaseModel):
    """``train.deepspeed``: how the backbone runs when ``train.engine: deepspeed``.

    The Partial FC classifier is never handed to DeepSpeed: its centers are already sharded by class and keep
    their own optimizer. Only the backbone is replicated data-parallel, so only it is partitioned by ZeRO.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 plain data parallel, 1 optimizer state, "
                            "2 + gradients, 3 + parameters partitioned across ranks")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="weights/activations dtype inside DeepSpeed (master weights stay fp32); auto: bf16 when "
        "train.bf16, else fp32. fp16 uses DeepSpeed's dynamic loss scaling")
    bucket_elements: int = Field(
        50_000_000, gt=0, description="ZeRO reduce/all-gather bucket size in elements (DeepSpeed's default 5e8 "
        "allocates a 2 GB fp32 bucket per rank, more than a face backbone needs)")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="for experts: merged last (recursively, dict into dict) into the generated "
        "DeepSpeed JSON config, e.g. {zero_optimization: {overlap_comm: true}}; keys are DeepSpeed's, not checked here")

    def resolved_precision(self, bf16: bool) -> Literal["fp32", "bf16", "fp16"]:
        """The precision in effect: ``precision``, with ``auto`` resolved from ``train.bf16``."""
        if self.precision == "auto":
            return "bf16" if bf16 else "fp32"
        return self.precision


def build_deepspeed_config(train: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config for the backbone, from ``train`` (batch, accumulation, clipping, precision).

    Args:
        train: The ``train`` section of the config tree (its ``deepspeed`` block included).

    Returns:
        A dict for ``deepspeed.initialize(config=...)``; ``train.deepspeed.overrides`` is merged in last.
    """
    ds = train.deepspeed
    precision = ds.resolved_precision(train.bf16)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": float(train.grad_clip or 0.0),
        "zero_optimization": {"stage": ds.zero_stage, "reduce_bucket_size": ds.bucket_elements,
                              "allgather_bucket_size": ds.bucket_elements},
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0: dynamic loss scaling (DeepSpeed's default for fp16), so overflowing steps are skipped.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},
        # No "optimizer" block: we pass a torch SGD or AdamW (DeepSpeed's fused optimizers JIT-compile for minutes).
        # DeepSpeed casts parameters to bf16/fp16 but keeps buffers fp32 unless told; BatchNorm then meets low-precision
        # weights and fp32 running stats and refuses the mix. The whole module in one dtype works (fp32 masters
        # stay in the optimizer).
        **({"data_types": {"buffer_dtype": precision}} if precision != "fp32" else {}),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _QUIET_STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }

    return merge_trees(config, ds.overrides)
