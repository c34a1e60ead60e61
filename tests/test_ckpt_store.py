"""Atomic checkpoint store, local and on a real S3 API server (moto) on 127.0.0.1.

Two ranks are real gloo processes; an interrupted save is a real subprocess killed with SIGKILL mid-save.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from facescale import storage
from facescale.checkpoint import store as ckpt_store
from facescale.checkpoint.committed import (
    MANIFEST_NAME,
    IncompleteCheckpointError,
    local_copy,
    resolve_checkpoint,
    verify_checkpoint,
)
from facescale.checkpoint.store import CheckpointStore
from facescale.parallel.dist import free_loopback_port
from facescale.storage import StorageError

pytestmark = pytest.mark.integration
BACKENDS = ["local", "s3"]


@pytest.fixture(params=BACKENDS)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A run root: a local directory, or a prefix in a fresh bucket."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('bucket')}/runs/run-a"
    return str(tmp_path / "runs" / "run-a")


def _writer(files: dict[str, bytes]) -> Callable[[Path], None]:
    def write_files(directory: Path) -> None:
        for name, data in files.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)

    return write_files


def _entries(root: str) -> list[str]:
    """Top-level names under a run root (directories locally, first key components on S3)."""
    if root.startswith("s3://"):
        return sorted({key.split("/")[0] for key in storage.list_objects(root)})
    return sorted(os.listdir(root))


def _put(uri: str, name: str, data: bytes | None) -> None:
    """Overwrite (or, with ``None``, delete) one file of a checkpoint behind the store's back."""
    if uri.startswith("s3://"):
        bucket, key = storage.split_s3_url(f"{uri}/{name}")
        if data is None:
            storage.s3_client().delete_object(Bucket=bucket, Key=key)
        else:
            storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data)
    elif data is None:
        os.remove(os.path.join(uri, name))
    else:
        Path(uri, name).write_bytes(data)


def _remove_checkpoint(uri: str) -> None:
    if uri.startswith("s3://"):
        storage.delete_objects(uri, list(storage.list_objects(uri)))
    else:
        shutil.rmtree(uri)


def _no_barrier() -> None:
    pass


def test_save_commits_and_latest_finds_it(root: str) -> None:
    store = CheckpointStore(root, rank=0, world_size=1, barrier=_no_barrier, keep_last=None)
    assert store.latest() is None and resolve_checkpoint(root) is None
    first = store.save(1, _writer({"model.pt": b"m" * 10, "sub/opt.pt": b"o" * 3}), meta={"loss": 1.5})
    second = store.save(2, _writer({"model.pt": b"M" * 20, "sub/opt.pt": b"O" * 4}), meta={"loss": 1.25})
    assert second == store.checkpoint_uri(2) and store.latest() == second
    manifest = verify_checkpoint(second)
    assert manifest["files"] == {"model.pt": 20, "sub/opt.pt": 4}
    assert manifest["ranks"] == {"0": ["model.pt", "sub/opt.pt"]}, "which rank wrote which file"
    assert (manifest["format"], manifest["name"], manifest["step"], manifest["world_size"]) == (
        1, "checkpoint_00000002", 2, 1)  # fmt: skip
    assert manifest["meta"] == {"loss": 1.25} and manifest["created"].endswith("+00:00")
    assert resolve_checkpoint(root) == second and resolve_checkpoint(first) == first
    assert _entries(root) == ["checkpoint_00000001", "checkpoint_00000002"], "no staging left behind"
    with local_copy(first) as local:
        assert (local / "model.pt").read_bytes() == b"m" * 10 and (local / "sub/opt.pt").read_bytes() == b"ooo"
        assert (local / MANIFEST_NAME).is_file()
    assert local.is_dir() == (not root.startswith("s3://")), "an S3 copy is temporary"
    # Saving a step again replaces that checkpoint.
    store.save(2, _writer({"model.pt": b"x" * 7}))
    assert verify_checkpoint(second)["files"] == {"model.pt": 7} and store.latest() == second
    with local_copy(second) as local:
        assert sorted(p.name for p in local.iterdir()) == [MANIFEST_NAME, "model.pt"]



def _two_rank_worker(rank: int, world_size: int, port: int, roots: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    for root in roots:
        store = CheckpointStore(root, rank, world_size, barrier=dist.barrier)
        files = {f"rng_rank{rank}.pt": bytes(100 + rank)}
        if rank == 0:
            files["model.pt"] = bytes(1000)
        uri = store.save(7, _writer(files), meta={"step": 7})
        assert uri == store.checkpoint_uri(7)
        # Returned after the final barrier: every rank sees the committed checkpoint.
        manifest = verify_checkpoint(uri)
        assert manifest["files"] == {"model.pt": 1000, "rng_rank0.pt": 100, "rng_rank1.pt": 101}
        assert manifest["ranks"] == {"0": ["model.pt", "rng_rank0.pt"], "1": ["rng_rank1.pt"]}
    dist.barrier()
    dist.destroy_process_group()
    # Leave without interpreter finalization (see tests/test_partial_fc.py: gloo threads once aborted there).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_gloo_ranks_write_one_checkpoint(tmp_path: Path, bucket: str) -> None:
    roots = [str(tmp_path / "run"), f"s3://{bucket}/run"]
    mp.spawn(_two_rank_worker, args=(2, free_loopback_port(), roots), nprocs=2, join=True)
    for root in roots:
        manifest = verify_checkpoint(resolve_checkpoint(root))
        assert manifest["world_size"] == 2 and manifest["step"] == 7
        assert manifest["files"] == {"model.pt": 1000, "rng_rank0.pt": 100, "rng_rank1.pt": 101}


# A run that saves step 1, then dies in step 2's save: inside write_files after one file ("write"), or at the barrier
# after every file is written (local) or uploaded with its receipt (S3) but before the manifest ("barrier").
_KILLED_SAVE = """
import sys, time
from pathlib import Path
from facescale.checkpoint.store import CheckpointStore
root, kill_at, ready = sys.argv[1:4]
barriers = []

def barrier():
    barriers.append(1)
    if kill_at == "barrier" and len(barriers) == 5:  # 3 barriers a save: this is save 2's second
        Path(ready).touch()
        time.sleep(600)

def writer(step):
    def write_files(directory):
        (directory / "model.pt").write_bytes(bytes(1000 * step))
        if step == 2 and kill_at == "write":
            (directory / "optimizer.pt").write_bytes(b"half")
            Path(ready).touch()
            time.sleep(600)
        (directory / "optimizer.pt").write_bytes(bytes(500))
    return write_files

store = CheckpointStore(root, 0, 1, barrier)
store.save(1, writer(1))
store.save(2, writer(2))
"""


@pytest.mark.parametrize("backend,kill_at", [("local", "write"), ("local", "barrier"), ("s3", "barrier")])
def test_killed_save_is_never_resumed(backend: str, kill_at: str, tmp_path: Path, request: pytest.FixtureRequest,
                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    root = f"s3://{request.getfixturevalue('bucket')}/run" if backend == "s3" else str(tmp_path / "run")
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, root, kill_at, str(ready)], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, f"the saving process ended early: {proc.stdout.read().decode()}"
            assert time.monotonic() < deadline, "the saving process never reached the kill point"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind runs
        proc.wait()
    store = CheckpointStore(root, 0, 1, _no_barrier)
    second = store.checkpoint_uri(2)
    if backend == "s3":
        left = storage.list_objects(second)
        assert {"model.pt", "optimizer.pt"} <= set(left) and MANIFEST_NAME not in left, "uploaded, not committed"
        with caplog.at_level(logging.WARNING, "facescale.checkpoint"):
            assert store.latest() == store.checkpoint_uri(1)
        assert f"not resuming from {second}" in caplog.text and f"no {MANIFEST_NAME}" in caplog.text
    else:
        assert list((Path(root) / ".checkpoint_00000002.staging").rglob("model.pt")), "written, not committed"
        assert store.latest() == store.checkpoint_uri(1)
    with pytest.raises(IncompleteCheckpointError, match=f"{re.escape(second)} is not committed: no {MANIFEST_NAME}"):
        resolve_checkpoint(second)
    assert resolve_checkpoint(root) == store.checkpoint_uri(1)
    # The next attempt saves step 2 over the leftovers.
    assert store.save(2, _writer({"model.pt": bytes(3)})) == second and store.latest() == second
    assert verify_checkpoint(second)["files"] == {"model.pt": 3}
    assert _entries(root) == ["checkpoint_00000001", "checkpoint_00000002"]


def test_listed_file_missing_or_truncated_is_not_committed(root: str, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(root, 0, 1, _no_barrier, keep_last=None)
    uris = [store.save(step, _writer({"model.pt": bytes(50), "optimizer.pt": bytes(20)})) for step in (1, 2, 3)]
    _put(uris[2], "model.pt", bytes(5))  # truncated
    _put(uris[1], "optimizer.pt", None)  # missing
    with caplog.at_level(logging.WARNING, "facescale.checkpoint"):
        assert store.latest() == uris[0]
    assert f"not resuming from {uris[2]}: checkpoint {uris[2]} is not committed: model.pt has 5 bytes" in caplog.text
    assert (f"{uris[1]} is not committed: optimizer.pt, listed in {MANIFEST_NAME} as written by rank 0, is missing"
            in caplog.text)
    with pytest.raises(IncompleteCheckpointError, match="model.pt has 5 bytes, checkpoint.json lists 50") as info:
        resolve_checkpoint(uris[2])
    assert info.value.file == "model.pt" and info.value.checkpoint == uris[2]
    with pytest.raises(IncompleteCheckpointError, match="optimizer.pt, listed in checkpoint.json as written by rank 0"):
        resolve_checkpoint(uris[1])
    with pytest.raises(IncompleteCheckpointError, match="model.pt has 5 bytes"):
        with local_copy(uris[2]):
            pass
    _put(uris[0], MANIFEST_NAME, b'{"format": 1, "files": {"model.pt": ')  # a manifest cut short
    assert store.latest() is None and resolve_checkpoint(root) is None
    with pytest.raises(IncompleteCheckpointError, match=f"unreadable {MANIFEST_NAME}"):
        verify_checkpoint(uris[0])


def test_retention_and_interrupted_deletion(root: str, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(root, 0, 1, _no_barrier, keep_last=2)
    for step in (1, 2, 3, 4):
        store.save(step, _writer({"model.pt": bytes(step), "optimizer.pt": bytes(9)}))
    assert _entries(root) == ["checkpoint_00000003", "checkpoint_00000004"]
    # The deletion of checkpoint 3 dies after its manifest went (S3) / after the uncommitting rename (local).
    # (A patch of its own: undoing the test's monkeypatch would also drop the bucket fixture's AWS variables.)
    patch = pytest.MonkeyPatch()
    if root.startswith("s3://"):
        real_delete = storage.delete_objects

        def delete_manifest_then_fail(prefix_url: str, names: list[str]) -> None:
            if names != [MANIFEST_NAME]:
                raise StorageError(f"deleting under {prefix_url} failed (connection reset)", prefix_url)
            real_delete(prefix_url, names)

        patch.setattr(storage, "delete_objects", delete_manifest_then_fail)
        leftover = store.checkpoint_uri(3)
    else:
        real_rmtree = shutil.rmtree

        def rmtree_fails(path: str, ignore_errors: bool = False, **kwargs: object) -> None:
            if str(path).endswith(".deleting") and not ignore_errors:
                raise OSError(f"{path}: device busy")
            real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

        patch.setattr(ckpt_store.shutil, "rmtree", rmtree_fails)
        leftover = os.path.join(root, ".checkpoint_00000003.deleting")
    try:
        with caplog.at_level(logging.WARNING, "facescale.checkpoint"):
            fifth = store.save(5, _writer({"model.pt": bytes(5)}))
    finally:
        patch.undo()
    assert "cleaning up old checkpoints" in caplog.text, "a failed deletion is logged, not raised"
    assert store.latest() == fifth
    with pytest.raises(IncompleteCheckpointError, match="not committed"):
        resolve_checkpoint(leftover)
    # Even with nothing newer, the half-deleted checkpoint is never chosen.
    _remove_checkpoint(store.checkpoint_uri(4))
    _remove_checkpoint(fifth)
    assert store.latest() is None and resolve_checkpoint(root) is None
    # The next save removes the leftover; keep_last counts committed checkpoints only.
    sixth = store.save(6, _writer({"model.pt": bytes(6)}))
    assert _entries(root) == ["checkpoint_00000006"]
    store.save(7, _writer({"model.pt": bytes(7)}))
    # Resuming from 6 and saving it again abandons the newer 7: it would be chosen after the next failure.
    assert store.save(6, _writer({"model.pt": bytes(60)})) == sixth
    assert _entries(root) == ["checkpoint_00000006"] and store.latest() == sixth


def _save_in_threads(roots: list[str], step: int, sabotage: Callable[[], None] | None = None,
                      keep_last: int | None = None) -> list[object]:
    """Saves ``step`` as 2 ranks in 2 threads (rank r's store at ``roots[r]``); returns each rank's result or error.

    Rank 0 writes model.pt and rng_rank0.pt, rank 1 rng_rank1.pt. ``sabotage`` runs on rank 1 once its files and
    receipt are written, before rank 0 checks them. A rank that fails breaks the barrier, as a torn-down worker group.
    """
    gate = threading.Barrier(2, timeout=60)
    results: list[object] = [None, None]

    def run(rank: int) -> None:
        calls = []

        def barrier() -> None:
            calls.append(1)
            if rank == 1 and len(calls) == 2 and sabotage is not None:
                sabotage()
            gate.wait()

        files = {f"rng_rank{rank}.pt": bytes(100 + rank)} | ({"model.pt": bytes(1000)} if rank == 0 else {})
        try:
            results[rank] = CheckpointStore(roots[rank], rank, 2, barrier, keep_last).save(step, _writer(files))
        except (IncompleteCheckpointError, threading.BrokenBarrierError) as exn:
            gate.abort()
            results[rank] = exn

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("backend,missing", [("local", "receipt"), ("local", "file"), ("s3", "receipt"),
                                             ("s3", "file")])  # fmt: skip
def test_a_rank_whose_receipt_or_file_rank_0_cannot_see_blocks_the_commit(backend: str, missing: str, tmp_path: Path,
                                                                        request: pytest.FixtureRequest) -> None:
    """Local: rank 1 on another node (its own copy of the path rank 0 cannot see), or one of its files gone.
    S3: rank 1's receipt or file is not there when rank 0 lists. Both refuse the same way, naming rank and file."""
    s3 = backend == "s3"
    root = f"s3://{request.getfixturevalue('bucket')}/run" if s3 else str(tmp_path / "node0" / "run")
    uri = CheckpointStore(root, 0, 2, _no_barrier).checkpoint_uri(3)
    roots, sabotage, file = [root, root], None, "rng_rank1.pt" if missing == "file" else ".written_by_rank1.json"
    if missing == "receipt" and not s3:
        roots[1] = str(tmp_path / "node1" / "run")  # the same storage_path on a node that shares no disk
    elif s3:
        sabotage = lambda: _put(uri, file, None)  # noqa: E731
    else:
        sabotage = lambda: os.remove(Path(root, ".checkpoint_00000003.staging", file))  # noqa: E731
    refused, rank1 = _save_in_threads(roots, 3, sabotage)
    assert isinstance(refused, IncompleteCheckpointError) and isinstance(rank1, threading.BrokenBarrierError)
    assert refused.file == file and refused.checkpoint == uri
    what = f"the receipt {file} of rank 1" if missing == "receipt" else f"{file}, written by rank 1,"
    cause = "is not on S3: did rank 1 finish uploading?" if s3 else (
        "is not visible on rank 0's node: is scaling.storage_path on a filesystem every node mounts?")
    assert str(refused) == f"saving {uri}: {what} {cause} Nothing is committed."
    store = CheckpointStore(root, 0, 2, _no_barrier)
    assert store.latest() is None and resolve_checkpoint(root) is None
    if s3:
        assert MANIFEST_NAME not in storage.list_objects(uri)
    else:
        assert not Path(uri).exists() and not [p for p in Path(root).iterdir() if p.name.startswith("checkpoint_")]
        if missing == "receipt":  # rank 1 did write, on its own node
            assert (tmp_path / "node1/run/.checkpoint_00000003.staging/rng_rank1.pt").is_file()
    # Both ranks on one (shared) root: the same save commits, with each rank's files recorded.
    assert _save_in_threads([root, root], 3) == [uri, uri]
    assert verify_checkpoint(uri)["ranks"] == {"0": ["model.pt", "rng_rank0.pt"], "1": ["rng_rank1.pt"]}
    if not s3:
        assert sorted(os.listdir(uri)) == [MANIFEST_NAME, "model.pt", "rng_rank0.pt", "rng_rank1.pt"]


def _rewrite_manifest(uri: str, change: Callable[[dict], None]) -> None:
    manifest = verify_checkpoint(uri)
    change(manifest)
    _put(uri, MANIFEST_NAME, json.dumps(manifest).encode())


def test_latest_skips_a_checkpoint_missing_a_rank(root: str, caplog: pytest.LogCaptureFixture) -> None:
    uris = [_save_in_threads([root, root], step)[0] for step in (1, 2, 3, 4)]
    _put(uris[3], "rng_rank1.pt", None)  # rank 1's file lost after the commit

    def forget_rank_1(manifest: dict) -> None:  # a manifest that does not record rank 1 (nor its file)
        del manifest["ranks"]["1"], manifest["files"]["rng_rank1.pt"]

    _rewrite_manifest(uris[2], forget_rank_1)
    _rewrite_manifest(uris[1], lambda m: m["ranks"]["0"].append("rng_rank1.pt"))  # a file of two ranks
    _rewrite_manifest(uris[0], lambda m: m.pop("ranks"))  # written before rank records: still read
    with caplog.at_level(logging.WARNING, "facescale.checkpoint"):
        assert CheckpointStore(root, 0, 2, _no_barrier).latest() == uris[0]
    assert (f"not resuming from {uris[3]}: checkpoint {uris[3]} is not committed: rng_rank1.pt, listed in "
            f"{MANIFEST_NAME} as written by rank 1, is missing") in caplog.text
    assert (f"not resuming from {uris[2]}: checkpoint {uris[2]} is not committed: rank 1 of 2 has no files "
            f"recorded in {MANIFEST_NAME}") in caplog.text
    assert f"not resuming from {uris[1]}: checkpoint {uris[1]}: unreadable {MANIFEST_NAME}" in caplog.text
    with pytest.raises(IncompleteCheckpointError, match="rng_rank1.pt, listed in checkpoint.json as written by rank 1"):
        with local_copy(uris[3]):
            pass
    assert verify_checkpoint(uris[0])["files"] == {"model.pt": 1000, "rng_rank0.pt": 100, "rng_rank1.pt": 101}


def test_local_copy_downloads_only_wanted_files_after_verifying_all(bucket: str) -> None:
    uri = _save_in_threads([f"s3://{bucket}/run"] * 2, 5)[0]
    with local_copy(uri, wanted=lambda name: name != "model.pt") as local:
        assert sorted(p.name for p in local.iterdir()) == [MANIFEST_NAME, "rng_rank0.pt", "rng_rank1.pt"]
    _put(uri, "model.pt", bytes(3))  # an unwanted file that is wrong still fails the verification
    with pytest.raises(IncompleteCheckpointError, match="model.pt has 3 bytes"):
        with local_copy(uri, wanted=lambda name: name != "model.pt"):
            pass


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        CheckpointStore("x", 2, 2, _no_barrier)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointStore("x", 0, 1, _no_barrier, keep_last=0)
    with pytest.raises(ValueError, match="meta is not JSON-serialisable"):
        CheckpointStore("x", 0, 1, _no_barrier).save(1, _writer({}), meta={"t": object()})
