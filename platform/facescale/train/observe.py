"""What a training run shows while it runs and when it ends: step metrics, step-time breakdown, system metrics,
verification, and a closing summary. Rank checks live here (and in the Tracker), not in the loop.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from facescale.config import FaceScaleConfig
from facescale.eval.plots import plot_roc
from facescale.eval.verification import verify_model

if TYPE_CHECKING:  # MLflow is imported where it is used: the step code also runs where MLflow is absent (benchmarks)
    from facescale.tracking.mlflow_run import Tracker

log = logging.getLogger("facescale.train")
# Rank 0's per-step lines. Under Ray they go to Ray's log files only, and the driver shows progress from MLflow
# (facescale.console: configure_worker_logging, RunProgress); under torchrun, and with --verbose, also to stdout.
progress_log = logging.getLogger("facescale.train.progress")

# The phases of one optimizer step, in the order they run (DESIGN.md: load batch → forward → classifier loss →
# backward → step). "data_wait" is time the loop spent blocked on the loader, not the loader's total work.
PHASES = ("data_wait", "backbone_fwd", "classifier", "backward", "optimizer")


class StepTimer:
    """Wall time per phase of the optimizer step, accumulated over a logging window and over the run.

    Args:
        device: The training device; on CUDA the device is synchronised at each phase boundary when ``sync``.
        sync: Synchronise an accelerator before reading the clock, so a phase is charged with its own kernels
            (costs a little throughput on GPUs; without it GPU time lands in whichever phase waits for it -- mostly
            "optimizer", where the step reads its non-finite flags). These are the only syncs the timer makes.
    """

    def __init__(self, device: torch.device, sync: bool = True) -> None:
        self._sync = sync and device.type == "cuda"
        self._window: dict[str, float] = defaultdict(float)
        self.total: dict[str, float] = defaultdict(float)
        self.window_steps = 0
        self.total_steps = 0
        self._step_start = time.perf_counter()

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = self._now()
        try:
            yield
        finally:
            self._window[name] += self._now() - t0

    def step_done(self) -> None:
        now = self._now()
        self._window["step"] += now - self._step_start
        self._step_start = now
        self.window_steps += 1

    def restart_clock(self) -> None:
        """Excludes what happened since the last step (checkpointing, verification) from the next step's time."""
        self._step_start = self._now()

    def flush(self) -> dict[str, float]:
        """Mean milliseconds per step of each phase (``time/<phase>_ms``) over the window; resets the window."""
        n = max(self.window_steps, 1)
        names = (*PHASES, *self._extra_phases(), "step")
        out = {f"time/{name}_ms": 1000 * self._window.get(name, 0.0) / n for name in names}
        for name, value in self._window.items():
            self.total[name] += value
        self.total_steps += self.window_steps
        self._window.clear()
        self.window_steps = 0
        return out

    def _extra_phases(self) -> list[str]:
        """Phases the loop opened beyond PHASES (FFC's "gallery"), by name; none in runs that open none."""
        return sorted((set(self._window) | set(self.total)) - {*PHASES, "step"})

    def breakdown(self) -> dict[str, float]:
        """Share of the run's step time spent in each phase (the rest, "other": batches to the device, lr, logs)."""
        step = max(self.total.get("step", 0.0), 1e-9)
        shares = {name: self.total.get(name, 0.0) / step for name in (*PHASES, *self._extra_phases())}
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        return shares


class StepLogger:
    """Progress lines on rank 0 and step metrics to MLflow, each step at most once.

    With each window's metrics goes ``train/step`` (the window's optimizer step), and the run is tagged with its
    planned length (``facescale.total_steps``): the driver's progress line reads both from the run's latest values
    (:class:`facescale.console.RunProgress`).

    After a restart the loop replays the steps between the last checkpoint and the failure; those were logged by
    the attempt that failed, so steps up to ``logged_through`` (read back from the run) are not logged again.
    """

    def __init__(self, tracker: Tracker, rank: int, global_batch: int, total_steps: int,
                 logged_through: int = 0) -> None:
        self.tracker, self.rank, self.global_batch, self.total_steps = tracker, rank, global_batch, total_steps
        self.logged_through = logged_through
        self._t0, self._steps = time.perf_counter(), 0
        self.samples_per_s: list[float] = []
        tracker.set_tag("facescale.total_steps", str(total_steps))  # no-op off rank 0

    def step_done(self) -> None:
        self._steps += 1

    def flush(self, step: int, losses: dict[str, float], lr: float, extra: dict[str, float]) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        metrics = {f"train/{name}": value for name, value in losses.items()}
        metrics.update({"train/lr": lr, "train/samples_per_s": self._steps * self.global_batch / elapsed, **extra})
        self.samples_per_s.append(metrics["train/samples_per_s"])
        self._t0, self._steps = time.perf_counter(), 0
        if step <= self.logged_through:  # replayed after a restart: already in the run
            return metrics
        self.tracker.log_metrics({**metrics, "train/step": step}, step)
        if self.rank == 0:
            parts = "".join(f"  {name} {value:.4f}" for name, value in losses.items() if name != "loss")
            progress_log.info("step %d/%d  loss %.4f%s  lr %.5f  %.1f samples/s  (data wait %.0f ms/step)", step,
                     self.total_steps, losses["loss"], parts, lr, metrics["train/samples_per_s"],
                     extra.get("time/data_wait_ms", float("nan")))
        return metrics

    def restart_clock(self) -> None:
        self._t0 = time.perf_counter()


class Verifier:
    """Runs the verification sets on rank 0 and logs accuracy, threshold and the ROC plot."""

    def __init__(self, cfg: FaceScaleConfig, tracker: Tracker, rank: int, device: torch.device) -> None:
        self.bins = [Path(p) for p in cfg.data.val_bins]
        self.batch_size = cfg.train.eval_batch_size
        self.tracker, self.rank, self.device = tracker, rank, device
        self._cache: dict[str, Any] = {}

    def run(self, backbone: nn.Module, step: int, plot_dir: Path | None = None) -> dict[str, float]:
        if self.rank != 0 or not self.bins:
            return {}
        metrics, curves = {}, {}
        for path in self.bins:
            res = verify_model(backbone, path, self.batch_size, self.device, cache=self._cache)
            name = path.stem
            curves[name] = res
            metrics[f"val/{name}/accuracy"] = res["accuracy_mean"]
            metrics[f"val/{name}/accuracy_std"] = res["accuracy_std"]
            metrics[f"val/{name}/threshold"] = res["best_threshold"]
            log.info("step %d  verification %s: %.2f%% ± %.2f  threshold %.2f", step, name,
                     100 * res["accuracy_mean"], 100 * res["accuracy_std"], res["best_threshold"])
        self.tracker.log_metrics(metrics, step)
        if plot_dir is not None:
            png = plot_roc(curves, plot_dir / "roc.png", title=f"Verification ROC at step {step}")
            self.tracker.log_artifact(png, "plots")
            for name, res in curves.items():  # the curve itself, so pipelines can overlay generations
                self.tracker.log_dict({"step": step, **{k: _plain(res[k]) for k in _CURVE_KEYS}},
                                      f"verification/{name}.json")
        return metrics


_CURVE_KEYS = ("accuracy_mean", "accuracy_std", "best_threshold", "fpr", "tpr")


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


class SystemMonitor:
    """MLflow's system metrics (CPU, memory, disk, network; GPU when pynvml finds one) for this node.

    One monitor per node (local rank 0), named ``node<k>`` so several nodes do not overwrite each other. GPU
    utilisation and memory come from NVML through ``nvidia-ml-py`` (the ``pynvml`` module, in requirements.txt).
    Where no NVIDIA driver exists, MLflow's GPU monitor fails to start, logs that at DEBUG and one INFO line
    ("Skip logging GPU metrics"), and the CPU metrics go on: nothing to silence. A node that has a GPU but gets
    no GPU metrics is worth a warning, though (a missing package or a broken driver).

    Attributes:
        gpu_metrics: Whether this node logs GPU metrics.
    """

    def __init__(self, tracker: Tracker, local_rank: int, node_rank: int, interval_s: float | None,
                 resumed: bool) -> None:
        self._monitor = None
        self.gpu_metrics = False
        if interval_s is None or local_rank != 0:
            return
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s, resume_logging=resumed,
                                             node_id=f"node{node_rank}", tracking_uri=tracker.tracking_uri)
        self.gpu_metrics = any(isinstance(m, GPUMonitor) for m in self._monitor.monitors)
        if torch.cuda.is_available() and not self.gpu_metrics:
            log.warning("node%d has a GPU but logs no GPU system metrics: NVML did not start (is nvidia-ml-py "
                        "installed? DEBUG logs of mlflow.system_metrics say why)", node_rank)
        self._monitor.start()

    def finish(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary as a short table (logged by rank 0 and saved as ``summary.json``)."""
    rows = [("optimizer steps", f"{summary['steps']} ({summary['steps_this_attempt']} in this attempt)"),
            ("samples seen", f"{summary['samples']:,}"),
            ("throughput", f"{summary['samples_per_s_median']:.1f} samples/s (median of logging windows)"),
            ("step time", f"{summary['step_ms_mean']:.1f} ms mean"),
            ("time per phase", "  ".join(f"{k} {100 * v:.0f}%" for k, v in summary["breakdown"].items())),
            ("non-finite steps skipped", str(summary["nonfinite_skipped"])),
            ("resumed from", summary["resumed_from"] or "-"),
            ("last checkpoint", summary["last_checkpoint"] or "-")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["run summary", *(f"  {k.ljust(width)}  {v}" for k, v in rows)])
