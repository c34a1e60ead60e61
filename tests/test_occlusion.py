"""Occlusion-aware training: region boxes, keyed erase draws, both loaders through the factory, config errors, and
the synthetic occluded verification set. Real loaders (torch and DALI on CPU) over the tiny_data shards."""

from __future__ import annotations

import hashlib
import json
import pickle
import typing
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

from facescale.config import ConfigError, OcclusionRegion, load_config
from facescale.data import FaceLoader, build_train_loader, synthesize
from facescale.data.align import ARCFACE_TEMPLATE
from facescale.data.factory import dali_unavailable
from facescale.data.occlusion import (
    REGIONS,
    OcclusionLoader,
    check_regions,
    draw_occlusions,
    erase,
    region_boxes,
    with_occlusion,
)
from facescale.data.synth import (
    OCCLUDED_VERIFICATION_NAME,
    OCCLUDERS,
    VERIFICATION_NAME,
    FaceRenderer,
    render_jpeg,
    sample_identities,
)

KEYS = [f"{i:07d}_{j:05d}" for i in range(40) for j in range(5)]  # 200 keys in the synth key format


def _inside(box: tuple[int, int, int, int], x: float, y: float) -> bool:
    top, left, bottom, right = box
    return left <= x < right and top <= y < bottom


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, 112, 112), dtype=np.uint8))


def _box_mask(box: tuple[int, int, int, int], h: int = 112, w: int = 112) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = True
    return mask


def test_region_boxes_frame_the_template_landmarks() -> None:
    boxes = region_boxes()
    assert tuple(boxes) == REGIONS == typing.get_args(OcclusionRegion), "config and data layer list the same regions"
    # By hand from ARCFACE_TEMPLATE, d = 73.5318 - 38.2946 = 35.237 px: eyes rows 51.599 -+ 0.3 d = 41.03..62.17,
    # half-width (35.237 / 2 + 0.4 d) = 31.71 about column 56 -> columns 24..88.
    assert boxes["eyes"] == (41, 24, 62, 88)
    assert boxes["nose"] == (56, 45, 81, 67) and boxes["mouth"] == (83, 33, 101, 79)
    (le, re, nose, lm, rm) = ARCFACE_TEMPLATE.tolist()
    margin = 5  # every landmark at least 5 px inside its own box
    for name, points in (("eyes", [le, re]), ("nose", [nose]), ("mouth", [lm, rm])):
        top, left, bottom, right = boxes[name]
        for x, y in points:
            assert left + margin <= x < right - margin and top + margin <= y < bottom - margin, (name, x, y)
    assert not any(_inside(boxes["eyes"], x, y) for x, y in (nose, lm, rm))
    assert not any(_inside(boxes["nose"], x, y) for x, y in (le, re, lm, rm))
    assert not any(_inside(boxes["mouth"], x, y) for x, y in (le, re, nose))
    for name in ("eyes", "nose", "mouth", "upper", "lower"):  # mirror-symmetric: columns c <-> 111 - c
        _, left, _, right = boxes[name]
        mask = _box_mask(boxes[name])
        assert left + right == 112 and torch.equal(mask, mask.flip(-1)), name
    assert torch.equal(_box_mask(boxes["left"]).flip(-1), _box_mask(boxes["right"]))
    for a, b in (("upper", "lower"), ("left", "right")):  # the halves partition the canvas
        ma, mb = _box_mask(boxes[a]), _box_mask(boxes[b])
        assert not (ma & mb).any() and (ma | mb).all() and int(ma.sum()) == int(mb.sum()) == 112 * 56
    big = region_boxes(224, 224)  # scaled with the canvas
    assert big["eyes"] == (82, 49, 124, 175) and big["lower"] == (112, 0, 224, 224)


def test_draws_depend_on_seed_epoch_and_key_only_not_on_batch_order() -> None:
    images = _images(len(KEYS))
    whole = erase(images.clone(), draw_occlusions(KEYS, 0.5, REGIONS, seed=7, epoch=2))
    order = np.random.default_rng(1).permutation(len(KEYS))
    for chunk in np.array_split(order, 9):  # other batch compositions and orders, other batch sizes
        keys = [KEYS[i] for i in chunk]
        part = erase(images[chunk].clone(), draw_occlusions(keys, 0.5, REGIONS, seed=7, epoch=2))
        assert torch.equal(part, whole[chunk])
    draws = draw_occlusions(KEYS, 0.5, REGIONS, seed=7, epoch=2)
    assert draws == draw_occlusions(KEYS, 0.5, list(REGIONS), seed=7, epoch=2)
    assert draws != draw_occlusions(KEYS, 0.5, REGIONS, seed=7, epoch=3), "a new draw every epoch"
    assert draws != draw_occlusions(KEYS, 0.5, REGIONS, seed=8, epoch=2), "and for another seed"
    # The hash is fixed, so the draws are the same in every process and on every machine (no Python hash()).
    h = hashlib.blake2b(f"facescale-occlusion/7/2/{KEYS[0]}".encode(), digest_size=24).digest()
    expected = (None if int.from_bytes(h[:8], "little") >= int(0.5 * 2**64)
                else (REGIONS[int.from_bytes(h[8:16], "little") % 7], (h[16], h[17], h[18])))  # fmt: skip
    assert draws[0] == expected


def test_p0_leaves_batches_unchanged_and_p1_erases_exactly_the_region() -> None:
    images = _images(len(KEYS))
    assert draw_occlusions(KEYS, 0.0, REGIONS, 0, 0) == [None] * len(KEYS)
    assert torch.equal(erase(images.clone(), draw_occlusions(KEYS, 0.0, REGIONS, 0, 0)), images)
    boxes = region_boxes()
    for region in REGIONS:
        draws = draw_occlusions(KEYS, 1.0, [region], seed=0, epoch=0)
        out = erase(images.clone(), draws)
        mask = _box_mask(boxes[region])
        fills = torch.tensor([d[1] for d in draws], dtype=torch.uint8)  # every sample drawn, with its own colour
        assert all(d[0] == region for d in draws) and len({d[1] for d in draws}) > 150
        assert torch.equal(out[:, :, ~mask], images[:, :, ~mask]), f"{region}: pixels outside the box changed"
        assert torch.equal(out[:, :, mask], fills[:, :, None].expand(-1, -1, int(mask.sum()))), region
    draws = draw_occlusions(KEYS, 1.0, REGIONS, seed=0, epoch=0)
    counts = {r: sum(d[0] == r for d in draws) for r in REGIONS}
    assert all(13 <= c <= 45 for c in counts.values()), counts  # uniform: 200 / 7 = 28.6 each
    many = [f"k{i}" for i in range(4000)]
    erased = sum(d is not None for d in draw_occlusions(many, 0.3, REGIONS, seed=0, epoch=0))
    assert abs(erased / 4000 - 0.3) < 0.03, erased  # 4 sigma
    host = _images(2).pin_memory() if torch.cuda.is_available() else _images(2)
    assert erase(host, draw_occlusions(["a", "b"], 1.0, ["eyes"], 0, 0)) is host  # in place, storage kept


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown occlusion region 'chin'; valid regions: eyes, nose, mouth, upper, "
                                         r"lower, left, right"):  # fmt: skip
        check_regions(["eyes", "chin"])
    with pytest.raises(ValueError, match="no occlusion regions given"):
        draw_occlusions(["a"], 0.5, [], 0, 0)
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        OcclusionLoader(object(), 1.5, REGIONS, 0)
    with pytest.raises(TypeError, match="uint8"):
        erase(_images(1).float(), [("eyes", (0, 0, 0))])
    with pytest.raises(ValueError, match="2 occlusion draws for a batch of 1"):
        erase(_images(1), [None, None])


@pytest.mark.parametrize(("override", "message"), [
    ("data.augment.occlusion.regions=[eyes,chin]",
     "data.augment.occlusion.regions.1: Input should be 'eyes', 'nose', 'mouth', 'upper', 'lower', 'left' or 'right'"),
    ("data.augment.occlusion.regions=[]", "data.augment.occlusion.regions: List should have at least 1 item"),
    ("data.augment.occlusion.p=1.5", "data.augment.occlusion.p: Input should be less than or equal to 1"),
    ("data.augment.occlusion.prob=0.5", "data.augment.occlusion.prob: unknown key"),
    ("data.augment.cutout.p=0.5", "data.augment.cutout: unknown key"),
])  # fmt: skip
def test_config_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "unknown key" in message or "(got" in str(info.value)  # a wrong value is shown too


def _loader(root: Path, kind: str, p: float, regions: str = "[eyes,nose,mouth,upper,lower,left,right]",
            seed: int = 3):  # fmt: skip
    cfg = load_config(None, [f"data.root={root}", f"data.loader={kind}", "data.num_workers=0", "train.batch_size=8",
                             f"train.seed={seed}", f"data.augment.occlusion.p={p}",
                             f"data.augment.occlusion.regions={regions}"])  # fmt: skip
    return build_train_loader(cfg, rank=0, world_size=1)


def _epoch(loader, epoch: int, start_step: int = 0) -> dict[str, torch.Tensor]:
    return {k: img for images, _, keys in loader.epoch_samples(epoch, start_step) for k, img in zip(keys, images)}


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_both_loaders_erase_the_same_pixels_for_the_same_keys(tiny_data: Path, kind: str) -> None:
    if kind == "dali" and (reason := dali_unavailable()):
        pytest.skip(f"DALI does not import here: {reason}")
    clean = _loader(tiny_data, kind, 0.0)
    assert not isinstance(clean, OcclusionLoader), "p=0: the loader itself, untouched"
    occluded = _loader(tiny_data, kind, 0.6)
    assert isinstance(occluded, OcclusionLoader) and isinstance(occluded, FaceLoader)
    assert occluded.steps_per_epoch == clean.steps_per_epoch == 24 and occluded.manifest.num_classes == 12
    assert type(occluded.inner).__name__ == ("DaliFaceLoader" if kind == "dali" else "TorchFaceLoader")
    boxes = region_boxes()
    erased_regions = []
    for epoch in (0, 1):
        before, after = _epoch(clean, epoch), _epoch(occluded, epoch)
        assert len(before) == len(after) == 192 and set(before) == set(after)
        draws = dict(zip(after, draw_occlusions(list(after), 0.6, REGIONS, seed=3, epoch=epoch)))
        for key, image in after.items():
            if draws[key] is None:
                assert torch.equal(image, before[key])
                continue
            region, fill = draws[key]
            top, left, bottom, right = boxes[region]  # image coordinates: after the loader's mirror
            expected = before[key].clone()
            expected[:, top:bottom, left:right] = torch.tensor(fill, dtype=torch.uint8)[:, None, None]
            assert torch.equal(image, expected), (key, region)
            erased_regions.append(region)
    assert 0.45 < len(erased_regions) / 384 < 0.75 and set(erased_regions) == set(REGIONS)
    # Resumed mid-epoch: the same erased batches as the uninterrupted epoch (the draws do not depend on position).
    tail = _epoch(occluded, 1, start_step=20)
    assert len(tail) == 32 and all(torch.equal(img, after[k]) for k, img in tail.items())
    if kind == "dali":
        occluded.close()
        clean.close()


def test_loaders_agree_pixel_for_pixel_under_occlusion(tiny_data: Path) -> None:
    # The two loaders decode with the same libjpeg-turbo and cover the same 192 samples; where one mirrored a
    # sample and the other did not, the erased box (mirror-symmetric for eyes/nose/mouth) is still the same.
    if reason := dali_unavailable():
        pytest.skip(f"DALI does not import here: {reason}")
    dali = _loader(tiny_data, "dali", 1.0, "[eyes,nose,mouth]")
    torch_images, dali_images = _epoch(_loader(tiny_data, "torch", 1.0, "[eyes,nose,mouth]"), 0), _epoch(dali, 0)
    assert set(torch_images) == set(dali_images)
    same = flipped = 0
    for key, image in torch_images.items():
        other = dali_images[key]
        if torch.equal(image, other):
            same += 1
        else:
            assert torch.equal(image, other.flip(-1)), key
            flipped += 1
    assert same > 0 and flipped > 0
    dali.close()


def _decode(jpeg: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(jpeg, colorspace="RGB").astype(np.int16)


def test_synth_occluded_pairs_have_exactly_one_occluded_face(tmp_path: Path) -> None:
    kw = {"identities": 3, "images_per_identity": 2, "seed": 5, "difficulty": 0.3, "held_out_identities": 6,
          "num_pairs": 16, "samples_per_shard": 8, "progress": False}  # fmt: skip
    plain, with_occ = tmp_path / "plain", tmp_path / "occ"
    synthesize(plain, **kw)
    synthesize(with_occ, occluded_pairs=16, **kw)

    def digests(root: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.name != "manifest.json"}

    assert not (plain / OCCLUDED_VERIFICATION_NAME).exists()
    extra = {OCCLUDED_VERIFICATION_NAME, "verification_occluded.json"}
    assert set(digests(with_occ)) == set(digests(plain)) | extra
    assert all(digests(with_occ)[n] == d for n, d in digests(plain).items()), "the default set's bytes changed"
    assert json.loads((with_occ / "manifest.json").read_text())["digest"] == \
        json.loads((plain / "manifest.json").read_text())["digest"]  # fmt: skip

    with open(with_occ / OCCLUDED_VERIFICATION_NAME, "rb") as f:
        jpegs, issame = pickle.load(f)
    with open(plain / VERIFICATION_NAME, "rb") as f:
        clean_jpegs, clean_issame = pickle.load(f)
    info = json.loads((with_occ / "verification_occluded.json").read_text())
    assert len(jpegs) == 32 and issame == clean_issame and len(info["occluded"]) == 16
    assert info["pairs"] == json.loads((plain / "verification.json").read_text())["pairs"]  # the same pairs
    latents, _ = sample_identities(6, 5, 0.3, held_out=True)
    renderer = FaceRenderer()
    kinds = []
    for i, ((a, b), (side, kind)) in enumerate(zip(info["pairs"], info["occluded"])):
        assert side in (0, 1) and kind in OCCLUDERS
        kinds.append(kind)
        for j, identity in enumerate((a, b)):
            image = _decode(jpegs[2 * i + j])
            unoccluded = render_jpeg(renderer, latents[identity - 3], 5, identity, 2 * i + j, 0.3)
            if j != side:
                assert jpegs[2 * i + j] == unoccluded == clean_jpegs[2 * i + j], f"pair {i}: face {j} changed"
                continue
            changed = np.abs(image - _decode(unoccluded)).max(axis=2) > 40
            # An occluder over the face: a visible share of the canvas, and at least part of it on the inner face.
            assert 0.02 < changed.mean() < 0.6, (i, kind, changed.mean())
            assert changed[40:100, 30:82].mean() > 0.05, (i, kind)
            assert render_jpeg(renderer, latents[identity - 3], 5, identity, 2 * i + j, 0.3, kind) == jpegs[2 * i + j]
    assert set(kinds) == set(OCCLUDERS)


def test_occlusion_loader_delegates_everything_else(tiny_data: Path) -> None:
    inner = _loader(tiny_data, "torch", 0.0)
    wrapped = with_occlusion(inner, 0.5, ["left"], seed=3)
    assert with_occlusion(inner, 0.0, ["left"], seed=3) is inner
    batches = list(wrapped.epoch_batches(0))
    assert len(batches) == 24 and all(images.shape == (8, 3, 112, 112) for images, _ in batches)
    assert wrapped.local_position() == inner.local_position() and wrapped.local_position()["step_in_epoch"] == 24
    assert wrapped.local_shards(0) == inner.local_shards(0) and wrapped.stats == inner.stats
    assert wrapped.fallback_reason is None


def test_cli_synth_writes_the_occluded_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from facescale.cli import main

    out = tmp_path / "d"
    assert main(["data", "synth", "--out", str(out), "--identities", "3", "--images-per-identity", "2",
                 "--held-out-identities", "4", "--pairs", "6", "--occluded-pairs", "6"]) == 0
    jpegs, issame = pickle.loads((out / "verification_occluded.bin").read_bytes())
    clean, clean_same = pickle.loads((out / "verification.bin").read_bytes())
    assert len(jpegs) == 12 and issame == clean_same, "the same pairs as verification.bin"
    assert sum(a != b for a, b in zip(jpegs, clean)) == 6, "one face of each pair differs: the occluded one"
    assert "verification_occluded.bin" in capsys.readouterr().out
