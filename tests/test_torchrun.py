"""Training under torchrun, without Ray: ``torchrun --nproc-per-node 2 -m facescale train ... launcher=torchrun``.

Real processes on real parts: torchrun's rendezvous, a 2-rank gloo group, the default (DALI, CPU) loader, a real
MLflow sqlite store and checkpoints committed to local storage -- with ``ray`` made unimportable (a ``ray`` package
that raises ImportError comes first on PYTHONPATH), so any import of Ray on this path fails the run. A first run
trains and commits checkpoints; a second resumes from it through ``train.resume_from``. And outside torchrun the
launcher refuses to start, saying how to launch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from facescale.checkpoint.committed import resolve_checkpoint, verify_checkpoint
from facescale.cli import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def no_ray(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a ``ray`` package whose import fails."""
    root = tmp_path_factory.mktemp("no_ray")
    (root / "ray").mkdir()
    (root / "ray" / "__init__.py").write_text("raise ImportError('ray is not importable in this test')\n")
    return root


def _config_file(data: Path, work: Path) -> Path:
    tree = {
        "data": {"root": str(data), "val_bins": [str(data / "verification.bin")], "num_workers": 1},
        "model": {"backbone": "iresnet_nano", "embedding_size": 32},
        "classifier": {"type": "partial_fc", "margin": {"type": "cosface", "s": 16}},
        "train": {"batch_size": 8, "lr": 0.1, "log_every": 2, "checkpoint_every": 2, "eval_batch_size": 32,
                  "system_metrics_interval_s": None},
        "scaling": {"storage_path": str(work / "runs")},
        "tracking": {"uri": f"sqlite:///{work / 'mlruns.db'}", "artifact_root": str(work / "artifacts"),
                     "log_model": False},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _torchrun(config: Path, no_ray: Path, *overrides: str, returncode: int = 0,
              faults: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``torchrun -m facescale train``; with ``faults``, the same CLI through tests/planted_faults.py."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(no_ray), str(Path(__file__).parent), env.get("PYTHONPATH")]
                                        if p)
    env["OMP_NUM_THREADS"] = "1"
    entry = ["-m", "planted_faults", *faults, "--"] if faults else ["-m", "facescale"]
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *entry, "train", "--config",
           str(config), "scaling.launcher=torchrun", *overrides]
    proc = subprocess.run(cmd, cwd=config.parent, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == returncode, \
        f"torchrun exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def _run_id(stdout: str) -> str:
    assert stdout.count("FaceScale training results") == 1, stdout  # printed by rank 0 only
    found = re.search(r"MLflow run:\s+(\w+)", stdout)
    assert found, stdout
    return found.group(1)


def _summary(run_root: Path) -> dict:
    final = resolve_checkpoint(str(run_root))
    assert final is not None, f"no committed checkpoint under {run_root}"
    return json.loads(verify_checkpoint(final)["meta"]["metrics"]["summary"])


def test_the_ray_stand_in_really_blocks_ray(no_ray: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(no_ray)}
    proc = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "ray is not importable" in proc.stderr


def test_torchrun_trains_checkpoints_and_resumes_without_ray(tiny_data: Path, no_ray: Path, tmp_path: Path) -> None:
    config = _config_file(tiny_data, tmp_path)
    first = _torchrun(config, no_ray, "train.max_steps=4")
    run_id = _run_id(first.stdout)
    run_root = tmp_path / "runs" / f"facescale-{run_id}"
    assert sorted(p.name for p in run_root.iterdir() if p.name.startswith("checkpoint_")) == [
        "checkpoint_00000002", "checkpoint_00000004"]
    summary = _summary(run_root)
    assert (summary["steps"], summary["resumed_from"]) == (4, None), summary
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["facescale.launcher"] == "torchrun" and run.data.params["scaling.num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4]
    assert "val/verification/accuracy" in run.data.metrics

    second = _torchrun(config, no_ray, "train.max_steps=6", f"train.resume_from={run_root}")
    resumed_id = _run_id(second.stdout)
    assert resumed_id != run_id
    summary = _summary(tmp_path / "runs" / f"facescale-{resumed_id}")
    assert summary["resumed_from"].rstrip("/").endswith("checkpoint_00000004"), summary
    assert (summary["steps"], summary["steps_this_attempt"], summary["resumes"]) == (6, 2, 1), summary
    assert [m.step for m in client.get_metric_history(resumed_id, "train/loss")] == [6]
    assert client.get_run(resumed_id).info.status == "FINISHED"


def test_a_nonfinite_stop_under_torchrun_fails_the_run_naming_the_step(tiny_data: Path, no_ray: Path,
                                                                       tmp_path: Path) -> None:
    config = _config_file(tiny_data, tmp_path)
    proc = _torchrun(config, no_ray, "train.max_steps=4", "train.nonfinite=stop", returncode=1,
                     faults=("--nonfinite-loss-steps", "3"))
    stopped = re.search(r"facescale: non-finite step 3: loss nan .*train\.nonfinite=stop", proc.stderr)
    assert stopped, proc.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = client.search_runs([client.get_experiment_by_name("facescale").experiment_id])[0]
    assert run.info.status == "FAILED" and "step 3" in run.data.tags["facescale.stop_reason"]


def test_the_torchrun_launcher_outside_torchrun_says_how_to_launch(tiny_data: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--config", str(_config_file(tiny_data, tmp_path)), "scaling.launcher=torchrun"]) == 2
    err = capsys.readouterr().err
    assert "scaling.launcher=torchrun: this process was not started by torchrun" in err, err
    assert "torchrun --nproc-per-node N" in err and "-m facescale train" in err, err
    assert not (tmp_path / "mlruns.db").exists(), "nothing started"


def test_the_ray_launcher_inside_torchrun_is_refused(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", str(_config_file(tiny_data, tmp_path))]) == 2
    assert "add scaling.launcher=torchrun" in capsys.readouterr().err
