"""Teacher-embedding cache on s3:// (a real S3 API server) and per-rank shares: each rank holds the embeddings of the
shards its loader reads, for both loaders, and every key the loader yields is found there."""

from __future__ import annotations

import logging
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from facescale import storage
from facescale.config import ConfigError, ScalingConfig
from facescale.data import ShardSetWriter, build_loader, iter_shard, load_manifest
from facescale.distill import cache as cache_mod
from facescale.distill.cache import TeacherCache, TeacherCacheError, check_cache, read_meta, write_build_marker
from facescale.distill.cache_write import commit_cache, write_shard
from facescale.models import build_backbone

EMB = 16


def _aws_env(endpoint: str) -> dict[str, str]:
    """What the ``bucket`` fixture puts in the environment, for Ray workers started before it runs."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture(scope="module")
def ray_s3(s3_endpoint: str) -> Iterator[None]:
    """A local Ray whose workers reach the S3 server (builder tasks write shard objects themselves)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": _aws_env(s3_endpoint)})
    yield
    ray.shutdown()


def _keys_by_shard(root: Path) -> list[list[str]]:
    return [[s["__key__"] for s in iter_shard(url)] for url in load_manifest(root).shard_urls()]


def _synthetic_cache(root: Path, cache_dir: str, teacher_id: str = "m-synthetic") -> dict[str, np.ndarray]:
    """A committed cache of random unit vectors for every sample of ``root`` (no teacher); key -> its vector."""
    manifest = load_manifest(root)
    rng = np.random.default_rng(0)
    vectors = {}
    for i, keys in enumerate(_keys_by_shard(root)):
        emb = rng.standard_normal((len(keys), EMB)).astype(np.float32)
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
        write_shard(cache_dir, i, keys, emb)
        vectors.update(zip(keys, emb))
    commit_cache(cache_dir, teacher_id, manifest, EMB)
    return vectors


def _etags(url: str) -> dict[str, str]:
    bucket, key = storage.split_s3_url(url + "/")
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    return {o["Key"][len(key):]: o["ETag"] for p in pages for o in p.get("Contents", [])}


# ---------------------------------------------------------------- on s3://
def test_cache_built_on_s3_by_ray_tasks_is_reused_resumed_and_rebuilt(
        tiny_data: Path, bucket: str, ray_s3: None, caplog: pytest.LogCaptureFixture) -> None:
    from facescale.distill.cache_build import build_teacher_cache

    manifest = load_manifest(tiny_data)
    scaling = ScalingConfig(num_workers=2, cpus_per_worker=1)
    url = f"s3://{bucket}/caches/t"
    torch.manual_seed(0)
    teacher = build_backbone("iresnet_nano", EMB)
    meta, built = build_teacher_cache(teacher, "m-a", manifest, url, EMB, scaling, batch_size=64)
    assert built and meta.num_shards == 4 and meta.num_samples == manifest.num_samples == 192
    assert set(_etags(url)) == {"cache.json"} | {f"shard-{i:05d}.npz" for i in range(4)}  # building.json removed
    assert read_meta(url) == meta and check_cache(url, "m-a", manifest) is None
    cache = TeacherCache(url, tiny_data, "m-a")
    keys = [k for shard in _keys_by_shard(tiny_data) for k in shard]
    emb = cache.lookup(keys)
    assert len(cache) == 192 and emb.shape == (192, EMB)
    assert torch.allclose(emb.norm(dim=1), torch.ones(192), atol=2e-3)
    before = _etags(url)

    # Same teacher, same data: reused, nothing is written.
    assert build_teacher_cache(teacher, "m-a", manifest, url, EMB, scaling) == (meta, False)
    assert _etags(url) == before

    # An interrupted build (marker, two shards gone, no cache.json): only the missing shards are computed.
    storage.delete_objects(url, ["cache.json", "shard-00001.npz", "shard-00003.npz"])
    write_build_marker(url, "m-a", manifest.digest)
    assert read_meta(url) is None and "no complete cache" in check_cache(url, "m-a", manifest)
    with pytest.raises(TeacherCacheError, match="incomplete or absent"):
        TeacherCache(url, tiny_data)
    meta2, built = build_teacher_cache(teacher, "m-a", manifest, url, EMB, scaling)
    after = _etags(url)
    assert built and meta2 == meta
    assert {n: after[n] for n in ("shard-00000.npz", "shard-00002.npz")} == {
        n: before[n] for n in ("shard-00000.npz", "shard-00002.npz")}  # kept as they were
    torch.testing.assert_close(TeacherCache(url, tiny_data).lookup(keys), emb, atol=2e-3, rtol=0)

    # Another teacher: reported and rebuilt; the old cache's readers are refused.
    with caplog.at_level(logging.WARNING, logger="facescale.teacher_cache"):
        meta_b, built = build_teacher_cache(build_backbone("iresnet_nano", EMB), "m-b", manifest, url, EMB, scaling)
    assert built and meta_b.teacher_model_id == "m-b"
    assert any("rebuilt" in r.message and "not m-b" in r.message for r in caplog.records)
    assert all(_etags(url)[n] != after[n] for n in after if n.startswith("shard-"))
    with pytest.raises(TeacherCacheError, match="not m-a"):
        TeacherCache(url, tiny_data, "m-a")


def test_commit_writes_cache_json_last_and_refuses_missing_shards(tiny_data: Path, bucket: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{bucket}/c"
    manifest = load_manifest(tiny_data)
    uploads: list[str] = []
    real_upload = storage.upload_file
    monkeypatch.setattr(storage, "upload_file", lambda path, dest: (uploads.append(dest.rsplit("/", 1)[1]),
                                                                    real_upload(path, dest)))
    shards = _keys_by_shard(tiny_data)
    for i, keys in enumerate(shards[:3]):
        write_shard(url, i, keys, np.zeros((len(keys), EMB), np.float16))
    with pytest.raises(TeacherCacheError, match=r"shards \[3\] are not visible"):
        commit_cache(url, "m", manifest, EMB)
    assert read_meta(url) is None
    write_shard(url, 3, shards[3], np.zeros((len(shards[3]), EMB), np.float16), skipped=2)
    listings = []
    real_list = storage.list_objects
    monkeypatch.setattr(storage, "list_objects", lambda prefix: (listings.append(prefix), real_list(prefix))[1])
    meta = commit_cache(url, "m", manifest, EMB)  # counts read back from the shard objects
    assert uploads[-1] == "cache.json" and uploads.count("cache.json") == 1
    assert meta.num_samples == 192 and meta.skipped_samples == 2
    listings.clear()
    assert check_cache(url, "m", manifest) is None and len(listings) == 1  # one listing, not a request per shard


def test_a_cache_that_was_never_committed_is_not_read(tiny_data: Path, tmp_path: Path, bucket: str) -> None:
    for where in (str(tmp_path / "local"), f"s3://{bucket}/uncommitted"):
        shards = _keys_by_shard(tiny_data)
        for i, keys in enumerate(shards):
            write_shard(where, i, keys, np.zeros((len(keys), EMB), np.float16))
        assert read_meta(where) is None
        with pytest.raises(TeacherCacheError, match="incomplete"):
            TeacherCache(where, tiny_data)
        _synthetic_cache(tiny_data, where)
        assert len(TeacherCache(where, tiny_data)) == 192
        cache_mod.clear_cache(where)
        assert cache_mod.list_cache(where) == set() and read_meta(where) is None


# ---------------------------------------------------------------- each rank holds its share
def _dali_loader(root: Path, rank: int, **kw):  # noqa: ANN202
    from facescale.data.dali_loader import build_dali_loader

    return build_dali_loader(root, **{"batch_size": 8, "rank": rank, "world_size": 2, "seed": 5, "num_threads": 1,
                                      "shuffle_buffer": 16, **kw})  # fmt: skip


def _torch_loader(root: Path, rank: int, **kw):  # noqa: ANN202
    return build_loader(root, batch_size=8, rank=rank, world_size=2, seed=5, num_workers=2, shuffle_buffer=16, **kw)


LOADERS = {"dali": _dali_loader, "torch": _torch_loader}


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_every_key_a_rank_reads_is_in_the_shards_it_selected(tiny_data: Path, tmp_path: Path, kind: str,
                                                            where: str, request: pytest.FixtureRequest) -> None:
    cache_dir = str(tmp_path / "cache") if where == "local" else f"s3://{request.getfixturevalue('bucket')}/share"
    vectors = _synthetic_cache(tiny_data, cache_dir)
    shard_of = {k: i for i, keys in enumerate(_keys_by_shard(tiny_data)) for k in keys}
    held_over_epochs = []
    for rank in range(2):
        loader = LOADERS[kind](tiny_data, rank)
        cache = TeacherCache(cache_dir, tiny_data, shards=loader.local_shards(0))
        for epoch in range(2):
            shards = loader.local_shards(epoch)
            assert set(shards) < set(range(4)) and shards == sorted(shards)  # a strict subset at W = 2
            cache.select(shards)
            assert cache.shards == shards and len(cache) == sum(1 for s in shard_of.values() if s in shards)
            held_over_epochs.append((rank, epoch, shards))
            seen = 0
            for _, _, keys in loader.epoch_samples(epoch):
                assert {shard_of[k] for k in keys} <= set(shards)
                expected = torch.from_numpy(np.stack([vectors[k] for k in keys])).float()
                torch.testing.assert_close(cache.lookup(keys), expected, atol=0, rtol=0)
                seen += len(keys)
            assert seen == loader.steps_per_epoch * 8
            outside = next(k for k, s in shard_of.items() if s not in shards)
            with pytest.raises(TeacherCacheError, match=rf"{outside!r} in the 2 of 4 shards it holds"):
                cache.lookup([outside])
    for epoch in range(2):  # the two ranks' shares cover the data set between them
        assert sorted(s for _, e, shards in held_over_epochs if e == epoch for s in shards) == [0, 1, 2, 3]


def _write_uneven(root: Path, bad_every: int = 0) -> dict[str, int]:
    """110 samples in shards of 25, 25, 25, 25, 10 (rank ranges of 55 straddle shards); some unreadable images."""
    import simplejpeg

    image = np.zeros((112, 112, 3), np.uint8)
    writer = ShardSetWriter(root, prefix="u", samples_per_shard=25)
    for i in range(110):
        bad = bad_every and i % bad_every == 0
        writer.write(f"u{i:04d}", b"not a jpeg" if bad else simplejpeg.encode_jpeg(image, colorspace="RGB"), i % 5)
    writer.close(num_classes=5, source="test")
    return {f"u{i:04d}": i // 25 for i in range(110)}


def test_dali_rank_reads_only_the_sample_range_local_shards_is_derived_from(tmp_path: Path) -> None:
    # Rank ranges of 55 samples that straddle a shard in every order; the keys a rank yields must stay inside its
    # range of the epoch's shard order, sample by sample, and local_shards must be the shards of that range.
    shard_of = _write_uneven(tmp_path)
    manifest = load_manifest(tmp_path)
    in_order = _keys_by_shard(tmp_path)
    for epoch in range(3):
        shares = []
        for rank in range(2):
            loader = _dali_loader(tmp_path, rank, shuffle_buffer=8)  # 110 // 16 = 6 steps: 48 of 55 samples
            order = loader._shard_order(epoch)
            sequence = [k for i in order for k in in_order[i]]
            first, last = 110 * rank // 2, 110 * (rank + 1) // 2
            keys = [k for _, _, batch in loader.epoch_samples(epoch) for k in batch]
            assert set(keys) <= set(sequence[first:last])
            shards = loader.local_shards(epoch)
            assert shards == sorted({shard_of[k] for k in sequence[first:last]})
            assert {shard_of[k] for k in keys} <= set(shards) < set(range(len(manifest.shards)))
            shares.append(set(shards))
        assert shares[0] | shares[1] == set(range(5)) and shares[0] & shares[1]  # one shard straddles the ranges


def test_wrapping_dali_rank_stays_in_its_range(tmp_path: Path) -> None:
    # A third of the images unreadable: ~37 good samples in a range of 55, fewer than the 48 of an epoch, so the
    # rank starts its range again (a wrap), and must not read another rank's samples doing so.
    _write_uneven(tmp_path, bad_every=3)
    in_order = _keys_by_shard(tmp_path)
    loader = _dali_loader(tmp_path, 1, on_error="skip", shuffle_buffer=8)
    order = loader._shard_order(1)
    sequence = [k for i in order for k in in_order[i]]
    keys = [k for _, _, batch in loader.epoch_samples(1) for k in batch]
    assert loader.stats["wraps"] >= 1 and len(keys) == 48 and len(set(keys)) < 48
    assert set(keys) <= set(sequence[55:110])


def test_select_drops_and_loads_shards_and_checks_its_arguments(tiny_data: Path, tmp_path: Path) -> None:
    vectors = _synthetic_cache(tiny_data, str(tmp_path / "c"))
    cache = TeacherCache(tmp_path / "c", tiny_data, shards=[])
    assert len(cache) == 0 and cache.shards == []
    with pytest.raises(TeacherCacheError, match="no-such-key"):
        cache.lookup(["no-such-key"])
    cache.select([3, 1, 3])
    assert cache.shards == [1, 3] and len(cache) == 96
    keys = _keys_by_shard(tiny_data)
    torch.testing.assert_close(cache.lookup([keys[3][5], keys[1][0]]),
                               torch.from_numpy(np.stack([vectors[keys[3][5]], vectors[keys[1][0]]])).float())
    cache.select([0])
    assert cache.shards == [0] and len(cache) == 48 and cache.lookup([]).shape == (0, EMB)
    with pytest.raises(TeacherCacheError, match=r"no shards \[4\]"):
        cache.select([0, 4])


# ---------------------------------------------------------------- the pipeline on s3:// storage
def _spec(tmp_path: Path, data: Path, storage_path: str, extra: str = "") -> Path:
    spec = tmp_path / "p.yaml"
    spec.write_text(textwrap.dedent(f"""\
        name: t
        config:
          data: {{root: {data}, val_bins: [{data}/verification.bin]}}
          scaling: {{num_workers: 1, storage_path: "{storage_path}"}}
          tracking: {{uri: "sqlite:///{tmp_path}/mlruns.db", artifact_root: {tmp_path}/art}}
        teacher: {{backbone: iresnet_nano}}
        student: {{backbone: iresnet_nano}}
        """) + textwrap.dedent(extra))
    return spec


def test_pipeline_on_s3_storage_keeps_its_cache_and_init_model_there(tiny_data: Path, tmp_path: Path,
                                                                     bucket: str) -> None:
    from facescale.distill.pipeline import load_pipeline
    from facescale.distill.runner import PipelineRunner, _checkpoint_identity

    init = tmp_path / "init"
    init.mkdir()
    arch = {"backbone": "iresnet_nano", "embedding_size": 512}
    torch.save({"backbone": build_backbone("iresnet_nano", 512).state_dict(), "arch": arch}, init / "model.pt")
    runner = PipelineRunner(load_pipeline(_spec(tmp_path, tiny_data, f"s3://{bucket}/runs/", f"init: {init}\n")),
                            "run-1")
    assert runner.cache_root == f"s3://{bucket}/runs/teacher_cache"
    init_from, identity = runner._init_for("gen-1", {})
    assert init_from == f"s3://{bucket}/runs/run-1/init" and identity == _checkpoint_identity(str(init))
    assert _checkpoint_identity(init_from) == identity  # the same bytes, wherever they are
    storage.download_file(f"{init_from}/model.pt", tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == (init / "model.pt").read_bytes()
    with pytest.raises(ConfigError, match="no model.pt"):
        _checkpoint_identity(str(tmp_path))

    given = PipelineRunner(load_pipeline(_spec(tmp_path, tiny_data, f"s3://{bucket}/runs",
                                               f"cache_dir: s3://{bucket}/caches/\n")))
    assert given.cache_root == f"s3://{bucket}/caches"
    with pytest.raises(ConfigError, match="cache_dir 'gs://b/c'"):
        load_pipeline(_spec(tmp_path, tiny_data, f"s3://{bucket}/runs", "cache_dir: gs://b/c\n"))
