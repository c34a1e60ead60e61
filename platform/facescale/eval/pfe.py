"""Probabilistic Face Embeddings: mutual likelihood score, uncertainty-aware template fusion, PFE evaluation.

Shi & Jain, "Probabilistic Face Embeddings", ICCV 2019 (arXiv:1904.09658). A face is a Gaussian
``N(mu, diag(sigma^2))`` in the embedding space: ``mu`` is the (frozen) backbone's L2-normalised embedding,
``sigma^2`` comes from an uncertainty head (``facescale.pfe``). Two faces are compared by the mutual likelihood
score (MLS, eq. 3), the log-likelihood that both are noisy observations of one latent code; a template (several
faces of one subject) is fused into one Gaussian ("feature fusion with uncertainty", eqs. 6-7) before it is
compared.

``mls_score`` and ``fuse_template`` accept torch tensors (result a torch tensor, differentiable: the PFE loss uses
``mls_score``) or numpy arrays (result numpy); one call never mixes the two.

``facescale eval --pfe`` runs :func:`run_bin_pfe` and :func:`run_ijb_pfe`: the model's ``forward`` gives the
protocol's embeddings (every existing number is unchanged) and its ``forward_pfe`` the Gaussian, from the same
batches (both from one backbone pass per view where the model has ``forward_with_pfe``, as ``PFEModel``). Each
image's two views (image and horizontal flip) are fused with :func:`fuse_template`, as two faces of one subject --
the probabilistic counterpart of the protocol's flip sum. Reported beside the existing numbers:
10-fold verification accuracy by MLS (each fold's MLS threshold the best one on the other nine folds) and by cosine
of the fused means; ROC / TPR@FPR by MLS; accuracy as the most uncertain pairs are rejected (uncertainty = harmonic
mean of sigma^2 over dimensions, as in the paper's risk-controlled recognition experiment) beside the norm-based
rejection of :mod:`facescale.eval.quality`; IJB templates fused with :func:`fuse_template` and compared by MLS.

The math (:func:`mls_score`, :func:`fuse_template`, :func:`uncertainty`, :func:`evaluate_scores`) is in
:mod:`facescale.eval.pfe_math` and re-exported here; this module runs the model and the protocols.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facescale.data.transforms import normalize_images
from facescale.eval.ijb import (
    IjbWeighting,
    pool_templates,
    template_pair_scores,
    weight_features,
)
from facescale.eval.images import read_aligned_image, read_images
from facescale.eval.pfe_math import _fuse
from facescale.eval.pfe_math import evaluate_scores as evaluate_scores
from facescale.eval.pfe_math import fuse_template as fuse_template
from facescale.eval.pfe_math import mls_score as mls_score
from facescale.eval.pfe_math import uncertainty as uncertainty
from facescale.eval.quality import REJECT_FRACTIONS, accuracy_vs_rejection
from facescale.eval.rates import FPR_TARGETS, Roc, compute_roc, pair_scores, tpr_at_fpr
from facescale.eval.suite import BinReport, IjbReport, read_ijb_inputs
from facescale.eval.verification import evaluate, load_bin


class PfeModelError(ValueError):
    """A model that cannot give probabilistic embeddings: no ``forward_pfe``, or outputs not ``(mu, sigma_sq > 0)``."""


def require_pfe(model: nn.Module, source: str) -> None:
    """Raises :class:`PfeModelError` naming ``source`` unless ``model`` has a ``forward_pfe`` method."""
    if not callable(getattr(model, "forward_pfe", None)):
        raise PfeModelError(f"{source}: --pfe needs a model with forward_pfe(x) -> (mu, sigma_sq), such as one "
                            f"that `facescale pfe` logs; this model is a {type(model).__name__} without it")


@dataclass
class PfeFeatures:
    """What one pass over images gives: the protocol's flip sums and norms, and each image's fused Gaussian.

    Attributes:
        flip_sums: float32 ``[N, D]`` un-normalised ``f(x) + f(flip(x))`` from ``forward``
            (:func:`facescale.eval.suite.flip_sum_features`).
        norms: float32 ``[N]`` mean raw norm of ``f(x)`` and ``f(flip(x))`` (the MagFace quality score).
        mu: float32 ``[N, D']`` unit-norm means, image and flip fused by :func:`fuse_template`.
        sigma_sq: float32 ``[N, D']`` variances, fused likewise.
    """

    flip_sums: np.ndarray
    norms: np.ndarray
    mu: np.ndarray
    sigma_sq: np.ndarray

    @property
    def embeddings(self) -> np.ndarray:
        """The protocol's unit-norm embeddings (the same op on the same values as ``compute_embeddings``)."""
        return torch.nn.functional.normalize(torch.from_numpy(self.flip_sums)).numpy()


def _checked_gaussian(out: Any, n: int, first: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, sigma_sq)`` of ``n`` images as float32, checked: equal ``[n, D]`` shapes, sigma^2 finite and > 0."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise PfeModelError(f"{method} returned a {type(out).__name__}, expected a (mu, sigma_sq) pair")
    mu, sigma_sq = out[0].float(), out[1].float()
    if mu.ndim != 2 or mu.shape != sigma_sq.shape or len(mu) != n:
        raise PfeModelError(f"{method} on {n} images returned mu {tuple(mu.shape)} and sigma_sq "
                            f"{tuple(sigma_sq.shape)}, expected both [{n}, D]")
    bad = ~(torch.isfinite(sigma_sq) & (sigma_sq > 0)).all(dim=1)
    if bool(bad.any()):  # one host sync per batch: evaluation, not the training hot path
        raise PfeModelError(f"{method} gave sigma_sq <= 0 or non-finite for image {first + int(bad.nonzero()[0])}")
    return mu, sigma_sq


def _embed_with_pfe(model: nn.Module, x: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``model(x)`` and ``model.forward_pfe(x)`` as float32 ``(embedding, mu, sigma_sq)``, the Gaussian checked.

    A model with ``forward_with_pfe(x) -> (embedding, mu, sigma_sq)`` (:class:`facescale.pfe.model.PFEModel`) gives
    the three from one backbone pass; any other model is run twice, ``forward`` then ``forward_pfe``.
    """
    with_pfe = getattr(model, "forward_with_pfe", None)
    if callable(with_pfe):
        out = with_pfe(x)
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            raise PfeModelError(f"forward_with_pfe returned a {type(out).__name__}, expected an "
                                "(embedding, mu, sigma_sq) triple")
        embedding, (mu, sigma_sq) = out[0], _checked_gaussian(tuple(out[1:]), len(x), first, "forward_with_pfe")
    else:
        embedding = model(x)
        mu, sigma_sq = _checked_gaussian(model.forward_pfe(x), len(x), first, "forward_pfe")
    return embedding.float(), mu, sigma_sq


@torch.no_grad()
def pfe_features(model: nn.Module, images: np.ndarray, batch_size: int = 128,
                 device: torch.device | str = "cpu") -> PfeFeatures:
    """Runs ``forward`` and ``forward_pfe`` on each image and its horizontal flip (one backbone pass per view where
    the model has ``forward_with_pfe``).

    Args:
        model: A model with ``forward_pfe`` (run in eval mode; its mode is restored afterwards).
        images: uint8 ``[N, H, W, 3]`` RGB.
        batch_size: Images per forward pass.
        device: Device of the model.

    Returns:
        The features.

    Raises:
        PfeModelError: ``forward_pfe`` missing or its outputs malformed (naming the image).
    """
    require_pfe(model, type(model).__name__)
    was_training = model.training
    model.eval()
    sums, norms, mus, variances = [], [], [], []
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            x = normalize_images(batch.contiguous(), device)  # uint8 crosses to the device, normalised there
            (plain_emb, mu_a, var_a), (flip_emb, mu_b, var_b) = (_embed_with_pfe(model, v, start)
                                                                 for v in (x, torch.flip(x, dims=[3])))
            sums.append((plain_emb + flip_emb).cpu())
            norms.append(((plain_emb.norm(dim=1) + flip_emb.norm(dim=1)) / 2).cpu())
            # The two views are two observations of one face: fused by the template rule (faces axis = 1).
            mu, sigma_sq = _fuse(torch.stack([mu_a, mu_b], dim=1), torch.stack([var_a, var_b], dim=1), axis=1)
            mus.append(mu.cpu())
            variances.append(sigma_sq.cpu())
    finally:
        model.train(was_training)
    if not sums:
        empty = np.empty((0, 0), np.float32)
        return PfeFeatures(empty, np.empty(0, np.float32), empty, empty)
    return PfeFeatures(*(torch.cat(c).numpy() for c in (sums, norms, mus, variances)))


def _pair_mls(mu: np.ndarray, sigma_sq: np.ndarray, rows1: np.ndarray, rows2: np.ndarray,
              chunk: int = 1 << 15) -> np.ndarray:
    """MLS of ``(rows1[i], rows2[i])`` in chunks (bounded memory for millions of pairs)."""
    out = np.empty(len(rows1), dtype=np.float64)
    for s in range(0, len(rows1), chunk):
        a, b = rows1[s:s + chunk], rows2[s:s + chunk]
        out[s:s + chunk] = mls_score(mu[a], sigma_sq[a], mu[b], sigma_sq[b])
    return out


@dataclass(kw_only=True)
class PfeBinReport(BinReport):
    """A ``.bin`` report (every existing number from ``forward``, unchanged) with the PFE numbers beside it.

    Attributes:
        mls: :func:`evaluate_scores` of the MLS of the fused Gaussians.
        mls_roc: ROC by MLS.
        mls_tpr_at_fpr: TPR@FPR by MLS.
        mu_cosine: :func:`facescale.eval.verification.evaluate` of the fused means (cosine without sigma^2).
        mu_cosine_roc: ROC by cosine of the fused means.
        mu_cosine_tpr_at_fpr: TPR@FPR by that cosine.
        uncertainty_mean: Mean per-image :func:`uncertainty`.
        uncertainty_quality: ``accuracy_vs_rejection`` rows rejecting the most uncertain pairs (same embeddings
            and protocol as ``quality``, which rejects by norm).
    """

    mls: dict[str, Any]
    mls_roc: Roc
    mls_tpr_at_fpr: dict[float, dict[str, float]]
    mu_cosine: dict[str, Any]
    mu_cosine_roc: Roc
    mu_cosine_tpr_at_fpr: dict[float, dict[str, float]]
    uncertainty_mean: float
    uncertainty_quality: list[dict[str, Any]]


def run_bin_pfe(model: nn.Module, path: str | Path, batch_size: int = 128, device: str = "cpu",
                fpr_targets: tuple[float, ...] = FPR_TARGETS,
                reject_fractions: tuple[float, ...] = REJECT_FRACTIONS) -> PfeBinReport:
    """:func:`facescale.eval.suite.run_bin` plus MLS verification and uncertainty rejection, in one pass.

    Args:
        model: A model with ``forward_pfe``.
        path: The ``.bin`` file.
        batch_size: Images per forward pass.
        device: Device for the model.
        fpr_targets: FPR targets.
        reject_fractions: Shares of pairs to reject (by norm and by uncertainty).

    Returns:
        The report.
    """
    images, issame = load_bin(path)
    f = pfe_features(model, images, batch_size=batch_size, device=device)
    emb = f.embeddings
    roc = compute_roc(pair_scores(emb[0::2], emb[1::2]), issame)
    mls = mls_score(f.mu[0::2], f.sigma_sq[0::2], f.mu[1::2], f.sigma_sq[1::2])
    mls_roc = compute_roc(mls, issame)
    cos_roc = compute_roc(pair_scores(f.mu[0::2], f.mu[1::2]), issame)
    # Pair quality is the lower of the two images' (quality.pair_quality): minus uncertainty, so the more uncertain.
    per_image = uncertainty(f.sigma_sq)
    return PfeBinReport(
        name=Path(path).stem, path=str(path), verification=evaluate(emb, issame), norm_mean=float(np.mean(f.norms)),
        roc=roc, tpr_at_fpr=tpr_at_fpr(roc, fpr_targets),
        quality=accuracy_vs_rejection(emb, issame, f.norms, reject_fractions),
        mls=evaluate_scores(mls, issame), mls_roc=mls_roc, mls_tpr_at_fpr=tpr_at_fpr(mls_roc, fpr_targets),
        mu_cosine=evaluate(f.mu, issame), mu_cosine_roc=cos_roc, mu_cosine_tpr_at_fpr=tpr_at_fpr(cos_roc, fpr_targets),
        uncertainty_mean=float(np.mean(per_image)),
        uncertainty_quality=accuracy_vs_rejection(emb, issame, -per_image, reject_fractions))


@dataclass(kw_only=True)
class PfeIjbReport(IjbReport):
    """An IJB report (existing pooling, unchanged) with templates also fused by :func:`fuse_template`.

    Attributes:
        mls_roc: ROC of template pairs by MLS of the fused templates.
        mls_tpr_at_fpr: TPR@FPR by MLS.
        mu_cosine_roc: ROC by cosine of the fused template means.
        mu_cosine_tpr_at_fpr: TPR@FPR by that cosine.
    """

    mls_roc: Roc
    mls_tpr_at_fpr: dict[float, dict[str, float]]
    mu_cosine_roc: Roc
    mu_cosine_tpr_at_fpr: dict[float, dict[str, float]]


def fuse_templates(mu: np.ndarray, sigma_sq: np.ndarray,
                   templates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fuse_template` over all images of each template.

    The existing pooling averages media first (frames of a video count once); here the 1/sigma^2 weights decide,
    as in the paper's IJB-A/IJB-C protocol, so a blurred frame adds little whatever its media.

    Args:
        mu: ``[L, D]`` per-image means.
        sigma_sq: ``[L, D]`` per-image variances.
        templates: ``[L]`` template id per image.

    Returns:
        ``(template_ids [T] sorted, mu [T, D], sigma_sq [T, D])``.
    """
    template_ids, inverse = np.unique(templates, return_inverse=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    bounds = np.cumsum(np.bincount(inverse.ravel(), minlength=len(template_ids)))[:-1]
    fused = [fuse_template(mu[rows], sigma_sq[rows]) for rows in np.split(order, bounds)]
    return template_ids, np.stack([m for m, _ in fused]), np.stack([s for _, s in fused])


def _ijb_features(model: nn.Module, names: list[str], root: Path, batch_size: int, device: str) -> PfeFeatures:
    if len(names) <= 50_000:
        return pfe_features(model, read_images(root, names, desc="ijb images"), batch_size, device)
    parts = []  # large sets: one slice of images in memory at a time, as suite._embed_paths
    step = max(batch_size, 256)
    for s in range(0, len(names), step):
        imgs = np.stack([read_aligned_image(root / n) for n in names[s:s + step]])
        parts.append(pfe_features(model, imgs, batch_size, device))
    return PfeFeatures(*(np.concatenate([getattr(p, k) for p in parts])
                         for k in ("flip_sums", "norms", "mu", "sigma_sq")))


def run_ijb_pfe(model: nn.Module, meta_path: str | Path, pairs_path: str | Path, images_root: str | Path,
                batch_size: int = 128, device: str = "cpu", fpr_targets: tuple[float, ...] = FPR_TARGETS,
                weighting: IjbWeighting = "both", scores_path: str | Path | None = None) -> PfeIjbReport:
    """:func:`facescale.eval.suite.run_ijb` plus PFE template fusion and MLS between templates, in one pass.

    Args:
        model: A model with ``forward_pfe``.
        meta_path: ``image template media`` file.
        pairs_path: ``template1 template2 label`` file.
        images_root: Directory of the aligned crops the image list names.
        batch_size: Images per forward pass.
        device: Device for the model.
        fpr_targets: FPR targets.
        weighting: Weighting of the existing pooling (:func:`facescale.eval.ijb.weight_features`); PFE fusion
            weights by 1/sigma^2 alone.
        scores_path: Detector-score file; required by ``detector`` and ``both``.

    Returns:
        The report.
    """
    meta, pairs, detector_scores = read_ijb_inputs(meta_path, pairs_path, weighting, scores_path)
    f = _ijb_features(model, meta.images, Path(images_root), batch_size, device)
    template_ids, features = pool_templates(weight_features(f.flip_sums, weighting, detector_scores),
                                            meta.templates, meta.media)
    roc = compute_roc(template_pair_scores(template_ids, features, pairs), pairs.labels)
    fused_ids, mu, sigma_sq = fuse_templates(f.mu, f.sigma_sq, meta.templates)
    cos_roc = compute_roc(template_pair_scores(fused_ids, mu, pairs), pairs.labels)  # also checks every template
    rows1, rows2 = (np.searchsorted(fused_ids, side) for side in (pairs.template1, pairs.template2))
    mls_roc = compute_roc(_pair_mls(mu, sigma_sq, rows1, rows2), pairs.labels)
    return PfeIjbReport(name=Path(pairs_path).stem, num_images=len(meta.images), num_templates=len(template_ids),
                        roc=roc, tpr_at_fpr=tpr_at_fpr(roc, fpr_targets), weighting=weighting,
                        scores_path=str(scores_path) if detector_scores is not None else None,
                        mls_roc=mls_roc, mls_tpr_at_fpr=tpr_at_fpr(mls_roc, fpr_targets),
                        mu_cosine_roc=cos_roc, mu_cosine_tpr_at_fpr=tpr_at_fpr(cos_roc, fpr_targets))
