"""The autograd pieces of Partial FC (:mod:`facescale.parallel.partial_fc`): the embedding all-gather, the chunked
cosine against this rank's (sampled) centers, and the softmax cross-entropy whose classes are split across ranks.

Each names its collectives in ``NOTE:`` comments. The gradient convention (``world_size * d(loss)/d(local
embeddings)``, right once DDP averages) is described in :mod:`facescale.parallel.partial_fc`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from facescale.heads.margin import IGNORE_LABEL
from facescale.parallel.dist import all_gather_rows, all_reduce_, rank_and_world_size, reduce_scatter_rows
from facescale.parallel.row_state import KeptStorage

# Rows of centers handled per chunk when computing logits; bounds the chunk's fp32 copy of bf16 rows (~8 MB at D=512).
# CPU: 2 MiB, cache-sized (see ``row_optimizer.CPU_STEP_CHUNK_BYTES``); the planner counts the larger value.
CHUNK_BYTES = 8 << 20
CPU_CHUNK_BYTES = 2 << 20


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

    Neither pass makes a normalised copy of the rows: the forward scales each chunk's ``[N, chunk]`` product by
    ``1/|w|`` per column, and both gradients use the ``[N, chunk]`` gradient block scaled the same way. (Until
    2026-12-02 the forward normalised the rows into a chunk buffer first, a ``[chunk, D]`` pass: ~10 ms per step
    more at 1M identities, rate 0.1, here. Scaling the product moves the cosines' rounding by an ulp; the
    DDP-vs-ZeRO trajectory test of ``tests/test_engine.py`` had drifted past its bound with it at an earlier state
    of the code, and now passes at 0.63 of it.) Saves only the embeddings,
    the row source and per-row norms; the rows are re-read chunk by chunk in backward. The rows come from
    ``weight[rows]`` (all rows when ``rows`` is ``None``) or, when the optimizer has already gathered and caught
    them up, from ``sampled`` (``[len(rows), D]``, the same values; see ``SparseRowOptimizer.prepare_rows_lazily``). The
    centers' gradient covers exactly ``rows``: a sparse COO tensor (``sparse_grad``) or a dense
    ``[num_local, D]`` tensor (v2 style). The clamp to [-1, 1] only guards rounding; its gradient is the identity.
    ``buffers`` (training): the :class:`KeptStorage` of the ``[N, S]`` cosines and of the sampled rows' gradient.
    ``fill(end)`` (with ``sampled``): called before rows ``[.., end)`` of ``sampled`` are read in forward, so the
    optimizer fills its working set chunk by chunk (``SparseRowOptimizer.prepare_rows_lazily``).
    """

    @staticmethod
    def forward(ctx: Any, norm_embeddings: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                sparse_grad: bool, sampled: torch.Tensor | None = None,
                buffers: tuple[KeptStorage, KeptStorage] | None = None,
                fill: Callable[[int], None] | None = None) -> torch.Tensor:
        source = _RowSource(weight, rows, sampled, norm_embeddings.dtype, fill)
        num_rows, batch = source.num_rows, norm_embeddings.shape[0]
        # Not a view (its own tensor on a kept storage): the margin and the softmax write into it in place, which
        # autograd forbids on a view.
        logits_buffer, grad_buffer = buffers if buffers is not None else (None, None)
        cos = KeptStorage.take_or_new(logits_buffer, (batch, num_rows), norm_embeddings.dtype, norm_embeddings.device)
        norms = norm_embeddings.new_empty((num_rows,))
        for start, end in source.spans():
            centers = source.take(start, end)
            torch.linalg.vector_norm(centers, dim=1, out=norms[start:end])
            # E w / |w|: the product is scaled per column (an [N, chunk] pass) rather than the rows normalised first
            # (a [chunk, D] pass, twice the size at N = 256, D = 512). Written in place into its columns (BLAS takes
            # the row stride), scaled and clamped while they are in cache.
            block = torch.mm(norm_embeddings, centers.t(), out=cos[:, start:end])
            block.div_(norms[start:end].clamp_min_(1e-12)).clamp_(-1.0, 1.0)
        ctx.save_for_backward(norm_embeddings, weight, rows, norms, sampled)
        ctx.sparse_grad, ctx.grad_buffer = sparse_grad, grad_buffer
        return cos

    @staticmethod
    def backward(ctx: Any, grad_cos: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None,
                                                            None, None, None]:
        norm_embeddings, weight, rows, norms, sampled = ctx.saved_tensors
        source = _RowSource(weight, rows, sampled, norm_embeddings.dtype)
        batch, width = norm_embeddings.shape
        # Each gradient only when asked for (frozen centers, or embeddings that need none).
        grad_embeddings = torch.zeros_like(norm_embeddings) if ctx.needs_input_grad[0] else None
        # The center gradient is written once, in the centers' dtype (bf16 centers: a bf16 gradient, rounded to
        # nearest -- autograd would cast it to the parameter's dtype anyway); the math stays in fp32 per chunk.
        # Kept at rate 1 too (all rows): a fresh [L, D] gradient costs its page faults and its unmapping every step
        # (~75 ms per GB here); a GPU's caching allocator keeps that memory reserved the same way.
        grad_rows = KeptStorage.take_or_new(ctx.grad_buffer, (source.num_rows, width), weight.dtype, weight.device) \
            if ctx.needs_input_grad[1] else None
        chunk = min(source.chunk, source.num_rows)
        scaled = norm_embeddings.new_empty((batch * chunk,))
        scratch = _CenterGradScratch(norm_embeddings, weight.dtype, chunk) if grad_rows is not None else None
        inv_norms = norms.reciprocal()  # for all rows at once (elementwise: the same bits as per chunk)
        inv_norms_sq = inv_norms.square()
        for start, end in source.spans():
            centers = source.take(start, end)
            # With G the cosine gradient and u = w/|w|: dE = G u = (G / |w|) w, and dw = (I - u u^T) G^T E / |w|
            # = g - w (w . g) / |w|^2 with g = (G / |w|)^T E -- both use the small [N, chunk] block scaled once,
            # never a normalised [chunk, D] copy of the rows.
            grad_chunk = scaled[:batch * (end - start)].view(batch, end - start)
            torch.mul(grad_cos[:, start:end], inv_norms[start:end], out=grad_chunk)
            if grad_embeddings is not None:
                grad_embeddings.addmm_(grad_chunk, centers)
            if scratch is not None:
                scratch.center_gradient(grad_chunk, centers, inv_norms_sq[start:end], grad_rows[start:end])
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if rows is None:
                grad_weight = grad_rows
            elif ctx.sparse_grad:
                grad_weight = torch.sparse_coo_tensor(rows.unsqueeze(0), grad_rows, weight.shape, is_coalesced=True,
                                                      check_invariants=False)
            else:
                grad_weight = torch.zeros_like(weight).index_copy_(0, rows, grad_rows)
        return grad_embeddings, grad_weight, None, None, None, None, None


class _CenterGradScratch:
    """The reused per-chunk buffers of :meth:`ShardCosine.backward`'s center gradient."""

    def __init__(self, norm_embeddings: torch.Tensor, dtype: torch.dtype, chunk: int) -> None:
        self.embeddings = norm_embeddings
        width = norm_embeddings.shape[1]
        self.product = norm_embeddings.new_empty((chunk, width))  # for w . g: vecdot would allocate it per chunk
        self.spare = None if dtype == norm_embeddings.dtype else norm_embeddings.new_empty((chunk, width))

    def center_gradient(self, grad_chunk: torch.Tensor, centers: torch.Tensor, inv_norms_sq: torch.Tensor,
                        out: torch.Tensor) -> None:
        """``out = g - w (w . g) / |w|^2`` with ``g = grad_chunk^T E`` (``grad_chunk`` already scaled by 1/|w|)."""
        rows = centers.shape[0]
        grad_w = out if self.spare is None else self.spare[:rows]
        torch.mm(grad_chunk.t(), self.embeddings, out=grad_w)
        radial = torch.mul(grad_w, centers, out=self.product[:rows]).sum(dim=1).mul_(inv_norms_sq)
        grad_w.addcmul_(centers, radial.unsqueeze(1), value=-1.0)
        if self.spare is not None:
            out.copy_(grad_w)


class _RowSource:
    """Chunks of the center rows a :class:`ShardCosine` reads, as fp32 (``dtype``) tensors not to be modified:
    views where the storage already is contiguous fp32, else copies into one reused chunk buffer."""

    def __init__(self, weight: torch.Tensor, rows: torch.Tensor | None, sampled: torch.Tensor | None,
                 dtype: torch.dtype, fill: Callable[[int], None] | None = None) -> None:
        self.weight, self.rows, self.sampled, self.dtype, self.fill = weight, rows, sampled, dtype, fill
        self.num_rows = weight.shape[0] if rows is None else rows.numel()
        self.chunk = _chunk_rows(weight)
        self._buffer: torch.Tensor | None = None

    def spans(self) -> Iterable[tuple[int, int]]:
        for start in range(0, self.num_rows, self.chunk):
            yield start, min(start + self.chunk, self.num_rows)

    def take(self, start: int, end: int) -> torch.Tensor:
        if self.fill is not None:  # the optimizer gathers and catches up the working set's rows up to ``end``
            self.fill(end)
        if self.sampled is not None or self.rows is None:
            block = (self.weight if self.sampled is None else self.sampled)[start:end]
            if block.dtype == self.dtype:
                return block
        if self._buffer is None:
            self._buffer = torch.empty((min(self.chunk, self.num_rows), self.weight.shape[1]), dtype=self.dtype,
                                       device=self.weight.device)
        out = self._buffer[:end - start]
        if self.sampled is not None or self.rows is None:
            return out.copy_(block)
        if self.weight.dtype == self.dtype:
            return torch.index_select(self.weight, 0, self.rows[start:end], out=out)
        return out.copy_(self.weight.index_select(0, self.rows[start:end]))


def _chunk_rows(weight: torch.Tensor) -> int:
    """Center rows per chunk: the chunk's copy in the compute dtype (fp32 for bf16 centers) is ~CHUNK_BYTES
    (CPU_CHUNK_BYTES on CPU)."""
    budget = CPU_CHUNK_BYTES if weight.device.type == "cpu" else CHUNK_BYTES
    return max(1, budget // (weight.shape[1] * max(4, weight.element_size())))


class DistSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over logits whose class dimension is split across the ranks of ``group``.

    Returns ``(loss, shifted_exp)``: the logits are turned into ``exp(logit - row max)`` *in place* (one ``[N, C]``
    buffer from the cosines to the logit gradient; ``shifted_exp`` is that same tensor, marked as modified, and
    carries no gradient of its own). They are not divided by the row sums: the backward folds that division into
    its own scaling, one pass over the logits fewer (the softmax probabilities are ``shifted_exp`` over the
    all-reduced row sums). Callers that need the logits afterwards pass a copy.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, local_target: torch.Tensor, group: dist.ProcessGroup | None,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        num_rows = logits.shape[0]
        max_logit = logits.amax(dim=1)  # amax, not max(): no argmax is needed, and it is ~10x faster on CPU
        # NOTE: all-reduce (max) of each row's largest logit -- one shift shared by all ranks keeps exp() finite
        # and makes the per-rank partial sums add up to the true softmax denominator.
        all_reduce_(max_logit, dist.ReduceOp.MAX, group)
        rows = torch.nonzero(local_target != IGNORE_LABEL, as_tuple=False).squeeze(1)
        cols = local_target[rows]
        row_stats = logits.new_zeros((2, num_rows))
        row_stats[1, rows] = logits[rows, cols] - max_logit[rows]
        shifted_exp = logits.sub_(max_logit.unsqueeze(1)).exp_()
        row_stats[0] = shifted_exp.sum(dim=1)
        # NOTE: all-reduce (sum) of [sum of exp(logit - max); target logit - max] per row -- the denominator is
        # spread over every rank's classes, and each row's target logit lives on exactly one rank (zeros elsewhere).
        all_reduce_(row_stats, dist.ReduceOp.SUM, group)
        sum_exp, target_shifted = row_stats
        per_row = sum_exp.log() - target_shifted
        if keep is None:  # the mean over every row
            weights = None
            loss = per_row.mean()
        else:  # the mean over kept rows (``keep`` is identical on every rank); no kept row -> 0
            weights = keep.to(per_row.dtype) / keep.sum().clamp_min(1).to(per_row.dtype)
            loss = (per_row * weights).sum()
        ctx.mark_dirty(logits)
        ctx.mark_non_differentiable(shifted_exp)
        # ``shifted_exp`` never has a gradient: without this autograd would hand backward a zero-filled [N, C] for it.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(shifted_exp, rows, cols, weights, sum_exp)
        return loss, shifted_exp

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_exp: torch.Tensor | None) -> tuple[torch.Tensor, None,
                                                                                                None, None]:
        shifted_exp, rows, cols, weights, sum_exp = ctx.saved_tensors
        # d(loss)/d(logit) = scale * (softmax - onehot), with the division by the row sums folded into the one pass
        # that scales the buffer, which becomes the gradient in place (a second backward then fails loudly).
        grad = shifted_exp
        scale = grad_loss / grad.shape[0] if weights is None else weights * grad_loss
        per_row = (scale / sum_exp).unsqueeze(1)
        target = grad[rows, cols] * per_row[rows, 0] - (scale[rows] if scale.dim() else scale)
        grad.mul_(per_row)
        grad[rows, cols] = target
        return grad, None, None, None
