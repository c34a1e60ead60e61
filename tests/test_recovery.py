"""Cluster-scale behaviour on real parts: a real local Ray head, 2 Ray Train workers (gloo), the DALI loader, a real
MLflow sqlite store and checkpoints committed to the run's storage.

- a Ray Train worker process is SIGKILLed mid-run: the run restarts on its own from the last committed checkpoint
  and ends with exactly the planned optimizer steps, each step's metrics logged once, and the same loss curve as an
  uninterrupted run;
- a run saved on 2 workers continues on 1 (elastic resume), skipping checkpoints that were never committed;
- a planted NaN under ``train.nonfinite: skip`` and ``stop``; planted NaN weights are never checkpointed;
- gradient accumulation: the lr schedule advances once per optimizer step.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from mlflow.tracking import MlflowClient

from facescale.checkpoint.committed import MANIFEST_NAME, resolve_checkpoint
from facescale.config import load_config
from facescale.train.launch import run_training
from facescale.train.schedule import lr_at
from facescale.train.step import NonFiniteError
from planted_faults import PlantedFaults, ship_to_ray_workers

ship_to_ray_workers()  # the hooks reach the Ray workers by value (tests/ is not on their path)

pytestmark = pytest.mark.integration


def _config(data: Path, work: Path, *extra: str):
    return load_config(None, [
        f"data.root={data}", "data.val_bins=[]", "data.num_workers=1",
        "model.backbone=iresnet_nano", "model.embedding_size=32",
        "classifier.type=partial_fc", "classifier.margin.type=cosface", "classifier.margin.s=16",
        "train.batch_size=8", "train.lr=0.1", "train.log_every=1", "train.system_metrics_interval_s=null",
        "scaling.num_workers=2", f"scaling.storage_path={work / 'runs'}",
        f"tracking.uri=sqlite:///{work / 'mlruns.db'}", f"tracking.artifact_root={work / 'artifacts'}",
        "tracking.log_model=false", *extra,
    ])


def _history(result, name: str) -> list[tuple[int, float]]:
    client = MlflowClient(result.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, name))


def _kill_a_worker_after(checkpoint: Path, killed: list[int], stop: threading.Event) -> None:
    """SIGKILLs one Ray Train worker process as soon as ``checkpoint`` is committed."""
    while not stop.is_set():
        if (checkpoint / MANIFEST_NAME).is_file():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if " ".join(proc.info["cmdline"] or []).startswith("ray::RayTrainWorker"):
                    proc.kill()
                    killed.append(proc.info["pid"])
                    return
        time.sleep(0.05)


ENGINE = ["train.engine=deepspeed", "train.deepspeed.zero_stage=2"]


@pytest.fixture(scope="module")
def reference(tiny_data: Path, local_ray, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted DeepSpeed ZeRO-2 run of 16 steps keeping every checkpoint (4, 8, 12, 16)."""
    work = tmp_path_factory.mktemp("reference")
    cfg = _config(tiny_data, work, *ENGINE, "train.max_steps=16", "train.checkpoint_every=4",
                  "train.keep_checkpoints=null")
    return run_training(cfg, ray_run_name="reference"), work


def test_a_killed_worker_is_replaced_and_the_run_finishes_as_if_nothing_happened(tiny_data, local_ray, reference,
                                                                                  tmp_path):
    ref, _ = reference
    cfg = _config(tiny_data, tmp_path, *ENGINE, "train.max_steps=16", "train.checkpoint_every=4",
                  "scaling.max_failures=1")
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_a_worker_after,
                               args=(tmp_path / "runs" / "killed" / "checkpoint_00000004", killed, stop), daemon=True)
    watcher.start()
    try:
        result = run_training(cfg, ray_run_name="killed")
    finally:
        stop.set()
        watcher.join()
    assert killed, "no Ray Train worker was killed"
    summary = json.loads(result.metrics["summary"])
    assert summary["resumes"] == 1 and summary["resumed_from"].rstrip("/").endswith("checkpoint_00000004")
    assert result.metrics["step"] == 16 and summary["steps"] == 16 and summary["steps_this_attempt"] == 12
    losses = _history(result, "train/loss")
    assert [s for s, _ in losses] == list(range(1, 17)), "each step's loss is logged exactly once"
    # the restarted run replays steps 5.. from the checkpoint: the curve matches the uninterrupted run's
    np.testing.assert_allclose([v for _, v in losses], [v for _, v in _history(ref, "train/loss")], rtol=1e-4)
    assert resolve_checkpoint(str(tmp_path / "runs" / "killed")).rstrip("/").endswith("checkpoint_00000016")


def test_a_run_saved_on_two_workers_continues_on_one(tiny_data, local_ray, reference, tmp_path):
    ref, work = reference
    run_root = work / "runs" / "reference"
    copy = tmp_path / "runs" / "reference"
    shutil.copytree(run_root, copy)
    # checkpoints 12 and 16 as an interrupted write leaves them: manifest never written / a file cut short
    (copy / "checkpoint_00000016" / MANIFEST_NAME).unlink()
    truncated = next(p for p in sorted((copy / "checkpoint_00000012").iterdir()) if p.name.startswith("partial_fc_"))
    truncated.write_bytes(truncated.read_bytes()[:10])
    cfg = _config(tiny_data, tmp_path, *ENGINE, "train.max_steps=16", "scaling.num_workers=1",
                  f"train.resume_from={copy}")
    result = run_training(cfg, ray_run_name="elastic")
    summary = json.loads(result.metrics["summary"])
    assert summary["resumed_from"].rstrip("/").endswith("checkpoint_00000008"), summary
    assert result.metrics["step"] == 16 and summary["steps_this_attempt"] == 8
    losses = dict(_history(result, "train/loss"))
    assert sorted(losses) == list(range(9, 17))
    ref_losses = dict(_history(ref, "train/loss"))
    # continuous: the first step on 1 worker is close to the 2-worker run's, far from a fresh start's
    assert abs(losses[9] - ref_losses[9]) < 0.25 * (ref_losses[1] - ref_losses[9]) + 0.05 * ref_losses[9], \
        (losses, ref_losses)


def test_nonfinite_skip_counts_the_step_and_accumulation_steps_the_lr_once_per_optimizer_step(tiny_data, local_ray,
                                                                                              tmp_path):
    # 192 samples / (8 x 2 workers) = 12 micro-batches per epoch = 6 optimizer steps of 2
    cfg = _config(tiny_data, tmp_path, "train.epochs=1", "train.grad_accum_steps=2", "train.warmup_steps=2",
                  "train.nonfinite=skip", "train.system_metrics_interval_s=1")
    result = run_training(cfg, hooks=PlantedFaults(nonfinite_loss_steps=(3,), rank=1).hooks())
    assert result.metrics["step"] == 6 and result.metrics["train/nonfinite_skipped"] == 1
    # observability: phase times per logging window, system metrics of the node, the end-of-run summary
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    phases = ["data_wait", "backbone_fwd", "classifier", "backward", "optimizer"]
    assert all(run.data.metrics[f"time/{p}_ms"] > 0 for p in phases), run.data.metrics
    assert any(k.startswith("system/node0/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    local = MlflowClient(result.tracking_uri).download_artifacts(result.run_id, "summary.json", str(tmp_path))
    summary = json.loads(Path(local).read_text())
    assert summary["nonfinite_skipped"] == 1 and summary["steps"] == 6
    assert sum(summary["breakdown"].values()) == pytest.approx(1.0)
    lrs = _history(result, "train/lr")
    assert [s for s, _ in lrs] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in lrs], [lr_at(s - 1, 6, 0.1, 2) for s, _ in lrs], rtol=1e-6)
    assert 3 not in dict(_history(result, "train/loss")), "the NaN loss of the skipped step is not logged"
    assert dict(_history(result, "train/nonfinite_skipped"))[3] == 1


def test_nonfinite_stop_names_the_step_and_keeps_the_last_good_checkpoint(tiny_data, local_ray, tmp_path):
    cfg = _config(tiny_data, tmp_path, "train.max_steps=8", "train.checkpoint_every=2", "train.nonfinite=stop")
    with pytest.raises(NonFiniteError, match=r"non-finite step 5: loss nan .*train\.nonfinite=stop"):
        run_training(cfg, ray_run_name="stopped", hooks=PlantedFaults(nonfinite_loss_steps=(5,)).hooks())
    assert resolve_checkpoint(str(tmp_path / "runs" / "stopped")).rstrip("/").endswith("checkpoint_00000004")
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert run.info.status == "FAILED" and "step 5" in run.data.tags["facescale.stop_reason"]


def test_nan_weights_are_never_checkpointed(tiny_data, local_ray, tmp_path):
    cfg = _config(tiny_data, tmp_path, "train.max_steps=8", "train.checkpoint_every=2", "train.nonfinite=skip")
    with pytest.raises(NonFiniteError, match=r"refusing to write the checkpoint of step 4: backbone\.\S+ on rank 0"):
        run_training(cfg, ray_run_name="poisoned", hooks=PlantedFaults(nonfinite_weights_step=3).hooks())
    runs = tmp_path / "runs" / "poisoned"
    assert resolve_checkpoint(str(runs)).rstrip("/").endswith("checkpoint_00000002")
    assert not any(p.name.startswith("checkpoint_0000000") and p.name > "checkpoint_00000002"
                   for p in runs.iterdir())
