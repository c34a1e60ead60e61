"""The mutual likelihood score (MLS) loss of the PFE uncertainty head.

Shi & Jain, "Probabilistic Face Embeddings", ICCV 2019 (arXiv:1904.09658), eq. 4: the head is trained to maximise
the MLS of every genuine pair in the batch, ``L = -1/|P| sum_{(i,j) in P} s(x_i, x_j)``. As in the authors' code
(``mutual_likelihood_score_loss`` in seasonSH/Probabilistic-Face-Embeddings ``utils/tflib.py``) the pairs are all
same-label pairs of an identity-balanced batch and ``sigma^2 = exp(log sigma^2)``. The score is
:func:`facescale.eval.pfe.mls_score` (eq. 3 without its constants: this loss is twice the paper's plus a constant,
which rescales the gradient only).
"""

from __future__ import annotations

import torch

from facescale.eval.pfe import mls_score

__all__ = ["genuine_pairs", "mls_loss"]


def genuine_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(i, j)``, ``i < j``, of every pair of samples with the same label.

    Each unordered pair once: the score is symmetric, so the mean over them equals the authors' mean over the
    ordered off-diagonal pairs.
    """
    same = labels[:, None] == labels[None, :]
    return torch.nonzero(torch.triu(same, diagonal=1), as_tuple=True)


def mls_loss(mu: torch.Tensor, log_sigma_sq: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative MLS over the genuine pairs of a batch.

    Args:
        mu: ``[B, D]`` L2-normalised embeddings (the frozen backbone's).
        log_sigma_sq: ``[B, D]`` the head's ``log sigma^2``.
        labels: ``[B]`` identity labels; at least one label must occur twice.

    Returns:
        The scalar loss, differentiable in ``mu`` and ``log_sigma_sq``.

    Raises:
        ValueError: No two samples share a label (the batch has no genuine pair), or the shapes disagree.
    """
    if mu.shape != log_sigma_sq.shape or mu.ndim != 2 or labels.shape != mu.shape[:1]:
        raise ValueError(f"mls_loss: mu and log_sigma_sq must be [B, D] and labels [B], got {tuple(mu.shape)}, "
                         f"{tuple(log_sigma_sq.shape)}, {tuple(labels.shape)}")
    i, j = genuine_pairs(labels)
    if i.numel() == 0:
        raise ValueError(f"mls_loss: the batch of {len(labels)} samples has no two of one identity (no genuine "
                         "pair); PFE needs identity-balanced batches (images_per_id >= 2)")
    sigma_sq = log_sigma_sq.exp()
    return -mls_score(mu[i], sigma_sq[i], mu[j], sigma_sq[j]).mean()
