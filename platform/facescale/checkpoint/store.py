"""Atomic checkpoint store: checkpoints of one run under a local directory or ``s3://`` prefix, committed last.

A run's checkpoints live under its run root (``<scaling.storage_path>/<run name>/``) as ``checkpoint_<step:08d>/``:
files written by several ranks, and ``checkpoint.json``, the commit manifest: ``{"format": 1, "name", "step",
"world_size", "created", "files": {relative name: size in bytes}, "ranks": {"<rank>": [names it wrote]},
"meta": {...the caller's...}}``.

A checkpoint is committed iff its manifest exists, parses, records each of its ``world_size`` ranks and every file it
lists exists with the listed size; nothing else is ever chosen for resume, so a save that dies half-way (a killed
worker, a lost node, a rank whose files rank 0 cannot see) is invisible. ``"ranks"`` is optional, so ``format`` is
still 1: older code reads new manifests, and older manifests (without it) are read by their file list alone.

Each rank ends its part of a save with a receipt, ``.written_by_rank<r>.json`` (the files it wrote, with sizes); rank 0
commits only when all receipts and every file in them are there at their sizes as rank 0 sees them, else it raises
:class:`IncompleteCheckpointError` naming the rank and the file, and nothing is committed.

- **Local root** (a filesystem every node mounts): each rank writes into its own ``.rank<r>.writing/`` in
  ``<root>/.checkpoint_<step>.staging/``, moves its files up into staging and writes its receipt there. Rank 0 writes
  the manifest (tmp + fsync + rename) and renames the directory to ``checkpoint_<step>``, atomic on POSIX, then
  fsyncs the root so the rename survives a power loss.
- **S3 root**: each rank writes into a local temporary directory, uploads its files, then its receipt; rank 0 checks
  the prefix's listing against the receipts and puts ``checkpoint.json`` last. S3 has been strongly read-after-write
  consistent for PUT, LIST and DELETE since December 2020 (AWS announcement), so that listing is complete.

Deleting is the commit in reverse: a checkpoint is uncommitted first (S3: its manifest object goes first; local: the
directory is renamed to a dot-name), then its files go, so an interrupted deletion never looks committed.

Reading -- is a checkpoint committed, which is the newest, a local copy of one -- is in
:mod:`facescale.checkpoint.committed`; this module writes and retains.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from facescale import storage
from facescale.checkpoint.committed import (
    LEFTOVER_RE,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PARALLEL_FILES,
    IncompleteCheckpointError,
    check_committed,
    checkpoint_dirs,
    checkpoint_name,
    latest_committed,
)

# Re-exported: the training loop and launcher import the readers from here.
from facescale.checkpoint.committed import local_copy as local_copy
from facescale.checkpoint.committed import resolve_checkpoint as resolve_checkpoint
from facescale.checkpoint.committed import verify_checkpoint as verify_checkpoint

logger = logging.getLogger("facescale.checkpoint")

_is_s3 = storage.is_remote  # an object store: commit by manifest last (no atomic directory rename there)
_join = storage.join
_normalize = storage.absolute

_RECEIPT = ".written_by_rank{rank}.json"
_RECEIPT_RE = re.compile(r"^\.written_by_rank\d+\.json$")
_OWN_DIR = ".rank{rank}.writing"  # local root: where a rank writes before moving its files into staging
_OWN_DIR_RE = re.compile(r"^\.rank\d+\.writing$")
# Why rank 0 may not see a rank's receipt or file (the likely cause, for the error message).
_UNSEEN_LOCAL = "is not visible on rank 0's node: is scaling.storage_path on a filesystem every node mounts?"
_UNSEEN_S3 = "is not on S3: did rank {rank} finish uploading?"


# --- writing ---------------------------------------------------------------------------------------------------


def _list_files(directory: Path) -> dict[str, int]:
    """Relative POSIX name -> size of every file under ``directory``."""
    files = {}
    for dirpath, _, filenames in os.walk(directory):
        for filename in filenames:
            path = Path(dirpath, filename)
            files[path.relative_to(directory).as_posix()] = path.stat().st_size
    return files


def _own_files(directory: Path, uri: str, rank: int) -> dict[str, int]:
    """What one rank wrote into its own ``directory`` (name -> size); the store's own names are refused."""
    files = _list_files(directory)
    reserved = [n for n in files if n == MANIFEST_NAME or _RECEIPT_RE.match(n) or _OWN_DIR_RE.match(n.split("/")[0])]
    if reserved:
        raise ValueError(f"checkpoint {uri}: rank {rank} wrote reserved file names {reserved}")
    return files


def _check_receipts(uri: str, world_size: int, listing: dict[str, int], read: Callable[[str], bytes],
                    unseen: str) -> dict[int, dict[str, int]]:
    """Rank 0, before committing (local and S3 alike): ``{rank: {name: size}}`` of every rank's receipt, each file
    checked against ``listing`` (what rank 0 sees); ``read`` reads a receipt; ``unseen``: the likely cause of a miss."""
    by_rank: dict[int, dict[str, int]] = {}
    owner: dict[str, int] = {}
    for rank in range(world_size):
        receipt = _RECEIPT.format(rank=rank)
        if receipt not in listing:
            raise IncompleteCheckpointError(f"saving {uri}: the receipt {receipt} of rank {rank} "
                                            f"{unseen.format(rank=rank)} Nothing is committed.", uri,
                                            receipt)  # fmt: skip
        by_rank[rank] = json.loads(read(receipt))["files"]
        for name, size in by_rank[rank].items():
            if name in owner:
                raise ValueError(f"saving {uri}: {name} was written by rank {owner[name]} and rank {rank}")
            if name not in listing:
                raise IncompleteCheckpointError(f"saving {uri}: {name}, written by rank {rank}, "
                                                f"{unseen.format(rank=rank)} Nothing is committed.", uri,
                                                name)  # fmt: skip
            if listing[name] != size:
                raise IncompleteCheckpointError(f"saving {uri}: {name} of rank {rank} has {listing[name]} bytes as "
                                                f"rank 0 sees it, {size} were written. Nothing is committed.", uri,
                                                name)  # fmt: skip
            owner[name] = rank
    if extra := sorted(n for n in listing if n not in owner and n != MANIFEST_NAME and not _RECEIPT_RE.match(n)):
        logger.warning("%s: %d files no rank wrote (left out of %s): %s", uri, len(extra), MANIFEST_NAME,
                       extra[:5])  # fmt: skip
    return by_rank


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a directory too: fsync on its fd makes its entries (renames) durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_durably(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _retire_local(path: str) -> None:
    """Uncommit (rename to a dot-name, fsync the parent), then remove a local checkpoint directory."""
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, f".{name}.deleting")
    if os.path.exists(doomed):
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    _fsync(parent)
    shutil.rmtree(doomed)


def _retire_s3(uri: str, listing: dict[str, int]) -> None:
    """Delete a checkpoint prefix: the manifest object first (uncommitted from then on), then the rest."""
    if MANIFEST_NAME in listing:
        storage.delete_objects(uri, [MANIFEST_NAME])
    storage.delete_objects(uri, sorted(n for n in listing if n != MANIFEST_NAME))


class CheckpointStore:
    """Saves checkpoints of one run atomically under its root and finds the newest committed one.

    Args:
        root: The run root: a local directory (shared by all nodes) or ``s3://bucket/prefix/<run name>``.
        rank: This process's rank.
        world_size: Number of ranks that call ``save`` together.
        barrier: Waits for every rank (``torch.distributed.barrier``; a no-op for one rank).
        keep_last: Committed checkpoints to keep (the newest by step); None keeps all.
    """

    def __init__(self, root: str | os.PathLike[str], rank: int, world_size: int, barrier: Callable[[], None],
                 keep_last: int | None = 2) -> None:  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"CheckpointStore: rank {rank} is not in [0, world_size={world_size})")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"CheckpointStore: keep_last must be >= 1 or None, got {keep_last}")
        self.root = _normalize(root)
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.keep_last = keep_last

    def checkpoint_uri(self, step: int) -> str:
        """Where the checkpoint of ``step`` is (or would be) committed."""
        return _join(self.root, checkpoint_name(step))

    def latest(self) -> str | None:
        """The newest committed checkpoint under the root (by step), or None; skipped newer ones are logged."""
        return latest_committed(self.root)

    def save(self, step: int, write_files: Callable[[Path], None], meta: dict[str, Any] | None = None) -> str:
        """Writes and commits the checkpoint of ``step``. COLLECTIVE: every rank calls it with the same step.

        A rank whose ``write_files`` raises leaves the others waiting at the barrier; under Ray Train the worker
        group is torn down then, and the half-written checkpoint is never committed.

        Args:
            step: Optimizer step; names the checkpoint ``checkpoint_<step:08d>`` (an existing one is replaced).
            write_files: Called once on every rank with a local directory of its own; each rank writes its own
                files there (names must differ across ranks).
            meta: JSON-serialisable record stored in the manifest (progress, metrics, config digest).

        Returns:
            The committed checkpoint's path or ``s3://`` URI (the same on every rank).

        Raises:
            ValueError: If ``step`` is negative or ``meta`` is not JSON-serialisable.
            IncompleteCheckpointError: (rank 0) If a rank's receipt or a file it wrote is missing or has the wrong
                size where rank 0 looks (S3, or a local root not shared by every node).
        """
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        try:
            json.dumps(meta or {})
        except TypeError as exn:
            raise ValueError(f"checkpoint {checkpoint_name(step)}: meta is not JSON-serialisable: {exn}") from exn
        save = self._save_s3 if _is_s3(self.root) else self._save_local
        return save(step, write_files, dict(meta or {}))

    def _manifest(self, step: int, by_rank: dict[int, dict[str, int]], meta: dict[str, Any]) -> dict[str, Any]:
        files = {name: size for files in by_rank.values() for name, size in files.items()}
        return {"format": MANIFEST_FORMAT, "name": checkpoint_name(step), "step": step,
                "world_size": self.world_size, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": dict(sorted(files.items())), "ranks": {str(r): sorted(f) for r, f in by_rank.items()},
                "meta": meta}  # fmt: skip

    def _save_local(self, step: int, write_files: Callable[[Path], None], meta: dict[str, Any]) -> str:
        final = Path(self.checkpoint_uri(step))
        staging = final.with_name(f".{final.name}.staging")
        if self.rank == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                logger.info("removing %s, left by an interrupted save", staging)
                shutil.rmtree(staging)
            staging.mkdir()
        self.barrier()  # NOTE: nobody writes before the stale staging directory is gone and the fresh one exists
        # A node that does not share rank 0's disk has no staging directory here: its ranks make their own, and
        # rank 0, not seeing their receipts, refuses to commit.
        own = staging / _OWN_DIR.format(rank=self.rank)
        shutil.rmtree(own, ignore_errors=True)
        own.mkdir(parents=True)
        write_files(own)
        files = _own_files(own, str(final), self.rank)
        for name in files:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(own / name, staging / name)  # a rename: same directory tree
            _fsync(staging / name)
        shutil.rmtree(own)
        _write_json_durably(staging / _RECEIPT.format(rank=self.rank), {"rank": self.rank, "files": files})
        self.barrier()  # NOTE: every rank's files and receipt are in staging before rank 0 checks them
        if self.rank == 0:
            by_rank = _check_receipts(str(final), self.world_size, _list_files(staging),
                                      lambda name: (staging / name).read_bytes(), _UNSEEN_LOCAL)  # fmt: skip
            for rank in by_rank:  # the manifest's "ranks" records them from here on
                os.remove(staging / _RECEIPT.format(rank=rank))
            manifest = self._manifest(step, by_rank, meta)
            files = manifest["files"]
            _write_json_durably(staging / MANIFEST_NAME, manifest)
            _fsync(staging)
            replaced = final.with_name(f".{final.name}.deleting")
            if final.exists():  # a save of the same step again: retire the old one around the commit
                shutil.rmtree(replaced, ignore_errors=True)
                os.rename(final, replaced)
            os.rename(staging, final)  # the commit
            _fsync(final.parent)
            shutil.rmtree(replaced, ignore_errors=True)
            logger.info("committed %s (%d files, %d bytes)", final, len(files), sum(files.values()))
            self._retain(step)
        self.barrier()  # NOTE: no rank returns (and reports the checkpoint) before it is committed
        return str(final)

    def _save_s3(self, step: int, write_files: Callable[[Path], None], meta: dict[str, Any]) -> str:
        uri = self.checkpoint_uri(step)
        if self.rank == 0:
            if stale := storage.list_objects(uri):
                logger.info("removing %d objects of %s, left by an earlier attempt", len(stale), uri)
                _retire_s3(uri, stale)
        self.barrier()  # NOTE: nobody uploads before stale objects of this step are gone
        with tempfile.TemporaryDirectory(prefix=f"facescale-{checkpoint_name(step)}-rank{self.rank}-") as tmp:
            local = Path(tmp)
            write_files(local)
            files = _own_files(local, uri, self.rank)
            with ThreadPoolExecutor(PARALLEL_FILES) as pool:
                for future in [pool.submit(storage.upload_file, local / n, _join(uri, n)) for n in files]:
                    future.result()
            receipt = _RECEIPT.format(rank=self.rank)
            _write_json_durably(local / receipt, {"rank": self.rank, "files": files})
            storage.upload_file(local / receipt, _join(uri, receipt))  # after this rank's files
            self.barrier()  # NOTE: every rank's uploads and receipt are in before rank 0 checks the listing
            if self.rank == 0:
                by_rank = _check_receipts(uri, self.world_size, storage.list_objects(uri),
                                          lambda name: storage.read_bytes(_join(uri, name)), _UNSEEN_S3)
                manifest = self._manifest(step, by_rank, meta)
                _write_json_durably(local / MANIFEST_NAME, manifest)
                storage.upload_file(local / MANIFEST_NAME, _join(uri, MANIFEST_NAME))  # the commit, last
                logger.info("committed %s (%d files, %d bytes)", uri, len(manifest["files"]),
                            sum(manifest["files"].values()))  # fmt: skip
                self._retain(step)
        self.barrier()  # NOTE: no rank returns (and reports the checkpoint) before it is committed
        return uri

    def _retain(self, step: int) -> None:
        """Rank 0, after committing ``step``: drop old checkpoints beyond ``keep_last`` and leftovers of earlier
        attempts. Failures are logged, never raised: the new checkpoint is committed, and the next save retries."""
        try:
            self._retain_or_raise(step, _is_s3(self.root))
        except OSError as exn:  # I/O only (StorageError too); a half-done deletion is uncommitted, never used
            logger.warning("cleaning up old checkpoints under %s after step %d failed (retried after the next "
                           "save): %r", self.root, step, exn)  # fmt: skip

    def _retain_or_raise(self, step: int, s3: bool) -> None:
        if not s3:
            for entry in os.scandir(self.root):
                if entry.is_dir() and LEFTOVER_RE.match(entry.name):
                    logger.info("removing %s, left by an interrupted save or deletion", entry.path)
                    shutil.rmtree(entry.path)
        committed = []
        for other, uri, listing in sorted(checkpoint_dirs(self.root), reverse=True):
            try:
                check_committed(uri, listing)
            except IncompleteCheckpointError as exn:
                if s3 and listing is not None and MANIFEST_NAME not in listing:
                    # No manifest on S3: objects of an interrupted save or deletion; nobody will commit them now.
                    logger.info("removing %s: %s", uri, exn)
                    _retire_s3(uri, listing)
                else:  # a manifest whose files are broken, or a directory this store did not write: keep, for a human
                    logger.warning("leaving %s in place: %s", uri, exn)
                continue
            if other > step:
                # NOTE: a run resumed from an older checkpoint continues that timeline; a newer checkpoint of the
                # abandoned one would be picked by latest() after the next failure, so it is removed.
                logger.warning("removing %s: newer than the checkpoint just saved (step %d), from an abandoned "
                               "attempt", uri, step)  # fmt: skip
            elif self.keep_last is None or len(committed) < self.keep_last:
                committed.append(uri)
                continue
            else:
                logger.info("removing %s (keep_last=%d)", uri, self.keep_last)
            if s3:
                _retire_s3(uri, listing or {})
            else:
                _retire_local(uri)
