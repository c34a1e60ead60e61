"""Probabilistic Face Embeddings, the math: mutual likelihood score, template fusion, uncertainty, MLS thresholds.

Shi & Jain, "Probabilistic Face Embeddings", ICCV 2019 (arXiv:1904.09658); see :mod:`facescale.eval.pfe` for the
model and the protocols that use these (and which re-exports them). Pure functions on torch tensors or numpy
arrays: nothing here runs a model or reads a file.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch

Array = TypeVar("Array", torch.Tensor, np.ndarray)


def _kind(name: str, *arrays: Any) -> str:
    """``"torch"`` or ``"numpy"`` for arguments that are all one kind; raises naming the odd one out."""
    kinds = ["torch" if isinstance(a, torch.Tensor) else "numpy" if isinstance(a, np.ndarray) else type(a).__name__
             for a in arrays]
    if kinds[0] not in ("torch", "numpy") or len(set(kinds)) != 1:
        raise TypeError(f"{name}: arguments must be all torch tensors or all numpy arrays, got {kinds}")
    return kinds[0]


def mls_score(mu1: Array, sigma_sq1: Array, mu2: Array, sigma_sq2: Array) -> Array:
    """Mutual likelihood score of each pair of Gaussian embeddings.

    ``s(x1, x2) = -sum_d ((mu1_d - mu2_d)^2 / (s1_d + s2_d) + log(s1_d + s2_d))`` with ``s = sigma^2``.

    Args:
        mu1: ``[N, D]`` means of the first faces (L2-normalised embeddings).
        sigma_sq1: ``[N, D]`` variances of the first faces, all > 0.
        mu2: ``[N, D]`` means of the second faces.
        sigma_sq2: ``[N, D]`` variances of the second faces, all > 0.

    Returns:
        ``[N]`` scores (higher = more likely the same identity): a torch tensor carrying gradients to all four
        inputs for torch inputs, a float64 numpy array for numpy inputs.

    Raises:
        TypeError: torch and numpy inputs mixed, or neither.
        ValueError: the four shapes differ or are not ``[N, D]``.
    """
    kind = _kind("mls_score", mu1, sigma_sq1, mu2, sigma_sq2)
    shapes = [tuple(a.shape) for a in (mu1, sigma_sq1, mu2, sigma_sq2)]
    if len(shapes[0]) != 2 or len(set(shapes)) != 1:
        raise ValueError(f"mls_score: mu1, sigma_sq1, mu2, sigma_sq2 must all be [N, D], got shapes {shapes}")
    # Shi & Jain 2019, eq. 3: s(x_i, x_j) = -1/2 sum_l ((mu_i - mu_j)^2 / (s_i + s_j) + log(s_i + s_j))
    #                                        - D/2 log(2 pi).
    # Issue 19 fixes the form without the constants: neither the factor 1/2 nor the -D/2 log(2 pi) term is kept.
    # Scores are an order-preserving (affine) map of the paper's, so thresholds, ROC curves and accuracies are
    # the same; the MLS loss built on this (facescale.pfe) is twice the paper's eq. 4, which only rescales its
    # gradient.
    if kind == "torch":
        var = sigma_sq1 + sigma_sq2
        return -(((mu1 - mu2) ** 2) / var + torch.log(var)).sum(dim=1)
    mu1, sigma_sq1, mu2, sigma_sq2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma_sq1, mu2, sigma_sq2))
    var = sigma_sq1 + sigma_sq2
    return -(((mu1 - mu2) ** 2) / var + np.log(var)).sum(axis=1)


def fuse_template(mu: Array, sigma_sq: Array) -> tuple[Array, Array]:
    """Fuses the Gaussian embeddings of one template (several faces of one subject) into one.

    Args:
        mu: ``[K, D]`` means of the template's K faces.
        sigma_sq: ``[K, D]`` their variances, all > 0.

    Returns:
        ``(mu [D], sigma_sq [D])``: the mean weighted per dimension by ``1/sigma^2`` (weights normalised to sum to
        1 over the K faces), L2-normalised; and the per-dimension minimum variance. Torch in, torch out
        (differentiable); numpy in, float64 numpy out.

    Raises:
        TypeError: torch and numpy inputs mixed, or neither.
        ValueError: shapes differ, are not ``[K, D]``, or K is 0.
    """
    _kind("fuse_template", mu, sigma_sq)
    if mu.ndim != 2 or tuple(mu.shape) != tuple(sigma_sq.shape) or mu.shape[0] == 0:
        raise ValueError(f"fuse_template: mu and sigma_sq must both be [K, D] with K >= 1, "
                         f"got {tuple(mu.shape)} and {tuple(sigma_sq.shape)}")
    return _fuse(mu, sigma_sq, axis=0)


def _fuse(mu: Array, sigma_sq: Array, axis: int) -> tuple[Array, Array]:
    """:func:`fuse_template` along ``axis`` (the faces axis), mu normalised along the last axis."""
    # Shi & Jain 2019 ("feature fusion with uncertainty", eqs. 6-7) fuse a template as the posterior of the latent
    # code given all its faces: mu_hat = sum_i (sigma_hat^2 / sigma_i^2) mu_i, i.e. weights 1/sigma_i^2 normalised
    # per dimension -- kept here -- and sigma_hat^2 = 1 / sum_i (1/sigma_i^2). Issue 19 asks instead for the
    # per-dimension minimum as the fused variance, as the authors' released code does (aggregate_PFE in
    # seasonSH/Probabilistic-Face-Embeddings): it is >= the posterior variance, so a large template does not become
    # over-confident when its faces are not independent observations (frames of one video). Fused mu is
    # L2-normalised so a fused template lies on the sphere like single faces (cosine and MLS treat both alike).
    if isinstance(mu, torch.Tensor):
        precision = 1.0 / sigma_sq
        fused = (precision / precision.sum(dim=axis, keepdim=True) * mu).sum(dim=axis)
        return torch.nn.functional.normalize(fused, dim=-1), sigma_sq.min(dim=axis).values
    mu, sigma_sq = np.asarray(mu, dtype=np.float64), np.asarray(sigma_sq, dtype=np.float64)
    precision = 1.0 / sigma_sq
    fused = (precision / precision.sum(axis=axis, keepdims=True) * mu).sum(axis=axis)
    return fused / np.linalg.norm(fused, axis=-1, keepdims=True).clip(min=1e-12), sigma_sq.min(axis=axis)


def uncertainty(sigma_sq: np.ndarray) -> np.ndarray:
    """Per-face uncertainty: the harmonic mean of ``sigma^2`` over dimensions (Shi & Jain 2019, risk-controlled FR).

    Args:
        sigma_sq: ``[N, D]`` variances.

    Returns:
        float64 ``[N]``.
    """
    sigma_sq = np.asarray(sigma_sq, dtype=np.float64)
    return sigma_sq.shape[1] / (1.0 / sigma_sq).sum(axis=1)


def evaluate_scores(scores: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> dict[str, Any]:
    """The 10-fold protocol of :func:`facescale.eval.verification.evaluate` for similarity scores of any range.

    Same contiguous folds; "same" = ``score > threshold``, each fold's threshold the one with the best accuracy on
    the other folds among all cuts between distinct scores (MLS has no fixed range for a fixed grid), the highest
    such cut on ties (the fewest accepted pairs, as ``evaluate`` takes the lowest distance on ties).

    Args:
        scores: ``[N]`` pair scores, higher = more likely the same identity.
        issame: ``[N]`` booleans.
        nfolds: Number of contiguous folds.

    Returns:
        ``accuracy_mean``, ``accuracy_std``, ``best_threshold`` (mean over folds), ``fold_thresholds``,
        ``fold_accuracies``, ``num_pairs``.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    issame = np.asarray(issame, dtype=bool).ravel()
    if scores.shape != issame.shape:
        raise ValueError(f"{len(scores)} scores for {len(issame)} pairs")
    if len(issame) < nfolds:
        raise ValueError(f"{len(issame)} pairs cannot be split into {nfolds} folds")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are not finite")
    fold_acc, fold_thr = [], []
    for test_idx in np.array_split(np.arange(len(issame)), nfolds):  # KFold(shuffle=False)'s split, as evaluate
        train = np.ones(len(issame), dtype=bool)
        train[test_idx] = False
        threshold = _best_threshold(scores[train], issame[train])
        fold_thr.append(threshold)
        fold_acc.append(float(np.mean((scores[test_idx] > threshold) == issame[test_idx])))
    return {"accuracy_mean": float(np.mean(fold_acc)), "accuracy_std": float(np.std(fold_acc)),
            "best_threshold": float(np.mean(fold_thr)), "fold_thresholds": fold_thr, "fold_accuracies": fold_acc,
            "num_pairs": int(len(issame))}


def _best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The cut with the most correct decisions when the pairs above it are called "same"."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    n = len(s)
    # Accepting the top k pairs (k = 0..n): correct = true positives + true negatives.
    tp = np.concatenate([[0], np.cumsum(y)])
    correct = tp + (n - int(y.sum())) - (np.arange(n + 1) - tp)
    cuttable = np.ones(n + 1, dtype=bool)
    cuttable[1:n] = s[:-1] != s[1:]  # no cut between equal scores
    k = int(np.argmax(np.where(cuttable, correct, -1)))  # first best = fewest accepted
    if k == 0:
        return float("inf")
    if k == n:
        return float("-inf")
    return float((s[k - 1] + s[k]) / 2)
