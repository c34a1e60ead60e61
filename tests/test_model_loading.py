"""load_backbone against a real MLflow store (sqlite in tmp) and real training checkpoints."""

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from facescale.checkpoint.format import TrainCheckpoint, TrainProgress
from facescale.models import build_backbone
from facescale.tracking.mlflow_run import Tracker, end_run, start_run
from facescale.tracking.models import ModelResolveError, load_backbone

ARCH = {"backbone": "mobilefacenet", "embedding_size": 64}


def _embed(module):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        return module.eval()(x).numpy()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One model logged by Tracker.log_model, registered as fs-eval-test v1 with alias 'champion'."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    run_id = start_run(uri, "facescale-test", str(root / "artifacts"), "load", {}, "")
    torch.manual_seed(7)
    model = build_backbone(ARCH["backbone"], ARCH["embedding_size"])
    model_id = Tracker(uri, run_id, rank=0).log_model(model, registered_model_name="fs-eval-test", metadata=ARCH)
    end_run(uri, run_id, ok=True)
    MlflowClient(uri).set_registered_model_alias("fs-eval-test", "champion", "1")
    return {"uri": uri, "run_id": run_id, "model_id": model_id, "expected": _embed(model)}


@pytest.fixture
def other_global_store(tmp_path, monkeypatch):
    """MLflow's process-global tracking URI points elsewhere: loading must follow the tracking_uri argument."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(previous)


@pytest.mark.parametrize("form", ["alias", "version", "latest", "model_id", "run"])
def test_every_uri_form_loads_the_logged_model(store, form, other_global_store):
    uri = {"alias": "models:/fs-eval-test@champion", "version": "models:/fs-eval-test/1",
           "latest": "models:/fs-eval-test/latest", "model_id": f"models:/{store['model_id']}",
           "run": f"runs:/{store['run_id']}/model"}[form]
    loaded = load_backbone(uri, tracking_uri=store["uri"])
    assert loaded.source == uri
    assert loaded.model_id == store["model_id"]
    assert (loaded.backbone, loaded.embedding_size) == (ARCH["backbone"], ARCH["embedding_size"])
    assert not loaded.module.training
    assert next(loaded.module.parameters()).device.type == "cpu"
    np.testing.assert_allclose(_embed(loaded.module), store["expected"], atol=1e-6)


def test_tracking_uri_from_environment(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert load_backbone("models:/fs-eval-test@champion").model_id == store["model_id"]


@pytest.mark.parametrize("bad, why", [
    ("models:/fs-eval-test@nobody", "nobody"),
    ("models:/fs-eval-test/9", "fs-eval-test"),
    ("models:/no-such-model/1", "no-such-model"),
    ("models:/m-0123456789abcdef0123456789abcdef", "m-0123456789abcdef"),
    ("models:/fs-eval-test", "give a version or alias"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "0123456789abcdef"),
    ("runs:/RUN/other", "logged no model named 'other'"),
    ("runs:/RUN", "expected runs:/<run_id>/<model name>"),
    ("s3://bucket/model", "unsupported model URI"),
])
def test_unresolvable_uris_name_the_uri(store, bad, why):
    bad = bad.replace("RUN", store["run_id"])
    with pytest.raises(ModelResolveError, match="does not resolve|logged no model|give a|expected|unsupported") as err:
        load_backbone(bad, tracking_uri=store["uri"])
    assert bad in str(err.value) and why in str(err.value)


def _checkpoint(directory, arch):
    torch.manual_seed(3)
    backbone = build_backbone("mobilefacenet", 64)
    head = torch.nn.Linear(64, 10)
    TrainCheckpoint(backbone, head, {}, TrainProgress(), arch=arch).save(directory, rank=0)
    return backbone


def test_checkpoint_directory_rebuilds_the_backbone(tmp_path):
    backbone = _checkpoint(tmp_path / "ckpt", ARCH)
    for given in (str(tmp_path / "ckpt"), str(tmp_path / "ckpt" / "model.pt"), f"file://{tmp_path / 'ckpt'}"):
        loaded = load_backbone(given)
        assert (loaded.model_id, loaded.backbone, loaded.embedding_size) == (None, "mobilefacenet", 64)
        assert loaded.source == given
        np.testing.assert_allclose(_embed(loaded.module), _embed(backbone), atol=1e-6)


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(ModelResolveError, match="no such file"):
        load_backbone(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelResolveError, match="no model.pt"):
        load_backbone(str(tmp_path / "empty"))
    _checkpoint(tmp_path / "old", arch=None)  # a checkpoint from before the arch record
    with pytest.raises(ModelResolveError, match="no arch record"):
        load_backbone(str(tmp_path / "old"))
    _checkpoint(tmp_path / "wrong", arch={"backbone": "iresnet18", "embedding_size": 64})
    with pytest.raises(ModelResolveError, match="do not fit backbone 'iresnet18'"):
        load_backbone(str(tmp_path / "wrong"))
