"""Memory-bound token-movement ops, as Triton kernels on CUDA and torch ops elsewhere.

- :func:`weighted_combine`: ``out[t] = sum_j weights[t, j] * y[pos[t, j]]`` (unpermute and the
  top-k weighted sum in one pass; torch needs a gather, a multiply and a reduction).
- :func:`histogram`: ``counts[b] = #{i: ids[i] == b}`` (per-slot token counts).
- :func:`swiglu`: ``silu(h[:, :I]) * h[:, I:]`` in one pass (torch: a SiLU pass and a multiply).
- :func:`triton_grouped_mm`: a grouped GEMM (rows of each group times that group's weight),
  a Triton alternative to ``torch._grouped_mm`` measured by ``expertplane bench kernels``.

Triton is import-guarded: CPU builds have no Triton GPU backend, and each function falls back
to its ``*_torch`` twin there (those stay public: the benchmark's baseline). A Triton row
gather (token permute) measured 0.82x ``index_select`` on an H100 and is therefore not here:
the permutes use ``index_select``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # pragma: no cover - exercised on GPU machines only
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "histogram", "histogram_torch",
           "swiglu", "swiglu_torch", "triton_grouped_mm", "use_triton", "weighted_combine", "weighted_combine_torch"]


def use_triton(t: Tensor) -> bool:
    """True when ``t`` lives on a CUDA device and Triton is importable."""
    return HAVE_TRITON and t.is_cuda


def weighted_combine_torch(y: Tensor, pos: Tensor, weights: Tensor) -> Tensor:
    """y [M, H], pos [T, k] int64 rows of y, weights [T, k] fp32 -> [T, H] in y's dtype
    (accumulated in fp32)."""
    tokens, k = pos.shape
    rows = y.index_select(0, pos.reshape(-1)).view(tokens, k, y.shape[1]).float()
    return (rows * weights.unsqueeze(-1)).sum(dim=1).to(y.dtype)


def histogram_torch(ids: Tensor, num_bins: int) -> Tensor:
    """ids [N] int64 in [0, num_bins) -> counts [num_bins] int64."""
    return torch.bincount(ids, minlength=num_bins)


def swiglu_torch(h: Tensor) -> Tensor:
    """h [N, 2I] (gate | up) -> silu(gate) * up [N, I]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(h: Tensor) -> Tensor:
    """h [N, 2I] (gate | up) -> silu(gate) * up [N, I], computed in fp32, stored in h's dtype."""
    if not use_triton(h) or h.numel() == 0:
        return swiglu_torch(h)
    h = h.contiguous()
    rows, inter = h.shape[0], h.shape[1] // 2
    out = h.new_empty(rows, inter)
    _swiglu_kernel[(rows,)](h, out, inter, BLOCK=_block(inter), num_warps=4)
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


def triton_grouped_mm(x: Tensor, w: Tensor, counts: list[int], block_m: int = 128) -> Tensor:
    """Grouped GEMM on CUDA: rows of group s of x [N, K] (groups consecutive, ``counts`` [S]
    host ints) times w[s] [K, M] -> [N, M] in x's dtype, fp32 accumulation. ``block_m``: rows
    per tile (64, 128 or 256). Needs K % 64 == 0 and M % 128 == 0."""
    if not use_triton(x):
        raise RuntimeError("triton_grouped_mm needs Triton and a CUDA tensor")
    groups, k_dim, m_dim = w.shape
    if k_dim % 64 or m_dim % 128 or x.shape[1] != k_dim or len(counts) != groups:
        raise ValueError(f"x {list(x.shape)} / w {list(w.shape)} / counts [{len(counts)}] "
                         "must satisfy K % 64 == 0, M % 128 == 0, len(counts) == S")
    out = x.new_empty(x.shape[0], m_dim)
    if x.shape[0] == 0:
        return out
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    if block_m not in (64, 128, 256):
        raise ValueError(f"block_m must be 64, 128 or 256, got {block_m}")
    m_tiles = [-(-n // block_m) for n in counts]
    tile_group = [g for g, tiles in enumerate(m_tiles) for _ in range(tiles)]
    tile_m = [j for tiles in m_tiles for j in range(tiles)]
    total = len(tile_group)
    meta = torch.tensor(tile_group + tile_m + starts, dtype=torch.int32).to(x.device)

    def grid(cfg):
        return (total * (m_dim // cfg["BN"]),)

    _grouped_mm_kernel[grid](x.contiguous(), w.contiguous(), out, meta, total, m_dim, k_dim,
                             BM=block_m)
    return out


def _block(hidden: int) -> int:
    return min(2048, triton.next_power_of_2(hidden))


def _prune_tiles(configs, named_args, **kwargs):
    """Keep accumulators within 256x128 fp32 per program (no register spills)."""
    block_m = kwargs.get("BM", named_args.get("BM", 128))
    return [c for c in configs if block_m * c.kwargs["BN"] <= 256 * 128]


if HAVE_TRITON:  # pragma: no cover - compiled on GPU machines only

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
    def _swiglu_kernel(h_ptr, out_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        for start in range(0, inter, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < inter
            gate = tl.load(h_ptr + row * 2 * inter + offs, mask=mask).to(tl.float32)
            up = tl.load(h_ptr + row * 2 * inter + inter + offs, mask=mask).to(tl.float32)
            act = gate * tl.sigmoid(gate) * up
            tl.store(out_ptr + row * inter + offs, act.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _histogram_kernel(ids_ptr, counts_ptr, n, num_bins, BINS: tl.constexpr,
                          BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=num_bins).to(tl.int32)
        hist = tl.histogram(ids, BINS)
        bins = tl.arange(0, BINS)
        tl.atomic_add(counts_ptr + bins, hist, mask=(bins < num_bins) & (hist > 0))

    @triton.autotune(
        configs=[triton.Config({"BN": bn, "BK": bk}, num_stages=st, num_warps=wp)
                 for bn, bk, st, wp in [(128, 64, 4, 8), (256, 64, 3, 8), (128, 128, 3, 8),
                                        (256, 64, 4, 8), (128, 64, 3, 4)]],
        key=["n_out", "k_dim", "BM"],
        prune_configs_by={"early_config_prune": _prune_tiles})
    @triton.jit
    def _grouped_mm_kernel(x_ptr, w_ptr, out_ptr, meta_ptr, total_tiles, n_out, k_dim,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        n_tiles = n_out // BN
        tile = pid // n_tiles
        col_tile = pid % n_tiles
        group = tl.load(meta_ptr + tile).to(tl.int64)
        m_tile = tl.load(meta_ptr + total_tiles + tile)
        start = tl.load(meta_ptr + 2 * total_tiles + group)
        end = tl.load(meta_ptr + 2 * total_tiles + group + 1)
        rows = start + m_tile * BM + tl.arange(0, BM)
        row_ok = rows < end
        rows64 = rows.to(tl.int64)
        cols = col_tile * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        a_ptrs = x_ptr + rows64[:, None] * k_dim + ks[None, :]
        b_ptrs = w_ptr + group * k_dim * n_out + ks[:, None] * n_out + cols[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, k_dim, BK):
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs)
            acc = tl.dot(a, b, acc)
            a_ptrs += BK
            b_ptrs += BK * n_out
        out_ptrs = out_ptr + rows64[:, None] * n_out + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
