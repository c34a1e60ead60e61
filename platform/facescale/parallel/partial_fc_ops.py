"""The autograd pieces of Partial FC (:mod:`facescale.parallel.partial_fc`): the embedding all-gather, the chunked
cosine against this rank's (sampled) centers, and the softmax cross-entropy whose classes are split across ranks.

Each names its collectives in ``NOTE:`` comments. The gradient convention (``world_size * d(loss)/d(local
embeddings)``, right once DDP averages) is described in :mod:`facescale.parallel.partial_fc`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from facescale.heads.margin import IGNORE_LABEL
from facescale.parallel.dist import all_gather_rows, all_reduce_, rank_and_world_size, reduce_scatter_rows

# Rows of centers handled per chunk when computing logits; bounds the temporary normalised copy (~8 MB at D=512).
CHUNK_BYTES = 8 << 20


class AllGatherEmbeddings(torch.autograd.Function):
    """``[B, D]`` per rank -> ``[W*B, D]`` on every rank; backward sums the W partial gradients."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        # NOTE: all-gather of embeddings -- every rank scores the whole global batch against its own classes.
        return all_gather_rows(local, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        world_size = rank_and_world_size(ctx.group)[1]
        # NOTE: reduce-scatter (sum) of embedding gradients -- each rank's logits see only its own classes, so the
        # gradient of one embedding is the sum of the W ranks' partial gradients; each rank keeps its own rows.
        local = reduce_scatter_rows(grad, ctx.group)
        # DDP will average the backbone gradients over W ranks; pre-multiply so the average is d(loss)/d(theta).
        return local * world_size, None


class ShardCosine(torch.autograd.Function):
    """Cosine logits of normalised embeddings against (a subset of) this rank's centers, in row chunks.

    Saves only the normalised embeddings, the row index and per-row norms: the normalised centers are recomputed
    chunk by chunk in backward, so no ``[rows, D]`` copy of the centers outlives a chunk. The centers' gradient
    covers exactly ``rows``: a sparse COO tensor (``sparse_grad``) or a dense ``[num_local, D]`` tensor (v2 style).
    The clamp to [-1, 1] only guards rounding; its gradient is taken as the identity.
    """

    @staticmethod
    def forward(ctx: Any, norm_embeddings: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                sparse_grad: bool) -> torch.Tensor:
        num_rows = weight.shape[0] if rows is None else rows.numel()
        chunk = _chunk_rows(weight)
        cos = norm_embeddings.new_empty((norm_embeddings.shape[0], num_rows))
        norms = norm_embeddings.new_empty((num_rows,))
        for start in range(0, num_rows, chunk):
            end = min(start + chunk, num_rows)
            centers = _take_rows(weight, rows, start, end, norm_embeddings.dtype)
            norms[start:end] = centers.norm(dim=1).clamp_min(1e-12)
            # Clamped per chunk while the product is in cache (no extra pass over the whole matrix).
            cos[:, start:end] = torch.mm(norm_embeddings, centers.div_(norms[start:end, None]).t()).clamp_(-1.0, 1.0)
        ctx.save_for_backward(norm_embeddings, weight, rows, norms)
        ctx.sparse_grad = sparse_grad
        return cos

    @staticmethod
    def backward(ctx: Any, grad_cos: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        norm_embeddings, weight, rows, norms = ctx.saved_tensors
        num_rows = norms.numel()
        chunk = _chunk_rows(weight)
        grad_embeddings = torch.zeros_like(norm_embeddings)
        # The center gradient is written once, in the centers' dtype (bf16 centers: a bf16 gradient, rounded to
        # nearest -- autograd would cast it to the parameter's dtype anyway); the math stays in fp32 per chunk.
        same_dtype = weight.dtype == norm_embeddings.dtype
        grad_rows = norm_embeddings.new_empty((num_rows, weight.shape[1]), dtype=weight.dtype)
        for start in range(0, num_rows, chunk):
            end = min(start + chunk, num_rows)
            normed = _take_rows(weight, rows, start, end, norm_embeddings.dtype).div_(norms[start:end, None])
            grad_chunk = grad_cos[:, start:end]
            grad_embeddings.addmm_(grad_chunk, normed)
            grad_normed = torch.mm(grad_chunk.t(), norm_embeddings, out=grad_rows[start:end] if same_dtype else None)
            # d(w/|w|)/dw = (I - n n^T) / |w|: remove the radial component, then divide by the norm.
            radial = torch.linalg.vecdot(grad_normed, normed).unsqueeze(1)
            grad_normed.sub_(normed.mul_(radial)).div_(norms[start:end, None])
            if not same_dtype:
                grad_rows[start:end] = grad_normed
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if rows is None:
                grad_weight = grad_rows
            elif ctx.sparse_grad:
                grad_weight = torch.sparse_coo_tensor(rows.unsqueeze(0), grad_rows, weight.shape, is_coalesced=True,
                                                      check_invariants=False)
            else:
                grad_weight = torch.zeros_like(weight).index_copy_(0, rows, grad_rows)
        return grad_embeddings, grad_weight, None, None


def _chunk_rows(weight: torch.Tensor) -> int:
    """Center rows per chunk: the chunk's copy in the compute dtype (fp32 for bf16 centers) is ~CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (weight.shape[1] * max(4, weight.element_size())))


def _take_rows(weight: torch.Tensor, rows: torch.Tensor | None, start: int, end: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Rows ``start:end`` of the (sampled) centers as a new tensor of ``dtype``, which the caller may overwrite."""
    if rows is None:
        return weight[start:end].to(dtype, copy=True)
    taken = weight.index_select(0, rows[start:end])
    return taken if taken.dtype == dtype else taken.to(dtype)


class DistSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over logits whose class dimension is split across the ranks of ``group``."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, local_target: torch.Tensor, group: dist.ProcessGroup | None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        num_rows = logits.shape[0]
        max_logit = logits.max(dim=1).values
        # NOTE: all-reduce (max) of each row's largest logit -- one shift shared by all ranks keeps exp() finite
        # and makes the per-rank partial sums add up to the true softmax denominator.
        all_reduce_(max_logit, dist.ReduceOp.MAX, group)
        probs = logits - max_logit.unsqueeze(1)  # a new tensor: the caller's logits are left untouched
        rows = torch.nonzero(local_target != IGNORE_LABEL, as_tuple=False).squeeze(1)
        cols = local_target[rows]
        row_stats = logits.new_zeros((2, num_rows))
        row_stats[1, rows] = probs[rows, cols]
        probs.exp_()
        row_stats[0] = probs.sum(dim=1)
        # NOTE: all-reduce (sum) of [sum of exp(logit - max); target logit - max] per row -- the denominator is
        # spread over every rank's classes, and each row's target logit lives on exactly one rank (zeros elsewhere).
        all_reduce_(row_stats, dist.ReduceOp.SUM, group)
        sum_exp, target_shifted = row_stats
        # Divided here, not folded into backward's scaling: the fold changes the gradient's last bits (checked
        # against DeepSpeed ZeRO's trajectory in tests/test_engine.py) for one pass over the logits.
        probs.div_(sum_exp.unsqueeze(1))
        per_row = sum_exp.log() - target_shifted
        if keep is None:  # the mean over every row
            weights = None
            loss = per_row.mean()
        else:  # the mean over kept rows (``keep`` is identical on every rank); no kept row -> 0
            weights = keep.to(per_row.dtype) / keep.sum().clamp_min(1).to(per_row.dtype)
            loss = (per_row * weights).sum()
        ctx.save_for_backward(probs, rows, cols, weights)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        probs, rows, cols, weights = ctx.saved_tensors
        # The softmax buffer becomes the gradient in place (a second backward then fails loudly, as it should).
        grad = probs
        grad[rows, cols] -= 1.0
        if weights is None:
            grad.mul_(grad_loss / grad.shape[0])
        else:
            grad.mul_(weights.unsqueeze(1) * grad_loss)
        return grad, None, None, None
