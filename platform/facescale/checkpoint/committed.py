"""Which checkpoints of a run are committed: reading and verifying one, finding the newest, a local copy of one.

The commit rule and the layout (``checkpoint_<step:08d>/`` with its ``checkpoint.json``) are described in
:mod:`facescale.checkpoint.store`, which writes and retains checkpoints; this module only reads them, so a resume
or an evaluation needs nothing of the writing side.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from facescale import storage

logger = logging.getLogger("facescale.checkpoint")

MANIFEST_NAME = "checkpoint.json"
MANIFEST_FORMAT = 1
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
# Local leftovers: a staging directory of an interrupted save, or a checkpoint being deleted.
LEFTOVER_RE = re.compile(r"^\.checkpoint_(\d+)\.(staging|deleting)$")
PARALLEL_FILES = 4  # uploads/downloads at once per rank (as facescale.storage.s3.PARALLEL_FILES)


class IncompleteCheckpointError(FileNotFoundError):
    """A checkpoint is not committed: no or unreadable manifest, or a listed file is missing or has the wrong size.

    Args:
        message: What is wrong; names the checkpoint and the file.
        checkpoint: Path or URI of the checkpoint.
        file: The missing or mismatched file (``checkpoint.json`` when the manifest itself is the problem).
    """

    def __init__(self, message: str, checkpoint: str = "", file: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.file = file

    def __reduce__(self) -> tuple[Any, ...]:  # keep the fields when Ray pickles the error across processes
        return (type(self), (str(self), self.checkpoint, self.file))


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint at optimizer step ``step`` (zero-padded so names sort by step)."""
    return f"checkpoint_{step:08d}"


def _is_s3(uri: str) -> bool:
    return storage.is_remote(uri)  # an object store: commit by manifest last (no atomic directory rename there)


_join = storage.join
_normalize = storage.absolute


def _read_manifest(uri: str) -> dict[str, Any] | None:
    """The parsed manifest of ``uri``; None if it has none."""
    try:
        raw = storage.read_bytes(_join(uri, MANIFEST_NAME))
    except OSError as exn:
        if storage.is_missing(exn) or (not _is_s3(uri) and not os.path.isfile(_join(uri, MANIFEST_NAME))):
            return None
        raise  # an unreachable store is an error, not an uncommitted checkpoint
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        bad = [n for n, s in files.items() if not isinstance(s, int) or s < 0 or not _safe_name(n)]
        if manifest["format"] != MANIFEST_FORMAT or not isinstance(manifest["step"], int) or bad:
            raise ValueError(f"format {manifest['format']} (this version reads {MANIFEST_FORMAT}), "
                             f"step {manifest['step']!r}, bad file entries {bad[:3]}")  # fmt: skip
        if "ranks" in manifest:
            _check_rank_record(manifest["ranks"], files, manifest["world_size"])
    except (ValueError, KeyError, TypeError, AttributeError) as exn:  # JSONDecodeError is a ValueError
        raise IncompleteCheckpointError(f"checkpoint {uri}: unreadable {MANIFEST_NAME}: {exn!r}", uri,
                                        MANIFEST_NAME) from exn  # fmt: skip
    return manifest


def _check_rank_record(ranks: dict[str, list[str]], files: dict[str, int], world_size: int) -> None:
    """Raises ValueError unless ``ranks`` assigns every listed file to exactly one rank in ``[0, world_size)``.
    A rank with no entry at all is not malformed but uncommitted (:func:`check_committed` says so)."""
    owned = [name for names in ranks.values() for name in names]
    keys_ok = all(key.isdigit() and int(key) < world_size for key in ranks)
    if not keys_ok or len(owned) != len(set(owned)) or set(owned) != set(files):
        raise ValueError(f"ranks {sorted(ranks)} of world_size {world_size} do not assign each of the "
                         f"{len(files)} files to one rank")  # fmt: skip


def _safe_name(name: str) -> bool:
    """A relative name that stays inside the checkpoint (a manifest can never point a download elsewhere)."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and "\\" not in name and ".." not in parts and "" not in parts


def _local_sizes(uri: str, names: list[str]) -> dict[str, int]:
    return {name: os.path.getsize(path) for name in names if os.path.isfile(path := os.path.join(uri, name))}


def check_committed(uri: str, listing: dict[str, int] | None = None) -> dict[str, Any]:
    """The manifest of ``uri`` checked against the files there (``listing``: S3 sizes already listed, or None)."""
    manifest = _read_manifest(uri)
    if manifest is None:
        raise IncompleteCheckpointError(f"checkpoint {uri} is not committed: no {MANIFEST_NAME}", uri, MANIFEST_NAME)
    files: dict[str, int] = manifest["files"]
    ranks = manifest.get("ranks")  # None in manifests that predate rank records: their file list is all there is
    if ranks is not None and (absent := [r for r in range(manifest["world_size"]) if str(r) not in ranks]):
        raise IncompleteCheckpointError(f"checkpoint {uri} is not committed: rank {absent[0]} of "
                                        f"{manifest['world_size']} has no files recorded in {MANIFEST_NAME}", uri,
                                        MANIFEST_NAME)  # fmt: skip
    owner = {name: rank for rank, names in (ranks or {}).items() for name in names}
    if listing is None:
        listing = storage.list_objects(uri) if _is_s3(uri) else _local_sizes(uri, list(files))
    for name, size in sorted(files.items()):
        if name not in listing:
            by = f" as written by rank {owner[name]}" if name in owner else ""
            raise IncompleteCheckpointError(f"checkpoint {uri} is not committed: {name}, listed in {MANIFEST_NAME}"
                                            f"{by}, is missing", uri, name)  # fmt: skip
        if listing[name] != size:
            raise IncompleteCheckpointError(f"checkpoint {uri} is not committed: {name} has {listing[name]} "
                                            f"bytes, {MANIFEST_NAME} lists {size} (truncated or replaced)", uri,
                                            name)  # fmt: skip
    return manifest


def verify_checkpoint(uri: str | os.PathLike[str]) -> dict[str, Any]:
    """Checks that a checkpoint is committed.

    Args:
        uri: A checkpoint directory or ``s3://.../checkpoint_<step>`` prefix.

    Returns:
        Its manifest (``files``, ``step``, ``world_size``, ``meta``, ...).

    Raises:
        IncompleteCheckpointError: If it is not committed; the message names the checkpoint and the file.
    """
    return check_committed(_normalize(uri))


def checkpoint_dirs(root: str) -> list[tuple[int, str, dict[str, int] | None]]:
    """``(step, uri, S3 listing or None)`` of every ``checkpoint_<step>`` under ``root``, committed or not."""
    if _is_s3(root):
        grouped: dict[str, dict[str, int]] = {}
        for key, size in storage.list_objects(root).items():
            top, _, rest = key.partition("/")
            if rest and CHECKPOINT_RE.match(top):
                grouped.setdefault(top, {})[rest] = size
        return [(int(CHECKPOINT_RE.match(top)[1]), _join(root, top), listing) for top, listing in grouped.items()]
    if not os.path.isdir(root):
        return []
    return [(int(m[1]), os.path.join(root, e.name), None) for e in os.scandir(root)
            if e.is_dir() and (m := CHECKPOINT_RE.match(e.name))]  # fmt: skip


def latest_committed(root: str) -> str | None:
    """The newest committed checkpoint under the run root ``root`` (by step), or None; skipped ones are logged."""
    for _, uri, listing in sorted(checkpoint_dirs(root), reverse=True):
        try:
            check_committed(uri, listing)
            return uri
        except IncompleteCheckpointError as exn:
            logger.warning("not resuming from %s: %s", uri, exn)
    return None


def resolve_checkpoint(uri: str | os.PathLike[str]) -> str | None:
    """The committed checkpoint that ``uri`` names.

    Args:
        uri: A checkpoint (``.../checkpoint_<step>``), or a run root holding checkpoints (local or ``s3://``).

    Returns:
        ``uri`` itself for a committed checkpoint; for a run root, its newest committed checkpoint, or None if it
        has none (each newer uncommitted one is logged with the reason it was skipped).

    Raises:
        IncompleteCheckpointError: If ``uri`` is a checkpoint that is not committed (names the file).
    """
    uri = _normalize(uri)
    name = os.path.basename(uri)
    if LEFTOVER_RE.match(name):  # even with a manifest inside: only the rename to checkpoint_<step> commits
        raise IncompleteCheckpointError(f"{uri} is not committed: the staging directory of an interrupted save, "
                                        "or a checkpoint being deleted", uri)  # fmt: skip
    if not CHECKPOINT_RE.match(name) and _read_manifest(uri) is None:
        return latest_committed(uri)  # a run root (a checkpoint copied under another name has a manifest)
    check_committed(uri)
    return uri


@contextmanager
def local_copy(uri: str | os.PathLike[str], wanted: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """A verified local directory holding a committed checkpoint, for ``torch.load`` and friends.

    Args:
        uri: A committed checkpoint: local (yielded as it is) or ``s3://`` (its listed files and manifest are
            downloaded into a temporary directory, removed on exit).
        wanted: For ``s3://``: which listed files to download (by relative name), e.g. one rank's share
            (``TrainCheckpoint.files_for_rank``); None downloads every file. The whole manifest is verified against
            the listing first either way. A local checkpoint is yielded whole: its readers open only what they need.

    Yields:
        The local directory.

    Raises:
        IncompleteCheckpointError: If the checkpoint is not committed, or an S3 object changed while downloading.
    """
    uri = _normalize(uri)
    manifest = check_committed(uri)
    if not _is_s3(uri):
        yield Path(uri)
        return
    listed: dict[str, int] = manifest["files"]
    with tempfile.TemporaryDirectory(prefix=f"facescale-{os.path.basename(uri)}-") as tmp:
        local = Path(tmp)
        names = sorted(n for n in listed if wanted is None or wanted(n))
        for name in names:
            (local / name).parent.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(PARALLEL_FILES) as pool:
            for future in [pool.submit(storage.download_file, _join(uri, n), local / n) for n in names]:
                future.result()
        downloaded = _local_sizes(str(local), names)
        for name, size in downloaded.items():
            if size != listed[name]:
                raise IncompleteCheckpointError(f"checkpoint {uri}: {name} changed while downloading ({size} "
                                                f"bytes, {MANIFEST_NAME} lists {listed[name]})", uri,
                                                name)  # fmt: skip
        (local / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        logger.info("downloaded %d of %d files of %s, %d of %d bytes (%s) to %s", len(names), len(listed), uri,
                    sum(downloaded.values()), sum(listed.values()), wanted or "every file", local)  # fmt: skip
        yield local
