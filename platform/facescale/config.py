"""The typed config tree: YAML parsed strictly into pydantic models, with dotted ``key=value`` overrides.

Each component owns its small model next to its code (``heads/config.py``, ...); this module assembles the
tree. Unknown keys, wrong types and missing files raise :class:`ConfigError` naming the key and the file --
before Ray or anything else starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from facescale.distill.config import DistillConfig
from facescale.heads.config import ClassifierConfig
from facescale.train.engine_config import DeepSpeedConfig
from facescale.trees import merge_trees  # noqa: F401  (re-exported for config users)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The regions of facescale.data.occlusion.REGIONS (tests check they agree); named here so the config tree loads and
# reports a wrong one without importing the data layer.
OcclusionRegion = Literal["eyes", "nose", "mouth", "upper", "lower", "left", "right"]


class OcclusionConfig(_Strict):
    """``data.augment.occlusion``: erase a face region of training images (AOFD's occlusion masks, Chen et al.,
    BTAS 2018), drawn per ``(train.seed, epoch, sample key)``; see ``facescale/data/occlusion.py``."""

    p: float = Field(0.0, ge=0.0, le=1.0, description="probability that a training sample gets a region erased "
                     "(0: off, the loaders' batches untouched)")
    regions: list[OcclusionRegion] = Field(
        default_factory=lambda: ["eyes", "nose", "mouth", "upper", "lower", "left", "right"], min_length=1,
        description="regions drawn uniformly: eyes, nose, mouth (boxes on the ArcFace 112x112 template's "
        "landmarks), upper, lower, left, right (canvas halves, in image coordinates after the loader's mirror)")


class AugmentConfig(_Strict):
    """``data.augment``: training-time augmentation on the loaders' uint8 batches, before normalisation."""

    occlusion: OcclusionConfig = OcclusionConfig()


class DataConfig(_Strict):
    """Where the training shards and the held-out verification set are."""

    root: str = "data/synth"
    val_bins: list[str] = Field(default_factory=lambda: ["data/synth/verification.bin"])
    loader: Literal["auto", "dali", "torch"] = Field(
        "auto", description="auto: DALI, falling back to torch (the reason logged and in the loader's "
        "fallback_reason) if DALI does not import; dali: DALI or an error naming the reason; torch: webdataset + "
        "simplejpeg in DataLoader workers")
    decode_device: Literal["auto", "cpu", "mixed"] = Field(
        "auto", description="DALI decoding: cpu (libjpeg-turbo), mixed (nvJPEG on the worker's GPU); "
        "auto: mixed when scaling.use_gpu, else cpu")
    num_workers: int = Field(1, ge=0, description="torch: DataLoader worker processes; dali: decode threads (>= 1)")
    on_error: Literal["fail", "skip"] = "fail"
    cache_dir: str | None = Field(None, description="node-local scratch where the DALI loader keeps copies of "
                                  "s3:// shards (under <cache_dir>/<dataset digest>/); null: "
                                  "<tempdir>/facescale-shards")
    cache_bytes: int = Field(20 << 30, gt=0, description="byte budget of that cache per node (shared by the ranks "
                             "of a node); it must hold the shard being read and the prefetched ones")
    augment: AugmentConfig = AugmentConfig()


class ViTOptions(_Strict):
    """``model.vit``: training-time regularisers of the ``vit_*`` backbones; null keeps the backbone's default
    (arcface_torch's: 0.1 / 0.1 for vit_t, vit_s, vit_b; 0.05 / 0.05 for vit_l). Both are off in eval and export."""

    mask_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of the 144 patch tokens dropped at "
                                     "random per sample in training (arcface_torch's mask_ratio)")
    drop_path: float | None = Field(None, ge=0.0, lt=1.0, description="stochastic-depth rate of the last block, "
                                    "linear from 0 at the first (arcface_torch's drop_path_rate)")


# Backbones whose names start with this take ``model.vit`` and ``model.activation_checkpointing`` (tests check the
# registry agrees). A name test, not a registry lookup: the config tree loads without importing torch.
VIT_PREFIX = "vit_"


class ModelConfig(_Strict):
    """Backbone choice (see ``facescale.models.list_backbones()``)."""

    backbone: str = "iresnet_tiny"
    embedding_size: int = Field(512, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    vit: ViTOptions = ViTOptions()
    activation_checkpointing: bool = Field(False, description="recompute each transformer block in the backward "
                                           "pass (torch.utils.checkpoint): ~1 extra forward for much less activation "
                                           "memory; vit_* backbones only, meant for vit_b and vit_l")

    @model_validator(mode="after")
    def _options_fit_backbone(self) -> ModelConfig:
        if self.backbone.startswith(VIT_PREFIX):
            if self.dropout:
                raise ValueError(f"model.dropout: backbone {self.backbone!r} has no dropout; use model.vit.drop_path")
            return self
        set_keys = [f"model.vit.{k}" for k, v in self.vit.model_dump().items() if v is not None]
        if self.activation_checkpointing:
            set_keys.append("model.activation_checkpointing")
        if set_keys:
            raise ValueError(f"{', '.join(set_keys)}: only the vit_* backbones take this, not {self.backbone!r}")
        return self

    def backbone_kwargs(self) -> dict[str, Any]:
        """The constructor arguments beyond ``embedding_size`` that this section sets (for ``build_backbone``)."""
        kwargs: dict[str, Any] = {}
        if self.dropout:
            kwargs["dropout"] = self.dropout
        kwargs.update({k: v for k, v in self.vit.model_dump().items() if v is not None})
        if self.activation_checkpointing:
            kwargs["activation_checkpointing"] = True
        return kwargs




class TrainConfig(_Strict):
    """Optimisation and loop cadence. ``batch_size`` is per worker."""

    batch_size: int = Field(64, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="backbone and classifier optimizer: sgd (momentum, L2 weight decay) or adamw (decoupled "
        "weight decay, Loshchilov & Hutter, ICLR 2019; the ViT recipe, see configs/vit_b.yaml); torch's own "
        "implementations in both engines, Partial FC's sparse AdamW for its centers")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (train.optimizer: sgd)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW moment decay rates (train.optimizer: adamw)")
    eps: float = Field(1e-8, gt=0, description="AdamW denominator epsilon (train.optimizer: adamw)")
    weight_decay: float = Field(5e-4, ge=0, description="sgd: L2 penalty added to the gradient; adamw: decoupled, "
                                "the weights shrink by lr * weight_decay per step")
    warmup_steps: int = Field(0, ge=0)
    lr_power: float = Field(2.0, gt=0, description="polynomial decay power after warm-up")
    grad_clip: float | None = Field(5.0, gt=0, description="max global grad norm of the backbone; null disables")
    bf16: bool = False
    engine: Literal["ddp", "deepspeed"] = Field(
        "ddp", description="how the backbone is data-parallel: ddp (torch DDP) or deepspeed (ZeRO, see "
        "train.deepspeed); the Partial FC classifier stays outside either, with its own optimizer")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches of batch_size per optimizer step (both "
                                  "engines); the loss is divided by it and the lr schedule steps once per update")
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    seed: int = 0
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0, description="steps between verification runs; null: at the end only")
    checkpoint_every: int | None = Field(None, gt=0, description="steps between checkpoints; null: at the end only")
    eval_batch_size: int = Field(128, gt=0)
    resume_from: str | None = Field(None, description="checkpoint directory to continue from (any world size)")
    init_from: str | None = Field(None, description="checkpoint directory whose backbone weights start this run "
                                  "(optimizer, schedule and classifier start fresh); ignored when resuming")
    keep_checkpoints: int | None = Field(2, gt=0, description="committed checkpoints kept in the run's storage "
                                         "(older ones are deleted); null keeps all")
    nonfinite: Literal["skip", "stop"] = Field(
        "skip", description="a NaN/inf loss or gradient: skip the update and count it, or stop the run naming the step")
    max_consecutive_nonfinite: int = Field(20, gt=0, description="under nonfinite=skip, stop after this many "
                                           "non-finite steps in a row (the run has diverged)")
    step_breakdown_sync: bool = Field(True, description="synchronise the GPU at phase boundaries so the step-time "
                                      "breakdown charges each phase its own kernels (a few % of GPU throughput)")
    system_metrics_interval_s: float | None = Field(10.0, gt=0, description="sampling interval of the system "
                                                    "metrics logged to MLflow (per node); null disables them")

    @model_validator(mode="after")
    def _betas_in_range(self) -> TrainConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must both be in [0, 1), got {list(self.betas)}")
        return self


class ScalingConfig(_Strict):
    """How many Ray Train workers and on what. ``address`` (or $RAY_ADDRESS) joins a running cluster.

    ``launcher: torchrun`` runs the same worker loop in processes that ``torchrun`` started (no Ray): the worker
    count and placement are then torchrun's (``--nproc-per-node``, ``--nnodes``), and ``num_workers``,
    ``cpus_per_worker`` (except as torch's thread count), ``resources_per_worker``, ``address`` and
    ``max_failures`` are Ray's alone.
    """

    launcher: Literal["ray", "torchrun"] = Field(
        "ray", description="ray: Ray Train starts the workers (and restarts them, scaling.max_failures); torchrun: "
        "the workers are the processes of `torchrun ... -m facescale train` (no automatic restart)")
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each worker also needs, e.g. {facescale_slot: 1} "
        "with one slot per node to place one worker on each node (CPU and GPU come from the keys above)")
    address: str | None = None
    storage_path: str = Field("runs", description="where checkpoints go: s3://bucket/prefix, or a directory every "
                              "node mounts (checked on each node before a multi-node run starts)")
    max_failures: int = Field(0, ge=-1)

    @model_validator(mode="after")
    def _custom_resources_only(self) -> ScalingConfig:
        if clash := sorted({"CPU", "GPU", "memory"} & set(self.resources_per_worker)):
            raise ValueError(f"scaling.resources_per_worker: {clash} are set by scaling.cpus_per_worker and "
                             "scaling.use_gpu; list only custom resources here")
        if bad := sorted(k for k, v in self.resources_per_worker.items() if v <= 0):
            raise ValueError(f"scaling.resources_per_worker: amounts must be > 0 ({bad})")
        return self

    def per_worker_resources(self) -> dict[str, float]:
        """Everything one Ray Train worker needs (CPU, GPU when used, custom resources)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {}), **self.resources_per_worker}


class TrackingConfig(_Strict):
    """MLflow. ``uri`` falls back to $MLFLOW_TRACKING_URI, then to the embedded sqlite store."""

    uri: str | None = None
    experiment: str = "facescale"
    run_name: str | None = None
    artifact_root: str = "mlartifacts"
    log_model: bool = True


class SynthConfig(_Strict):
    """Defaults for ``facescale data synth`` when it is given a config (the demo uses this)."""

    identities: int = Field(500, gt=1)
    images_per_identity: int = Field(20, gt=1)
    held_out_identities: int = Field(200, gt=1)
    num_pairs: int = Field(2000, gt=0)
    difficulty: float = Field(0.5, ge=0.0, le=1.0)
    seed: int = 0
    samples_per_shard: int = Field(1000, gt=0)


class FaceScaleConfig(_Strict):
    """The whole tree for one training run."""

    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()
    model: ModelConfig = ModelConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _classifier_fits_training(self) -> FaceScaleConfig:
        c = self.classifier
        if c.type == "linear" and c.margin.type in ("magface", "curricularface"):
            raise ValueError(f"classifier.margin.type {c.margin.type!r} needs classifier.type: partial_fc "
                             "(the linear classifier passes no embedding norms or cross-rank sums)")
        if c.type == "partial_fc" and not c.dense_state and self.train.optimizer == "sgd" and self.train.momentum == 0:
            raise ValueError("train.momentum must be > 0 with classifier.type: partial_fc (sparse SGD state)")
        if c.type == "ffc" and self.train.engine == "deepspeed" and self.train.deepspeed.zero_stage == 3:
            raise ValueError("classifier.type ffc needs the probe backbone whole on every rank (the gallery EMA): "
                             "train.deepspeed.zero_stage 3 partitions it; use zero_stage 1 or 2, or train.engine: ddp")
        return self

    def tracking_uri(self) -> str:
        """The MLflow tracking URI this run uses (config, then environment, then embedded sqlite)."""
        if self.tracking.uri:
            return self.tracking.uri
        from facescale.tracking.mlflow_run import default_tracking_uri  # lazy: imports mlflow

        return default_tracking_uri()


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=0.2)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key component")
    return parts, yaml.safe_load(raw) if raw.strip() else raw


def _set_dotted(tree: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: key {'.'.join(parts[:depth + 1])!r} is not a section")
        node = child
    node[parts[-1]] = value


def format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
                model: type[BaseModel] = FaceScaleConfig) -> Any:
    """Loads a YAML config strictly into ``model`` and applies dotted overrides.

    Args:
        path: YAML file; ``None`` starts from the embedded defaults.
        overrides: ``["train.lr=0.2", "scaling.num_workers=4"]``; values are parsed as YAML scalars/lists.
        model: Root pydantic model (pipelines use their own).

    Returns:
        The validated config.

    Raises:
        ConfigError: Missing/unreadable file, bad YAML, unknown key, wrong type -- naming the file and key.
    """
    source = str(path) if path is not None else "<defaults>"
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(loaded).__name__}")
        tree = loaded or {}
    for item in overrides or []:
        parts, value = _parse_override(item)
        _set_dotted(tree, parts, value, item)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        where = source + (f" with overrides {overrides}" if overrides else "")
        raise ConfigError(format_validation(exc, where)) from exc


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (saved with every run and logged to MLflow)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
