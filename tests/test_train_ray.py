"""End to end on real parts: synthetic shards → 2 Ray Train workers (real local Ray, gloo) → MLflow store.

The MLflow store is a real sqlite tracking store with a local artifact root (the embedded default). The test
checks what a user would look at: the run, its params and config, a decreasing loss curve, held-out
verification accuracy, the logged model (which loads back and embeds), and the final checkpoint.
"""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from facescale.config import load_config
from facescale.train.launch import format_results, run_training

pytestmark = pytest.mark.integration


def test_two_worker_run_logs_to_mlflow(tiny_data, local_ray, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config(None, [
        f"data.root={tiny_data}", f"data.val_bins=[{tiny_data / 'verification.bin'}]", "data.num_workers=0",
        "model.backbone=iresnet_tiny", "model.embedding_size=32",
        "classifier.margin.type=cosface", "classifier.margin.s=16", "classifier.margin.m3=0.2",
        "train.batch_size=16", "train.max_steps=24", "train.lr=0.05", "train.warmup_steps=2", "train.log_every=4",
        "train.checkpoint_every=12", "train.eval_batch_size=40",
        "scaling.num_workers=2", f"scaling.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={uri}", f"tracking.artifact_root={tmp_path / 'artifacts'}", "tracking.experiment=ray-test",
    ])
    result = run_training(cfg)

    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == "iresnet_tiny"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags["facescale.loader"] == "DaliFaceLoader"  # data.loader: auto, and DALI imports here
    assert "facescale.loader_fallback" not in run.data.tags
    history = client.get_metric_history(result.run_id, "train/loss")
    steps = [m.step for m in history]
    assert steps == sorted(set(steps)) and steps[-1] == 24, "each logged step once, up to the last"
    losses = [m.value for m in history]
    assert np.mean(losses[-2:]) < losses[0], f"loss did not decrease: {losses}"
    acc = run.data.metrics["val/verification/accuracy"]
    # Measured on the project's 2-core machine (2026-12-01) with exactly this config: 0.817 for seed 0 (the same,
    # bit for bit, on repeated runs), 0.850 for seed 1, 0.917 for seed 2. A broken run: the same 24 steps at lr 1e-9
    # (updates that do not land) reach 0.600, a 1-step run 0.617 -- random conv features already separate these
    # synthetic faces a little, so 0.5 proved nothing. 60 pairs, one pair = 1.7 points: the floor 0.75 is ~4 pairs
    # below the worst measured seed and ~8 above the untrained net.
    assert 0.75 <= acc <= 1.0, f"held-out accuracy {acc:.4f}: training did not learn"
    assert result.metrics["val/verification/accuracy"] == pytest.approx(acc)
    assert "Open the UI" in format_results(result)

    # the resolved config and the ROC plot are artifacts of the run
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert "config.yaml" in names and "plots" in names

    # the model was logged with the run (MLflow 3 LoggedModel) and embeds a batch
    model_id = result.metrics["model_id"]
    mlflow.set_tracking_uri(uri)
    logged = mlflow.get_logged_model(model_id)
    assert logged.source_run_id == result.run_id
    model = mlflow.pytorch.load_model(f"models:/{model_id}")
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 112, 112)).shape == (2, 32)

    # the last checkpoint holds the whole training state at the final step
    ckpt = Path(result.checkpoint_path)
    assert json.loads((ckpt / "progress.json").read_text())["step"] == 24
    assert {"model.pt", "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in ckpt.iterdir()}

    # Resuming from the step-12 checkpoint (a new run, same 2 workers) must retrace the uninterrupted run: model,
    # optimizer, RNG and data position all come back, and the run is deterministic (tests/test_determinism.py), so
    # the losses at steps 16, 20, 24 and the final accuracy are those of the reference run above, bit for bit on one
    # machine (1e-6 relative allows for nothing but float printing in MLflow's store).
    mid = ckpt.parent / "checkpoint_00000012"
    assert mid.is_dir(), sorted(p.name for p in ckpt.parent.iterdir())
    resumed_cfg = cfg.model_copy(deep=True)
    resumed_cfg.train.resume_from = str(mid)
    resumed = run_training(resumed_cfg)
    resumed_history = client.get_metric_history(resumed.run_id, "train/loss")
    assert [m.step for m in resumed_history] == [16, 20, 24]
    reference = {m.step: m.value for m in history}
    assert [m.value for m in resumed_history] == pytest.approx([reference[s] for s in (16, 20, 24)], rel=1e-6)
    assert resumed.metrics["val/verification/accuracy"] == pytest.approx(acc, abs=1e-9)


def tiny_overrides(data, tmp_path, *extra):
    return [f"data.root={data}", f"data.val_bins=[{data / 'verification.bin'}]", "data.num_workers=0",
            "model.backbone=iresnet_tiny", "model.embedding_size=32", "train.batch_size=16", "train.lr=0.05",
            "train.warmup_steps=2", "train.log_every=4", "train.eval_batch_size=40", "tracking.log_model=false",
            f"scaling.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
            f"tracking.artifact_root={tmp_path / 'artifacts'}", *extra]


def test_partial_fc_run_resumes_on_another_world_size(tiny_data, local_ray, tmp_path):
    """Partial FC through the real loop: 2 workers save class-range shards, 1 worker resumes from them."""
    pfc = ["classifier.type=partial_fc", "classifier.sample_rate=0.5", "classifier.margin.type=cosface",
           "classifier.margin.s=16", "classifier.margin.m3=0.2"]
    first = run_training(load_config(None, tiny_overrides(tiny_data, tmp_path, *pfc, "train.max_steps=12",
                                                           "scaling.num_workers=2")))
    ckpt = Path(first.checkpoint_path)
    manifest = json.loads((ckpt / "partial_fc.json").read_text())
    assert manifest["num_classes"] == 12 and manifest["embedding_size"] == 32
    assert len(list(ckpt.glob("partial_fc_classes_*.pt"))) == 2, "one class-range file per rank"
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in ckpt.iterdir()}

    second = run_training(load_config(None, tiny_overrides(tiny_data, tmp_path, *pfc, "train.max_steps=16",
                                                            "scaling.num_workers=1", f"train.resume_from={ckpt}")))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    steps = [m.step for m in client.get_metric_history(second.run_id, "train/loss")]
    assert steps == [16], "the resumed run continues at step 13 and logs its first report at 16"
    assert json.loads((Path(second.checkpoint_path) / "progress.json").read_text())["step"] == 16
    # On another world size the global batch (and so each step's samples) changes, so no run is a bitwise reference
    # here; the exact resume-equals-uninterrupted check is in test_two_worker_run_logs_to_mlflow. This one checks that
    # the resumed steps continue a trained classifier rather than diverge.
    resumed_loss = second.metrics["train/loss"]
    assert np.isfinite(resumed_loss) and resumed_loss < 1.5 * first.metrics["train/loss"]


def test_missing_dataset_fails_before_ray(tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path / 'absent'}"])
    with pytest.raises(Exception, match="absent"):
        run_training(cfg)
