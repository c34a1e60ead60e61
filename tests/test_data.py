"""Tests of the data layer: shard contract, manifest, synthetic identities, torch loader. Tiny data, fast."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
import webdataset as wds

from facescale.data import (
    MANIFEST_NAME,
    VERIFICATION_NAME,
    DataError,
    FaceLoader,
    ImageDecodeError,
    LabelError,
    ManifestError,
    ShardError,
    ShardSetWriter,
    build_loader,
    iter_shard,
    load_manifest,
    normalize_images,
    synthesize,
    verify_manifest,
)
from facescale.data.manifest import digest_of

IDENTITIES, IMAGES_PER_IDENTITY, HELD_OUT, PAIRS = 6, 3, 4, 6


def _jpeg(value: int) -> bytes:
    image = np.full((112, 112, 3), value % 256, np.uint8)
    image[:, :56, 0] = (value * 7) % 256  # not mirror-symmetric, so a flip changes the tensor
    return simplejpeg.encode_jpeg(image, quality=90, colorspace="RGB")


def _write_set(root: Path, num_samples: int, per_shard: int, num_classes: int, corrupt: tuple[str, ...] = ()):
    """Write ``num_samples`` samples (label = index % num_classes); keys in ``corrupt`` get garbage JPEG bytes."""
    writer = ShardSetWriter(root, prefix="t", samples_per_shard=per_shard)
    expected = {}
    for i in range(num_samples):
        key = f"s{i:04d}"
        jpeg = b"\xff\xd8 definitely not a jpeg" if key in corrupt else _jpeg(i)
        writer.write(key, jpeg, i % num_classes, {"index": i})
        expected[key] = i % num_classes
    return writer.close(num_classes=num_classes, source="test"), expected


def _edit_manifest(root: Path, **changes) -> None:
    path = root / MANIFEST_NAME
    data = json.loads(path.read_text())
    for name, change in changes.items():
        data[name] = change(data[name])
    path.write_text(json.dumps(data))


def _training_keys(root: Path) -> dict[str, dict]:
    manifest = load_manifest(root)
    return {s["__key__"]: s for url in manifest.shard_urls() for s in iter_shard(url)}


# --- synthetic identities ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    synthesize(out, IDENTITIES, IMAGES_PER_IDENTITY, seed=3, difficulty=0.7, held_out_identities=HELD_OUT,
               num_pairs=PAIRS, samples_per_shard=8, progress=False)  # fmt: skip
    return out


def test_synth_is_deterministic(synth_dir: Path, tmp_path: Path) -> None:
    kwargs = dict(held_out_identities=HELD_OUT, num_pairs=PAIRS, samples_per_shard=8, progress=False)
    again = synthesize(tmp_path / "b", IDENTITIES, IMAGES_PER_IDENTITY, seed=3, difficulty=0.7, **kwargs)
    other = synthesize(tmp_path / "c", IDENTITIES, IMAGES_PER_IDENTITY, seed=4, difficulty=0.7, **kwargs)
    first = load_manifest(synth_dir)
    assert again.digest == first.digest
    assert other.digest != first.digest
    assert (tmp_path / "b" / VERIFICATION_NAME).read_bytes() == (synth_dir / VERIFICATION_NAME).read_bytes()


def test_synth_shards_are_shuffled_and_complete(synth_dir: Path) -> None:
    manifest = load_manifest(synth_dir)
    verify_manifest(manifest, decode_images=True)
    assert manifest.num_samples == IDENTITIES * IMAGES_PER_IDENTITY and manifest.num_classes == IDENTITIES
    samples = [s for url in manifest.shard_urls() for s in iter_shard(url)]
    labels = [int(s["cls"]) for s in samples]
    assert sorted(labels) == sorted(list(range(IDENTITIES)) * IMAGES_PER_IDENTITY)
    assert labels != sorted(labels), "samples must be shuffled globally before writing"
    for s in samples:
        assert json.loads(s["json"]) == {"identity": int(s["cls"]), "source": "synth"}


def test_synth_verification_bin_uses_held_out_identities(synth_dir: Path) -> None:
    with open(synth_dir / VERIFICATION_NAME, "rb") as f:
        jpegs, issame = pickle.load(f)
    assert isinstance(jpegs, list) and isinstance(issame, list)
    assert len(jpegs) == 2 * PAIRS and len(issame) == PAIRS
    assert sum(issame) == PAIRS // 2 and all(isinstance(x, bool) for x in issame)
    assert all(simplejpeg.decode_jpeg(j).shape == (112, 112, 3) for j in jpegs)
    info = json.loads((synth_dir / "verification.json").read_text())
    training_ids = {json.loads(s["json"])["identity"] for s in _training_keys(synth_dir).values()}
    assert set(info["held_out_identities"]).isdisjoint(training_ids)
    for (a, b), same in zip(info["pairs"], issame):
        assert a in info["held_out_identities"] and b in info["held_out_identities"]
        assert (a == b) == same
    assert len(set(jpegs)) == len(jpegs), "every pair image is a distinct rendering"


# --- shards and manifest -------------------------------------------------------------------------------------------


def test_shards_round_trip(tmp_path: Path) -> None:
    manifest, expected = _write_set(tmp_path, num_samples=10, per_shard=4, num_classes=3)
    loaded = load_manifest(tmp_path)
    assert [s.num_samples for s in loaded.shards] == [4, 4, 2]
    assert [s.url for s in loaded.shards] == ["t-000000.tar", "t-000001.tar", "t-000002.tar"]
    assert loaded.digest == manifest.digest == digest_of([s.sha256 for s in loaded.shards])
    assert loaded.creator.startswith("facescale ") and loaded.image_size == (112, 112)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["image_size"] == [112, 112]
    samples = _training_keys(tmp_path)
    assert {k: int(s["cls"]) for k, s in samples.items()} == expected
    assert all(s["cls"].isdigit() for s in samples.values()), "labels are ASCII integers, never floats"
    assert json.loads(samples["s0007"]["json"]) == {"index": 7}
    verify_manifest(loaded, decode_images=True)


def test_verify_catches_count_mismatch(tmp_path: Path) -> None:
    _write_set(tmp_path, num_samples=8, per_shard=4, num_classes=2)
    _edit_manifest(tmp_path, shards=lambda s: [{**s[0], "num_samples": 5}, *s[1:]], num_samples=lambda n: n + 1)
    with pytest.raises(ShardError, match=r"t-000000\.tar: manifest says 5 samples, shard holds 4"):
        verify_manifest(load_manifest(tmp_path))


def test_verify_catches_bad_label(tmp_path: Path) -> None:
    _write_set(tmp_path, num_samples=8, per_shard=4, num_classes=8)
    _edit_manifest(tmp_path, num_classes=lambda n: 6)
    with pytest.raises(LabelError, match=r"t-000001\.tar: sample 's0006' has label 6 >= num_classes 6") as info:
        verify_manifest(load_manifest(tmp_path))
    assert info.value.key == "s0006"


def test_writer_rejects_label_beyond_num_classes(tmp_path: Path) -> None:
    writer = ShardSetWriter(tmp_path, samples_per_shard=4)
    writer.write("a", _jpeg(0), 0)
    writer.write("b", _jpeg(1), 9)
    with pytest.raises(LabelError, match=r"shard-000000\.tar: sample 'b' has label 9 >= num_classes 3"):
        writer.close(num_classes=3, source="test")
    assert not (tmp_path / MANIFEST_NAME).exists()
    with pytest.raises(LabelError, match="'c' has label 1.0"):
        ShardSetWriter(tmp_path / "x").write("c", _jpeg(0), 1.0)  # type: ignore[arg-type]


def test_load_manifest_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(ManifestError, match=f"dataset directory not found: {missing}"):
        load_manifest(missing)
    with pytest.raises(ManifestError, match=f"manifest file not found: {tmp_path / MANIFEST_NAME}"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match=f"cannot read manifest {tmp_path / MANIFEST_NAME}"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"shards": [], "num_classes": 0, "extra": 1}))
    with pytest.raises(ManifestError, match=r"invalid manifest .*num_classes.*extra"):
        load_manifest(tmp_path)


# --- loader ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_equal_batches_on_every_rank(tmp_path: Path, num_workers: int) -> None:
    _write_set(tmp_path, num_samples=27, per_shard=6, num_classes=5)  # shards of 6, 6, 6, 6, 3
    for rank in (0, 1):
        loader = build_loader(tmp_path, batch_size=4, rank=rank, world_size=2, seed=0, num_workers=num_workers)
        assert isinstance(loader, FaceLoader)
        assert loader.steps_per_epoch == 27 // 8
        batches = list(loader.epoch_batches(0))
        assert len(batches) == loader.steps_per_epoch
        for images, labels in batches:
            assert images.shape == (4, 3, 112, 112) and images.dtype == torch.uint8 and images.is_contiguous()
            assert labels.shape == (4,) and labels.dtype == torch.int64
            normalised = normalize_images(images, "cpu")  # what the training step does on its device
            assert normalised.dtype == torch.float32 and normalised.min() >= -1.0 and normalised.max() <= 1.0
            assert labels.min() >= 0 and labels.max() < 5
        assert loader.stats["samples"] == 4 * loader.steps_per_epoch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_epoch_covers_every_sample_when_shards_divide_evenly(tmp_path: Path, num_workers: int) -> None:
    _, expected = _write_set(tmp_path, num_samples=32, per_shard=8, num_classes=7)
    loader = build_loader(tmp_path, batch_size=4, rank=0, world_size=1, seed=1, num_workers=num_workers)
    seen = {}
    order = []
    for _, labels, keys in loader.epoch_samples(0):
        seen.update(zip(keys, labels.tolist()))
        order += keys
    assert len(order) == 32 and seen == expected
    assert loader.stats["wraps"] == 0
    assert order == [k for _, _, keys in loader.epoch_samples(0) for k in keys], "same (seed, epoch), same order"
    assert order != [k for _, _, keys in loader.epoch_samples(1) for k in keys], "a new epoch reshuffles"


def test_loader_workers_persist_across_epochs_and_see_each_epoch(tmp_path: Path) -> None:
    # 4 shards of 8, 2 workers: the DataLoader's worker processes start once; each epoch (and a restart inside
    # one) reaches them through shared memory, and gives what a fresh loader gives for that epoch.
    _write_set(tmp_path, num_samples=32, per_shard=8, num_classes=7)

    def make():
        return build_loader(tmp_path, batch_size=4, rank=0, world_size=1, seed=1, num_workers=2)

    def keys(loader, epoch, start_step=0):
        return [k for _, _, batch in loader.epoch_samples(epoch, start_step=start_step) for k in batch]

    loader = make()
    first = keys(loader, 0)
    workers = loader._loader._iterator._workers  # the DataLoader's worker processes
    pids = [w.pid for w in workers]
    assert keys(loader, 1) == keys(make(), 1) and keys(loader, 0) == first != keys(loader, 1)
    assert keys(loader, 2, start_step=3) == keys(make(), 2)[3 * 4 :]
    assert [w.pid for w in loader._loader._iterator._workers] == pids and all(w.is_alive() for w in workers)
    # An epoch left early: the next one is still exact (the DataLoader drains what the workers had prefetched).
    partial = loader.epoch_samples(1)
    next(partial)
    partial.close()
    assert keys(loader, 1) == keys(make(), 1)
    del loader
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers), "dropping the loader stops its workers"


def test_loader_wraps_around_short_splits(tmp_path: Path) -> None:
    _write_set(tmp_path, num_samples=12, per_shard=4, num_classes=3)  # 3 shards, 2 ranks: one rank gets one shard
    counts = []
    for rank in (0, 1):
        loader = build_loader(tmp_path, batch_size=6, rank=rank, world_size=2, seed=0, num_workers=0)
        assert len(list(loader.epoch_batches(0))) == 1
        counts.append(loader.stats["wraps"])
    assert max(counts) >= 1


def test_loader_label_errors_name_the_key(tmp_path: Path) -> None:
    _write_set(tmp_path, num_samples=8, per_shard=8, num_classes=8)
    _edit_manifest(tmp_path, num_classes=lambda n: 4)
    loader = build_loader(tmp_path, batch_size=8, rank=0, world_size=1, seed=0, num_workers=0, on_error="skip")
    with pytest.raises(LabelError, match=r"t-000000\.tar: sample 's000[4-7]' has label [4-7] >= num_classes 4"):
        list(loader.epoch_batches(0))
    with wds.TarWriter(str(tmp_path / "t-000000.tar"), encoder=False) as tar:
        for i in range(8):
            tar.write({"__key__": f"n{i}", "jpg": _jpeg(i), **({"cls": b"1"} if i != 5 else {})})
    with pytest.raises(LabelError, match=r"sample 'n5' has no \.cls"):
        list(build_loader(tmp_path, batch_size=8, rank=0, world_size=1, seed=0, num_workers=0).epoch_batches(0))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_corrupt_jpeg_fails_or_is_skipped(tmp_path: Path, num_workers: int) -> None:
    _write_set(tmp_path, num_samples=16, per_shard=4, num_classes=3, corrupt=("s0009",))
    strict = build_loader(tmp_path, batch_size=4, rank=0, world_size=1, seed=0, num_workers=num_workers)
    with pytest.raises(ImageDecodeError, match=r"t-000002\.tar: sample 's0009': corrupt JPEG"):
        list(strict.epoch_batches(0))
    lenient = build_loader(tmp_path, batch_size=4, rank=0, world_size=1, seed=0, num_workers=num_workers,
                           on_error="skip")  # fmt: skip
    assert len(list(lenient.epoch_batches(0))) == lenient.steps_per_epoch == 4
    assert lenient.stats["skipped_samples"] == 1 and lenient.stats["wraps"] >= 1


def test_loader_skips_unreadable_shard(tmp_path: Path) -> None:
    _write_set(tmp_path, num_samples=16, per_shard=4, num_classes=3)
    (tmp_path / "t-000001.tar").write_bytes(b"\0garbage" * 100)
    with pytest.raises(ShardError, match=r"t-000001\.tar"):
        list(build_loader(tmp_path, batch_size=4, rank=0, world_size=1, seed=0, num_workers=0).epoch_batches(0))
    loader = build_loader(tmp_path, batch_size=4, rank=0, world_size=1, seed=0, num_workers=0, on_error="skip")
    assert len(list(loader.epoch_batches(0))) == 4
    assert loader.stats["skipped_shards"] >= 1


def test_loader_sizes_come_from_the_manifest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_set(tmp_path, num_samples=6, per_shard=2, num_classes=2)
    with pytest.raises(DataError, match="an epoch would have no step"):
        build_loader(tmp_path, batch_size=4, rank=0, world_size=2, seed=0)
    with pytest.raises(DataError, match="3 shards for world_size 4"):
        build_loader(tmp_path, batch_size=1, rank=0, world_size=4, seed=0)
    with caplog.at_level(logging.WARNING, logger="facescale.data.loader"):
        loader = build_loader(tmp_path, batch_size=1, rank=1, world_size=2, seed=0, num_workers=4)
    assert loader.num_workers == 1 and "using 1 workers per rank" in caplog.text
    assert loader.steps_per_epoch == 3
    # The manifest alone sets the epoch length (nothing is scanned): claim twice the samples and the epoch doubles.
    _edit_manifest(tmp_path, shards=lambda s: [{**x, "num_samples": 4, "sha256": None} for x in s],
                   num_samples=lambda n: 12)  # fmt: skip
    assert build_loader(tmp_path, batch_size=1, rank=1, world_size=2, seed=0, num_workers=0).steps_per_epoch == 6


def test_loader_refuses_shard_whose_count_disagrees_with_manifest(tmp_path):
    """A manifest that claims more samples than a shard holds is an error naming the shard and both counts."""
    from facescale.data import ShardError, build_loader, synthesize

    root = tmp_path / "counts"
    synthesize(root, identities=4, images_per_identity=4, seed=0, difficulty=0.0, held_out_identities=2,
               num_pairs=10, samples_per_shard=8, progress=False)
    meta = json.loads((root / "manifest.json").read_text())
    meta["shards"][0]["num_samples"] += 3
    meta["num_samples"] += 3
    (root / "manifest.json").write_text(json.dumps(meta))
    loader = build_loader(root, batch_size=4, rank=0, world_size=1, seed=0, num_workers=0, train=False)
    with pytest.raises(ShardError, match=r"holds 8 samples but manifest.json says 11") as exc:
        for _ in loader.epoch_batches(0):
            pass
    assert meta["shards"][0]["url"] in str(exc.value)


# --- tar member names: webdataset's key rule (torch loader) and DALI's (index files, DALI batches) ------------------

# Names where the rules agree (<key>.<ext>, dots in directories and extensions) and where they differ (no extension,
# hidden files, a dotted directory above a hidden file, an upper-case extension).
_MEMBER_NAMES = ["a.jpg", "a.cls", "a.tea.npy", "d.x/b.JPG", "d.x/b.cls", "README", "c/README", "c/.hid.jpg",
                 "c/.hid.cls", "e.f/.hid.jpg", ".top.jpg", "g/h.jpg", "g/h.", "i.jpg"]


def _tar_of(path: Path, names: list[str]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(names):
            data = f"{i}:{name}".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_reader_groups_members_like_webdataset(tmp_path: Path) -> None:
    """The torch loader's reader makes the samples webdataset's own iterator makes, on names that probe the rule."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from facescale.data.tar_reader import iter_tar_samples

    path = _tar_of(tmp_path / "names.tar", _MEMBER_NAMES)
    with path.open("rb") as f:
        ours = list(iter_tar_samples(f, str(path)))
    with path.open("rb") as f:
        files = ({**member, "__url__": str(path)} for member in tar_file_iterator(f))
        reference = list(group_by_keys(files))
    assert ours == reference
    keys = [s["__key__"] for s in ours]
    assert keys == ["a", "d.x/b", "c/", "g/h", "i"]  # by hand: README, e.f/.hid.jpg and .top.jpg are no samples
    assert ours[1]["jpg"] == b"3:d.x/b.JPG" and ours[2]["hid.cls"] == b"8:c/.hid.cls" and ours[3][""] == b"12:g/h."


def _split_by_hand(name: str) -> tuple[str, str]:
    """DALI's rule written out: the key ends before the first dot after the last slash; no such dot: all key."""
    last_slash = max((i for i, c in enumerate(name) if c == "/"), default=-1)
    dots = [i for i, c in enumerate(name) if c == "." and i > last_slash]
    return (name, "") if not dots else (name[: dots[0]], name[dots[0] + 1 :])


def test_dali_split_matches_hand_rule_and_webdataset_on_plain_names() -> None:
    """``wds_index.split_member`` (DALI's rule) against the rule written out, on random names over ``a b . /``."""
    from webdataset.tariterators import base_plus_ext

    from facescale.data.wds_index import split_member

    rng = np.random.default_rng(0)
    names = ["".join(rng.choice(list("ab./"), size=rng.integers(1, 9))) for _ in range(3000)] + _MEMBER_NAMES
    for name in names:
        key, ext = split_member(name)
        assert (key, ext) == _split_by_hand(name), name
        last = key.rsplit("/", 1)[-1]
        if ext and last:  # a non-empty key component and an extension: webdataset's rule splits the same way
            assert base_plus_ext(name) == (key, ext), name
