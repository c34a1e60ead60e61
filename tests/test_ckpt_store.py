"""Atomic checkpoint store, local and on a real S3 API server (moto) on 127.0.0.1.

Two ranks are real gloo processes; an interrupted save is a real subprocess killed with SIGKILL mid-save.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from facescale.data import storage
from facescale.data.storage import StorageError
from facescale.parallel.dist import free_loopback_port
from facescale.train import ckpt_store
from facescale.train.ckpt_store import (
    MANIFEST_NAME,
    CheckpointStore,
    IncompleteCheckpointError,
    local_copy,
    resolve_checkpoint,
    verify_checkpoint,
)

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
        assert verify_checkpoint(uri)["files"] == {"model.pt": 1000, "rng_rank0.pt": 100, "rng_rank1.pt": 101}
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
from facescale.train.ckpt_store import CheckpointStore
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
        assert (Path(root) / ".checkpoint_00000002.staging" / "model.pt").is_file()
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
    assert f"{uris[1]} is not committed: optimizer.pt, listed in {MANIFEST_NAME}, is missing" in caplog.text
    with pytest.raises(IncompleteCheckpointError, match="model.pt has 5 bytes, checkpoint.json lists 50") as info:
        resolve_checkpoint(uris[2])
    assert info.value.file == "model.pt" and info.value.checkpoint == uris[2]
    with pytest.raises(IncompleteCheckpointError, match="optimizer.pt, listed in checkpoint.json, is missing"):
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


def test_a_rank_that_did_not_finish_uploading_blocks_the_commit(bucket: str) -> None:
    # Rank 0 of 2 alone (its barrier does not wait): rank 1's receipt never arrives, so nothing is committed.
    store = CheckpointStore(f"s3://{bucket}/run", 0, 2, _no_barrier)
    with pytest.raises(IncompleteCheckpointError, match=r"rank 1 did not finish uploading \(no \.written_by_rank1"):
        store.save(1, _writer({"model.pt": bytes(4)}))
    assert store.latest() is None
    assert MANIFEST_NAME not in storage.list_objects(store.checkpoint_uri(1))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        CheckpointStore("x", 2, 2, _no_barrier)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointStore("x", 0, 1, _no_barrier, keep_last=0)
    with pytest.raises(ValueError, match="meta is not JSON-serialisable"):
        CheckpointStore("x", 0, 1, _no_barrier).save(1, _writer({}), meta={"t": object()})
