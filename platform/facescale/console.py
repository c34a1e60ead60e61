"""What a training run shows on the console: one progress line (or bar) per stage, and quiet libraries.

Two halves, each in the process that owns it:

- **Library loggers** (driver, Ray Train controller, its placement-group cleaner, and the workers). A few library
  messages repeat many times per run and say nothing a user acts on; they are silenced by raising the level of the
  exact Python logger that emits them (:data:`QUIET_LEVELS`), never by filtering stdout. ``--verbose`` leaves every
  logger as the library set it. The full logs still reach Ray's log files (Ray Train's ``ray-train-sys-*`` files
  take every ``ray.train`` record at DEBUG, whatever the console level) and the metrics reach MLflow.
  In Ray processes that facescale does not run code in (the controller and the detached cleaner actor) the levels
  are set by a ``worker_process_setup_hook`` in the job's runtime_env (:func:`ray_runtime_env`); in the training
  workers by :func:`configure_worker_logging`, the first call of the worker loop.
- **Progress** on the driver (:class:`RunProgress`): a thread polls the run's latest metrics from MLflow every few
  seconds, so it works wherever the driver runs (a laptop, a ``ray job submit`` entrypoint on a head node that runs
  no worker). Rank 0's per-step lines go to Ray's log files, not to stdout (:data:`PROGRESS_LOGGER`).

This module imports neither Ray nor MLflow at import time: the worker loop imports it under torchrun too.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

log = logging.getLogger("facescale.console")

VERBOSE_ENV = "FACESCALE_VERBOSE"  # "1": every Ray process keeps the libraries' own log levels
PROGRESS_LOGGER = "facescale.train.progress"  # rank 0's per-step lines (train/observe.py)
TOTAL_STEPS_TAG = "facescale.total_steps"  # set by rank 0 once it knows the run's length (train/observe.py)
STEP_METRIC = "train/step"  # the optimizer step of the latest logging window, logged with it (train/observe.py)

# Ray Train V2 names this logger after the module's *file path* (``logging.getLogger(__file__)`` in
# ray/train/v2/_internal/execution/context.py), so it is found through the module's spec, not a dotted name. It
# logs "Reporting training result <n>: TrainingReport(...)" at INFO on every worker for every ``ray.train.report``.
# It is not under ``ray.train``, so neither RunConfig(logging_config=...) nor Ray Train's dictConfig touches it.
RAY_TRAIN_REPORT_MODULE = "ray.train.v2._internal.execution.context"
# The detached PlacementGroupCleaner actor polls the controller's state through the State API once a second; with
# no dashboard (a local Ray, launch.init_ray) every poll fails and logs "Failed to query Ray Train Controller actor
# state ..." at WARNING. Nothing configures logging in that actor's process, so the level set here stays.
RAY_TRAIN_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# MLflow warns on every pickle-format ``mlflow.pytorch.log_model`` (mlflow/pytorch/__init__.py, logger
# "mlflow.pytorch"); facescale picks that format deliberately (tracking/mlflow_run.py), so the warning is raised
# only around that call (:func:`quiet_logger`), not for the whole process.
MLFLOW_PYTORCH_LOGGER = "mlflow.pytorch"
# Four INFO lines per node and run ("Skip logging GPU metrics", "Started/Stopping/Successfully terminated ...").
MLFLOW_SYSTEM_METRICS_LOGGER = "mlflow.system_metrics.system_metrics_monitor"
MLFLOW_PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"

_verbose = False


def set_verbose(verbose: bool) -> None:
    """Whether this process shows every library message (``--verbose``).

    Not verbose: MLflow's per-download progress bars are off (the pipeline downloads each stage's ROC data for
    its comparison), unless ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` says otherwise.
    """
    global _verbose
    _verbose = bool(verbose)
    if not _verbose:
        os.environ.setdefault(MLFLOW_PROGRESS_BAR_ENV, "false")


def is_verbose() -> bool:
    return _verbose


def _module_file(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # Ray absent (torchrun, benchmarks) or a parent package missing
        return None
    return spec.origin if spec is not None else None


def quiet_levels() -> dict[str, int]:
    """The exact loggers silenced by default, and the level each is raised to (messages above it still show)."""
    levels = {RAY_TRAIN_PG_CLEANER_LOGGER: logging.ERROR, MLFLOW_SYSTEM_METRICS_LOGGER: logging.WARNING}
    report = _module_file(RAY_TRAIN_REPORT_MODULE)
    if report is not None:
        levels[report] = logging.WARNING
    return levels


def quiet_library_loggers(verbose: bool) -> None:
    """Raises the levels of :func:`quiet_levels` in this process, or (verbose) gives them back to the libraries."""
    for name, level in quiet_levels().items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else level)


def ray_worker_setup() -> None:
    """``worker_process_setup_hook`` of facescale's Ray jobs: runs first in every Ray worker process of the job.

    It reaches the processes facescale runs no code in: Ray Train's controller and its placement-group cleaner.
    """
    quiet_library_loggers(os.environ.get(VERBOSE_ENV) == "1")


def ray_runtime_env(verbose: bool) -> dict[str, Any]:
    """The runtime_env facescale passes to ``ray.init``: the setup hook, and the verbosity it reads.

    Under ``ray job submit`` Ray merges this with the job's runtime_env and refuses a field or env var that both
    set; what the job already sets (its own setup hook, ``FACESCALE_VERBOSE``) is then left to the job.
    """
    env: dict[str, Any] = {"worker_process_setup_hook": f"{__name__}.{ray_worker_setup.__name__}",
                           "env_vars": {VERBOSE_ENV: "1" if verbose else "0"}}
    try:  # the job's config as the job manager hands it to the entrypoint (ray/_private/worker.py)
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        job = {}
    if "worker_process_setup_hook" in job:
        env.pop("worker_process_setup_hook")
    if VERBOSE_ENV in (job.get("env_vars") or {}):
        env.pop("env_vars")
    return env


def ray_train_log_level(verbose: bool) -> str:
    """Console level of the ``ray.train`` loggers (RunConfig.logging_config): INFO when verbose, else WARNING.

    WARNING drops the controller's and workers' start-up chatter ("Requesting resources", "Setting up process
    group", ...) from the console; Ray Train's system log files keep it at DEBUG.
    """
    return "INFO" if verbose else "WARNING"


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def configure_worker_logging(launcher: str, verbose: bool = False) -> None:
    """Logging of one training worker; the first call of the worker loop (train/loop.py ``run_worker``).

    Args:
        launcher: ``"ray"`` or ``"torchrun"``. Under Ray the driver shows progress (:class:`RunProgress`), so rank
            0's per-step lines go only to the non-console handlers Ray Train put on the root logger (its
            ``ray-train-app-worker-*.log``). Under torchrun rank 0 is the console, and its lines stay.
        verbose: Keep every library's log level and print the per-step lines too.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_verbose(verbose)
    quiet_library_loggers(verbose)
    progress = logging.getLogger(PROGRESS_LOGGER)
    if launcher == "ray" and not verbose:
        progress.handlers = [h for h in logging.getLogger().handlers if not _is_console(h)]
        progress.propagate = False
    else:
        progress.handlers = []
        progress.propagate = True


@contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raises one logger's level for the duration of a call (not when verbose); restores it after."""
    logger = logging.getLogger(name)
    before = logger.level
    if not _verbose:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def format_duration(seconds: float) -> str:
    """``75`` → ``1m15s``; ``3700`` → ``1h01m``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_line(stage: str, step: int, total: int | None, loss: float | None, samples_per_s: float | None,
                  eta_s: float | None) -> str:
    """``demo  step 40/400  loss 12.3456  152.1 samples/s  ETA 2m05s`` (parts that are unknown are left out)."""
    parts = [stage, f"step {step}/{total if total else '?'}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if samples_per_s is not None:
        parts.append(f"{samples_per_s:.1f} samples/s")
    if eta_s is not None and total and step < total:
        parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


class RunProgress:
    """Progress of one training run on the driver, read from the run's latest metrics in MLflow.

    A thread polls ``MlflowClient.get_run`` every ``interval_s`` (one small request; the latest value of each metric
    comes with the run) and shows the stage (the MLflow run name), step/total, loss, samples/s and an ETA: a tqdm
    bar when ``stream`` is a terminal, else a plain line at most every ``line_every_s`` (and one when the run
    ends). The ETA comes from the steps the driver saw pass, so it includes checkpoints and verification.

    Args:
        tracking_uri: Tracking URI of the run.
        run_id: The run.
        global_batch: Samples per optimizer step (for the ETA before two polls have seen the step move).
        interval_s: Seconds between polls.
        line_every_s: On a non-terminal, the least seconds between two lines.
        stream: Where to write (default ``sys.stdout``).
    """

    def __init__(self, tracking_uri: str, run_id: str, global_batch: int, interval_s: float = 3.0,
                 line_every_s: float = 10.0, stream: IO[str] | None = None) -> None:
        self.tracking_uri, self.run_id, self.global_batch = tracking_uri, run_id, max(int(global_batch), 1)
        self.interval_s, self.line_every_s = interval_s, line_every_s
        self.stream = stream if stream is not None else sys.stdout
        self.lines: list[str] = []  # every plain line written (what a non-terminal shows)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._client: Any = None
        self._stage = run_id[:8]
        self._total: int | None = None
        self._shown_step = -1
        self._last_line_t = -math.inf
        self._first: tuple[float, int] | None = None  # (time, step) of the first step seen

    def __enter__(self) -> RunProgress:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(self.tracking_uri)
        self._thread = threading.Thread(target=self._loop, name="facescale-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops polling, shows the run's last state once more, and closes the bar."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.poll(final=True)
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self, final: bool = False) -> None:
        """Reads the run once and updates the display; a failed read (server briefly away) is skipped."""
        if self._client is None:
            return
        try:
            run = self._client.get_run(self.run_id)
        except Exception as exc:  # noqa: BLE001 -- progress must never stop a run
            log.debug("progress: cannot read run %s: %s", self.run_id, exc)
            return
        self._stage = run.info.run_name or self._stage
        total = run.data.tags.get(TOTAL_STEPS_TAG)
        self._total = int(total) if total and total.isdigit() else self._total
        metrics = run.data.metrics
        if STEP_METRIC not in metrics:
            return
        self._show(int(metrics[STEP_METRIC]), metrics.get("train/loss"), metrics.get("train/samples_per_s"), final)

    def _eta(self, step: int, samples_per_s: float | None, now: float) -> float | None:
        if self._total is None:
            return None
        if self._first is not None and step > self._first[1] and now > self._first[0]:
            steps_per_s = (step - self._first[1]) / (now - self._first[0])
        elif samples_per_s:
            steps_per_s = samples_per_s / self.global_batch
        else:
            return None
        return (self._total - step) / steps_per_s

    def _show(self, step: int, loss: float | None, samples_per_s: float | None, final: bool) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
        eta = self._eta(step, samples_per_s, now)
        if self.stream.isatty():
            self._show_bar(step, loss, samples_per_s)
            return
        if step == self._shown_step or (now - self._last_line_t < self.line_every_s and not final
                                        and step != self._total):
            return
        line = progress_line(self._stage, step, self._total, loss, samples_per_s, eta)
        self.lines.append(line)
        print(line, file=self.stream, flush=True)
        self._shown_step, self._last_line_t = step, now

    def _show_bar(self, step: int, loss: float | None, samples_per_s: float | None) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=self._total, desc=self._stage, unit="step", file=self.stream, dynamic_ncols=True,
                             initial=step)
        elif self._total is not None and self._bar.total != self._total:
            self._bar.total = self._total
        self._bar.update(step - self._bar.n)
        post = []
        if loss is not None:
            post.append(f"loss {loss:.4f}")
        if samples_per_s is not None:
            post.append(f"{samples_per_s:.1f} samples/s")
        self._bar.set_postfix_str("  ".join(post))
        self._shown_step = step
