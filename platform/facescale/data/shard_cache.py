"""Node-local copies of ``s3://`` shards for the DALI loader: fetched ahead of the reader, evicted LRU behind it.

DALI's webdataset reader reads local files (its own ``s3://`` support issues one ranged GET per sample component,
in order, from one thread), and it opens every tar and parses every index it is given when it is built. So the
DALI loader reads a rank's shards of an epoch one at a time from here: ``acquire(shard)`` returns local paths
(downloading now if the copy is not there yet), ``prefetch(shards)`` starts the next ones in background threads,
and ``release(shard)`` lets a copy be evicted again once its reader is done.

Layout of ``<cache_dir>/<dataset digest[:16]>/``::

    <name>                               a verified copy: a shard tar, or its DALI index
    <name>.<size>.<host>~<pid>~<n>.part  a download in progress (with boto3's temporary files beside it, named
                                         after it); together they count as <size> bytes from its admission
    .lock                                flock'd around every change of the directory (admit, commit, evict)

**Budget.** The bytes of the directory (copies plus admitted downloads at their full size) never exceed
``cache_bytes``: a download is admitted only once least-recently-used copies (oldest mtime; a copy's mtime is
set when it is committed or acquired) have been evicted to make room for it. A copy in use is never evicted.

**Several ranks on one node** may share the directory: every change happens under an exclusive ``flock`` of
``.lock``; a rank that uses a copy holds a shared ``flock`` on it, and eviction takes only copies it can lock
exclusively; a file that another live process is downloading is waited for, not fetched twice; a download
becomes visible only by ``os.replace`` onto its name after its size (and the manifest's sha256, for tars) is
checked. The budget is the directory's, so it must hold what all ranks of the node hold at once.

The cache of a manifest's shards (which files, their sizes, the directory) is built by
:func:`facescale.data.shard_cache_build.build_shard_cache`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import itertools
import logging
import os
import re
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from facescale.data.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_PREFETCH_SHARDS = 2
_LOCK_NAME = ".lock"
_PART = ".part"
_PART_RE = re.compile(r"^(?P<stem>(?P<target>.+)\.(?P<size>\d+)\.(?P<host>[^.~/]+)~(?P<pid>\d+)~\d+\.part)(?:\..*)?$")
_STALE_FOREIGN_PART_S = 6 * 3600  # a download of another host (not node-local after all) counts until then
_POLL_S = (0.02, 0.5)  # first and longest wait between looks at a file another rank is downloading


class ShardCacheError(DataError):
    """The shard cache cannot be used or cannot make room; the message names the config key, path or size."""


@dataclass(frozen=True)
class CachedFile:
    """One remote object the cache keeps a copy of.

    Attributes:
        name: Its file name in the cache directory.
        url: Its ``s3://`` URL.
        size: Its size in bytes (from the listing), checked after the download.
        sha256: Hex sha256 to check after the download (the manifest's, for shards), or ``None``.
    """

    name: str
    url: str
    size: int
    sha256: str | None = None


class ShardCache:
    """Local copies of remote shard files under a byte budget (see the module docstring).

    Args:
        root: The cache directory (created; must be writable).
        files: Per shard index, the files it needs (its tar and its index).
        budget_bytes: ``data.cache_bytes``.
        prefetch_shards: Shards fetched ahead of the one being read (background threads, one per shard).
        observer: Called with the directory's accounted bytes after every admission, commit and eviction.
        wait_timeout_s: How long an ``acquire`` waits for room or for another rank's download.

    Raises:
        ShardCacheError: ``root`` not writable, or the budget cannot hold one shard and the prefetched ones.
    """

    def __init__(self, root: str | os.PathLike[str], files: dict[int, list[CachedFile]], budget_bytes: int,
                 prefetch_shards: int = DEFAULT_PREFETCH_SHARDS, observer: Callable[[int], None] | None = None,
                 wait_timeout_s: float = 900.0) -> None:  # fmt: skip
        self.root, self.files, self.budget_bytes = Path(root), files, budget_bytes
        self.prefetch_shards, self.observer, self.wait_timeout_s = max(0, prefetch_shards), observer, wait_timeout_s
        largest = max(files, key=lambda s: sum(f.size for f in files[s]))
        need = (1 + self.prefetch_shards) * sum(f.size for f in files[largest])
        if budget_bytes < need:
            raise ShardCacheError(f"data.cache_bytes={budget_bytes} is too small: the shard being read and "
                                  f"{self.prefetch_shards} prefetched need up to {need} bytes (the largest, "
                                  f"{files[largest][0].url}, is {need // (1 + self.prefetch_shards)} bytes with "
                                  "its index)")  # fmt: skip
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # Closed with this object, not by close(): a prefetch thread still finishing a download may need it.
            self._lock_file = open(self.root / _LOCK_NAME, "a+b")  # noqa: SIM115
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exn:
            raise ShardCacheError(f"data.cache_dir: {self.root} is not writable ({exn}); set data.cache_dir to "
                                  "node-local scratch the workers can write") from exn  # fmt: skip
        host = socket.gethostname().replace(".", "_").replace("~", "_")
        self._owner = f"{host}~{os.getpid()}"
        self._host, self._counter = host, itertools.count()
        self._dir_mutex = threading.Lock()  # flock is per open file: threads of this object share one, so serialise
        self._state = threading.Lock()  # guards _pins and _pending
        self._pins: dict[int, list[int]] = {}  # shard -> fds holding LOCK_SH on its copies
        self._pending: set[int] = set()
        self._pool = ThreadPoolExecutor(max(1, self.prefetch_shards), thread_name_prefix="shard-prefetch")
        self._finalizer = weakref.finalize(self, _close, self._pool, self._pins)

    # -- public ----------------------------------------------------------------------------------------------------

    def path(self, shard: int) -> list[str]:
        """Local paths of the shard's files (valid only between ``acquire`` and ``release``)."""
        return [str(self.root / f.name) for f in self.files[shard]]

    def prefetch(self, shards: Iterable[int]) -> None:
        """Start downloading the shards not cached yet, in the background; a shard without room now is skipped."""
        for shard in shards:
            with self._state:
                if shard in self._pending or shard in self._pins or not self._finalizer.alive:
                    continue
                self._pending.add(shard)
            self._pool.submit(self._prefetch_one, shard)

    def acquire(self, shard: int) -> list[str]:
        """Local paths of the shard's files, downloaded now if need be, held (never evicted) until ``release``.

        Raises:
            ShardCacheError: No room within ``wait_timeout_s``, or a download disagrees with its size or sha256.
            StorageError: A download failed.
        """
        fds = []
        try:
            for f in self.files[shard]:
                fds.append(self._ensure(f, wait=True))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        with self._state:
            self._pins.setdefault(shard, []).extend(fds)
        return self.path(shard)

    def release(self, shard: int) -> None:
        """Let the shard's copies be evicted again (they stay until the budget needs their room)."""
        with self._state:
            fds = self._pins.pop(shard, [])
        for fd in fds:
            os.close(fd)  # drops the shared flock

    def usage_bytes(self) -> int:
        """Bytes the directory holds by the budget's accounting (copies, and admitted downloads at full size)."""
        with self._locked():
            return self._scan()[0]

    def close(self) -> None:
        """Stop prefetching and release every copy held."""
        self._finalizer()

    # -- internals -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._dir_mutex:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _prefetch_one(self, shard: int) -> None:
        try:
            for f in self.files[shard]:
                fd = self._ensure(f, wait=False)
                if fd is None:
                    return  # no room now: acquire fetches it when it is needed
                os.close(fd)
        except Exception as exn:  # noqa: BLE001 -- a failed prefetch is retried (and raised) by acquire
            logger.warning("prefetching shard %d failed (retried when it is read): %s", shard, exn)
        finally:
            with self._state:
                self._pending.discard(shard)

    def _ensure(self, f: CachedFile, wait: bool) -> int | None:
        """A read-only fd holding a shared flock on the verified copy of ``f``; ``None`` if not ``wait`` and no room."""
        final = self.root / f.name
        deadline, pause = time.monotonic() + self.wait_timeout_s, _POLL_S[0]
        while True:
            with self._locked():
                fd = self._pin_if_cached(final, f)
                if fd is not None:
                    return fd
                used, downloading = self._scan(f.name)
                if downloading:
                    if not wait:
                        return None  # a prefetch leaves it to the rank downloading it
                    problem = "another rank is downloading it"
                elif self._make_room(used, f.size):
                    part = self.root / f"{f.name}.{f.size}.{self._owner}~{next(self._counter)}{_PART}"
                    part.touch()  # admitted: counts as f.size bytes from now on
                    self._observe()
                    break
                elif not wait:
                    return None
                else:
                    problem = f"data.cache_bytes={self.budget_bytes} is held by shards in use or being downloaded"
            if time.monotonic() > deadline:
                raise ShardCacheError(f"shard cache {self.root}: no copy of {f.url} after {self.wait_timeout_s:.0f} s "
                                      f"({problem})")  # fmt: skip
            time.sleep(pause)
            pause = min(2 * pause, _POLL_S[1])
        self._download(f, part, final)
        return self._ensure(f, wait)

    def _pin_if_cached(self, final: Path, f: CachedFile) -> int | None:
        """Under the lock: pin a good copy (fd with LOCK_SH, mtime now); drop a copy of the wrong size."""
        try:
            fd = os.open(final, os.O_RDONLY)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_size != f.size:  # an old object of that name: take it out of the way if nobody reads it
            os.close(fd)
            self._evict(final)
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # eviction takes its LOCK_EX only under the directory lock, which we hold
        os.utime(final)
        return fd

    def _download(self, f: CachedFile, part: Path, final: Path) -> None:
        from facescale import storage  # lazy: boto3 loads only when s3:// is used (DESIGN.md)

        try:
            storage.download_file(f.url, part)  # writes <part>.tmp, then renames it to <part>
            size = part.stat().st_size
            if size != f.size:
                raise ShardCacheError(f"{f.url}: downloaded {size} bytes, the listing says {f.size}")
            if f.sha256 is not None:
                digest = hashlib.sha256()
                with open(part, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        digest.update(chunk)
                if digest.hexdigest() != f.sha256:
                    raise ShardCacheError(f"{f.url}: sha256 is {digest.hexdigest()}, the manifest says {f.sha256}")
            with self._locked():
                os.replace(part, final)  # same accounted size before and after: the budget holds throughout
                os.utime(final)
                self._observe()
        except BaseException:
            with self._locked():
                for leftover in self.root.glob(glob.escape(part.name) + "*"):
                    leftover.unlink(missing_ok=True)
                self._observe()
            raise

    def _make_room(self, used: int, size: int) -> bool:
        """Under the lock: evict least recently used copies not in use until ``size`` more bytes fit."""
        if used + size <= self.budget_bytes:
            return True
        copies = []
        for entry in os.scandir(self.root):
            if entry.is_file() and _parse_part(entry.name) is None and not entry.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    copies.append((stat.st_mtime_ns, entry.name, stat.st_size))
        for _, name, file_size in sorted(copies):
            if self._evict(self.root / name):
                used -= file_size
                if used + size <= self.budget_bytes:
                    return True
        return False

    def _evict(self, path: Path) -> bool:
        """Under the lock: delete a copy nobody holds (its exclusive flock succeeds); ``False`` if it is in use."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            path.unlink()
        finally:
            os.close(fd)
        logger.debug("shard cache %s: evicted %s", self.root, path.name)
        self._observe()
        return True

    def _scan(self, name: str | None = None) -> tuple[int, bool]:
        """Under the lock: ``(accounted bytes, whether a live download of name is under way)``; reaps dead ones."""
        used, downloading = 0, False
        downloads = set()  # one download: its .part (admitted), and the temporary files boto3 writes beside it
        for entry in os.scandir(self.root):
            if entry.name == _LOCK_NAME or entry.name.startswith(".probe-") or not entry.is_file():
                continue
            part = _parse_part(entry.name)
            if part is None:
                with contextlib.suppress(FileNotFoundError):  # only copies count by size, and they change under lock
                    used += entry.stat().st_size
                continue
            stem, target, size, host, pid = part
            if self._dead(host, pid, entry):
                Path(entry.path).unlink(missing_ok=True)
                continue
            if stem not in downloads:
                downloads.add(stem)
                used += size
            downloading |= target == name
        return used, downloading

    def _dead(self, host: str, pid: int, entry: os.DirEntry[str]) -> bool:
        if host != self._host:
            try:
                return time.time() - entry.stat().st_mtime > _STALE_FOREIGN_PART_S
            except FileNotFoundError:
                return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _observe(self) -> None:
        if self.observer is not None:
            self.observer(self._scan()[0])


def _parse_part(name: str) -> tuple[str, str, int, str, int] | None:
    """``(stem, target name, size, host, pid)`` of a download's files; ``None`` for a copy.

    A download is ``<target>.<size>.<host>~<pid>~<n>.part``, plus whatever is written beside it while it runs
    (``.part.tmp`` by ``storage.download_file``, and s3transfer's own ``.part.tmp.<random>`` under that).
    """
    match = _PART_RE.match(name)
    if match is None:
        return None
    return match["stem"], match["target"], int(match["size"]), match["host"], int(match["pid"])


def _close(pool: ThreadPoolExecutor, pins: dict[int, list[int]]) -> None:
    pool.shutdown(wait=False, cancel_futures=True)  # (never wait: this may run in a pool thread, at GC)
    for fds in pins.values():
        for fd in fds:
            os.close(fd)
    pins.clear()
