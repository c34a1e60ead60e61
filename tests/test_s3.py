"""S3 storage against a real S3 API server (moto) on 127.0.0.1: push/pull, streaming reads, training from s3://."""

from __future__ import annotations

import os
from pathlib import Path

import botocore.exceptions
import numpy as np
import pytest
import simplejpeg
from boto3.s3.transfer import TransferConfig

from facescale import storage
from facescale.cli import main as facescale_main
from facescale.data import MANIFEST_NAME, ManifestError, ShardSetWriter, build_loader, load_manifest, shard_sets
from facescale.storage import StorageError, s3

pytestmark = pytest.mark.integration


def _jpeg(i: int) -> bytes:
    return simplejpeg.encode_jpeg(np.random.default_rng(i).integers(0, 256, (112, 112, 3), np.uint8), quality=75)


def _write_set(root: Path, num_samples: int = 24, per_shard: int = 6, num_classes: int = 5) -> dict[str, int]:
    writer = ShardSetWriter(root, samples_per_shard=per_shard)
    expected = {}
    for i in range(num_samples):
        writer.write(f"s{i:04d}", _jpeg(i), i % num_classes)
        expected[f"s{i:04d}"] = i % num_classes
    writer.close(num_classes=num_classes, source="test")
    return expected


def _epoch(root: str | Path, num_workers: int, train: bool) -> dict[str, int]:
    loader = build_loader(root, batch_size=4, rank=0, world_size=1, seed=3, num_workers=num_workers, train=train)
    return {k: int(label) for _, labels, keys in loader.epoch_samples(0) for k, label in zip(keys, labels)}


def test_push_pull_round_trip_with_multipart(tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "local"
    _write_set(local)
    big = np.random.default_rng(0).bytes(11 << 20)  # > 2 parts of 5 MiB (the S3 minimum part size)
    (local / "verification.bin").write_bytes(big)
    (local / "stale.tar").write_bytes(b"not in the manifest")
    url = f"s3://{bucket}/sets/v1"
    client = storage.s3_client()
    client.put_object(Bucket=bucket, Key="sets/v1/manifest.json", Body=b"{}")  # an older push's manifest
    order: list[str] = []
    real_upload = shard_sets._upload

    def spy(path, url, config, bar):  # records the order and what a reader would see meanwhile
        if path.name != MANIFEST_NAME:
            with pytest.raises(ManifestError, match="manifest file not found"):
                load_manifest(f"s3://{bucket}/sets/v1/")
        order.append(path.name)
        real_upload(path, url, config, bar)

    monkeypatch.setattr(shard_sets, "_upload", spy)
    small_parts = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    pushed = shard_sets.push(local, url, transfer_config=small_parts, progress=False)
    files = sorted(p.name for p in local.iterdir() if p.name not in (MANIFEST_NAME, "stale.tar"))
    assert order[-1] == MANIFEST_NAME and sorted(order[:-1]) == files, "manifest last, stale.tar left out"
    head = client.head_object(Bucket=bucket, Key="sets/v1/verification.bin")
    assert head["ETag"].strip('"').endswith("-3"), "uploaded in 3 multipart parts"
    remote = load_manifest(url + "/")
    assert remote.root == url and remote.digest == load_manifest(local).digest
    pulled = shard_sets.pull(url, tmp_path / "pulled", progress=False)
    assert pulled.digest == remote.digest
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == sorted([MANIFEST_NAME, *files])
    assert (tmp_path / "pulled" / "verification.bin").read_bytes() == big
    for shard in pushed.shards:
        assert (tmp_path / "pulled" / shard.url).read_bytes() == (local / shard.url).read_bytes()


def test_pull_rejects_a_shard_that_changed(tmp_path: Path, bucket: str) -> None:
    _write_set(tmp_path / "local")
    url = f"s3://{bucket}/v2"
    manifest = shard_sets.push(tmp_path / "local", url, progress=False)
    storage.s3_client().put_object(Bucket=bucket, Key=f"v2/{manifest.shards[1].url}", Body=b"tampered")
    with pytest.raises(StorageError, match=rf"{url}/{manifest.shards[1].url}: sha256 is [0-9a-f]+, the manifest"):
        shard_sets.pull(url, tmp_path / "pulled", progress=False)
    assert not (tmp_path / "pulled" / MANIFEST_NAME).exists(), "an incomplete pull never has a manifest"
    with pytest.raises(ManifestError, match=rf"manifest file not found.*s3://{bucket}/nothing/manifest.json"):
        shard_sets.pull(f"s3://{bucket}/nothing", tmp_path / "x", progress=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_trains_from_s3(tmp_path: Path, bucket: str, num_workers: int) -> None:
    expected = _write_set(tmp_path / "local")  # 4 shards of 6: an epoch covers every sample exactly once
    shard_sets.push(tmp_path / "local", f"s3://{bucket}/train", progress=False)
    for train in (False, True):
        local = _epoch(tmp_path / "local", num_workers, train)
        remote = _epoch(f"s3://{bucket}/train/manifest.json", num_workers, train)
        assert remote == local == expected


def test_stream_resumes_after_a_broken_connection(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = np.random.default_rng(1).bytes(300_000)
    client = storage.s3_client()
    client.put_object(Bucket=bucket, Key="blob", Body=data)
    monkeypatch.setattr(s3.time, "sleep", lambda s: None)

    class Breaks:
        """Stands in for the HTTP body once: the connection drops on the next read."""

        def __init__(self, body):
            self.body = body

        def read(self, size=None):
            raise botocore.exceptions.ResponseStreamingError(error="connection reset by peer")

        def close(self):
            self.body.close()

    stream = storage.open_read(f"s3://{bucket}/blob")
    head = stream.read(100_000)
    stream._body = Breaks(stream._body)
    rest = stream.read()
    assert head + rest == data and stream.resumes == 1
    # The object changes under a reader: the resumed GET is pinned to the first ETag, so it fails loudly.
    stream = storage.open_read(f"s3://{bucket}/blob")
    stream.read(10)
    client.put_object(Bucket=bucket, Key="blob", Body=b"new contents")
    stream._body = Breaks(stream._body)
    with pytest.raises(StorageError, match=rf"s3://{bucket}/blob failed \(PreconditionFailed\)"):
        stream.read()


def test_cli_push_pull(tmp_path: Path, bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    _write_set(tmp_path / "local", num_samples=6)
    url = f"s3://{bucket}/cli"
    assert facescale_main(["data", "push", str(tmp_path / "local"), url]) == 0
    assert facescale_main(["data", "pull", url, str(tmp_path / "back")]) == 0
    assert f"pushed 6 samples in 1 shards to {url}" in capsys.readouterr().out
    assert load_manifest(tmp_path / "back").digest == load_manifest(tmp_path / "local").digest
    assert facescale_main(["data", "pull", f"s3://{bucket}/none", str(tmp_path / "x")]) == 1
    assert "manifest file not found" in capsys.readouterr().err


def test_training_checkpoints_to_s3_and_another_run_resumes_from_there(tmp_path: Path, bucket: str) -> None:
    """Ray Train's storage and the run's checkpoints on s3:// (pyarrow and boto3 both honour AWS_ENDPOINT_URL)."""
    import json

    import ray

    from facescale.checkpoint.committed import resolve_checkpoint
    from facescale.config import load_config
    from facescale.data.synth import synthesize
    from facescale.train.launch import run_training

    synthesize(tmp_path / "d", identities=12, images_per_identity=8, seed=0, difficulty=0.2, held_out_identities=4,
               num_pairs=10, samples_per_shard=48, progress=False)
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    common = [f"data.root={tmp_path / 'd'}", "data.val_bins=[]", "model.backbone=iresnet_nano",
              "model.embedding_size=32", "classifier.type=partial_fc", "train.batch_size=8", "train.max_steps=4",
              "train.checkpoint_every=2", "train.log_every=1", "train.system_metrics_interval_s=null",
              f"scaling.storage_path=s3://{bucket}/runs", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
              f"tracking.artifact_root={tmp_path / 'a'}", "tracking.log_model=false"]
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        first = run_training(load_config(None, [*common, "scaling.num_workers=2"]), ray_run_name="on-s3")
        assert first.checkpoint_path == f"s3://{bucket}/runs/on-s3/checkpoint_00000004"
        names = storage.list_objects(f"s3://{bucket}/runs/on-s3/checkpoint_00000002/")
        assert {"checkpoint.json", "model.pt", "rng_rank0.pt", "rng_rank1.pt", "partial_fc.json"} <= set(names)
        assert resolve_checkpoint(f"s3://{bucket}/runs/on-s3") == first.checkpoint_path
        resume = f"s3://{bucket}/runs/on-s3/checkpoint_00000002"
        second = run_training(load_config(None, [*common, "scaling.num_workers=1", f"train.resume_from={resume}"]),
                              ray_run_name="from-s3")
    finally:
        ray.shutdown()
    summary = json.loads(second.metrics["summary"])
    assert summary["resumed_from"].rstrip("/") == resume and summary["steps_this_attempt"] == 2
    assert second.checkpoint_path == f"s3://{bucket}/runs/from-s3/checkpoint_00000004"
