"""Load a backbone from wherever users point at one: an MLflow model URI or a training checkpoint directory.

Accepted forms (resolved cheaply against the tracking store first, loaded only once they resolve):

    models:/<name>@<alias>        registered model by alias -> ModelVersion.model_id (MLflow 3)
    models:/<name>/<version>      registered model by version ("latest" = highest version)
    models:/m-<id>                MLflow 3 LoggedModel id
    runs:/<run_id>/<name>         the LoggedModel called <name> that the run logged
    <directory>                   a training checkpoint (model.pt with an ``arch`` record), or a local MLflow model
                                  directory (an MLmodel file, e.g. one downloaded with ``mlflow artifacts download``)

Models logged by :meth:`facescale.tracking.mlflow_run.Tracker.log_model` are ``mlflow.pytorch`` pickle-format
models whose MLmodel ``metadata`` holds ``{"backbone": name, "embedding_size": n}``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from facescale.checkpoint.format import load_backbone_state
from facescale.models import build_backbone
from facescale.tracking.mlflow_run import default_tracking_uri  # re-exported (in __all__)

__all__ = ["LoadedBackbone", "ModelResolveError", "default_tracking_uri", "load_backbone", "resolve_model_id"]


class ModelResolveError(ValueError):
    """A model URI or path that does not resolve to a backbone; the message names it and says why."""


@dataclass
class LoadedBackbone:
    """A backbone ready for evaluation or export.

    Attributes:
        module: The backbone, in eval mode, on CPU.
        source: The URI or path as given.
        model_id: MLflow 3 LoggedModel id when loaded from MLflow, else None.
        backbone: Registry name (``facescale.models``) when known.
        embedding_size: Length of the embedding the module returns.
    """

    module: nn.Module
    source: str
    model_id: str | None
    backbone: str | None
    embedding_size: int


def _latest_version(client: MlflowClient, name: str) -> Any:
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise ModelResolveError(f"registered model {name!r} has no versions")
    return max(versions, key=lambda v: int(v.version))


def resolve_model_id(uri: str, client: MlflowClient) -> str:
    """The MLflow 3 LoggedModel id a ``models:/`` or ``runs:/`` URI names, without downloading anything.

    Args:
        uri: ``models:/name@alias``, ``models:/name/version``, ``models:/m-...`` or ``runs:/run_id/name``.
        client: Client on the tracking (and registry) store.

    Returns:
        The model id (``m-...``).

    Raises:
        ModelResolveError: Unknown name, alias, version, model id or run, or a run without that model.
    """
    try:
        if uri.startswith("models:/"):
            rest = uri[len("models:/"):].strip("/")
            if "@" in rest:
                name, alias = rest.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            elif "/" in rest:
                name, number = rest.split("/", 1)
                if number == "latest":
                    version = _latest_version(client, name)
                elif number.isdigit():
                    version = client.get_model_version(name, number)
                else:
                    raise ModelResolveError(f"{uri}: version {number!r} is neither a number nor 'latest'")
            elif rest.startswith("m-"):
                return client.get_logged_model(rest).model_id
            else:
                raise ModelResolveError(f"{uri}: give a version or alias (models:/{rest}/1, models:/{rest}@prod) "
                                        "or a model id (models:/m-...)")
            if getattr(version, "model_id", None):
                return version.model_id
            # NOTE: some stores (sqlite in MLflow 3.17) leave ModelVersion.model_id empty and keep the LoggedModel
            # only in the version's source, ``models:/m-...``.
            source = version.source or ""
            if source.startswith("models:/m-"):
                return client.get_logged_model(source[len("models:/"):].strip("/")).model_id
            # A version registered from a plain artifact path (MLflow 2 style) has no LoggedModel behind it.
            raise ModelResolveError(f"{uri}: model version {version.name}/{version.version} has no "
                                    f"MLflow 3 model id (source {version.source})")
        if uri.startswith("runs:/"):
            parts = uri[len("runs:/"):].strip("/").split("/", 1)
            if len(parts) != 2 or not parts[1]:
                raise ModelResolveError(f"{uri}: expected runs:/<run_id>/<model name>")
            run_id, name = parts
            run = client.get_run(run_id)
            found = client.search_logged_models([run.info.experiment_id],
                                                filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
            if not found:
                outputs = run.outputs.model_outputs if run.outputs else []
                names = sorted({client.get_logged_model(o.model_id).name for o in outputs}) or ["(none)"]
                raise ModelResolveError(f"{uri}: run {run_id} logged no model named {name!r}; "
                                        f"its models: {', '.join(names)}")
            # Several models of one name in one run (re-logged): the newest is the one the run ended with.
            return max(found, key=lambda m: m.creation_timestamp).model_id
    except MlflowException as exc:
        raise ModelResolveError(f"{uri} does not resolve in {client.tracking_uri}: {exc.message}") from exc
    raise ModelResolveError(f"{uri}: not a models:/ or runs:/ URI")


def _embedding_size(module: nn.Module, source: str) -> int:
    # NOTE: only for models logged without metadata: one tiny forward pass reveals the output width.
    with torch.no_grad():
        out = module(torch.zeros(2, 3, 112, 112))
    if out.ndim != 2:
        raise ModelResolveError(f"{source}: model returns shape {tuple(out.shape)}, not [B, embedding_size]")
    return int(out.shape[1])


def _from_mlflow_dir(local: str | Path, source: str, model_id: str | None) -> LoadedBackbone:
    import mlflow.pytorch
    from mlflow.models import Model

    try:
        metadata = dict(Model.load(str(local)).metadata or {})
        module = mlflow.pytorch.load_model(str(local), map_location="cpu", weights_only=False)
    except (MlflowException, OSError, RuntimeError, ModuleNotFoundError, AttributeError) as exc:
        raise ModelResolveError(f"{source}: resolved, but the model could not be loaded: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ModelResolveError(f"{source}: the logged model is a {type(module).__name__}, not a torch module")
    module = module.cpu().eval()
    size = metadata.get("embedding_size")
    return LoadedBackbone(module=module, source=source, model_id=model_id, backbone=metadata.get("backbone"),
                          embedding_size=int(size) if size else _embedding_size(module, source))


def _from_checkpoint(directory: Path, source: str) -> LoadedBackbone:
    try:
        state, arch = load_backbone_state(directory)
    except (FileNotFoundError, RuntimeError, KeyError) as exc:
        raise ModelResolveError(f"{source}: {exc}") from exc
    if "backbone" not in arch or "embedding_size" not in arch:
        raise ModelResolveError(f"{source}: model.pt has no arch record (backbone name, embedding size); "
                                "the checkpoint predates it and cannot be rebuilt from its path alone")
    module = build_backbone(arch["backbone"], int(arch["embedding_size"]))
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelResolveError(f"{source}: weights do not fit backbone {arch['backbone']!r}: {exc}") from exc
    return LoadedBackbone(module=module.eval(), source=source, model_id=None, backbone=arch["backbone"],
                          embedding_size=int(arch["embedding_size"]))


def load_backbone(uri: str, tracking_uri: str | None = None) -> LoadedBackbone:
    """Resolves ``uri`` (MLflow model URI or checkpoint directory) and loads the backbone on CPU in eval mode.

    Args:
        uri: ``models:/name@alias``, ``models:/name/version``, ``models:/m-...``, ``runs:/run_id/name``, a
            training-checkpoint directory (with ``model.pt``) or a local MLflow model directory.
        tracking_uri: MLflow store; None means ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlruns.db``.

    Returns:
        The loaded backbone with where it came from.

    Raises:
        ModelResolveError: The URI or path does not resolve (raised before any download), or what it names
            cannot be loaded as a backbone.
    """
    if uri.startswith(("models:/", "runs:/")):
        tracking_uri = tracking_uri or default_tracking_uri()
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        model_id = resolve_model_id(uri, client)
        import mlflow.artifacts

        with tempfile.TemporaryDirectory(prefix="facescale-model-") as tmp:
            try:
                # NOTE: download from the model's artifact location, not "models:/<id>": MLflow resolves a model
                # id through the process-global tracking URI, whatever tracking_uri says.
                location = client.get_logged_model(model_id).artifact_location
                local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                            tracking_uri=tracking_uri, registry_uri=tracking_uri)
            except MlflowException as exc:
                raise ModelResolveError(f"{uri}: model {model_id} resolved but its files did not download: "
                                        f"{exc.message}") from exc
            return _from_mlflow_dir(local, uri, model_id)
    if uri.startswith(("models:", "runs:")) or ("://" in uri and not uri.startswith("file://")):
        raise ModelResolveError(f"{uri}: unsupported model URI (use models:/..., runs:/... or a local directory)")
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
    if not path.exists():
        raise ModelResolveError(f"{uri}: no such file or directory")
    if path.is_file() and path.name == "model.pt":
        path = path.parent
    if not path.is_dir():
        raise ModelResolveError(f"{uri}: not a checkpoint directory (expected a directory holding model.pt)")
    if (path / "MLmodel").is_file():
        return _from_mlflow_dir(path, uri, None)
    if not (path / "model.pt").is_file():
        raise ModelResolveError(f"{uri}: not a training checkpoint (no model.pt) nor an MLflow model (no MLmodel)")
    return _from_checkpoint(path, uri)
