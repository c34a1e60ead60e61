"""DALI loader, loader choice, resumable loader position and DALI index files. Tiny shards, real DALI (CPU decode)."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from torch import nn

from facescale.checkpoint.format import TrainCheckpoint, TrainProgress
from facescale.config import FaceScaleConfig
from facescale.data import (
    MANIFEST_NAME,
    DataError,
    ImageDecodeError,
    LabelError,
    ShardError,
    ShardSetWriter,
    TorchFaceLoader,
    build_loader,
    build_train_loader,
    load_manifest,
    normalize_images,
)
from facescale.data.dali_loader import DaliFaceLoader, build_dali_loader
from facescale.data.factory import resolve_decode_device
from facescale.data.wds_index import index_text


def _jpeg(value: int, noise: bool = False, size: int = 112) -> bytes:
    if noise:  # incompressible: a file cut in half still has a parsable header
        image = np.random.default_rng(value).integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        image = np.full((size, size, 3), value % 256, np.uint8)
        image[:, : size // 2, 0] = (value * 7) % 256  # not mirror-symmetric, so a mirror changes the tensor
    return simplejpeg.encode_jpeg(image, quality=90, colorspace="RGB")


def _write_set(root: Path, num_samples: int, per_shard: int, num_classes: int = 7, bad: dict[str, bytes] | None = None,
               noise: bool = False) -> dict[str, int]:  # fmt: skip
    """Shards of ``num_samples`` samples (label = index % num_classes); ``bad`` replaces some JPEGs."""
    writer = ShardSetWriter(root, prefix="t", samples_per_shard=per_shard)
    expected = {}
    for i in range(num_samples):
        key = f"s{i:04d}"
        writer.write(key, (bad or {}).get(key, _jpeg(i, noise)), i % num_classes)
        expected[key] = i % num_classes
    writer.close(num_classes=num_classes, source="test")
    return expected


def _dali(root: Path, rank: int = 0, world_size: int = 1, **kw) -> DaliFaceLoader:
    kw = {"batch_size": 5, "seed": 3, "num_threads": 2, "shuffle_buffer": 7, **kw}
    return build_dali_loader(root, rank=rank, world_size=world_size, **kw)


def _torch(root: Path, rank: int = 0, world_size: int = 1, **kw) -> TorchFaceLoader:
    kw = {"batch_size": 5, "seed": 3, "num_workers": 0, "shuffle_buffer": 7, **kw}
    return build_loader(root, rank=rank, world_size=world_size, **kw)


def _pairs(loader, epoch: int) -> list[tuple[str, int]]:
    return [(k, int(label)) for _, labels, keys in loader.epoch_samples(epoch) for k, label in zip(keys, labels)]


@pytest.mark.parametrize("train", [False, True], ids=["in-order", "shuffled"])
def test_dali_and_torch_yield_the_same_samples_over_an_epoch(tmp_path: Path, train: bool) -> None:
    # Exactly comparable only where both epoch policies cover every sample once: 8 equal shards, 2 ranks x 2 torch
    # workers = 4 splits of 2 shards = 20 samples = each split's quota; DALI's rank ranges are 40 = 8 steps x 5.
    # Orders differ (DALI shuffles in its reader, torch per split), so epochs are compared as multisets.
    expected = _write_set(tmp_path, num_samples=80, per_shard=10)
    for epoch in (0, 1):
        dali, torch_ = Counter(), Counter()
        for rank in range(2):
            dali.update(_pairs(_dali(tmp_path, rank, 2, train=train), epoch))
            torch_.update(_pairs(_torch(tmp_path, rank, 2, num_workers=2, train=train), epoch))
        assert dali == torch_ == Counter(expected.items())


def test_dali_uneven_ranges_give_equal_batches_and_distinct_samples(tmp_path: Path) -> None:
    # 23 samples in ONE shard on 2 ranks of batch 4: DALI splits by sample (11 and 12), steps = 23 // 8 = 2 on both.
    expected = _write_set(tmp_path, num_samples=23, per_shard=23)
    seen: list[tuple[str, int]] = []
    for rank in range(2):
        loader = _dali(tmp_path, rank, 2, batch_size=4)
        batches = list(loader.epoch_samples(0))
        assert loader.steps_per_epoch == len(batches) == 2
        assert all(images.shape == (4, 3, 112, 112) and len(keys) == 4 for images, _, keys in batches)
        seen += [(k, int(label)) for _, labels, keys in batches for k, label in zip(keys, labels)]
    assert len(seen) == len(set(seen)) == 16 and set(seen) <= set(expected.items())
    with pytest.raises(DataError, match="an epoch would have no step"):
        _dali(tmp_path, 0, 3, batch_size=8)


def test_dali_images_are_uint8_and_mirrored_like_the_torch_loader(tmp_path: Path) -> None:
    expected = _write_set(tmp_path, num_samples=20, per_shard=10)
    reference = {k: img for images, _, keys in _torch(tmp_path, train=False).epoch_samples(0)
                 for k, img in zip(keys, images)}  # fmt: skip
    for images, labels, keys in _dali(tmp_path, train=False).epoch_samples(0):
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and images.shape == (5, 3, 112, 112)
        assert images.is_contiguous() and not images.is_pinned()  # no CUDA here: nothing to pin for
        assert all(isinstance(k, str) for k in keys) and [expected[k] for k in keys] == labels.tolist()
        for key, image in zip(keys, images):  # the same libjpeg-turbo decode: the same pixels
            assert torch.equal(image, reference[key])
        normalised = normalize_images(images, "cpu")  # what the training step does on its device
        assert normalised.dtype == torch.float32 and -1.0 <= float(normalised.min()) <= float(normalised.max()) <= 1.0
        torch.testing.assert_close(normalised, (images.float() - 127.5) / 127.5)
    mirrored = 0
    for images, _, keys in _dali(tmp_path, train=True).epoch_samples(0):
        for key, image in zip(keys, images):
            flipped = not torch.equal(image, reference[key])
            assert torch.equal(image, reference[key].flip(-1) if flipped else reference[key])
            mirrored += flipped
    assert 0 < mirrored < 20


def test_dali_builds_its_decode_pipeline_once_and_resets_it_per_epoch(tmp_path: Path, monkeypatch) -> None:
    from facescale.data import dali_batch

    _write_set(tmp_path, num_samples=40, per_shard=10)
    builds, readers = Counter(), Counter()
    real_build, real_reader = dali_batch.DecodePipeline._build, dali_batch.build_reader
    monkeypatch.setattr(dali_batch.DecodePipeline, "_build", lambda self: builds.update(["n"]) or real_build(self))
    monkeypatch.setattr("facescale.data.dali_loader.build_reader",
                        lambda *a, **k: readers.update(["n"]) or real_reader(*a, **k))  # fmt: skip
    loader = _dali(tmp_path, batch_size=4)
    epochs = [_pairs(loader, epoch) for epoch in range(3)]
    assert builds["n"] == 1 and readers["n"] == 3, "decode pipeline once per loader; one reader per epoch"
    assert all(len(e) == 40 for e in epochs) and epochs[0] != epochs[1]
    # An epoch left early: the batches still in flight are drained, the pipeline reset, the next epoch exact.
    partial = loader.epoch_samples(0)
    next(partial)
    partial.close()
    assert _pairs(loader, 1) == epochs[1] and builds["n"] == 1
    # One epoch at a time: an older epoch's generator cannot go on once another started.
    first = loader.epoch_samples(0)
    next(first)
    assert len(_pairs(loader, 2)) == 40
    with pytest.raises(RuntimeError, match="another epoch started"):
        next(first)
    loader.close()


@pytest.mark.parametrize("kind", ["dali", "torch-0-workers", "torch-2-workers"])
def test_resume_yields_the_uninterrupted_batches_without_decoding_the_skipped(tmp_path: Path, kind: str,
                                                                              monkeypatch) -> None:  # fmt: skip
    _write_set(tmp_path, num_samples=83, per_shard=10)

    def make():
        if kind == "dali":
            return _dali(tmp_path, batch_size=4)
        return _torch(tmp_path, batch_size=4, num_workers=0 if "0" in kind else 2)

    full = [(x.clone(), y, k) for x, y, k in make().epoch_samples(1)]
    assert len(full) == 20
    decoded = Counter()
    if kind == "torch-0-workers":  # in-process decode: count the calls themselves, besides the loader's counter
        import facescale.data.loader_stream as torch_loader

        real = torch_loader.decode_image
        monkeypatch.setattr(torch_loader, "decode_image", lambda *a: decoded.update(["n"]) or real(*a))
    for start in (1, 5, 19, 20):
        decoded.clear()
        loader = make()
        resumed = list(loader.epoch_samples(1, start_step=start))
        assert len(resumed) == 20 - start
        for (x, y, k), (rx, ry, rk) in zip(full[start:], resumed):
            assert k == rk and torch.equal(y, ry) and torch.equal(x, rx)
        # Every sample of the resumed part is decoded once, none of the skipped part.
        assert loader.stats["samples"] == (20 - start) * 4
        if kind != "torch-2-workers" and start < 20:  # (2 workers: a split with no batch left reports nothing)
            assert loader.stats["fast_forwarded"] == start * 4
        if kind == "torch-0-workers":
            assert decoded["n"] == (20 - start) * 4


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_saved_position_makes_resume_exact_after_skipped_samples(tmp_path: Path, kind: str) -> None:
    # A corrupt image before the restart shifts the raw stream by one: the saved cursor accounts for it, the
    # cursor derived from the step alone does not.
    # 41 samples, 1 corrupt: 10 steps of 4 use every good one (DALI's read-ahead past the end wraps to s0000-2).
    _write_set(tmp_path, num_samples=41, per_shard=10, bad={"s0003": b"\xff\xd8 not a jpeg"})
    make = (lambda: _dali(tmp_path, batch_size=4, on_error="skip", train=False)) if kind == "dali" else (
        lambda: _torch(tmp_path, batch_size=4, on_error="skip", train=False))  # fmt: skip
    loader = make()
    keys, positions = [], []
    for _, _, batch_keys in loader.epoch_samples(0):
        keys.append(batch_keys)
        positions.append(loader.local_position())
    assert loader.stats["skipped_samples"] == 1 and positions[2]["step_in_epoch"] == 3
    assert positions[2]["cursors"] == {"0": 13}  # 12 samples delivered + the skipped one
    json.dumps(positions[2])  # it goes into the checkpoint as is
    exact = [k for _, _, k in make().epoch_samples(0, start_step=3, resume=positions[2])]
    assert exact == keys[3:]
    derived = [k for _, _, k in make().epoch_samples(0, start_step=3)]
    assert derived[0][0] == keys[2][-1]  # one sample replayed: the count of samples skipped before the restart
    other_seed = {**positions[2], "seed": 99}
    assert [k for _, _, k in make().epoch_samples(0, start_step=3, resume=other_seed)] == derived


def test_position_survives_the_training_checkpoint(tmp_path: Path) -> None:
    position = {"loader": "dali", "epoch": 2, "step_in_epoch": 7, "cursors": {"0": 29}}
    model, head = nn.Linear(2, 2), nn.Linear(2, 2)
    saved = TrainProgress(step=9, epoch=2, step_in_epoch=7, world_size=2, local_loader_position=position)
    TrainCheckpoint(model, head, {}, saved).save(tmp_path, rank=1)
    TrainCheckpoint(model, head, {}, TrainProgress()).save(tmp_path, rank=0)  # rank 0 writes progress.json
    assert "local_loader_position" not in json.loads((tmp_path / "progress.json").read_text())
    restored = TrainCheckpoint(model, head, {}, TrainProgress()).load(tmp_path, rank=1)
    assert restored.local_loader_position == position
    # A checkpoint written before positions were saved (RNG state only) still loads, with no position.
    state = torch.load(tmp_path / "rng_rank1.pt", weights_only=False)
    torch.save({k: v for k, v in state.items() if k != "loader_position"}, tmp_path / "rng_rank1.pt")
    assert TrainCheckpoint(model, head, {}, TrainProgress()).load(tmp_path, rank=1).local_loader_position == {}


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_training_loop_resumes_from_a_checkpoint_where_it_stopped(tmp_path: Path, kind: str) -> None:
    from facescale.train.batches import epoch_batches  # the loop's own batch source

    root = tmp_path / "set"
    _write_set(root, num_samples=60, per_shard=10, bad={"s0001": b"not a jpeg"})
    make = (lambda: _dali(root, on_error="skip")) if kind == "dali" else (lambda: _torch(root, on_error="skip"))
    model, head = nn.Linear(2, 2), nn.Linear(2, 2)
    progress = TrainProgress(epoch=1)
    before = []
    for _, _, keys in epoch_batches(make(), progress):  # the loop's bookkeeping, then a checkpoint after step 4
        before.append(keys)
        progress.step += 1
        progress.step_in_epoch += 1
        if progress.step == 4:
            TrainCheckpoint(model, head, {}, progress).save(tmp_path / "ckpt", rank=0)
            break
    restored = TrainCheckpoint(model, head, {}, TrainProgress()).load(tmp_path / "ckpt", rank=0)
    assert (restored.epoch, restored.step_in_epoch) == (1, 4) and restored.local_loader_position["step_in_epoch"] == 4
    after = [keys for _, _, keys in epoch_batches(make(), restored)]
    assert before + after == [keys for _, _, keys in make().epoch_samples(1)]


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_dali_corrupt_images_are_skipped_or_named(tmp_path: Path, on_error: str) -> None:
    # s0005: garbage (stage 2 rejects its header); s0012: cut short (header parses, DALI's decoder fails the
    # pipeline, the loader finds the sample and re-feeds the rest); s0021: wrong size.
    good = {i: _jpeg(i, noise=True) for i in range(40)}
    bad = {"s0005": b"\xff\xd8 not a jpeg", "s0012": good[12][: len(good[12]) * 4 // 5],
           "s0021": _jpeg(21, noise=True, size=96)}  # fmt: skip
    _write_set(tmp_path, num_samples=40, per_shard=10, bad=bad, noise=True)
    loader = _dali(tmp_path, batch_size=4, on_error=on_error, train=False)
    if on_error == "fail":
        with pytest.raises(ImageDecodeError, match=r"t-000000\.tar: sample 's0005' corrupt JPEG") as err:
            list(loader.epoch_samples(0))
        assert err.value.key == "s0005" and err.value.shard.endswith("t-000000.tar")
        loader = _dali(tmp_path, batch_size=4, on_error="fail", train=False)
        with pytest.raises(ImageDecodeError, match=r"t-000001\.tar: sample 's0012': corrupt JPEG \(DALI"):
            list(loader.epoch_samples(0, start_step=2))  # starts past s0005
        return
    keys = [k for _, _, batch_keys in loader.epoch_samples(0) for k in batch_keys]
    assert len(keys) == 40 and not set(bad) & set(keys) and loader.stats["skipped_samples"] == 3
    assert Counter(keys).most_common(1)[0][1] == 2  # 3 skipped: the range wraps, 3 samples come twice


def test_dali_label_errors_name_shard_and_key(tmp_path: Path) -> None:
    _write_set(tmp_path, num_samples=20, per_shard=10, num_classes=7)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest, "num_classes": 5}))
    with pytest.raises(LabelError, match=r"t-000000\.tar: sample 's0005' has label 5 >= num_classes 5"):
        list(_dali(tmp_path, on_error="skip", train=False).epoch_samples(0))


def test_index_files_match_dalis_tool_and_are_built_when_missing(tmp_path: Path, caplog) -> None:
    wds2idx = pytest.importorskip("wds2idx")  # DALI's own index writer, installed with the DALI wheel
    root = tmp_path / "set"
    _write_set(root, num_samples=30, per_shard=10)
    manifest = load_manifest(root)
    assert [s.index for s in manifest.shards] == ["t-000000.idx", "t-000001.idx", "t-000002.idx"]
    with wds2idx.IndexCreator(str(root / "t-000001.tar"), str(tmp_path / "ref.idx"), verbose=False) as creator:
        creator.create_index()
    assert (root / "t-000001.idx").read_text() == (tmp_path / "ref.idx").read_text() == index_text(
        root / "t-000001.tar")[0]  # fmt: skip
    # A manifest from before indices: no `index` field, no .idx files; the loader builds and caches them.
    data = json.loads((root / MANIFEST_NAME).read_text())
    for shard in data["shards"]:
        del shard["index"]
        (root / shard["url"].replace(".tar", ".idx")).unlink()
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="facescale.data.wds_index"):
        assert len(list(_dali(root).epoch_samples(0))) == 6
    assert "building 3 missing DALI index files" in caplog.text and (root / "t-000002.idx").is_file()
    (root / "t-000002.idx").write_text((root / "t-000000.idx").read_text().replace("v1.2 10", "v1.2 9", 1))
    with pytest.raises(ShardError, match=r"t-000002\.tar: index .* lists 9 samples but manifest.json says 10"):
        _dali(root)
    from facescale.cli import main

    assert main(["data", "index", str(root), "--force"]) == 0
    assert [s.index for s in load_manifest(root).shards] == ["t-000000.idx", "t-000001.idx", "t-000002.idx"]
    assert len(list(_dali(root).epoch_samples(0))) == 6


def test_build_train_loader_prefers_dali_and_logs_the_fallback(tmp_path: Path, monkeypatch, caplog) -> None:
    _write_set(tmp_path, num_samples=20, per_shard=10)
    cfg = FaceScaleConfig.model_validate({"data": {"root": str(tmp_path)}, "train": {"batch_size": 5}})
    assert cfg.data.loader == "auto"
    loader = build_train_loader(cfg, 0, 1)
    assert isinstance(loader, DaliFaceLoader) and loader.fallback_reason is None

    def with_loader(kind: str) -> FaceScaleConfig:
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"loader": kind})})

    assert isinstance(build_train_loader(with_loader("dali"), 0, 1), DaliFaceLoader)
    loader = build_train_loader(with_loader("torch"), 0, 1)
    assert isinstance(loader, TorchFaceLoader) and loader.fallback_reason is None
    # Simulate a machine without DALI: a None entry in sys.modules makes `import nvidia.dali` raise ImportError.
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with caplog.at_level(logging.WARNING, logger="facescale.data.factory"):
        loader = build_train_loader(cfg, 0, 1)
    assert isinstance(loader, TorchFaceLoader) and len(list(loader.epoch_samples(0))) == 4
    assert re.search(r"data.loader=auto falls back to the torch loader: \w*Error: .*nvidia\.dali", caplog.text)
    assert re.fullmatch(r"\w*Error: .*nvidia\.dali.*", loader.fallback_reason)  # the loop tags the MLflow run with it
    with pytest.raises(DataError, match=r"data.loader=dali, but DALI cannot be used here: \w*Error: .*nvidia\.dali"):
        build_train_loader(with_loader("dali"), 0, 1)


def test_decode_device_follows_the_worker_device() -> None:
    assert resolve_decode_device("auto", use_gpu=False, device=torch.device("cpu")) == ("cpu", None)
    assert resolve_decode_device("auto", use_gpu=True, device=torch.device("cuda", 3)) == ("mixed", 3)
    assert resolve_decode_device("cpu", use_gpu=True, device=torch.device("cuda", 0)) == ("cpu", None)
    with pytest.raises(DataError, match="data.decode_device=mixed decodes on the worker's GPU"):
        resolve_decode_device("mixed", use_gpu=False, device=torch.device("cpu"))


def _tar_of(path: Path, names: list[str], tar_format: int) -> dict[str, bytes]:
    import io
    import tarfile

    contents = {}
    with tarfile.open(path, "w", format=tar_format) as tar:
        for i, name in enumerate(names):
            contents[name] = data = f"{i}:{name}".encode() * (i + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return contents


# Nested and dotted directories, multi-dot extensions, hidden files, an empty extension and a name past ustar's
# 100 characters; every name has an extension (DALI's tool splits a name without one wrongly, see wds_index).
_INDEX_NAMES = ["a.jpg", "a.cls", "a.tea.npy", "d.x/b.jpg", "d.x/b.cls", "c/.hid.jpg", ".top.jpg", "e.f/.hid.cls",
                "g/h.", "g/h.cls", "long/" + "k" * 120 + ".jpg", "long/" + "k" * 120 + ".cls", "i.jpg"]


def test_index_matches_dalis_tool_on_odd_names(tmp_path: Path) -> None:
    import tarfile

    wds2idx = pytest.importorskip("wds2idx")
    _tar_of(tmp_path / "odd.tar", _INDEX_NAMES, tarfile.PAX_FORMAT)  # Python's default format, as ShardSetWriter's
    with wds2idx.IndexCreator(str(tmp_path / "odd.tar"), str(tmp_path / "ref.idx"), verbose=False) as creator:
        creator.create_index()
    text, count = index_text(tmp_path / "odd.tar")
    assert text == (tmp_path / "ref.idx").read_text() and count == 5  # a, d.x/b, g/h, long/k..k, i; hidden skipped
    members = [line.split(" ")[3::4] for line in text.splitlines()[1:]]
    assert members == [_INDEX_NAMES[0:3], _INDEX_NAMES[3:5], _INDEX_NAMES[8:10], _INDEX_NAMES[10:12], ["i.jpg"]]
    assert text.splitlines()[3].startswith(" ")  # "g/h." has the empty extension: the line starts with its blank


@pytest.mark.parametrize("tar_format", ["PAX_FORMAT", "GNU_FORMAT"])
def test_index_offsets_point_at_member_data(tmp_path: Path, tar_format: str) -> None:
    """Each index entry's offset and size read back its member's bytes, long names included (GNU: LongLink)."""
    import tarfile

    contents = _tar_of(tmp_path / "t.tar", _INDEX_NAMES, getattr(tarfile, tar_format))
    text, _ = index_text(tmp_path / "t.tar")
    raw = (tmp_path / "t.tar").read_bytes()
    entries = [line.split(" ") for line in text.splitlines()[1:]]
    seen = {}
    for fields in entries:
        for ext, offset, size, name in zip(*[iter(fields)] * 4):
            assert name.endswith(f".{ext}")
            seen[name] = raw[int(offset) : int(offset) + int(size)]
    assert seen == {n: d for n, d in contents.items() if "/." not in n and not n.startswith(".")}


def test_dali_batch_keys_follow_the_index_rule() -> None:
    from facescale.data.dali_batch import parse_source_infos
    from facescale.data.wds_index import split_member

    infos = [f"/s/t-0.tar:{1536 * i}:{name}".encode() for i, name in enumerate(_INDEX_NAMES)]
    width = max(map(len, infos))
    padded = np.frombuffer(b"".join(i.ljust(width, b"\0") for i in infos), np.uint8).reshape(len(infos), width)
    keys, shards = parse_source_infos(padded)  # DALI's source_info: tar path, data offset, member name
    assert keys == [split_member(n)[0] for n in _INDEX_NAMES] and set(shards) == {"/s/t-0.tar"}
    assert keys[:5] == ["a", "a", "a", "d.x/b", "d.x/b"] and keys[8] == "g/h"
