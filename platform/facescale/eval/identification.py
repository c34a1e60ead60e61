"""1:N identification against a growing set of distractors (MegaFace-style), and open-set TPIR at fixed FPIR.

A gallery of enrolled embeddings (identity labels), a stream of distractor embeddings (identities that are not
searched for) and probes. A probe whose identity is enrolled is *mated*, otherwise *non-mated*.

- **Rank-1 identification rate at N distractors** (MegaFace challenge 1, Kemelmacher-Shlizerman et al., CVPR
  2016): the share of mated probes whose best mate score is strictly higher than every non-mate gallery entry
  and every one of the first N distractors (a tie counts as a miss). The distractor sets are nested prefixes of
  the stream, so one pass with a running maximum per probe answers every N.
- **TPIR at FPIR** (NIST FRVT 1:N, NISTIR 8271): at threshold T, FPIR(T) is the share of non-mated probes whose
  top candidate scores ``>= T``; TPIR(T) the share of mated probes whose mate is at rank 1 with score ``>= T``.
  T is the lowest threshold with FPIR(T) <= target; a target below ``1 / num_non_mated`` is NaN (unmeasurable).

Distractors are consumed in chunks (an iterable of ``[c, D]`` arrays), so a million of them never need to sit in
memory at once: the similarity block in flight is ``num_probes × chunk`` floats.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

DISTRACTOR_COUNTS: tuple[int, ...] = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
FPIR_TARGETS: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
_BLOCK_ELEMENTS = 1 << 24  # similarity block of 16M float32 (64 MiB) per step


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def array_chunks(embeddings: np.ndarray, chunk: int = 16384) -> Iterator[np.ndarray]:
    """Distractors held in an array (or a memory map), served in chunks.

    Args:
        embeddings: ``[N, D]`` distractor embeddings.
        chunk: Rows per chunk.

    Yields:
        ``[<=chunk, D]`` slices in order.
    """
    for s in range(0, len(embeddings), chunk):
        yield embeddings[s:s + chunk]


@dataclass
class GaussianDistractors:
    """Synthetic distractor embeddings: samples of N(mean, cov), L2-normalised, generated chunk by chunk.

    With ``mean=None`` they are uniform on the unit sphere (isotropic). Fitted to real embeddings with
    :meth:`fit`, they follow the embedding space's anisotropy (trained embeddings occupy a cone, not the whole
    sphere), so their scores against probes look far more like real impostor scores than uniform vectors do,
    at the cost of one matrix multiply per chunk instead of a forward pass per image.

    Attributes:
        dim: Embedding size.
        mean: ``[D]`` mean, or None for isotropic.
        factor: ``[D, R]`` with ``factor @ factor.T`` = covariance, or None for identity covariance.
        seed: Seed; chunk k depends only on ``(seed, k)``.
    """

    dim: int
    mean: np.ndarray | None = None
    factor: np.ndarray | None = field(default=None, repr=False)
    seed: int = 0

    @classmethod
    def fit(cls, embeddings: np.ndarray, seed: int = 0) -> GaussianDistractors:
        """Gaussian fitted to ``[N, D]`` embeddings (normalised first); needs N >= 2."""
        x = _normalise(embeddings).astype(np.float64)
        if len(x) < 2:
            raise ValueError(f"fitting distractors needs at least 2 embeddings, got {len(x)}")
        mean = x.mean(axis=0)
        # Factor of the sample covariance from the SVD of the centred data: rank <= N - 1, no D x D eigensolve.
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        factor = (vt.T * (s / np.sqrt(len(x) - 1))).astype(np.float32)
        return cls(dim=x.shape[1], mean=mean.astype(np.float32), factor=factor, seed=seed)

    def chunks(self, num: int, chunk: int = 16384) -> Iterator[np.ndarray]:
        """Yields ``num`` unit-norm distractors in chunks of ``chunk``."""
        for k, s in enumerate(range(0, num, chunk)):
            rng = np.random.default_rng([self.seed, k])
            n = min(chunk, num - s)
            if self.factor is None:
                x = rng.standard_normal((n, self.dim), dtype=np.float32)
            else:
                x = rng.standard_normal((n, self.factor.shape[1]), dtype=np.float32) @ self.factor.T + self.mean
            yield _normalise(x)


@dataclass
class IdentificationResult:
    """Outcome of :func:`identify`.

    Attributes:
        distractor_counts: Distractor counts the rank-1 rates were measured at (the total reached is last).
        rank1: Rank-1 identification rate of the mated probes at each count.
        tpir: ``{fpir_target: tpir}`` at the largest count (NaN where unmeasurable).
        thresholds: ``{fpir_target: threshold}`` used for ``tpir``.
        num_gallery: Enrolled gallery entries.
        num_mated: Mated probes.
        num_non_mated: Non-mated probes.
    """

    distractor_counts: list[int]
    rank1: list[float]
    tpir: dict[float, float]
    thresholds: dict[float, float]
    num_gallery: int
    num_mated: int
    num_non_mated: int


def _gallery_scores(probes: np.ndarray, probe_labels: np.ndarray, gallery: np.ndarray,
                    gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best mate score and best non-mate score of each probe in the enrolled gallery (−inf where none)."""
    mate = np.full(len(probes), -np.inf, dtype=np.float32)
    non_mate = np.full(len(probes), -np.inf, dtype=np.float32)
    rows = max(1, _BLOCK_ELEMENTS // max(len(gallery), 1))
    for s in range(0, len(probes), rows):
        sim = probes[s:s + rows] @ gallery.T
        same = probe_labels[s:s + rows, None] == gallery_labels[None, :]
        mate[s:s + rows] = np.where(same, sim, -np.inf).max(axis=1, initial=-np.inf)
        non_mate[s:s + rows] = np.where(same, -np.inf, sim).max(axis=1, initial=-np.inf)
    return mate, non_mate


def distractor_maxima(probes: np.ndarray, distractors: Iterable[np.ndarray], counts: Sequence[int],
                      progress: bool = True) -> tuple[list[int], np.ndarray]:
    """Each probe's highest score over the first N distractors, for every N in ``counts``.

    Args:
        probes: ``[Q, D]`` unit-norm probes.
        distractors: Chunks of distractors (any chunk sizes; normalised here); consumed to the end.
        counts: Distractor counts to record the maxima at.
        progress: Show a progress bar (total unknown for a stream).

    Returns:
        ``(counts reached, maxima [len(counts reached), Q])``: the counts up to the stream's length, then the
        stream's length itself when it is not one of them.
    """
    counts = sorted(set(int(c) for c in counts if c > 0))
    running = np.full(len(probes), -np.inf, dtype=np.float32)
    reached: list[int] = []
    maxima: list[np.ndarray] = []
    pos = 0
    bar = tqdm(desc="distractors", unit="emb", disable=not progress, mininterval=2.0)
    for chunk in distractors:
        chunk = _normalise(np.asarray(chunk))  # cheap next to the multiply; unit norm is the contract
        # NOTE: the block [Q, c] is the only large temporary; split the chunk so it stays under _BLOCK_ELEMENTS.
        step = max(1, _BLOCK_ELEMENTS // max(len(probes), 1))
        for s in range(0, len(chunk), step):
            sim = probes @ chunk[s:s + step].T
            start = pos
            for c in counts:
                if start < c <= start + sim.shape[1]:
                    reached.append(c)
                    maxima.append(np.maximum(running, sim[:, :c - start].max(axis=1)))
            running = np.maximum(running, sim.max(axis=1))
            pos += sim.shape[1]
        bar.update(len(chunk))
    bar.close()
    if pos and (not reached or reached[-1] < pos):
        reached.append(pos)
        maxima.append(running.copy())
    return reached, np.stack(maxima) if maxima else np.empty((0, len(probes)), np.float32)


def identify(gallery: np.ndarray, gallery_labels: np.ndarray, probes: np.ndarray, probe_labels: np.ndarray,
             distractors: Iterable[np.ndarray] = (), counts: Sequence[int] = DISTRACTOR_COUNTS,
             fpir_targets: Sequence[float] = FPIR_TARGETS, progress: bool = True) -> IdentificationResult:
    """Rank-1 identification rate against growing distractor sets, and TPIR at FPIR at the largest set.

    Args:
        gallery: ``[M, D]`` enrolled embeddings.
        gallery_labels: ``[M]`` identity of each enrolled embedding.
        probes: ``[Q, D]`` probe embeddings.
        probe_labels: ``[Q]`` identity of each probe; one not in ``gallery_labels`` makes a non-mated probe.
        distractors: Chunks of distractor embeddings (see :func:`array_chunks`, :class:`GaussianDistractors`).
        counts: Distractor counts for the rank-1 curve (0 distractors is always measured first).
        fpir_targets: FPIR targets.
        progress: Show a progress bar.

    Returns:
        The rates.

    Raises:
        ValueError: No mated probe, or shapes that do not agree.
    """
    gallery, probes = _normalise(gallery), _normalise(probes)
    gallery_labels = np.asarray(gallery_labels)
    probe_labels = np.asarray(probe_labels)
    if len(gallery) != len(gallery_labels) or len(probes) != len(probe_labels):
        raise ValueError(f"labels do not match: gallery {len(gallery)}/{len(gallery_labels)}, "
                         f"probes {len(probes)}/{len(probe_labels)}")
    mated = np.isin(probe_labels, gallery_labels)
    if not mated.any():
        raise ValueError("no probe has an identity in the gallery: rank-1 identification needs mated probes")
    mate, non_mate = _gallery_scores(probes, probe_labels, gallery, gallery_labels)
    reached, dmax = distractor_maxima(probes, distractors, counts, progress=progress)
    rank1 = [float(np.mean(mate[mated] > non_mate[mated]))]
    rank1 += [float(np.mean(mate[mated] > np.maximum(non_mate, d)[mated])) for d in dmax]
    best_other = np.maximum(non_mate, dmax[-1]) if len(dmax) else non_mate
    # Non-mated probes have no mate: their top candidate is the best of gallery and distractors.
    top_non_mated = np.sort(best_other[~mated])[::-1]
    hit = mate[mated] > best_other[mated]
    tpir, thresholds = {}, {}
    for target in fpir_targets:
        allowed = int(np.floor(target * len(top_non_mated) + 1e-9))
        if allowed < 1:
            tpir[target], thresholds[target] = float("nan"), float("nan")
            continue
        # Lowest T with at most `allowed` non-mated tops >= T: just above the (allowed+1)-th highest top.
        t = np.nextafter(top_non_mated[allowed], np.float32(np.inf)) if allowed < len(top_non_mated) else -np.inf
        thresholds[target] = float(t)
        tpir[target] = float(np.mean(hit & (mate[mated] >= t)))
    return IdentificationResult(distractor_counts=[0, *reached], rank1=rank1, tpir=tpir, thresholds=thresholds,
                                num_gallery=len(gallery), num_mated=int(mated.sum()),
                                num_non_mated=int((~mated).sum()))
