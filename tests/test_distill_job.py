"""The recursive-distillation pipeline as a user runs it, on real parts only.

A real Ray head (`ray start --head` on 127.0.0.1) and a real `mlflow server` (sqlite + served artifacts) run as
separate processes; the pipeline goes in through `ray job submit --working-dir <repo>`, and everything is checked
from outside through `MlflowClient`: the run tree, lineage tags, LoggedModels with their source runs, registered
versions and aliases, the parent's comparison. Re-submitting the same pipeline run id skips finished stages; a
stage stopped mid-run (`ray job stop`) resumes from its checkpoint in its own MLflow run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from facescale.data.synth import synthesize
from facescale.parallel.dist import free_loopback_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_ID = "rkd-test"



def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                # One auth mode for head, submitter and job driver (Ray 2.60 turns token auth on by default and
                # a token written by another local Ray would otherwise disagree).
                "RAY_AUTH_MODE": "disabled", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    return env


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_loopback_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", 120, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    port, dashboard = free_loopback_port(), free_loopback_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                    "--include-dashboard", "true", "--disable-usage-stats"],
                   env=_env(), check=True, capture_output=True, timeout=180)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_http(f"{address}/api/version", 120)
        yield address
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=_env(), capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    synthesize(data, identities=12, images_per_identity=8, seed=3, difficulty=0.2, held_out_identities=8,
               num_pairs=40, samples_per_shard=24, progress=False)
    spec = root / "tiny.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: tiny-rkd
        config:
          data: {{root: {data}, val_bins: [{data}/verification.bin], num_workers: 0}}
          model: {{embedding_size: 32}}
          classifier: {{type: linear, margin: {{type: cosface, s: 16.0}}}}
          train: {{batch_size: 16, max_steps: 4, lr: 0.05, log_every: 2, eval_batch_size: 40}}
          scaling: {{num_workers: 1, storage_path: {root / 'runs'}}}
          tracking: {{uri: "{mlflow_server}", experiment: rkd-test}}
        teacher: {{backbone: iresnet_tiny, config: {{train: {{max_steps: 6}}}}}}
        student: {{backbone: iresnet_tiny}}
        generations: 2
        scratch_baseline: {{epochs: match}}
        pfe: {{after: [gen-2], config: {{pfe: {{steps: 4, ids_per_batch: 4, images_per_id: 2, log_every: 2}}}}}}
        registered_model: tiny-rkd-model
        """))
    return spec


def _submit(address: str, spec: Path, submission_id: str, *extra: str, wait: bool = True) -> tuple[str, str]:
    """`ray job submit` as a user types it; returns (final status, job logs)."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", submission_id,
           "--working-dir", str(REPO), "--no-wait", "--", "python", "jobs/distill.py", "--pipeline", str(spec),
           "--run-id", RUN_ID, *extra]
    tries = 0
    while True:
        tries += 1
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        # Right after `ray start` the dashboard answers before the node's job agent has registered; Ray then
        # refuses the submission ("No available agent ... try again later") without creating the job.
        if done.returncode == 0 or tries == 30 or "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(2)
    assert done.returncode == 0, f"ray job submit failed ({tries} tries):\n{done.stdout}\n{done.stderr}"
    if not wait:
        return "SUBMITTED", ""
    return _wait_job(address, submission_id)


def _wait_job(address: str, submission_id: str, timeout_s: float = 900) -> tuple[str, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(submission_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value), client.get_job_logs(submission_id)
        time.sleep(2)
    raise TimeoutError(f"job {submission_id} still {status} after {timeout_s} s")


def _children(client: MlflowClient, experiment_id: str, parent: str) -> dict[str, list]:
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags["facescale.stage"], []).append(run)
    return out


def test_pipeline_through_ray_job_submit(ray_head: str, mlflow_server: str, pipeline: Path) -> None:
    status, logs = _submit(ray_head, pipeline, "rkd-1")
    assert status == "SUCCEEDED", logs[-4000:]
    assert "teacher embeddings" in logs

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("rkd-test")
    parents = client.search_runs([exp.experiment_id], f"tags.`facescale.pipeline_run_id` = '{RUN_ID}' "
                                 "AND tags.`facescale.stage` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    digest = parent.data.tags["facescale.dataset_digest"]
    children = _children(client, exp.experiment_id, parent.info.run_id)
    assert sorted(children) == ["gen-1", "gen-2", "gen-2-pfe", "scratch", "scratch-matched", "teacher"]
    runs = {stage: found[0] for stage, found in children.items()}
    assert all(len(found) == 1 and found[0].info.status == "FINISHED" for found in children.values())

    # lineage tags
    teacher_model = runs["teacher"].data.tags["facescale.model_id"]
    for stage, run in runs.items():
        tags = run.data.tags
        assert tags["facescale.pipeline_run_id"] == RUN_ID and tags["facescale.dataset_digest"] == digest
        assert tags["facescale.generation"] == {"gen-1": "1", "gen-2": "2", "gen-2-pfe": "2",
                                                "scratch-matched": "scratch"}.get(stage, stage)
        assert tags["facescale.seed"] == "0" and tags["facescale.stage_base"] == stage  # no `seeds`: plain names
    assert runs["gen-1"].data.tags["facescale.teacher_model_id"] == teacher_model
    assert runs["gen-2"].data.tags["facescale.teacher_model_id"] == teacher_model
    assert runs["scratch"].data.tags["facescale.teacher_model_id"] == "none"
    assert runs["gen-1"].data.tags["facescale.init_model_id"] == "none"  # generation 1 from scratch
    assert runs["gen-2"].data.tags["facescale.init_model_id"] == runs["gen-1"].data.tags["facescale.model_id"]
    assert "train/distill_loss" in runs["gen-2"].data.metrics
    assert "train/distill_loss" not in runs["scratch"].data.metrics
    # the budget-matched baseline: as many steps as gen-2 has had in total (gen-1's 4 + its own 4), no teacher
    matched = runs["scratch-matched"].data
    assert matched.params["train.max_steps"] == "8" and matched.tags["facescale.teacher_model_id"] == "none"
    assert "train/distill_loss" not in matched.metrics and matched.tags["facescale.init_model_id"] == "none"
    # the PFE stage after gen-2: an uncertainty head on gen-2's model, trained in its own child run
    pfe = runs["gen-2-pfe"].data
    assert pfe.tags["facescale.base_model_id"] == runs["gen-2"].data.tags["facescale.model_id"]
    assert [m.step for m in client.get_metric_history(runs["gen-2-pfe"].info.run_id, "train/loss")] == [2, 4]

    # every stage's LoggedModel has its stage run as source, and is a registered version with the stage's alias
    versions = {v.version: v for v in client.search_model_versions("name = 'tiny-rkd-model'")}
    assert len(versions) == 6  # five training stages and the PFE stage
    for stage, run in runs.items():
        model_id = run.data.tags["facescale.model_id"]
        assert client.get_logged_model(model_id).source_run_id == run.info.run_id
        mv = client.get_model_version_by_alias("tiny-rkd-model", stage)
        # (MLflow 3.17's OSS registry leaves ModelVersion.model_id empty; the source URI names the LoggedModel.)
        assert mv.source == f"models:/{model_id}" and mv.run_id == run.info.run_id
        assert mv.tags["facescale.model_id"] == model_id and mv.tags["facescale.stage"] == stage
    champion = client.get_model_version_by_alias("tiny-rkd-model", "champion")
    students = {s: runs[s].data.metrics["val/verification/accuracy"]
                for s in ("scratch", "scratch-matched", "gen-1", "gen-2")}
    assert champion.run_id == runs[max(students, key=students.get)].info.run_id

    # the parent compares the stages: a table, per-stage metrics, plots
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.json", "pipeline.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/accuracy_by_stage.png", "plots/roc_by_stage.png"}
    assert parent.data.metrics["gen-2/accuracy"] == pytest.approx(students["gen-2"])

    # Re-submitting the same pipeline run id: every stage is skipped, nothing new is trained or registered.
    status, logs = _submit(ray_head, pipeline, "rkd-2")
    assert status == "SUCCEEDED", logs[-4000:]
    for stage in runs:
        assert f"stage {stage}: already complete" in logs
    assert "teacher embeddings" not in logs
    assert {s: len(f) for s, f in _children(client, exp.experiment_id, parent.info.run_id).items()} == dict.fromkeys(
        runs, 1)
    assert len(client.search_model_versions("name = 'tiny-rkd-model'")) == 6

    # A third generation, stopped mid-stage after its first checkpoint, then resubmitted: it resumes in the same
    # MLflow run from the checkpoint, with the teacher cache reused (no teacher forward passes).
    gen3 = ["generations=3", "stages.gen-3.train.max_steps=40", "stages.gen-3.train.checkpoint_every=4",
            "stages.gen-3.train.log_every=4"]
    _submit(ray_head, pipeline, "rkd-3", *gen3, wait=False)
    first_ckpt = pipeline.parent / "runs" / f"{RUN_ID}-gen-3" / "checkpoint_00000004" / "progress.json"
    deadline = time.time() + 600
    while not first_ckpt.exists() and time.time() < deadline:
        time.sleep(1)
    assert first_ckpt.exists(), "gen-3 never wrote its first checkpoint"
    subprocess.run([str(BIN / "ray"), "job", "stop", "--address", ray_head, "rkd-3"], env=_env(), check=True,
                   capture_output=True, timeout=120)
    status, _ = _wait_job(ray_head, "rkd-3")
    assert status == "STOPPED"
    interrupted = _children(client, exp.experiment_id, parent.info.run_id)["gen-3"]
    assert len(interrupted) == 1 and interrupted[0].data.tags.get("facescale.stage_complete") != "true"

    status, logs = _submit(ray_head, pipeline, "rkd-4", *gen3)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "stage gen-3: resuming interrupted run" in logs and "resumed at step" in logs
    assert "teacher embeddings" not in logs
    gen3_runs = _children(client, exp.experiment_id, parent.info.run_id)["gen-3"]
    assert [r.info.run_id for r in gen3_runs] == [interrupted[0].info.run_id]
    assert gen3_runs[0].data.tags["facescale.stage_complete"] == "true"
    assert gen3_runs[0].data.tags["facescale.init_model_id"] == runs["gen-2"].data.tags["facescale.model_id"]
    steps = [m.step for m in client.get_metric_history(gen3_runs[0].info.run_id, "train/loss")]
    assert steps == list(range(4, 41, 4)), "each logged step once, across the stop and the resume"
    assert client.get_model_version_by_alias("tiny-rkd-model", "gen-3").run_id == gen3_runs[0].info.run_id
    shutil.rmtree(pipeline.parent / "runs", ignore_errors=True)
