"""MLflow system metrics through :class:`facescale.train.observe.SystemMonitor`, against a real local MLflow store.

``nvidia-ml-py`` (the ``pynvml`` module) is installed, as in the image, and this machine has no NVIDIA driver:
MLflow's GPU monitor must step aside quietly and the CPU, memory, disk and network metrics must still be logged.
Nothing is mocked.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from facescale.tracking.mlflow_run import Tracker
from facescale.train.observe import SystemMonitor


def test_pynvml_comes_from_nvidia_ml_py() -> None:
    import pynvml

    assert importlib.util.find_spec("pynvml") is not None
    assert hasattr(pynvml, "nvmlInit") and hasattr(pynvml, "nvmlDeviceGetUtilizationRates")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver path; a GPU machine logs GPU metrics")
def test_monitor_logs_system_metrics_without_a_gpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("system-metrics", artifact_location=str(tmp_path / "art")))
    tracker = Tracker(uri, run.info.run_id, rank=0)
    with caplog.at_level(logging.INFO):
        monitor = SystemMonitor(tracker, local_rank=0, node_rank=0, interval_s=0.2, resumed=False)
        assert not monitor.gpu_metrics
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "system/node0/cpu_utilization_percentage" not in \
                client.get_run(run.info.run_id).data.metrics:
            time.sleep(0.2)
        monitor.finish()
    metrics = client.get_run(run.info.run_id).data.metrics
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_percentage"):
        assert f"system/node0/{name}" in metrics, sorted(metrics)
    assert not [k for k in metrics if "gpu" in k]
    # No traceback and no warning: MLflow's NVML failure goes to DEBUG, plus one INFO line.
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert noisy == [], [r.getMessage() for r in noisy]


def test_monitor_is_off_when_disabled_or_not_local_rank_zero(tmp_path: Path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path / 'unused.db'}", "no-run", rank=1)
    assert SystemMonitor(tracker, local_rank=0, node_rank=0, interval_s=None, resumed=False)._monitor is None
    assert SystemMonitor(tracker, local_rank=1, node_rank=0, interval_s=1.0, resumed=False)._monitor is None
