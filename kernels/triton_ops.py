"""Memory-bound token-movement ops, as Triton kernels on CUDA and torch ops elsewhere.

- :func:`gather_rows`: ``out[i] = x[index[i]]`` (token permute before dispatch, and the
  receiver's reorder to slot-major rows).
- :func:`weighted_combine`: ``out[t] = sum_j weights[t, j] * y[pos[t, j]]`` (unpermute and the
  top-k weighted sum in one pass; torch needs a gather, a multiply and a reduction).
- :func:`histogram`: ``counts[b] = #{i: ids[i] == b}`` (per-slot token counts).

Triton is import-guarded: CPU builds have no Triton GPU backend, and each function falls back
to its ``*_torch`` twin there (those stay public: the benchmark's baseline).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # pragma: no cover - exercised on GPU machines only
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "gather_rows", "gather_rows_torch", "histogram", "histogram_torch",
           "use_triton", "weighted_combine", "weighted_combine_torch"]


def use_triton(t: Tensor) -> bool:
    """True when ``t`` lives on a CUDA device and Triton is importable."""
    return HAVE_TRITON and t.is_cuda


def gather_rows_torch(x: Tensor, index: Tensor) -> Tensor:
    """x [N, H], index [M] int64 -> [M, H]."""
    return x.index_select(0, index)


def weighted_combine_torch(y: Tensor, pos: Tensor, weights: Tensor) -> Tensor:
    """y [M, H], pos [T, k] int64 rows of y, weights [T, k] fp32 -> [T, H] in y's dtype
    (accumulated in fp32)."""
    tokens, k = pos.shape
    rows = y.index_select(0, pos.reshape(-1)).view(tokens, k, -1).float()
    return (rows * weights.unsqueeze(-1)).sum(dim=1).to(y.dtype)


def histogram_torch(ids: Tensor, num_bins: int) -> Tensor:
    """ids [N] int64 in [0, num_bins) -> counts [num_bins] int64."""
    return torch.bincount(ids, minlength=num_bins)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``out[i] = x[index[i]]``: x [N, H] (contiguous), index [M] int64 -> [M, H]."""
    if not use_triton(x) or index.numel() == 0:
        return gather_rows_torch(x, index)
    x = x.contiguous()
    out = x.new_empty(index.numel(), x.shape[1])
    _gather_rows_kernel[(index.numel(),)](x, index, out, x.shape[1],
                                         BLOCK=_block(x.shape[1]), num_warps=4)
    return out


def weighted_combine(y: Tensor, pos: Tensor, weights: Tensor) -> Tensor:
    """``out[t] = sum_j weights[t, j] * y[pos[t, j]]``: y [M, H], pos/weights [T, k] -> [T, H]."""
    if not use_triton(y) or pos.numel() == 0:
        return weighted_combine_torch(y, pos, weights)
    y = y.contiguous()
    tokens, k = pos.shape
    out = y.new_empty(tokens, y.shape[1])
    _weighted_combine_kernel[(tokens,)](y, pos.contiguous(), weights.float().contiguous(), out,
                                        y.shape[1], K=k, BLOCK=_block(y.shape[1]), num_warps=4)
    return out


def histogram(ids: Tensor, num_bins: int) -> Tensor:
    """Counts [num_bins] int64 of ids [N] (values in [0, num_bins))."""
    if not use_triton(ids) or ids.numel() == 0:
        return histogram_torch(ids, num_bins)
    counts = torch.zeros(num_bins, dtype=torch.int32, device=ids.device)
    block = 4096
    bins = triton.next_power_of_2(num_bins + 1)
    _histogram_kernel[(triton.cdiv(ids.numel(), block),)](
        ids, counts, ids.numel(), num_bins, BINS=bins, BLOCK=block, num_warps=8)
    return counts.to(torch.int64)


def _block(hidden: int) -> int:
    return min(2048, triton.next_power_of_2(hidden))


if HAVE_TRITON:  # pragma: no cover - compiled on GPU machines only

    @triton.jit
    def _gather_rows_kernel(x_ptr, index_ptr, out_ptr, hidden, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        src = tl.load(index_ptr + row).to(tl.int64)
        for start in range(0, hidden, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < hidden
            vals = tl.load(x_ptr + src * hidden + offs, mask=mask)
            tl.store(out_ptr + row.to(tl.int64) * hidden + offs, vals, mask=mask)

    @triton.jit
    def _weighted_combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, hidden,
                                 K: tl.constexpr, BLOCK: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        for start in range(0, hidden, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < hidden
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for j in tl.static_range(K):
                src = tl.load(pos_ptr + tok * K + j).to(tl.int64)
                w = tl.load(w_ptr + tok * K + j)
                acc += w * tl.load(y_ptr + src * hidden + offs, mask=mask).to(tl.float32)
            tl.store(out_ptr + tok * hidden + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _histogram_kernel(ids_ptr, counts_ptr, n, num_bins, BINS: tl.constexpr,
                          BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=num_bins).to(tl.int32)
        hist = tl.histogram(ids, BINS)
        bins = tl.arange(0, BINS)
        tl.atomic_add(counts_ptr + bins, hist, mask=(bins < num_bins) & (hist > 0))
