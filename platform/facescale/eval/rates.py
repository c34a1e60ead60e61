"""ROC from pair scores and TPR at fixed FPR, as IJB-B/IJB-C 1:1 verification is reported.

Scores are similarities (higher = more likely the same identity), e.g. cosine similarities of normalised
embeddings. The ROC has one point per distinct score: "same" = ``score >= threshold`` with the threshold lowered
through every distinct score, starting from the point (0, 0) above the highest score -- scikit-learn's
``roc_curve(..., drop_intermediate=False)``, which computes it here.

TPR@FPR follows the InsightFace IJB evaluation (``recognition/_evaluation_/ijb/ijb_11.py``: sklearn's
``roc_curve`` then, for each target, the point whose FPR is closest, first such point on ties): at a target FPR
it reports the ROC point with the closest FPR, and among several points with that same FPR the first one in
order of decreasing threshold (the lowest TPR at that FPR). A target below ``1 / num_negatives`` cannot be
measured with the pairs at hand and is reported as NaN instead of a misleading 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# FPR targets of the IJB-B/IJB-C 1:1 tables (ArcFace, Partial FC and most later papers report 1e-6 .. 1e-1).
FPR_TARGETS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class Roc:
    """ROC points in order of decreasing threshold (FPR and TPR non-decreasing).

    Attributes:
        fpr: False positive rate at each point, starting at 0.
        tpr: True positive rate at each point, starting at 0.
        thresholds: Score threshold of each point (``+inf`` for the first).
        num_pos: Number of positive (same-identity) pairs.
        num_neg: Number of negative pairs.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    num_pos: int
    num_neg: int

    @property
    def fnr(self) -> np.ndarray:
        """False negative rate (1 − TPR), the y axis of a DET curve."""
        return 1.0 - self.tpr


def compute_roc(scores: np.ndarray, labels: np.ndarray) -> Roc:
    """The ROC at every distinct score (no points dropped).

    Args:
        scores: ``[N]`` similarities.
        labels: ``[N]`` booleans, True for same-identity pairs.

    Returns:
        The curve; ties between scores form a single point.

    Raises:
        ValueError: Shapes differ, non-finite scores, or no positive or no negative pair.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are not finite")
    num_pos = int(labels.sum())
    num_neg = len(labels) - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"an ROC needs positive and negative pairs, got {num_pos} and {num_neg}")
    # sklearn's curve is this one: a point per distinct score (ties admitted together), (0, 0) at threshold +inf
    # first; drop_intermediate=False keeps the collinear points that tpr_at_fpr's closest-FPR rule may pick.
    from sklearn.metrics import roc_curve  # lazy: seconds of scipy imports that FPR_TARGETS/format_fpr users skip

    fpr, tpr, thresholds = roc_curve(labels, scores, pos_label=True, drop_intermediate=False)
    return Roc(fpr=fpr, tpr=tpr, thresholds=thresholds, num_pos=num_pos, num_neg=num_neg)


def tpr_at_fpr(roc: Roc, targets: Sequence[float] = FPR_TARGETS) -> dict[float, dict[str, float]]:
    """TPR (and the threshold and FPR actually used) at each target FPR.

    Args:
        roc: Curve from :func:`compute_roc`.
        targets: Target false positive rates.

    Returns:
        ``{target: {"tpr", "fpr", "threshold"}}``; all NaN where ``target < 1 / num_neg`` (not measurable).
    """
    # Hand-written: scikit-learn has no TPR-at-FPR lookup. The rule is InsightFace's IJB one (closest FPR, first
    # point of a vertical segment), not an interpolation, and a target below 1 / num_neg is reported as NaN.
    out: dict[float, dict[str, float]] = {}
    for target in targets:
        if target * roc.num_neg < 1.0:
            out[target] = {"tpr": float("nan"), "fpr": float("nan"), "threshold": float("nan")}
            continue
        i = int(np.argmin(np.abs(roc.fpr - target)))  # argmin returns the first of equally close points
        out[target] = {"tpr": float(roc.tpr[i]), "fpr": float(roc.fpr[i]), "threshold": float(roc.thresholds[i])}
    return out


def format_fpr(target: float) -> str:
    """``1e-4`` → ``"1e-4"`` (table headers and metric names)."""
    mantissa, exponent = f"{target:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def pair_scores(emb_a: np.ndarray, emb_b: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Cosine similarity of row ``i`` of ``emb_a`` with row ``i`` of ``emb_b`` (rows L2-normalised here).

    Args:
        emb_a: ``[N, D]`` embeddings.
        emb_b: ``[N, D]`` embeddings.
        chunk: Rows per step (bounds the temporary memory for millions of pairs).

    Returns:
        float64 ``[N]`` similarities in ``[-1, 1]``.
    """
    if emb_a.shape != emb_b.shape:
        raise ValueError(f"pair sides differ in shape: {emb_a.shape} vs {emb_b.shape}")
    out = np.empty(len(emb_a), dtype=np.float64)
    for s in range(0, len(emb_a), chunk):
        a = np.asarray(emb_a[s:s + chunk], dtype=np.float64)
        b = np.asarray(emb_b[s:s + chunk], dtype=np.float64)
        a /= np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
        b /= np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
        out[s:s + chunk] = np.einsum("nd,nd->n", a, b)
    return out
