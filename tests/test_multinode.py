"""FaceScale on a real 2-node Ray cluster whose nodes share no local disk (see tests/multinode_cluster.py).

One Ray Train worker runs on each node. What a real cluster would do, these tests make this machine do:

a. ``scaling.storage_path`` on a node-local directory: refused before any worker trains, naming the other node;
b. data and storage on ``s3://``: the run trains across both nodes, commits checkpoints holding both ranks'
   files, survives the SIGKILL of the second node's worker and ends at exactly its step count, each step logged once;
c. the distillation pipeline (teacher → gen-1) with the teacher cache on ``s3://`` runs across both nodes, and
   generation 1 only looks the teacher's embeddings up;
d. a node-local ``data.root`` that only the head sees: refused, naming the other node.

Only the GPU is missing from this picture: workers use gloo on CPU.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from multinode_cluster import BIN, SLOT, TwoNodeCluster, unshare_available

pytestmark = pytest.mark.integration

_why_not = unshare_available()
if _why_not:  # this machine (root, util-linux) has it; a sandbox without user namespaces may not
    pytest.skip(f"2-node cluster test needs network and mount namespaces: {_why_not}", allow_module_level=True)

BUCKET = "cluster"
CONFIG = """\
data: {{root: {data}, val_bins: [{val}], num_workers: 0}}
model: {{backbone: iresnet_nano, embedding_size: 32}}
classifier: {{type: partial_fc, sample_rate: 1.0, margin: {{type: cosface, s: 16.0}}}}
train: {{batch_size: 8, max_steps: {steps}, lr: 0.05, log_every: 2, checkpoint_every: 4, eval_batch_size: 40,
        system_metrics_interval_s: null}}
scaling: {{num_workers: 2, cpus_per_worker: 1, storage_path: {storage}, max_failures: 1,
          resources_per_worker: {{{slot}: 1}}}}
tracking: {{experiment: {experiment}, log_model: false}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Iterator[TwoNodeCluster]:
    work = tmp_path_factory.mktemp("multinode")
    c = TwoNodeCluster(work)
    # Node-local copies (the head's disk only) and one file every node sees (as on a shared mount).
    shutil.copytree(tiny_data, c.local / "data")
    (work / "shared").mkdir()
    shutil.copy(tiny_data / "verification.bin", work / "shared" / "verification.bin")
    try:
        c.start()
        c.python(f"import json\nfrom facescale import storage\nfrom facescale.data import shard_sets\n"
                 f"storage.s3_client().create_bucket(Bucket='{BUCKET}')\n"
                 f"shard_sets.push('{c.local / 'data'}', 's3://{BUCKET}/data', progress=False)\nprint(json.dumps(1))")
        yield c
    finally:
        c.stop()


def _config(c: TwoNodeCluster, name: str, data: str, storage: str, steps: int = 8) -> Path:
    path = c.work / f"{name}.yaml"
    path.write_text(CONFIG.format(data=data, val=c.work / "shared" / "verification.bin", steps=steps,
                                  storage=storage, slot=SLOT, experiment=name))
    return path


def _runs(c: TwoNodeCluster, experiment: str) -> list[dict]:
    """The experiment's runs as the tracking server has them: id, status, tags, metric histories."""
    code = textwrap.dedent(f"""\
        import json
        from mlflow.tracking import MlflowClient
        client = MlflowClient()
        exp = client.get_experiment_by_name({experiment!r})
        out = []
        for run in (client.search_runs([exp.experiment_id]) if exp else []):
            hist = {{k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k))
                    for k in ("train/loss", "train/distill_loss")}}
            out.append({{"id": run.info.run_id, "status": run.info.status, "tags": run.data.tags,
                        "params": run.data.params, "steps": hist}})
        print(json.dumps(out))""")
    return c.python(code)


def _s3_keys(c: TwoNodeCluster, prefix: str) -> dict[str, int]:
    return c.python(f"import json\nfrom facescale import storage\n"
                    f"print(json.dumps(storage.list_objects('s3://{BUCKET}/{prefix}')))")


def _facescale(c: TwoNodeCluster, *args: str, timeout: float = 600):
    return c.run(str(BIN / "facescale"), *args, timeout=timeout)


def test_a_node_local_storage_path_is_refused_before_training_naming_the_other_node(cluster):
    cfg = _config(cluster, "local-storage", f"s3://{BUCKET}/data", str(cluster.local / "runs"))
    done = _facescale(cluster, "train", "--config", str(cfg))
    second = cluster.node_ids()["second"]
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    err = done.stderr
    assert f"scaling.storage_path={cluster.local / 'runs'}: {cluster.local / 'runs'} is not visible on node " \
           f"127.0.0.1 (id {second[:8]}; up to 1 of 2 workers there); use s3://" in err, err[-3000:]
    assert "RayTrainWorker" not in err and "train/loss" not in err
    assert _runs(cluster, "local-storage") == []  # refused before the MLflow run was created


def test_a_node_local_dataset_is_refused_naming_the_node_that_cannot_see_it(cluster):
    cfg = _config(cluster, "local-data", str(cluster.local / "data"), f"s3://{BUCKET}/runs-d")
    done = _facescale(cluster, "train", "--config", str(cfg))
    second = cluster.node_ids()["second"]
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("data.root=")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert f"{cluster.local / 'data'} cannot be read as a dataset" in lines[0]
    assert f"on node 127.0.0.1 (id {second[:8]};" in lines[0] and "use s3://" in lines[0]
    # Only the second node is named: the head sees the data, and the shared verification file is fine everywhere.
    assert "data.val_bins" not in done.stderr
    assert _runs(cluster, "local-data") == []


KILLER = """\
import os, signal, sys, time
from pathlib import Path
from facescale import storage
prefix, marker, mount_ns = sys.argv[1:4]
deadline = time.time() + 600
while time.time() < deadline:
    if any(k.endswith(marker) for k in storage.list_objects(prefix)):
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
                ns = os.readlink(proc / "ns" / "mnt")
            except OSError:
                continue
            if cmd.startswith("ray::RayTrainWorker") and ns == mount_ns:
                os.kill(int(proc.name), signal.SIGKILL)
                print("killed", proc.name, ns, flush=True)
                sys.exit(0)
    time.sleep(0.05)
sys.exit(1)
"""


def test_s3_run_across_two_nodes_survives_losing_the_second_nodes_worker(cluster):
    cfg = _config(cluster, "on-s3", f"s3://{BUCKET}/data", f"s3://{BUCKET}/runs-b", steps=12)
    # A watcher inside the cluster SIGKILLs the second node's Ray Train worker once checkpoint 4 is committed.
    log = cluster.work / "killer.log"
    killer = cluster.popen(str(BIN / "python"), "-c", KILLER, f"s3://{BUCKET}/runs-b/",
                           "checkpoint_00000004/checkpoint.json", cluster.second_node_mount_ns(), log=log)
    try:
        done = _facescale(cluster, "train", "--config", str(cfg))
    finally:
        killer.kill()
        killer.wait(10)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert log.read_text().startswith("killed "), f"the second node's worker was never killed: {log.read_text()}"
    (run,) = _runs(cluster, "on-s3")
    assert run["status"] == "FINISHED"
    assert run["steps"]["train/loss"] == [2, 4, 6, 8, 10, 12]  # every logging step once, across the restart
    run_root = f"facescale-{run['id']}"  # the run's checkpoints: <storage_path>/<Ray Train run name>/
    final = json.loads(cluster.python(
        f"import json\nfrom facescale import storage\n"
        f"print(json.dumps(storage.read_bytes('s3://{BUCKET}/runs-b/{run_root}/checkpoint_00000012/"
        f"checkpoint.json').decode()))"))
    files = set(final["files"])
    assert final["world_size"] == 2 and final["step"] == 12
    assert {"rng_rank0.pt", "rng_rank1.pt", "model.pt", "partial_fc.json"} <= files
    ranges = sorted(f for f in files if f.startswith("partial_fc_classes_"))
    assert ranges == ["partial_fc_classes_0000000000_0000000006.pt", "partial_fc_classes_0000000006_0000000012.pt"]
    summary = json.loads(final["meta"]["metrics"]["summary"])
    # Killed right after checkpoint 4 committed, the group resumed from it (or from 8, had 8 committed before the
    # kill landed): exactly one resume, and the steps after it were trained once.
    resumed_at = int(summary["resumed_from"].rsplit("_", 1)[1])
    assert summary["resumes"] == 1 and resumed_at in (4, 8), summary
    assert summary["steps_this_attempt"] == 12 - resumed_at


PIPELINE = """\
name: mn-rkd
config:
  data: {{root: s3://{bucket}/data, val_bins: [{val}], num_workers: 0}}
  model: {{embedding_size: 32}}
  classifier: {{type: linear, margin: {{type: cosface, s: 16.0}}}}
  train: {{batch_size: 8, max_steps: 4, lr: 0.05, log_every: 2, eval_batch_size: 40, system_metrics_interval_s: null}}
  scaling: {{num_workers: 2, cpus_per_worker: 1, storage_path: s3://{bucket}/pipeline,
            resources_per_worker: {{{slot}: 1}}}}
  tracking: {{experiment: mn-rkd}}
teacher: {{backbone: iresnet_nano}}
student: {{backbone: iresnet_nano}}
generations: 1
scratch_baseline: false
cache_dir: s3://{bucket}/teacher-cache
registered_model: mn-rkd-model
"""


def test_distillation_pipeline_with_the_teacher_cache_on_s3_across_two_nodes(cluster):
    spec = cluster.work / "pipeline.yaml"
    spec.write_text(PIPELINE.format(bucket=BUCKET, val=cluster.work / "shared" / "verification.bin", slot=SLOT))
    done = _facescale(cluster, "distill", "--pipeline", str(spec), "--run-id", "mn", timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    cache = {k: v for k, v in _s3_keys(cluster, "teacher-cache/").items()}
    (cache_dir,) = {k.rsplit("/", 1)[0] for k in cache}
    shards = sorted(k for k in cache if k.rsplit("/", 1)[1].startswith("shard-"))
    assert len(shards) == 4 and f"{cache_dir}/cache.json" in cache
    runs = {r["tags"].get("facescale.stage"): r for r in _runs(cluster, "mn-rkd") if "facescale.stage" in r["tags"]}
    assert set(runs) == {"pipeline", "teacher", "gen-1"}, set(runs)  # the parent run and its two stages
    assert all(r["status"] == "FINISHED" for r in runs.values())
    gen1 = runs["gen-1"]
    assert gen1["params"]["distill.teacher_cache"] == f"s3://{BUCKET}/teacher-cache/{cache_dir}"
    assert gen1["tags"]["facescale.teacher_model_id"] == runs["teacher"]["tags"]["facescale.model_id"]
    assert gen1["steps"]["train/distill_loss"] == [2, 4]
    # The teacher's forward passes happen once, in the cache build, before generation 1 starts; gen-1 only
    # looks embeddings up (its workers never load the teacher).
    assert out.count("teacher embeddings") >= 1
    assert out.rindex("teacher embeddings") < out.index("stage gen-1:")
