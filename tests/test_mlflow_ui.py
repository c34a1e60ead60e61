"""What the MLflow UI shows of facescale's runs, against a real `mlflow server` on 127.0.0.1: experiments marked as
model training (so the UI opens on the runs, not the GenAI traces overview), the training data as a dataset input,
and non-finite metrics that are counted and named instead of vanishing."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from facescale.data import load_manifest
from facescale.tracking.mlflow_run import (
    EXPERIMENT_KIND_TAG,
    NONFINITE_METRIC,
    NONFINITE_TAG,
    UI_TRAINING_QUERY,
    Tracker,
    log_dataset_input,
    start_run,
    ui_url,
)

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent



def test_experiments_are_marked_model_training(mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    run_id = start_run(mlflow_server, "ui-new", "unused", "r", {}, "")
    assert client.get_experiment_by_name("ui-new").tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_run(run_id).info.experiment_id == client.get_experiment_by_name("ui-new").experiment_id

    client.create_experiment("ui-old")  # made before facescale marked experiments: no kind
    assert EXPERIMENT_KIND_TAG not in client.get_experiment_by_name("ui-old").tags
    start_run(mlflow_server, "ui-old", "unused", "r", {}, "")
    assert client.get_experiment_by_name("ui-old").tags[EXPERIMENT_KIND_TAG] == "custom_model_development"

    chosen = client.create_experiment("ui-chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    start_run(mlflow_server, "ui-chosen", "unused", "r", {}, "")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development", "a user's choice stays"


def test_printed_links_open_the_ui_on_training_runs(mlflow_server: str) -> None:
    # MLflow 3.17's UI picks GenAI or model training from a sidebar toggle kept in the browser, or from the link's
    # `workflowType` query parameter (seen in a real headless Chromium: without it the experiment opens on the
    # GenAI overview even with the kind tag). The installed UI bundle must still read that parameter and value.
    import mlflow

    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    main_js = "".join(p.read_text(errors="ignore") for p in bundle.glob("main.*.js"))
    assert 'get("workflowType")' in main_js and 'MACHINE_LEARNING="machine_learning"' in main_js
    assert UI_TRAINING_QUERY == "workflowType=machine_learning"
    assert ui_url(mlflow_server, "7") == f"{mlflow_server}/#/experiments/7/runs?workflowType=machine_learning"
    assert ui_url("sqlite:///x/mlruns.db", "7", "abc") == (
        "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning")


def test_training_data_is_the_runs_dataset_input(mlflow_server: str, tiny_data: Path) -> None:
    client = MlflowClient(mlflow_server)
    manifest = load_manifest(tiny_data)
    run_id = start_run(mlflow_server, "ui-data", "unused", "stage", {}, "")
    log_dataset_input(mlflow_server, run_id, str(tiny_data), manifest)
    (inp,) = client.get_run(run_id).inputs.dataset_inputs
    assert inp.dataset.name == tiny_data.name
    assert inp.dataset.digest == manifest.digest[:12]
    assert (inp.dataset.source_type, json.loads(inp.dataset.source)) == ("local", {"uri": str(tiny_data)})
    profile = json.loads(inp.dataset.profile)
    assert (profile["num_samples"], profile["num_classes"], profile["digest"]) == (12 * 16, 12, manifest.digest)
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "training")]

    s3_run = start_run(mlflow_server, "ui-data", "unused", "stage-s3", {}, "")
    log_dataset_input(mlflow_server, s3_run, "s3://faces/ms1m/", manifest)
    (inp,) = client.get_run(s3_run).inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.source_type) == ("ms1m", "s3")
    assert json.loads(inp.dataset.source) == {"uri": "s3://faces/ms1m/"}


def test_nonfinite_metrics_are_counted_tagged_and_warned_once(mlflow_server: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    client = MlflowClient(mlflow_server)
    run_id = start_run(mlflow_server, "ui-nonfinite", "unused", "r", {}, "")
    tracker = Tracker(mlflow_server, run_id, rank=0)
    with caplog.at_level(logging.WARNING, logger="facescale.tracking"):
        tracker.log_metrics({"train/loss": 2.5, "train/grad_norm": math.nan, "val/x": math.inf}, 3)
        tracker.log_metrics({"train/loss": 2.0, "train/grad_norm": math.nan}, 5)
        # a restarted worker group: a new Tracker continues the count and the names
        Tracker(mlflow_server, run_id, rank=0).log_metrics({"train/lr": -math.inf}, 7)
    run = client.get_run(run_id)
    assert run.data.tags[NONFINITE_TAG] == "train/grad_norm@3,val/x@3,train/lr@7"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, NONFINITE_METRIC)] == \
        [(3, 2.0), (5, 3.0), (7, 4.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(3, 2.5), (5, 2.0)]
    assert "train/grad_norm" not in run.data.metrics and "val/x" not in run.data.metrics
    warned = [r.getMessage() for r in caplog.records if r.name == "facescale.tracking"]
    assert len(warned) == 3 and [w.split()[1] for w in warned] == ["train/grad_norm", "val/x", "train/lr"]

    # off rank 0 nothing is logged, nothing counted
    Tracker(mlflow_server, run_id, rank=1).log_metrics({"train/grad_norm": math.nan}, 9)
    assert client.get_metric_history(run_id, NONFINITE_METRIC)[-1].step == 7
