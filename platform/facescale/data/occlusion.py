"""Occlusion-aware training: erase a face region of aligned training images, the same way in both loaders.

Chen et al., "Adversarial Occlusion-aware Face Detection" (AOFD, BTAS 2018, arXiv:1709.05188) trains with occlusion
masks placed from landmarks and from random face halves. Here the masks are boxes on the aligned ArcFace 112×112
canvas, applied to recognition training (``data.augment.occlusion``):

- ``eyes``, ``nose``, ``mouth``: boxes around the five template landmarks (``align.ARCFACE_TEMPLATE``), sized in
  units of the template's inter-ocular distance ``d`` = 35.2 px: ``eyes`` spans both eyes with 0.4 d beyond each
  (columns 24-87, rows 41-61), ``nose`` 0.6 d wide from 0.45 d above the tip to 0.25 d below it (columns 45-66,
  rows 56-80), ``mouth`` the corners with 0.25 d beyond each, 0.25 d above and below them (columns 33-78, rows
  83-100). Each box is centred on the canvas' vertical axis (the template's centre is within 0.5 px of it), so a
  box is its own mirror image.
- ``upper``, ``lower``, ``left``, ``right``: halves of the canvas (split at row and column 56), AOFD's face halves.

**Where it runs.** On the uint8 batches a loader yields, before normalisation (``transforms.normalize_images``),
host or device tensors alike: ``with_occlusion`` wraps whichever loader the factory built. Both loaders mirror
before they yield a batch, so the boxes are in image coordinates of the mirrored image: ``left`` is the left half of
the image as the network sees it, which is the subject's left or right half with probability 1/2 each (the mirror
coin is independent of the erase draw). ``eyes``/``nose``/``mouth`` are mirror-symmetric, so for them it does not
matter whether the mirror comes before or after.

**Draws.** Whether a sample is erased (probability ``p``), which region (uniform over ``regions``) and the fill
colour come from a BLAKE2b hash of ``(seed, epoch, key)``: reproducible, and independent of batch composition,
world size, worker count, resume position and loader. A hash rather than a seeded numpy generator per sample:
~1 µs against ~15 µs, and the three draws need only 19 of its bytes.

**Fill.** One solid random colour per erased sample (each channel uniform in 0..255), not zero, the mean or
per-pixel noise: real occluders (sunglasses, masks, hands, scarves) and the synthetic generator's are solid objects of
any colour, a constant fill is a single value the network can learn to treat as "missing", and per-pixel noise
(Random Erasing's default, Zhong et al., AAAI 2020) is a texture no occluder has.

**A torch op, not DALI's ``fn.erase``.** One op after either loader gives the torch and DALI loaders the same erased
pixels for the same keys by construction, on host and device batches; ``fn.erase`` would need the per-sample boxes
fed through the decode pipeline's ``external_source`` (built once for the loader's life, with different CPU and
``mixed`` graphs, and on CPU the mirror is a host copy after DALI), and a second implementation for the torch loader.
The op is one indexed fill per region drawn (at most 7 per batch, on the host or the device): draws and fill take
3.7 ms per host batch of 512 on a loaded CPU core (``benchmarks/occlusion.py``), ~7 µs a sample against ~100 µs to
decode it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from facescale.data.align import ALIGNED_SIZE, ARCFACE_TEMPLATE

REGIONS: tuple[str, ...] = ("eyes", "nose", "mouth", "upper", "lower", "left", "right")


def _template_boxes() -> dict[str, tuple[float, float, float, float]]:
    """``(top, left, bottom, right)`` of the landmark regions on the 112×112 canvas, in (fractional) pixels."""
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = ARCFACE_TEMPLATE.tolist()
    d = rex - lex  # inter-ocular distance, 35.2 px
    eye_y, mouth_y = (ley + rey) / 2, (lmy + rmy) / 2
    centre = ALIGNED_SIZE / 2

    def centred(top: float, half_width: float, bottom: float) -> tuple[float, float, float, float]:
        return top, centre - half_width, bottom, centre + half_width

    return {
        "eyes": centred(eye_y - 0.3 * d, (rex - lex) / 2 + 0.4 * d, eye_y + 0.3 * d),
        "nose": centred(ny - 0.45 * d, 0.3 * d, ny + 0.25 * d),
        "mouth": centred(mouth_y - 0.25 * d, (rmx - lmx) / 2 + 0.25 * d, mouth_y + 0.25 * d),
    }


def region_boxes(height: int = ALIGNED_SIZE, width: int = ALIGNED_SIZE) -> dict[str, tuple[int, int, int, int]]:
    """Each region's box on an aligned ``height × width`` image (template boxes scaled from 112×112).

    Returns:
        ``{region: (top, left, bottom, right)}`` in whole pixels, half-open (rows ``top..bottom-1``). The mirror
        maps ``left`` onto ``right`` and every other box onto itself (``left + right == width``).
    """
    sy, sx = height / ALIGNED_SIZE, width / ALIGNED_SIZE
    boxes = {}
    for name, (top, left, bottom, _) in _template_boxes().items():
        half = round(width / 2 - left * sx)
        boxes[name] = (round(top * sy), width // 2 - half, round(bottom * sy), width - width // 2 + half)
    boxes.update(upper=(0, 0, height // 2, width), lower=(height // 2, 0, height, width),
                 left=(0, 0, height, width // 2), right=(0, width // 2, height, width))  # fmt: skip
    return {name: boxes[name] for name in REGIONS}


def check_regions(regions: Sequence[str]) -> list[str]:
    """``regions`` as a list, or ``ValueError`` naming an unknown one and listing the valid ones."""
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise ValueError(f"unknown occlusion region {unknown[0]!r}; valid regions: {', '.join(REGIONS)}")
    if not regions:
        raise ValueError(f"no occlusion regions given; valid regions: {', '.join(REGIONS)}")
    return list(regions)


def draw_occlusions(keys: Sequence[str], p: float, regions: Sequence[str], seed: int, epoch: int
                    ) -> list[tuple[str, tuple[int, int, int]] | None]:  # fmt: skip
    """Per sample: ``None`` (kept) or ``(region, fill RGB)``, from a hash of ``(seed, epoch, key)`` alone.

    Args:
        keys: The samples' keys (``__key__`` of the shard sample).
        p: Erase probability per sample.
        regions: Regions to draw from, uniformly (a region listed twice is drawn twice as often).
        seed: ``train.seed``.
        epoch: The epoch: a sample gets a new draw every epoch.
    """
    regions = check_regions(regions)
    threshold = int(p * 2**64)  # integer compare: p=1 erases every sample, p=0 none
    draws: list[tuple[str, tuple[int, int, int]] | None] = []
    for key in keys:
        h = hashlib.blake2b(f"facescale-occlusion/{seed}/{epoch}/{key}".encode(), digest_size=24).digest()
        if int.from_bytes(h[:8], "little") >= threshold:
            draws.append(None)
            continue
        region = regions[int.from_bytes(h[8:16], "little") % len(regions)]
        draws.append((region, (h[16], h[17], h[18])))
    return draws


def erase(images: torch.Tensor, draws: Sequence[tuple[str, tuple[int, int, int]] | None]) -> torch.Tensor:
    """Fill each drawn region of ``images`` with its colour, in place (pinned host memory stays pinned).

    Args:
        images: uint8 ``[B, 3, H, W]``, on the host or a device.
        draws: ``draw_occlusions`` for the batch's keys, in batch order.

    Returns:
        ``images``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise TypeError(f"erase expects uint8 [B, 3, H, W] images, got {images.dtype} {list(images.shape)}")
    if len(draws) != images.shape[0]:
        raise ValueError(f"{len(draws)} occlusion draws for a batch of {images.shape[0]} images")
    table = region_boxes(*images.shape[2:])
    rows_by_region: dict[str, list[int]] = {}
    for i, draw in enumerate(draws):
        if draw is not None:
            rows_by_region.setdefault(draw[0], []).append(i)
    pin = images.is_cuda  # asynchronous copies of the small index tables, like the batches themselves
    for region, rows in rows_by_region.items():  # one indexed fill per region: at most 7 kernels per batch
        top, left, bottom, right = table[region]
        index = torch.tensor(rows, dtype=torch.int64, pin_memory=pin).to(images.device, non_blocking=True)
        fill = torch.tensor([draws[i][1] for i in rows], dtype=torch.uint8, pin_memory=pin)  # type: ignore[index]
        images[index, :, top:bottom, left:right] = fill.to(images.device, non_blocking=True)[:, :, None, None]
    return images


class OcclusionLoader:
    """A ``FaceLoader`` that erases regions of another loader's batches; everything else is the inner loader's.

    Args:
        inner: The torch or DALI loader.
        p: Erase probability per sample.
        regions: Regions drawn uniformly (``REGIONS``).
        seed: ``train.seed`` (the draws' key with the epoch and the sample key).
    """

    def __init__(self, inner: Any, p: float, regions: Sequence[str], seed: int) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"occlusion probability must be in [0, 1], got {p}")
        self.inner, self.p, self.regions, self.seed = inner, p, check_regions(regions), seed

    def __getattr__(self, name: str) -> Any:  # only for what this class does not define itself
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def epoch_samples(self, epoch: int, start_step: int = 0, resume: dict[str, Any] | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:  # fmt: skip
        """The inner loader's ``(images, labels, keys)`` with regions erased (see ``FaceLoader.epoch_samples``)."""
        for images, labels, keys in self.inner.epoch_samples(epoch, start_step, resume):
            yield erase(images, draw_occlusions(keys, self.p, self.regions, self.seed, epoch)), labels, keys

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``epoch_samples`` without the keys."""
        for images, labels, _ in self.epoch_samples(epoch):
            yield images, labels


def with_occlusion(loader: Any, p: float, regions: Sequence[str], seed: int) -> Any:
    """``loader`` itself when ``p`` is 0, else an ``OcclusionLoader`` around it (``data.augment.occlusion``)."""
    return loader if p == 0 else OcclusionLoader(loader, p, regions, seed)
