"""Embedding norm as a face-quality score, and verification accuracy as low-quality pairs are rejected.

MagFace (Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality Assessment",
CVPR 2021) trains the norm of the un-normalised embedding to grow with recognisability, so the norm is a quality
score for free. How good a quality score is shows in an error-versus-reject curve (Grother & Tabassi,
"Performance of Biometric Quality Measures", IEEE TPAMI 2007): drop the pairs of lowest quality, measure again.
A pair's quality is the lower of its two images' qualities, as in that paper.

Here each rejection level re-runs the full 10-fold protocol of :func:`facescale.eval.verification.evaluate` on
the pairs that remain (order kept), so the 0 % row equals the set's reported accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from facescale.eval.verification import evaluate

REJECT_FRACTIONS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def pair_quality(norms: np.ndarray) -> np.ndarray:
    """Quality of each interleaved pair: the smaller norm of its two images.

    Args:
        norms: ``[2N]`` per-image quality (raw embedding norms), pairs interleaved.

    Returns:
        ``[N]`` pair qualities.
    """
    norms = np.asarray(norms, dtype=np.float64)
    if len(norms) % 2:
        raise ValueError(f"{len(norms)} norms do not form pairs")
    return np.minimum(norms[0::2], norms[1::2])


def accuracy_vs_rejection(embeddings: np.ndarray, issame: np.ndarray, norms: np.ndarray,
                          fractions: Sequence[float] = REJECT_FRACTIONS, nfolds: int = 10) -> list[dict[str, Any]]:
    """Verification accuracy after rejecting the lowest-quality share of pairs.

    Args:
        embeddings: ``[2N, D]`` embeddings, pairs interleaved.
        issame: ``[N]`` labels.
        norms: ``[2N]`` per-image quality scores.
        fractions: Shares of pairs to reject, each in ``[0, 1)``.
        nfolds: Folds of the protocol.

    Returns:
        One row per fraction: ``reject_fraction``, ``num_pairs`` kept, ``accuracy_mean``, ``accuracy_std``
        (NaN when fewer than ``nfolds`` pairs or only one class remain).
    """
    issame = np.asarray(issame, dtype=bool)
    quality = pair_quality(norms)
    if len(quality) != len(issame):
        raise ValueError(f"{len(quality)} pair qualities for {len(issame)} pairs")
    # Stable sort: among equal qualities the earlier pair is rejected first, so results are reproducible.
    order = np.argsort(quality, kind="stable")
    rows = []
    for fraction in fractions:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"reject fraction must be in [0, 1), got {fraction}")
        keep = np.ones(len(issame), dtype=bool)
        keep[order[:int(np.floor(fraction * len(issame)))]] = False
        kept = np.flatnonzero(keep)
        row: dict[str, Any] = {"reject_fraction": float(fraction), "num_pairs": int(len(kept)),
                               "accuracy_mean": float("nan"), "accuracy_std": float("nan")}
        labels = issame[kept]
        if len(kept) >= nfolds and labels.any() and not labels.all():
            idx = np.stack([2 * kept, 2 * kept + 1], axis=1).ravel()
            res = evaluate(embeddings[idx], labels, nfolds=nfolds)
            row.update(accuracy_mean=res["accuracy_mean"], accuracy_std=res["accuracy_std"])
        rows.append(row)
    return rows
