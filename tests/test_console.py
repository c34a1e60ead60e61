"""The console of a training run (facescale/console.py): quiet library loggers, the driver's progress line, and
one-line input errors.

The run test is a real short Ray Train run (real local Ray with ``log_to_driver=True``, so worker output reaches the
driver as it would on a terminal) whose captured output is searched for the progress lines and for the three
library messages that used to flood it. Nothing is mocked.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from facescale import console
from facescale.cli import main
from facescale.config import load_config
from facescale.train.launch import run_training

NOISY = ("Reporting training result", "Failed to query Ray Train Controller actor state",
         "Saving pytorch model by Pickle or CloudPickle format")


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    """Puts the loggers this module touches back as they were."""
    names = [*console.quiet_levels(), console.PROGRESS_LOGGER, console.MLFLOW_PYTORCH_LOGGER]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
             for n in names}
    root_handlers = list(logging.getLogger().handlers)
    yield
    for name, (level, handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers, logger.propagate = handlers, propagate
    logging.getLogger().handlers = root_handlers
    console.set_verbose(False)


def test_the_quieted_loggers_are_the_ones_ray_and_mlflow_emit_on(restore_loggers) -> None:
    # The very logger objects the libraries log the noisy messages on (not names typed by hand).
    report = importlib.import_module(console.RAY_TRAIN_REPORT_MODULE).logger
    cleaner = importlib.import_module("ray.train.v2._internal.execution.controller.placement_group_cleaner").logger
    console.quiet_library_loggers(verbose=False)
    assert not report.isEnabledFor(logging.INFO) and report.isEnabledFor(logging.WARNING)
    assert not cleaner.isEnabledFor(logging.WARNING) and cleaner.isEnabledFor(logging.ERROR)
    console.quiet_library_loggers(verbose=True)  # --verbose: the libraries' own levels again
    assert report.level == logging.NOTSET and cleaner.level == logging.NOTSET
    logging.getLogger().setLevel(logging.INFO)
    assert report.isEnabledFor(logging.INFO) and cleaner.isEnabledFor(logging.WARNING)


def test_mlflow_pickle_warning_is_quiet_only_inside_the_call(restore_loggers) -> None:
    logger = logging.getLogger(console.MLFLOW_PYTORCH_LOGGER)
    logger.setLevel(logging.NOTSET)
    with console.quiet_logger(console.MLFLOW_PYTORCH_LOGGER):
        assert not logger.isEnabledFor(logging.WARNING)
    assert logger.level == logging.NOTSET
    console.set_verbose(True)
    with console.quiet_logger(console.MLFLOW_PYTORCH_LOGGER):
        assert logger.level == logging.NOTSET


def test_worker_step_lines_leave_stdout_but_not_the_log_file(tmp_path: Path, restore_loggers) -> None:
    from facescale.train.observe import progress_log

    stream, log_file = io.StringIO(), tmp_path / "ray-train-app-worker.log"
    root = logging.getLogger()
    root.handlers = [logging.StreamHandler(stream), logging.FileHandler(log_file)]  # Ray Train's console + file
    root.setLevel(logging.INFO)
    console.configure_worker_logging("ray", verbose=False)
    progress_log.info("step 4/8  quiet")
    console.configure_worker_logging("ray", verbose=True)
    progress_log.info("step 8/8  verbose")
    console.configure_worker_logging("torchrun", verbose=False)  # torchrun: rank 0 is the console
    progress_log.info("step 8/8  torchrun")
    for handler in root.handlers:
        handler.flush()
    assert stream.getvalue().splitlines() == ["step 8/8  verbose", "step 8/8  torchrun"]
    assert log_file.read_text().splitlines() == ["step 4/8  quiet", "step 8/8  verbose", "step 8/8  torchrun"]


def test_progress_line_and_duration() -> None:
    assert console.format_duration(75) == "1m15s" and console.format_duration(3700) == "1h01m"
    assert console.format_duration(math.nan) == "?"
    assert console.progress_line("gen1", 40, 400, 12.34567, 152.14, 125) == \
        "gen1  step 40/400  loss 12.3457  152.1 samples/s  ETA 2m05s"
    assert console.progress_line("gen1", 400, 400, 1.0, None, 0) == "gen1  step 400/400  loss 1.0000"


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite tracking store for the module (creating its tables costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns.db'}"


def test_progress_reads_the_run_and_writes_at_most_one_line_per_interval(store_uri: str) -> None:
    uri = store_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("progress"), run_name="stage-a").info.run_id
    client.set_tag(run_id, console.TOTAL_STEPS_TAG, "30")
    out = io.StringIO()  # not a terminal: plain lines
    progress = RunProgressForTest(uri, run_id, out)
    for step, loss in ((10, 3.0), (20, 2.0)):
        client.log_batch(run_id, metrics=[_metric("train/step", step, step), _metric("train/loss", loss, step),
                                          _metric("train/samples_per_s", 64.0, step)])
        progress.poll()
    progress.poll()  # step unchanged: nothing
    # 10 s between lines: the second window is not shown until the run ends (or reaches its last step)
    assert progress.lines == ["stage-a  step 10/30  loss 3.0000  64.0 samples/s  ETA 10s"]
    client.log_batch(run_id, metrics=[_metric("train/step", 30, 30), _metric("train/loss", 1.5, 30)])
    progress.poll()
    assert progress.lines[-1] == "stage-a  step 30/30  loss 1.5000  64.0 samples/s"
    assert out.getvalue().splitlines() == progress.lines


class RunProgressForTest(console.RunProgress):
    """The real RunProgress, polled by the test instead of its thread (global batch 32: 2 steps/s at 64 samples/s)."""

    def __init__(self, uri: str, run_id: str, out: io.StringIO) -> None:
        super().__init__(uri, run_id, global_batch=32, line_every_s=10.0, stream=out)
        self._client = MlflowClient(uri)


def _metric(key: str, value: float, step: int):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


def test_missing_data_root_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nonexistent"
    code = main(["train", "--config", str(Path(__file__).parents[1] / "configs" / "demo.yaml"),
                 f"data.root={missing}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"facescale: data.root: dataset directory not found: {missing}"]
    assert "Traceback" not in err


def test_runtime_env_leaves_to_a_submitted_job_what_it_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = "facescale.console.ray_worker_setup"
    assert console.ray_runtime_env(True) == {"worker_process_setup_hook": hook,
                                             "env_vars": {console.VERBOSE_ENV: "1"}}
    # `ray job submit --runtime-env-json ...`: Ray refuses a field or env var set by both the job and ray.init
    job = {"runtime_env": {"working_dir": "/src", "worker_process_setup_hook": "mine.setup",
                           "env_vars": {console.VERBOSE_ENV: "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert console.ray_runtime_env(False) == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "/src"}}))
    assert console.ray_runtime_env(False) == {"worker_process_setup_hook": hook,
                                              "env_vars": {console.VERBOSE_ENV: "0"}}


@pytest.fixture(scope="module")
def console_ray() -> Iterator[None]:
    """A local Ray as `facescale train` starts one: worker output streamed to the driver, facescale's setup hook."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True,
             runtime_env=console.ray_runtime_env(verbose=False))
    yield
    ray.shutdown()


def test_setup_hook_quiets_every_ray_worker_process(console_ray) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def levels() -> dict[str, int]:
        return {name: logging.getLogger(name).level for name in console.quiet_levels()}

    assert ray.get(levels.remote()) == console.quiet_levels()


@pytest.mark.integration
def test_short_run_shows_progress_lines_and_no_library_noise(tiny_data: Path, console_ray, store_uri: str,
                                                             tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    uri = store_uri
    cfg = load_config(None, [
        f"data.root={tiny_data}", "data.val_bins=[]", "data.num_workers=0", "model.backbone=iresnet_tiny",
        "model.embedding_size=32", "train.batch_size=16", "train.max_steps=6", "train.log_every=2",
        "train.system_metrics_interval_s=null",
        "scaling.num_workers=1", f"scaling.storage_path={tmp_path / 'runs'}", f"tracking.uri={uri}",
        f"tracking.artifact_root={tmp_path / 'artifacts'}", "tracking.run_name=console-stage",
    ])
    result = run_training(cfg)  # tracking.log_model: true (the default): the pickle-format model is logged
    out = capfd.readouterr()
    text = out.out + out.err
    deadline = time.monotonic() + 60  # worker output reaches the driver through Ray's log monitor, a little later
    while "run summary" not in text and time.monotonic() < deadline:
        time.sleep(0.5)
        more = capfd.readouterr()
        text += more.out + more.err
    time.sleep(1.0)
    more = capfd.readouterr()
    text += more.out + more.err
    assert "run summary" in text, f"the workers' output never reached the driver (so proves nothing): {text[-3000:]}"

    lines = re.findall(r"^console-stage  step (\d+)/6  loss (\d+\.\d{4})  [\d.]+ samples/s.*$", text, re.M)
    assert lines, text[-3000:]
    assert lines[-1][0] == "6" and float(lines[-1][1]) == pytest.approx(result.metrics["train/loss"], abs=1e-4)
    for message in NOISY:
        assert message not in text, text[max(0, text.find(message) - 1500):text.find(message) + 500]
    assert "samples/s  (data wait" not in text, "rank 0's per-step lines belong in the Ray logs, not the console"
    assert "model_id" in result.metrics

    # the run's dataset input: the shard set, by its manifest digest
    (inp,) = MlflowClient(uri).get_run(result.run_id).inputs.dataset_inputs
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    assert (inp.dataset.name, inp.dataset.digest) == (tiny_data.name, manifest["digest"][:12])
    assert json.loads(inp.dataset.source) == {"uri": str(tiny_data)}


def test_quiet_console_turns_off_mlflows_download_bars_unless_the_user_set_them(monkeypatch) -> None:
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    from facescale.console import set_verbose

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    set_verbose(False)
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is False
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # the user's word wins
    set_verbose(False)
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is True
