"""Training of the PFE uncertainty head on a frozen backbone: the loop, and the job as an MLflow run.

The loop reads like the method (Shi & Jain, ICCV 2019, sec. 3.3): an identity-balanced batch (K identities x n
images, :class:`facescale.data.identity_batches.IdentityBatcher` over the training loader) -> the frozen backbone's
``mu`` (L2-normalised) and the head's ``log sigma^2`` -> the MLS loss over the batch's genuine pairs -> an SGD step of
the head. One process, on the config's device (``scaling.use_gpu``).

The job (:func:`run_pfe`) loads the model (any URI :func:`facescale.tracking.models.load_backbone` takes), trains the
head as an MLflow run linked to the model (the model is a logged input of the run; tags name its model id and run,
and carry the pipeline's lineage tags), and logs backbone + head as one :class:`facescale.pfe.model.PFEModel`,
which ``load_backbone`` loads back and ``facescale eval --pfe`` evaluates.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from facescale.config import ConfigError, dump_config
from facescale.data.identity_batches import IdentityBatcher
from facescale.data.transforms import normalize_images
from facescale.pfe.config import PFEConfig, PFERunConfig
from facescale.pfe.loss import mls_loss
from facescale.pfe.model import PFEModel, PFEShapeError, UncertaintyHead, backbone_shapes

if TYPE_CHECKING:  # annotations only: the job imports these lazily (MLflow stays out of the loop's import)
    from facescale.data.manifest import Manifest
    from facescale.tracking.models import LoadedBackbone

log = logging.getLogger("facescale.pfe")

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]
STAGE = "pfe"  # the facescale.stage tag of a run of `facescale pfe`
TAG_BASE_MODEL_ID = "facescale.base_model_id"  # the model whose backbone the PFE model wraps
TAG_BASE_MODEL_URI = "facescale.base_model_uri"
TAG_BASE_RUN_ID = "facescale.base_run_id"  # the run that logged it
# Lineage tags of the base model's run that the PFE run carries over (as the pipeline sets them, distill/runner.py).
INHERITED_TAGS = ("facescale.pipeline_run_id", "facescale.generation", "facescale.stage_base", "facescale.seed",
                  "facescale.student_epochs", "facescale.teacher_model_id")


def lr_at(step: int, cfg: PFEConfig) -> float:
    """The lr of optimizer step ``step`` (0-based): ``lr`` times ``lr_gamma`` per milestone passed (authors' step
    schedule ``{0: lr, 2000: 0.1 lr}``)."""
    return cfg.lr * cfg.lr_gamma ** sum(step >= m for m in cfg.lr_milestones)


def build_optimizer(head: UncertaintyHead, cfg: PFEConfig) -> torch.optim.SGD:
    """SGD with momentum; weight decay on the FC weights only (the authors regularise only those; BN, scale and
    shift are free)."""
    decay = [head.fc1.weight, head.fc2.weight]
    ids = {id(p) for p in decay}
    rest = [p for p in head.parameters() if id(p) not in ids]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, momentum=cfg.momentum)


@dataclass
class HeadTrainResult:
    """What :func:`train_head` did: per-window mean losses, the steps and samples it ran."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    samples: int = 0


def train_head(model: PFEModel, batches: Iterable[Batch], cfg: PFEConfig, device: torch.device,
               on_window: Callable[[int, dict[str, float]], None] | None = None) -> HeadTrainResult:
    """Trains ``model.head`` for ``cfg.steps`` steps on identity-balanced batches; the backbone stays frozen.

    Args:
        model: Backbone + head, on ``device``.
        batches: ``(uint8 images [K*n, 3, 112, 112], labels [K*n], keys)`` with at least one genuine pair each.
        cfg: The ``pfe`` section (steps, lr schedule, optimizer, logging window).
        device: Where the model runs; images are normalised there.
        on_window: Called after every ``cfg.log_every`` steps (and the last) with the step and the window's metrics
            (``train/loss``, ``train/lr``, ``train/samples_per_s``, ``pfe/log_sigma_sq_mean``,
            ``pfe/log_sigma_sq_std``).

    Returns:
        Per-window losses and counts.

    Raises:
        FloatingPointError: The loss is not finite (naming the step).
        RuntimeError: ``batches`` ran out before ``cfg.steps``.
    """
    optimizer = build_optimizer(model.head, cfg)
    model.train()  # the head's BN learns; the backbone stays in eval mode (PFEModel.train)
    result = HeadTrainResult()
    source: Iterator[Batch] = iter(batches)
    window_loss = torch.zeros((), device=device)
    window_stats = torch.zeros(2, device=device)
    window_steps, window_samples, t0 = 0, 0, time.perf_counter()
    for step in range(1, cfg.steps + 1):
        try:
            images, labels, _ = next(source)  # load an identity batch
        except StopIteration:
            raise RuntimeError(f"pfe: the identity batches ran out after {step - 1} of {cfg.steps} steps") from None
        x, labels = normalize_images(images, device), labels.to(device, non_blocking=True)
        lr = lr_at(step - 1, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mu, log_sigma_sq = model.forward_log_sigma_sq(x)  # frozen backbone -> mu; head -> log sigma^2
        loss = mls_loss(mu, log_sigma_sq, labels)  # MLS over the genuine pairs
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window_loss += loss.detach()
        window_stats += torch.stack([log_sigma_sq.detach().mean(), log_sigma_sq.detach().std()])
        window_steps += 1
        window_samples += len(labels)
        if step % cfg.log_every == 0 or step == cfg.steps:  # one host read per logging window
            mean_loss = float(window_loss) / window_steps
            mean_log, std_log = (window_stats / window_steps).tolist()
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"pfe: the MLS loss is {mean_loss} in the window ending at step {step} "
                                         f"(lr {lr:g}); lower pfe.lr")
            elapsed = max(time.perf_counter() - t0, 1e-9)
            result.losses.append(mean_loss)
            if on_window is not None:
                on_window(step, {"train/loss": mean_loss, "train/lr": lr,
                                 "train/samples_per_s": window_samples / elapsed,
                                 "pfe/log_sigma_sq_mean": mean_log, "pfe/log_sigma_sq_std": std_log})
            window_loss.zero_()
            window_stats.zero_()
            window_steps, window_samples, t0 = 0, 0, time.perf_counter()
        result.steps, result.samples = step, result.samples + len(labels)
    model.eval()
    return result


def endless_identity_batches(loader: Any, cfg: PFEConfig, seed: int) -> tuple[IdentityBatcher, Iterator[Batch]]:
    """An :class:`IdentityBatcher` over ``loader``'s epochs, one after the other, and its batches.

    Raises (from the iterator):
        RuntimeError: A whole epoch passed without one identity batch (too few identities with ``images_per_id``
            images within ``buffer_samples``), rather than reading forever.
    """
    holder: list[IdentityBatcher] = []

    def epochs() -> Iterator[Batch]:
        for epoch in itertools.count():
            before = holder[0].stats["batches"]
            yield from loader.epoch_samples(epoch)
            if holder[0].stats["batches"] == before:
                raise RuntimeError(f"pfe: epoch {epoch} of {loader.manifest.num_samples} samples gave no batch of "
                                   f"pfe.ids_per_batch={cfg.ids_per_batch} identities x pfe.images_per_id="
                                   f"{cfg.images_per_id} images within pfe.buffer_samples={cfg.buffer_samples}; "
                                   "lower ids_per_batch/images_per_id or raise buffer_samples")

    batcher = IdentityBatcher(epochs(), cfg.ids_per_batch, cfg.images_per_id, cfg.buffer_samples, seed)
    holder.append(batcher)
    return batcher, iter(batcher)


def resolve_device(cfg: PFERunConfig) -> torch.device:
    """``cuda`` (the current device) under ``scaling.use_gpu``, else ``cpu``.

    Raises:
        ConfigError: ``scaling.use_gpu`` without a visible CUDA device.
    """
    if not cfg.scaling.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("scaling.use_gpu is true, but this process sees no CUDA device; set scaling.use_gpu=false")
    return torch.device("cuda", torch.cuda.current_device())


def build_pfe_model(backbone: nn.Module, cfg: PFEConfig, init_head: nn.Module | None = None,
                    seed: int = 0) -> PFEModel:
    """A fresh uncertainty head fitted to ``backbone`` (or the head of ``init_head``, a PFE model), paired with it.

    Raises:
        PFEShapeError: The backbone family is unknown, or ``init_head``'s head does not fit the backbone (both named).
    """
    feature_shape, embedding_size = backbone_shapes(backbone)
    torch.manual_seed(seed)
    head = UncertaintyHead(feature_shape, embedding_size, cfg.hidden_size, cfg.bn_momentum)
    if init_head is not None:
        if not isinstance(init_head, PFEModel):
            raise PFEShapeError(f"pfe.init_head: {type(init_head).__name__} is not a PFE model (no uncertainty head)")
        given = init_head.head
        if (given.feature_shape, given.embedding_size) != (feature_shape, embedding_size):
            raise PFEShapeError(f"pfe.init_head: its head takes feature maps {given.feature_shape} and embedding size "
                                f"{given.embedding_size}; the model has feature maps {feature_shape} and embedding "
                                f"size {embedding_size}")
        head = given
        for bn in (head.bn1, head.bn2):
            bn.momentum = cfg.bn_momentum
    return PFEModel(backbone, head)


@dataclass
class PFEResult:
    """A finished ``facescale pfe`` run."""

    run_id: str
    model_id: str | None
    tracking_uri: str
    metrics: dict[str, Any]
    wall_time_s: float


def run_pfe(cfg: PFERunConfig, model_uri: str, stage: str = STAGE, tags: dict[str, str] | None = None,
            parent_run_id: str | None = None) -> PFEResult:
    """Trains a PFE head on the model at ``model_uri`` as one MLflow run and logs backbone + head.

    The steps: :func:`_prepare` (data, device, model: every config error before the run starts),
    :func:`_start_pfe_run` (the run, its lineage tags and inputs), :func:`_train_and_log` (the loop, the model).

    Args:
        cfg: Validated config (``data``, ``train.batch_size``/``train.seed``, ``scaling.use_gpu``, ``tracking``,
            ``pfe``).
        model_uri: Anything :func:`facescale.tracking.models.load_backbone` takes; a PFE model's backbone is reused.
        stage: The run's ``facescale.stage`` tag (a pipeline passes its stage name).
        tags: Extra tags (a pipeline's lineage tags), applied last.
        parent_run_id: Nest the run under this one (a pipeline's parent run).

    Returns:
        The run, the logged model's id and the final metrics.

    Raises:
        ConfigError: The model does not resolve or does not fit the head (both shapes named), bad data root, no
            CUDA device under ``scaling.use_gpu`` -- all before the MLflow run starts.
    """
    from facescale.tracking.mlflow_run import end_run

    t0 = time.perf_counter()
    seed = cfg.train.seed if cfg.pfe.seed is None else cfg.pfe.seed
    prep = _prepare(cfg, model_uri, seed)
    run_id = _start_pfe_run(cfg, prep, model_uri, stage, tags, parent_run_id)
    ok = False
    try:
        model_id, metrics = _train_and_log(cfg, prep, model_uri, run_id, seed)
        ok = True
    finally:
        end_run(prep.tracking_uri, run_id, ok)
    return PFEResult(run_id, model_id, prep.tracking_uri, metrics, time.perf_counter() - t0)


@dataclass
class _Prepared:
    """What :func:`run_pfe` resolved before its MLflow run: the data, the device, the base model and the PFE model."""

    manifest: Manifest
    device: torch.device
    tracking_uri: str
    loaded: LoadedBackbone  # of model_uri
    model: PFEModel


def _prepare(cfg: PFERunConfig, model_uri: str, seed: int) -> _Prepared:
    """Checks the data and device, loads the base model (and ``pfe.init_head``) and builds the PFE model.

    Raises:
        ConfigError: Each failure, naming the key or URI (see :func:`run_pfe`).
    """
    from facescale.data import ManifestError, load_manifest
    from facescale.tracking.mlflow_run import resolve_local_uri
    from facescale.tracking.models import ModelResolveError, load_backbone

    pfe = cfg.pfe
    try:
        manifest = load_manifest(cfg.data.root)
    except ManifestError as exc:
        raise ConfigError(f"data.root: {exc}") from exc
    if manifest.num_classes < pfe.ids_per_batch:
        raise ConfigError(f"pfe.ids_per_batch={pfe.ids_per_batch}, but {cfg.data.root} has only "
                          f"{manifest.num_classes} identities")
    device = resolve_device(cfg)
    tracking_uri = resolve_local_uri(cfg.tracking_uri())
    try:
        loaded = load_backbone(model_uri, tracking_uri=tracking_uri)
    except ModelResolveError as exc:
        raise ConfigError(f"--model: {exc}") from exc
    try:
        init = load_backbone(pfe.init_head, tracking_uri=tracking_uri).module if pfe.init_head else None
    except ModelResolveError as exc:
        raise ConfigError(f"pfe.init_head: {exc}") from exc
    backbone = loaded.module.backbone if isinstance(loaded.module, PFEModel) else loaded.module
    try:
        model = build_pfe_model(backbone, pfe, init, seed)
    except PFEShapeError as exc:
        raise ConfigError(f"{model_uri}: {exc}") from exc
    if model.head.embedding_size != loaded.embedding_size:
        raise ConfigError(f"{model_uri}: the model's metadata says embedding size {loaded.embedding_size}, its forward "
                          f"returns {model.head.embedding_size}")
    return _Prepared(manifest, device, tracking_uri, loaded, model)


def _lineage_tags(client: Any, prep: _Prepared, model_uri: str, stage: str,
                  tags: dict[str, str] | None) -> dict[str, str]:
    """The run's tags: stage, method, base model, and the base model's run's lineage (``INHERITED_TAGS``)."""
    from mlflow.exceptions import MlflowException

    loaded = prep.loaded
    all_tags = {"facescale.stage": stage, "facescale.method": "pfe", "facescale.backbone": str(loaded.backbone),
                "facescale.dataset_digest": prep.manifest.digest, TAG_BASE_MODEL_URI: model_uri,
                TAG_BASE_MODEL_ID: loaded.model_id or "none", "facescale.init_model_id": loaded.model_id or "none"}
    if loaded.model_id:  # the base model's run: the PFE run's lineage continues it
        try:
            base_run = client.get_logged_model(loaded.model_id).source_run_id
            if base_run:
                all_tags[TAG_BASE_RUN_ID] = base_run
                base_tags = client.get_run(base_run).data.tags
                all_tags.update({k: base_tags[k] for k in INHERITED_TAGS if k in base_tags})
        except MlflowException as exc:  # the model resolved; only its run is gone: the link is the model id
            log.warning("pfe: the run of model %s cannot be read (%s); linking by model id only", loaded.model_id, exc)
    all_tags.update(tags or {})
    return all_tags


def _start_pfe_run(cfg: PFERunConfig, prep: _Prepared, model_uri: str, stage: str, tags: dict[str, str] | None,
                   parent_run_id: str | None) -> str:
    """Starts the MLflow run (config, tags, dataset and base model as inputs); returns its id."""
    from mlflow.entities import LoggedModelInput
    from mlflow.tracking import MlflowClient

    from facescale.tracking.mlflow_run import log_dataset_input, start_run

    client = MlflowClient(prep.tracking_uri)
    all_tags = _lineage_tags(client, prep, model_uri, stage, tags)
    run_name = cfg.tracking.run_name or f"{stage}-{prep.loaded.backbone or 'model'}"
    run_id = start_run(prep.tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_root, run_name,
                       cfg.model_dump(mode="json"), dump_config(cfg), tags=all_tags, parent_run_id=parent_run_id)
    log_dataset_input(prep.tracking_uri, run_id, cfg.data.root, prep.manifest)
    if prep.loaded.model_id:
        client.log_inputs(run_id, models=[LoggedModelInput(prep.loaded.model_id)])
    log.info("pfe: MLflow run %s at %s; head %s -> %d on %s", run_id, prep.tracking_uri,
             prep.model.head.feature_shape, prep.model.head.embedding_size, prep.device)
    return run_id


def _train_and_log(cfg: PFERunConfig, prep: _Prepared, model_uri: str, run_id: str,
                   seed: int) -> tuple[str | None, dict[str, Any]]:
    """Trains the head in the run, logs the data statistics and backbone + head; returns (model id, metrics)."""
    from facescale.console import TOTAL_STEPS_TAG, RunProgress
    from facescale.data.factory import build_train_loader
    from facescale.tracking.mlflow_run import Tracker

    pfe, model, device, loaded = cfg.pfe, prep.model, prep.device, prep.loaded
    tracker = Tracker(prep.tracking_uri, run_id, rank=0)
    tracker.set_tag(TOTAL_STEPS_TAG, str(pfe.steps))
    model.to(device)
    loader = build_train_loader(cfg, rank=0, world_size=1, device=device)
    batcher, batches = endless_identity_batches(loader, pfe, seed)

    def report(step: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics({**metrics, "train/step": step}, step)

    with RunProgress(prep.tracking_uri, run_id, pfe.ids_per_batch * pfe.images_per_id):  # progress, from MLflow
        trained = train_head(model, batches, pfe, device, on_window=report)
    metrics: dict[str, Any] = {"step": trained.steps, "train/loss": trained.losses[-1]}
    metrics.update({f"data/{k}": v for k, v in batcher.stats.items()})
    tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("data/")}, trained.steps)
    model.cpu().eval()
    head = model.head
    metadata = {"backbone": loaded.backbone, "embedding_size": head.embedding_size,
                "pfe": {"feature_shape": list(head.feature_shape), "hidden_size": head.fc1.out_features,
                        "base_model_id": loaded.model_id, "base_model_uri": model_uri}}
    model_id = tracker.log_model(model, name=pfe.model_name, metadata=metadata)
    if model_id:
        tracker.set_tag("facescale.model_id", model_id)
        metrics["model_id"] = model_id
    return model_id, metrics


def format_pfe_result(res: PFEResult) -> str:
    """The result lines ``facescale pfe`` prints."""
    lines = ["", "FaceScale PFE uncertainty head", f"steps {res.metrics.get('step')}, final MLS loss "
             f"{res.metrics.get('train/loss', float('nan')):.4f}, wall time {res.wall_time_s:.0f} s",
             f"MLflow run {res.run_id} (tracking URI {res.tracking_uri})"]
    if res.model_id:
        lines.append(f"model: models:/{res.model_id}  (evaluate with: facescale eval --model models:/{res.model_id} "
                     "--pfe ...)")
    return "\n".join(lines)
