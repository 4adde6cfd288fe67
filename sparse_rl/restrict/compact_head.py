"""Compact backward for TRL's fused LM head: the output head's weight gradient never exists as a dense matrix.

TRL 1.16's DPO and GRPO trainers (``add_fused_lm_head``) do not call ``lm_head(hidden)``: the patched forward reads
``lm_head.weight`` and hands it to ``trl.trainer.utils._ChunkedLogProbFunction``, whose backward accumulates the
weight gradient into a dense fp32 ``[V, H]`` tensor (108 MiB for SmolLM2-135M) that autograd then holds until the
weight's gradient accumulator runs, at the end of the backward pass for a tied embedding. With compact gradients the
hook keeps only the selected entries of it anyway.

:func:`install_compact_fused_head` replaces that module attribute by a dispatcher: for a weight with a compact-gradient
handle (:func:`~sparse_rl.restrict.compact.handle_of`) on CPU, it runs :class:`_CompactChunkedLogProb`, TRL's
function with the same forward and a backward that repeats TRL's loops (token chunks of ``TOKEN_CHUNK_SIZE``, vocab
tiles of ``chunk_size``, the same ``addmm_`` calls in fp32 for the hidden-state and bias gradients) but computes the
weight gradient of each tile in blocks of ``block_bytes`` (4 MiB) of vocabulary rows: each block is
``zeros.addmm_(tile_block.T, hidden)`` like TRL's ``grad_weight[rows].addmm_``, reloaded from the running selected
entries for the next token chunk, and only its selected entries are kept. The selected entries go to the handle
(:meth:`~sparse_rl.restrict.compact._Handle.deliver`), and the weight gets no gradient from autograd. Every other
call (no handle, a GPU weight, DTensor, a TRL whose function is not the one this was written against) takes TRL's
own function unchanged.

Exactness: splitting the rows of a product does not change the reduction over tokens. With torch's MKL sgemm on
AVX-512 the blocks are bit-identical to TRL's full tile at SmolLM2's shapes (576 wide, 1820-row blocks) and in the
tests' one-token-chunk case; sgemm does round some tiny shapes (a 2-row block, or a block continuing from nonzero
running sums) differently from the same rows of a taller product, so across several token chunks (more than
``TOKEN_CHUNK_SIZE`` = 4096 tokens in one forward) results may differ from the dense path by fp32 rounding, which
the tests bound. ``SPARSE_RL_DENSE_HEAD=1`` (or :func:`uninstall_compact_fused_head`) keeps the dense path.

Not covered: a model forward that calls ``lm_head(hidden)`` itself (SFT, TRL without the fused head) still builds
the head's dense gradient, which the compact hook then reduces as before.
"""

from __future__ import annotations

import os

import torch

from .compact import handle_of

BLOCK_BYTES = 4 * 2**20

_original = None  # TRL's function while the dispatcher is installed
_CompactChunkedLogProb = None  # subclass of it, built on installation


class _Dispatch:
    """Stands in for ``trl.trainer.utils._ChunkedLogProbFunction``: ``apply`` picks the compact backward where it
    applies and TRL's function everywhere else."""

    @staticmethod
    def apply(hidden, weight, bias, *rest):
        if _compact_applies(weight, hidden):
            return _CompactChunkedLogProb.apply(hidden, weight, bias, *rest)
        return _original.apply(hidden, weight, bias, *rest)


def _compact_applies(weight, hidden) -> bool:
    if os.environ.get("SPARSE_RL_DENSE_HEAD") == "1" or not torch.is_grad_enabled() or not weight.requires_grad:
        return False
    if type(weight) is not torch.nn.Parameter and type(weight) is not torch.Tensor:
        return False  # DTensor and other subclasses
    return weight.device.type == "cpu" and hidden.device.type == "cpu" and handle_of(weight) is not None


def install_compact_fused_head() -> bool:
    """Route TRL's fused LM head through the compact backward for weights with a compact-gradient handle; True if
    installed (idempotent). Returns False, leaving TRL alone, when TRL's fused head is not the one expected."""
    global _original, _CompactChunkedLogProb
    try:
        import trl.trainer.utils as trl_utils
        from trl.kernels import chunked_logprob
    except ImportError:
        return False
    current = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if current is _Dispatch:
        return True
    if current is not getattr(chunked_logprob, "ChunkedLogProbFunction", None) or not all(
            hasattr(chunked_logprob, name) for name in ("TOKEN_CHUNK_SIZE", "_backward_tile", "_addmm_fp32")):
        return False
    _original = current
    _CompactChunkedLogProb = _make_compact_function(current, chunked_logprob)
    trl_utils._ChunkedLogProbFunction = _Dispatch
    return True


def uninstall_compact_fused_head() -> None:
    import trl.trainer.utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is _Dispatch:
        trl_utils._ChunkedLogProbFunction = _original


def _make_compact_function(base, kernels):
    class CompactChunkedLogProb(base):
        """TRL's ``ChunkedLogProbFunction`` (same forward) whose backward hands the weight's selected gradient
        entries to its compact-gradient handle instead of returning a dense gradient."""

        @staticmethod
        def backward(ctx, grad_logprobs, grad_entropy, *_):
            hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
            handle = handle_of(weight)
            compute_dtype, chunk_size = ctx.compute_dtype, ctx.chunk_size
            needs_hidden_grad, needs_weight_grad, needs_bias_grad = ctx.needs_input_grad[:3]
            N, (vocab, width) = hidden.shape[0], weight.shape
            token_chunk = kernels.TOKEN_CHUNK_SIZE
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32) if needs_hidden_grad else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32) if needs_bias_grad else None
            mm_buf = torch.empty((min(N, token_chunk), chunk_size), dtype=compute_dtype)
            grad_logprobs = grad_logprobs.float().contiguous() if grad_logprobs is not None else None
            grad_entropy = grad_entropy.float().contiguous() if grad_entropy is not None else None
            if needs_weight_grad:
                indices = handle.indices
                selected = torch.zeros(indices.numel(), dtype=torch.float32)
                rows_per_block = max(1, BLOCK_BYTES // (4 * width))
                block = torch.empty((min(rows_per_block, vocab), width), dtype=torch.float32)

            for token_start in range(0, N, token_chunk):
                token_end = min(token_start + token_chunk, N)
                n = token_end - token_start
                hidden_chunk = hidden[token_start:token_end].to(compute_dtype)
                for start in range(0, vocab, chunk_size):
                    end = min(start + chunk_size, vocab)
                    w_chunk = weight[start:end].to(compute_dtype)
                    tile = mm_buf[:n, : end - start]
                    torch.mm(hidden_chunk, w_chunk.t(), out=tile)
                    if bias is not None:
                        tile.add_(bias[start:end].to(compute_dtype))
                    kernels._backward_tile(
                        tile, tile.stride(0), targets[token_start:token_end], log_z[token_start:token_end],
                        entropy[token_start:token_end],
                        grad_logprobs[token_start:token_end] if grad_logprobs is not None else log_z,
                        grad_entropy[token_start:token_end] if grad_entropy is not None else log_z,
                        start, end - start, HAS_LOGPROB_GRAD=grad_logprobs is not None,
                        HAS_ENTROPY_GRAD=grad_entropy is not None, BLOCK_SIZE=kernels._BLOCK_SIZE,
                        **ctx.kernel_args)
                    if grad_hidden is not None:
                        kernels._addmm_fp32(grad_hidden[token_start:token_end], tile, w_chunk)
                    if needs_weight_grad:
                        _selected_weight_gradient(selected, block, tile, hidden_chunk, start, end, rows_per_block,
                                                  width, indices, first=token_start == 0)
                    if grad_bias is not None:
                        grad_bias[start:end] += tile.sum(dim=0, dtype=torch.float32)

            if needs_weight_grad:
                handle.deliver(None, selected.to(weight.dtype))
            return (grad_hidden.to(hidden.dtype) if grad_hidden is not None else None, None,
                    grad_bias.to(bias.dtype) if grad_bias is not None else None, None, None, None, None, None, None)

    return CompactChunkedLogProb


def _selected_weight_gradient(selected, block, tile, hidden_chunk, start, end, rows_per_block, width, indices,
                              first):
    """Add ``tile.T @ hidden_chunk`` (the weight gradient of vocabulary rows ``start:end`` from one token chunk) into
    ``selected`` at the slots of those rows, one block of rows at a time, each computed as TRL's
    ``grad_weight[rows].addmm_`` would: from zero for the first token chunk, from the running sums after it. Blocks
    without a selected entry are skipped."""
    a, b = tile.t().float(), hidden_chunk.float()
    bounds = torch.arange(start, end + rows_per_block, rows_per_block).clamp(max=end)
    edges = torch.searchsorted(indices, (bounds * width).to(indices.dtype)).tolist()
    bounds = bounds.tolist()
    for k in range(len(bounds) - 1):
        row, block_end, lo, hi = bounds[k], bounds[k + 1], edges[k], edges[k + 1]
        if hi == lo:
            continue
        out = block[: block_end - row]
        flat = out.view(-1)
        local = indices[lo:hi].long() - row * width
        out.zero_()
        if not first:
            flat[local] = selected[lo:hi]
        out.addmm_(a[row - start:block_end - start], b)
        selected[lo:hi] = flat[local]
