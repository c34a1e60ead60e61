"""DALI training from s3:// through the node-local shard cache, against a real S3 API server (moto) on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from facescale import storage
from facescale.config import FaceScaleConfig
from facescale.data import ShardCacheError, build_train_loader, load_manifest, shard_sets
from facescale.data.dali_loader import DaliFaceLoader, build_dali_loader
from facescale.data.shard_cache_build import build_shard_cache
from facescale.data.wds_index import ensure_indices

pytestmark = pytest.mark.integration


def _push(tiny_data: Path, bucket: str) -> str:
    url = f"s3://{bucket}/set"
    shard_sets.push(tiny_data, url, progress=False)
    return url


def _largest_shard_bytes(root: Path) -> int:
    """Bytes of the largest shard with its index: what the cache holds per shard."""
    manifest = load_manifest(root)
    return max((root / s.url).stat().st_size + (root / s.index).stat().st_size for s in manifest.shards)


def _cfg(root: str, **data) -> FaceScaleConfig:
    return FaceScaleConfig.model_validate({"data": {"root": root, **data}, "train": {"batch_size": 8, "seed": 5}})


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != ".lock")


def test_dali_from_s3_yields_the_local_samples_and_stays_within_the_cache_budget(
    tiny_data: Path, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 192 samples in 4 shards of 48; W=2 ranks of batch 8: 12 steps of 8 cover each rank's 96 samples, so an epoch
    # yields every sample once. The budget holds 3 shards (the one read and 2 prefetched), not the 4 of the set.
    url = _push(tiny_data, bucket)
    budget = int(3.2 * _largest_shard_bytes(tiny_data))
    downloads: list[str] = []  # URLs, in order
    real_download = storage.download_file
    monkeypatch.setattr(storage, "download_file", lambda u, p: downloads.append(u) or real_download(u, p))
    remote_cfg = _cfg(url, cache_dir=str(tmp_path / "cache"), cache_bytes=budget)
    local_cfg = _cfg(str(tiny_data))
    remote = [build_train_loader(remote_cfg, rank, 2) for rank in range(2)]
    local = [build_train_loader(local_cfg, rank, 2) for rank in range(2)]
    assert all(isinstance(x, DaliFaceLoader) and x.fallback_reason is None for x in remote + local)
    cache_dir = remote[0].shard_cache.root
    assert cache_dir.parent == tmp_path / "cache" and cache_dir.name == load_manifest(url).digest[:16]
    accounted: list[int] = []
    on_disk: list[int] = []
    for loader in remote:  # every download, admission and eviction reports the directory's bytes
        loader.shard_cache.observer = lambda used: (accounted.append(used), on_disk.append(_dir_bytes(cache_dir)))
    manifest = load_manifest(tiny_data)
    everything = Counter()
    for epoch in range(2):
        remote_pairs, local_pairs = Counter(), Counter()
        for rank in range(2):
            before = len(downloads)
            for pairs, loader in ((remote_pairs, remote[rank]), (local_pairs, local[rank])):
                for images, labels, keys in loader.epoch_samples(epoch):
                    assert images.dtype == torch.uint8 and images.shape == (8, 3, 112, 112)
                    pairs.update(zip(keys, labels.tolist()))
            # A rank fetches only the shards it reads (and their indices).
            files = remote[rank].shard_cache.files
            assert set(downloads[before:]) <= {f.url for i in remote[rank].local_shards(epoch)
                                                         for f in files[i]}  # fmt: skip
        assert remote_pairs == local_pairs and sum(remote_pairs.values()) == manifest.num_samples
        everything.update(remote_pairs)
    assert len(everything) == manifest.num_samples
    assert max(accounted) <= budget and max(on_disk) <= budget, "the cache never exceeds its byte budget"
    assert any(b < a for a, b in zip(accounted, accounted[1:])), "the budget forced evictions"
    assert not [p for p in cache_dir.iterdir() if ".part" in p.name], "no download left behind"
    # A restart mid-epoch gives the uninterrupted batches, without fetching the shards wholly before it.
    full = [keys for _, _, keys in remote[1].epoch_samples(1)]
    fresh = build_dali_loader(url, batch_size=8, rank=1, world_size=2, seed=5, cache_dir=str(tmp_path / "other"),
                              cache_bytes=budget)  # fmt: skip
    first_shard = fresh._range_parts(1)[0]
    start = (first_shard[2] - first_shard[1]) // 8 + 1  # past the first shard of the range
    downloads.clear()
    assert [keys for _, _, keys in fresh.epoch_samples(1, start_step=start)] == full[start:]
    assert fresh.shard_cache.files[first_shard[0]][0].url not in downloads
    for loader in remote + [fresh]:
        loader.close()


def test_bad_cache_settings_are_errors_naming_the_key(tiny_data: Path, bucket: str, tmp_path: Path) -> None:
    url = _push(tiny_data, bucket)
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")  # a file where the directory would go (root ignores permission bits; this it cannot)
    with pytest.raises(ShardCacheError, match=rf"data.cache_dir: {not_a_dir}/[0-9a-f]{{16}} is not writable"):
        build_train_loader(_cfg(url, cache_dir=str(not_a_dir)), 0, 1)
    largest = _largest_shard_bytes(tiny_data)
    message = (rf"data.cache_bytes={2 * largest} is too small: the shard being read and 2 prefetched need up to "
               rf"{3 * largest} bytes \(the largest, {url}/synth-00000\d\.tar, is {largest} bytes")  # fmt: skip
    with pytest.raises(ShardCacheError, match=message):
        build_train_loader(_cfg(url, cache_dir=str(tmp_path / "c"), cache_bytes=2 * largest), 0, 1)
    # data.loader=dali honoured on S3 now; without DALI it is an error (auto falls back, tested in test_dali_loader).
    assert isinstance(build_train_loader(_cfg(url, loader="dali", cache_dir=str(tmp_path / "c")), 0, 1),
                      DaliFaceLoader)  # fmt: skip


def test_two_ranks_share_one_cache_directory(tiny_data: Path, bucket: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # Two caches on one directory (as two ranks of a node), reading every shard in opposite orders at once under a
    # budget of ~2.5 shards: nothing is downloaded twice at the same time, every copy read is whole, and the
    # directory stays within its budget; a download a dead process left behind is reclaimed.
    url = _push(tiny_data, bucket)
    manifest = load_manifest(url)
    index_urls = ensure_indices(manifest)
    budget = int(2.5 * _largest_shard_bytes(tiny_data))
    in_flight: set[str] = set()
    overlaps: list[str] = []
    guard = threading.Lock()
    real_download = storage.download_file

    def slow_download(u: str, path: str) -> None:
        with guard:
            overlaps.extend([u] if u in in_flight else [])
            in_flight.add(u)
        try:
            time.sleep(0.05)  # widen the window in which the other rank could start the same download
            real_download(u, path)
        finally:
            with guard:
                in_flight.discard(u)

    monkeypatch.setattr(storage, "download_file", slow_download)
    usage: list[int] = []
    caches = [build_shard_cache(manifest, index_urls, str(tmp_path), budget, prefetch_shards=0, observer=usage.append)
              for _ in range(2)]  # fmt: skip
    for cache in caches:
        cache.wait_timeout_s = 60
    root = caches[0].root
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = caches[0]._host
    stale = root / f"{caches[0].files[0][0].name}.{budget}.{host}~{int(dead.stdout)}~0.part"
    stale.write_bytes(b"partial")  # admitted at the whole budget by a process that died: reaped, or nothing fits
    errors: list[BaseException] = []

    def read_all(cache, order) -> None:
        try:
            for _ in range(2):
                for shard in order:
                    tar, _ = cache.acquire(shard)
                    digest = hashlib.sha256(Path(tar).read_bytes()).hexdigest()
                    assert digest == manifest.shards[shard].sha256, f"copy of shard {shard} is not whole"
                    cache.release(shard)
        except BaseException as exn:  # noqa: BLE001 -- reported by the test thread below
            errors.append(exn)

    threads = [threading.Thread(target=read_all, args=(caches[0], [0, 1, 2, 3])),
               threading.Thread(target=read_all, args=(caches[1], [3, 2, 1, 0]))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not overlaps, f"downloaded twice at once: {overlaps}"
    assert not stale.exists() and max(usage) <= budget and _dir_bytes(root) <= budget
    assert not any(".part" in p.name for p in root.iterdir())
    assert os.path.isfile(root / ".lock")
    for cache in caches:
        cache.close()
