"""Procedural synthetic identities: face-like images a CNN has to learn to tell apart.

Each identity is a latent vector in ``[0, 1]^D`` decoded into face traits: head shape, skin and hair colour, hair
style, eye/brow/nose/mouth geometry and spacing, iris colour, ears, beard, blush, freckles and moles. Each sample
adds nuisance drawn from its own seeded generator: pose (roll, shift, scale, a yaw-like shift of the inner
features), expression (smile, open mouth, raised brows, squint), lighting (brightness, gradient, directional shading,
colour cast), background, occluders, blur and noise. ``difficulty`` in ``[0, 1]`` scales every nuisance amplitude
and the share of look-alike identities (copies of an earlier identity with a small latent perturbation): at 0 the
identities are trivially separable, at 1 look-alikes under strong nuisance are confusable.

Faces are drawn in a canonical frame whose landmarks follow the ArcFace 112x112 alignment template, so the output
looks like an aligned crop. Every image depends only on ``(seed, identity, sample)``: same seed, same bytes.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import simplejpeg
from tqdm import tqdm

from facescale.data.shards import Manifest, ShardSetWriter
from facescale.data.synth_face import NUM_TRAITS, OCCLUDERS
from facescale.data.synth_render import FaceRenderer

JPEG_QUALITY = 90
VERIFICATION_NAME = "verification.bin"
OCCLUDED_VERIFICATION_NAME = "verification_occluded.bin"  # `synthesize(occluded_pairs=N)`: one face per pair occluded
# Seed-stream tags keep the generators for identities, samples, shuffling and pairs independent of each other.
_TAG_TRAIN_IDS, _TAG_HELD_OUT_IDS, _TAG_SAMPLE, _TAG_SHUFFLE, _TAG_PAIRS = 1, 2, 3, 4, 5
_TAG_OCCLUDED_PAIRS, _TAG_OCCLUDER = 6, 7  # which face of a pair is occluded and by what; the occluder's draws
_SIBLING_SIGMA = 0.05  # latent std of a look-alike around its parent (latent range is [0, 1])
_MAX_SIBLING_SHARE = 0.6  # share of look-alike identities at difficulty 1


def sample_identities(num: int, seed: int, difficulty: float, held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Draw identity latents; a ``difficulty``-dependent share are look-alikes of an earlier identity of the set.

    Args:
        num: Number of identities.
        seed: Dataset seed.
        difficulty: In ``[0, 1]``; the look-alike share is ``0.6 * difficulty``.
        held_out: Draw from the held-out stream (parents are then held-out identities too).

    Returns:
        ``(latents [num, NUM_TRAITS] float64, parents [num] int64)``; ``parents[i]`` is ``-1`` or the index of the
        identity that ``i`` is a look-alike of.
    """
    rng = np.random.default_rng([seed, _TAG_HELD_OUT_IDS if held_out else _TAG_TRAIN_IDS])
    latents = rng.random((num, NUM_TRAITS))
    is_sibling = rng.random(num) < _MAX_SIBLING_SHARE * difficulty
    parents = np.where(is_sibling, np.floor(rng.random(num) * np.arange(num)).astype(np.int64), -1)
    parents[0:1] = -1
    noise = rng.normal(0.0, _SIBLING_SIGMA, (num, NUM_TRAITS))
    for i in np.flatnonzero(parents >= 0):  # increasing order: a parent is final before its children
        latents[i] = np.clip(latents[parents[i]] + noise[i], 0.0, 1.0)
    return latents, parents


def render_jpeg(renderer: FaceRenderer, latent: np.ndarray, seed: int, identity: int, sample: int, d: float,
                occluder: str | None = None) -> bytes:
    """Render sample ``sample`` of ``identity`` and encode it (quality 90); depends only on its arguments.

    ``occluder`` (one of ``OCCLUDERS``) adds that occluder over the face, drawn from its own ``(seed, identity,
    sample)`` generator: the same sample as without it, with the occluder in front.
    """
    rng = np.random.default_rng([seed, _TAG_SAMPLE, identity, sample])
    forced = None if occluder is None else (occluder, np.random.default_rng([seed, _TAG_OCCLUDER, identity, sample]))
    return simplejpeg.encode_jpeg(renderer.render(latent, rng, d, forced), quality=JPEG_QUALITY, colorspace="RGB")


def _pairs(parents: np.ndarray, num_pairs: int, seed: int, difficulty: float) -> list[tuple[int, int]]:
    """Half same-identity and half different-identity pairs of held-out indices, in shuffled order.

    A different pair uses a look-alike and its parent with probability ``difficulty`` when the first identity
    drawn has one, so hard negatives grow with difficulty.
    """
    rng = np.random.default_rng([seed, _TAG_PAIRS])
    num = len(parents)
    pairs = [(int(a), int(a)) for a in rng.integers(0, num, num_pairs // 2)]
    for _ in range(num_pairs - len(pairs)):
        a = int(rng.integers(0, num))
        if parents[a] >= 0 and rng.random() < difficulty:
            pairs.append((a, int(parents[a])))
        else:
            b = int(rng.integers(0, num - 1))
            pairs.append((a, b + (b >= a)))
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _write_pairs(out: Path, name: str, renderer: FaceRenderer, latents: np.ndarray, pairs: list[tuple[int, int]],
                 first_id: int, seed: int, difficulty: float, bar: tqdm,
                 occluded: list[tuple[int, str]] | None = None) -> None:
    """Render ``pairs`` of held-out identities into ``name`` (``.bin``) and its ``.json``.

    Pair ``i``'s images are samples ``2i`` and ``2i + 1`` (unique per image, so no two images repeat nuisance);
    ``occluded[i] = (side, occluder)`` puts that occluder on face ``side`` (0 or 1) of pair ``i``.
    """
    jpegs: list[bytes] = []
    issame: list[bool] = []
    pair_ids: list[list[int]] = []
    for i, (a, b) in enumerate(pairs):
        for j, h in enumerate((a, b)):
            kind = occluded[i][1] if occluded is not None and occluded[i][0] == j else None
            jpegs.append(render_jpeg(renderer, latents[h], seed, first_id + h, 2 * i + j, difficulty, kind))
        issame.append(a == b)
        pair_ids.append([first_id + a, first_id + b])
        bar.update(2)
    with open(out / name, "wb") as f:
        pickle.dump((jpegs, issame), f, protocol=4)
    info: dict[str, list] = {"held_out_identities": list(range(first_id, first_id + len(latents))), "pairs": pair_ids}
    if occluded is not None:
        info["occluded"] = [[side, kind] for side, kind in occluded]
    (out / name).with_suffix(".json").write_text(json.dumps(info) + "\n")


def synthesize(
    out_dir: str | os.PathLike[str],
    identities: int,
    images_per_identity: int,
    seed: int,
    difficulty: float,
    held_out_identities: int = 100,
    num_pairs: int = 1000,
    samples_per_shard: int = 1000,
    progress: bool = True,
    occluded_pairs: int = 0,
) -> Manifest:
    """Write a synthetic training shard set and a held-out verification set.

    Training samples (class ids ``0..identities-1``) are shuffled globally with the seed before writing. The
    held-out identities (ids ``identities..identities+held_out_identities-1`` in ``key.json``) never appear in
    the shards; their pairs go to ``verification.bin`` (InsightFace format: a pickle of ``(jpegs, issame)`` with
    the pairs interleaved ``[a0, b0, a1, b1, ...]``) and, for inspection, ``verification.json``.

    Args:
        out_dir: Output directory.
        identities: Number of training identities (classes).
        images_per_identity: Training images per identity.
        seed: Seed; the same seed gives byte-identical images and the same manifest digest.
        difficulty: Nuisance strength and look-alike share, in ``[0, 1]``.
        held_out_identities: Identities for the verification set (0 to skip it).
        num_pairs: Verification pairs, half same-identity (0 to skip the set).
        samples_per_shard: Samples per shard.
        progress: Show a progress bar.
        occluded_pairs: Pairs of a second held-out set, ``verification_occluded.bin`` (+ ``.json``: pairs, and
            per pair the occluded side and the occluder), 0 to skip it. Its pairs are drawn as ``verification.bin``'s
            (the same pairs and images when ``occluded_pairs == num_pairs``) and one face of each, chosen at random,
            has a sunglasses, face-mask or patch occluder (``OCCLUDERS``) drawn over it. Nothing else changes.

    Returns:
        The manifest of the training shards.
    """
    if identities < 1 or images_per_identity < 1:
        raise ValueError(f"need identities >= 1 and images_per_identity >= 1, got {identities}, {images_per_identity}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    if max(num_pairs, occluded_pairs) > 0 and held_out_identities < 2:
        raise ValueError(f"num_pairs={num_pairs}, occluded_pairs={occluded_pairs} need held_out_identities >= 2, "
                         f"got {held_out_identities}")
    out = Path(out_dir)
    renderer = FaceRenderer()
    latents, _ = sample_identities(identities, seed, difficulty)
    order = np.random.default_rng([seed, _TAG_SHUFFLE]).permutation(identities * images_per_identity)
    total = len(order) + 2 * max(num_pairs, 0) + 2 * max(occluded_pairs, 0)
    bar = tqdm(total=total, desc="synth", unit="img", disable=not progress, smoothing=0.1)
    writer = ShardSetWriter(out, prefix="synth", samples_per_shard=samples_per_shard)
    for flat in order.tolist():
        identity, sample = divmod(flat, images_per_identity)
        jpeg = render_jpeg(renderer, latents[identity], seed, identity, sample, difficulty)
        writer.write(f"{identity:07d}_{sample:05d}", jpeg, identity, {"identity": identity, "source": "synth"})
        bar.update()
    source = (
        f"synth seed={seed} identities={identities} images_per_identity={images_per_identity} "
        f"difficulty={difficulty} held_out_identities={held_out_identities} num_pairs={num_pairs}"
    )
    manifest = writer.close(num_classes=identities, source=source)
    held_latents, parents = sample_identities(held_out_identities, seed, difficulty, held_out=True)
    if num_pairs > 0:
        pairs = _pairs(parents, num_pairs, seed, difficulty)
        _write_pairs(out, VERIFICATION_NAME, renderer, held_latents, pairs, identities, seed, difficulty, bar)
    if occluded_pairs > 0:
        rng = np.random.default_rng([seed, _TAG_OCCLUDED_PAIRS])
        occluded = [(int(rng.integers(2)), OCCLUDERS[int(rng.integers(len(OCCLUDERS)))]) for _ in range(occluded_pairs)]
        pairs = _pairs(parents, occluded_pairs, seed, difficulty)
        _write_pairs(out, OCCLUDED_VERIFICATION_NAME, renderer, held_latents, pairs, identities, seed, difficulty,
                     bar, occluded)  # fmt: skip
    bar.close()
    return manifest
