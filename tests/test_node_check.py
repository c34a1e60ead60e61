"""The per-node path check's parts, on one machine: which nodes can host workers, which paths a run has, and what a
node that sees other files than the driver reports. The check across real nodes is in tests/test_multinode.py."""

from __future__ import annotations

import shutil
from pathlib import Path

from facescale.config import load_config
from facescale.data.synth import synthesize
from facescale.train.launch import local_path_specs
from facescale.train.node_check import PathSpec, _look, _node_task, check_paths_on_nodes, worker_nodes


def _node(node_id: str, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": f"10.0.0.{len(node_id)}", "Alive": alive,
            "Resources": resources}


def test_worker_nodes_are_the_alive_ones_that_fit_a_worker_with_their_capacity():
    nodes = [_node("head", CPU=2.0), _node("gpu-a", CPU=16.0, GPU=8.0), _node("gpu-dead", alive=False, CPU=16.0,
             GPU=8.0), _node("gpu-b", CPU=4.0, GPU=8.0, slot=1.0)]
    found = worker_nodes({"CPU": 2.0, "GPU": 1.0}, nodes)
    assert [(n.node_id, n.capacity) for n in found] == [("gpu-a", 8), ("gpu-b", 2)]  # CPU-bound on gpu-b
    assert [n.node_id for n in worker_nodes({"CPU": 1.0, "slot": 1.0}, nodes)] == ["gpu-b"]
    assert found[1].describe(4) == "node 10.0.0.5 (id gpu-b; up to 2 of 4 workers there)"


def test_the_runs_local_paths_are_listed_with_what_each_node_must_find(tmp_path: Path, tiny_data: Path):
    given = load_config(None, [f"data.root={tiny_data}", f"data.val_bins=[{tiny_data}/verification.bin]",
                               "scaling.storage_path=runs", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                               f"tracking.artifact_root={tmp_path}/art", f"distill.teacher_cache={tmp_path}/c"])
    cfg = given.model_copy(deep=True)
    specs = {s.key: s for s in local_path_specs(given, cfg, str(tmp_path / "runs"))}
    assert {k: (s.kind, s.path) for k, s in specs.items()} == {
        "data.root": ("dataset", str(tiny_data)),
        "data.val_bins": ("file", f"{tiny_data}/verification.bin"),
        "scaling.storage_path": ("shared_dir", str(tmp_path / "runs")),
        "distill.teacher_cache": ("file", f"{tmp_path}/c/cache.json"),
        "tracking.uri": ("shared_dir", str(tmp_path)),
        "tracking.artifact_root": ("shared_dir", f"{tmp_path}/art"),
    }
    assert specs["scaling.storage_path"].shown == "runs"  # messages show the path as the user wrote it
    remote = load_config(None, ["data.root=s3://b/data", "data.val_bins=[]", "scaling.storage_path=s3://b/runs",
                                "tracking.uri=http://127.0.0.1:5000"])
    assert local_path_specs(remote, remote, "s3://b/runs") == []  # nothing local: nothing to check


def test_a_node_that_sees_other_files_than_the_driver_says_which_and_why(tmp_path: Path, tiny_data: Path):
    shared, data, other_data = tmp_path / "runs", tmp_path / "data", tmp_path / "other"
    shutil.copytree(tiny_data, data)
    synthesize(other_data, identities=4, images_per_identity=4, seed=1, difficulty=0.2, held_out_identities=2,
               num_pairs=4, samples_per_shard=8, progress=False)  # another dataset at the same path on some node
    specs = [PathSpec("data.root", str(data), "dataset"), PathSpec("data.val_bins", str(data / "verification.bin"),
             "file"), PathSpec("scaling.storage_path", str(shared), "shared_dir")]
    expected = [_look(s, None) for s in specs]  # the driver's view; leaves its probe in runs/
    probe = shared / expected[2]
    assert probe.is_file()
    assert _node_task(specs, expected) == []  # a node that sees the same files

    # A node with another copy of the data, a truncated verification file, and no shared storage.
    (data / "verification.bin").write_bytes(b"short")
    probe.unlink()
    elsewhere = [PathSpec("data.root", str(other_data), "dataset"), specs[1], specs[2]]
    problems = dict(_node_task(elsewhere, expected))
    assert problems[0].startswith("holds a dataset with manifest digest ") and "the driver sees" in problems[0]
    assert problems[1] == f"holds a file of 5 bytes, the driver sees {expected[1]} bytes"
    assert problems[2] == "is not visible"
    assert list(shared.iterdir()) == []  # a node's own probe is removed

    shutil.rmtree(data)
    assert dict(_node_task(specs[:1], expected[:1]))[0].startswith("cannot be read as a dataset")


def test_one_node_is_not_checked(local_ray, tmp_path: Path):
    # The path does not exist anywhere: on a one-node cluster nothing is compared, so nothing is reported.
    missing = PathSpec("data.val_bins", str(tmp_path / "nowhere.bin"), "file")
    assert check_paths_on_nodes([missing], {"CPU": 1.0}, 2) == 0
