"""Memory-bound token-movement ops, as Triton kernels on CUDA and torch ops elsewhere.

- :func:`weighted_combine`: ``out[t] = sum_j weights[t, j] * y[pos[t, j]]`` (unpermute and the
  top-k weighted sum in one pass; torch needs a gather, a multiply and a reduction).
- :func:`histogram`: ``counts[b] = #{i: ids[i] == b}`` (per-slot token counts).
- :func:`swiglu`: ``silu(h[:, :I]) * h[:, I:]`` in one pass (torch: a SiLU pass and a multiply).
- :func:`grouped_gemm`: a persistent grouped GEMM whose groups' weights are found through a
  table of offsets (so they may live in different buffers), optionally with the SwiGLU fused
  into its epilogue; the CUDA path of the experts' FFN (``expertplane bench kernels``
  compares it with ``torch._grouped_mm``).

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

__all__ = ["HAVE_TRITON", "grouped_gemm", "histogram", "histogram_torch", "pretune", "swiglu",
           "swiglu_torch", "tile_fits", "tuned_configs", "use_triton", "weight_table",
           "weighted_combine", "weighted_combine_torch"]


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


def grouped_gemm(x: Tensor, w_base: Tensor, w_offsets: Tensor, offsets: Tensor, n_out: int,
                 w_cols: int, *,
                 swiglu: bool = False, config: dict | None = None,
                 out: Tensor | None = None) -> Tensor:
    """Grouped GEMM over weights addressed through a table (one persistent Triton kernel).

    x [N, K]: rows of group g are ``offsets[g-1]:offsets[g]`` (offsets int32 [S] cumulative,
    on x's device: no host sync). Group g's weight is the row-major [K, w_cols] matrix in x's
    dtype at element ``w_offsets[g]`` (int64 [S], a multiple of 16) from ``w_base``'s first
    element: the groups' weights may live in different buffers (hot-swap points a slot at
    its staged weights by rewriting the table; see :func:`weight_table`). Offsets rather
    than raw pointers keep the compiler's 16-byte alignment knowledge (vector loads).
    Plain (``swiglu=False``, w_cols == n_out): out = x_g @ w_g -> [N, n_out].
    Fused (``swiglu=True``, w_cols == 2 * n_out): gate = cols [0, n_out), up = cols
    [n_out, 2 n_out); out = silu(x_g @ gate) * (x_g @ up) -> [N, n_out], computed from the two
    fp32 accumulators in the epilogue (the [N, 2 n_out] activation is never written).
    fp32 accumulation, out in x's dtype. Needs K % 64 == 0 and n_out % 128 == 0. Tile
    configs are autotuned per (mean rows per group rounded to a power of 2, n_out, K, fused);
    ``config``: a fixed one instead (keys BM, BN, BK, num_warps, num_stages; tests, the
    interpreter). ``out``: [N, n_out] to write into (default: a new tensor).
    """
    if not HAVE_TRITON:
        raise RuntimeError("grouped_gemm needs Triton")
    groups = w_offsets.shape[0]
    k_dim = x.shape[1]
    if (k_dim % 64 or n_out % 128 or w_cols != (2 if swiglu else 1) * n_out
            or offsets.shape != (groups,)):
        raise ValueError(f"x {list(x.shape)} / n_out {n_out} / w_cols {w_cols} / offsets "
                         f"{list(offsets.shape)} / S {groups}: need K % 64 == 0, "
                         "n_out % 128 == 0, w_cols == (2 if swiglu else 1) * n_out, offsets [S]")
    if out is None:
        out = x.new_empty(x.shape[0], n_out)
    elif out.shape != (x.shape[0], n_out) or not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(f"out must be a contiguous [{x.shape[0]}, {n_out}] {x.dtype} tensor")
    if x.shape[0] == 0 or groups == 0:
        return out
    x = x.contiguous()
    common = {"N_OUT": n_out, "K_DIM": k_dim, "GROUPS": triton.next_power_of_2(groups),
              "SWIGLU": swiglu}
    programs = _programs(x.device)
    if config is None:
        bucket = triton.next_power_of_2(max(1, x.shape[0] // groups))
        _grouped_gemm_tuned[(programs,)](x, w_base, w_offsets, out, offsets, groups, bucket,
                                         **common)
    else:
        cfg = dict(config)
        if n_out % cfg["BN"] or k_dim % cfg["BK"]:
            raise ValueError(f"config: BN {cfg['BN']} must divide n_out {n_out} and BK "
                             f"{cfg['BK']} must divide K {k_dim}")
        launch = {"num_warps": cfg.pop("num_warps", 4), "num_stages": cfg.pop("num_stages", 2)}
        _grouped_gemm_kernel[(programs,)](x, w_base, w_offsets, out, offsets, groups, 0,
                                          **common, **cfg, **launch)
    return out


def pretune(k_dim: int, n_out: int, *, swiglu: bool, groups: int, max_rows: int,
            dtype: torch.dtype, device: torch.device) -> int:
    """Run :func:`grouped_gemm`'s autotuner now for every rows-per-group bucket 1, 2, 4, ...
    up to the first >= ``max_rows`` (x [bucket * groups, k_dim] of zeros, all ``groups`` on one shared
    [k_dim, w_cols] weight), so that no serving step pays a tuning: the first call of a new
    bucket compiles and times every tile config, seconds on the serving path. Returns the
    number of buckets run."""
    w_cols = (2 if swiglu else 1) * n_out
    weight = torch.zeros(k_dim, w_cols, dtype=dtype, device=device)
    w_offsets = torch.zeros(groups, dtype=torch.int64, device=device)
    bucket, runs = 1, 0
    while True:
        x = torch.zeros(bucket * groups, k_dim, dtype=dtype, device=device)
        offsets = torch.arange(1, groups + 1, dtype=torch.int32, device=device) * bucket
        grouped_gemm(x, weight, w_offsets, offsets, n_out, w_cols, swiglu=swiglu)
        runs += 1
        if bucket >= max_rows:
            return runs
        bucket *= 2


def weight_table(weights: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(w_base, w_offsets) for :func:`grouped_gemm`: matrices of one dtype and device (any
    buffers) -> the first one and int64 [S] element offsets of each from it, on the device.
    The caller keeps the matrices alive while the table is in use."""
    base = weights[0]
    size = base.element_size()
    offs = [(w.data_ptr() - base.data_ptr()) // size for w in weights]
    if any(w.dtype != base.dtype or not w.is_contiguous() or (w.data_ptr() - base.data_ptr())
           % (16 * size) for w in weights):
        raise ValueError("weights must be contiguous, of one dtype, 16-element aligned")
    return base, torch.tensor(offs, dtype=torch.int64).to(base.device)


def tuned_configs() -> dict:
    """The autotuner's choice so far: {(key values...): config} of :func:`grouped_gemm`."""
    return dict(_grouped_gemm_tuned.cache) if HAVE_TRITON else {}


def _programs(device: torch.device) -> int:
    """Persistent grid: one program per multiprocessor (the interpreter: a few)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block(hidden: int) -> int:
    return min(2048, triton.next_power_of_2(hidden))


def tile_fits(bm: int, bn: int, bk: int, stages: int, *, n_out: int, k_dim: int, fused: bool,
              smem_bytes: int) -> bool:
    """A tile config runs for this GEMM: BN divides n_out, BK divides K, the fp32
    accumulators fit in 128x256 per program (two when fused: no register spills) and the
    pipelined A and B tiles (2-byte elements) fit in ``smem_bytes`` of shared memory."""
    b_tiles = 2 if fused else 1
    return (n_out % bn == 0 and k_dim % bk == 0 and bm * bn * b_tiles <= 128 * 256
            and stages * (bm * bk + b_tiles * bk * bn) * 2 <= smem_bytes)


def _prune_tiles(configs, named_args, **kwargs):
    """The autotuner's configs that :func:`tile_fits` this call on the current device."""
    def arg(name):
        return kwargs[name] if name in kwargs else named_args[name]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    smem = props.shared_memory_per_block_optin
    return [c for c in configs
            if tile_fits(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_stages,
                         n_out=arg("N_OUT"), k_dim=arg("K_DIM"), fused=arg("SWIGLU"),
                         smem_bytes=smem)]


_TILE_CONFIGS = [  # (BM, BN, BK, num_stages, num_warps); small BM for ~100-row groups
    (64, 128, 64, 4, 4), (64, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 4),
    (128, 256, 64, 3, 8), (64, 64, 64, 5, 4), (128, 64, 64, 4, 4), (128, 128, 128, 3, 8),
    (64, 128, 128, 3, 4),
]


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

    @triton.jit
    def _grouped_gemm_kernel(x_ptr, w_base, w_offsets, out_ptr, offsets_ptr, num_groups,
                             rows_bucket,
                             N_OUT: tl.constexpr, K_DIM: tl.constexpr, GROUPS: tl.constexpr,
                             SWIGLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr):
        """Persistent: program p takes work items p, p + P, ...; item = (group, N tile,
        M tile) with the M tiles of one (group, N tile) adjacent, so they run together and
        the weight tile is read from HBM once (the others hit L2). Groups and item counts
        come from ``offsets`` on the device."""
        gs = tl.arange(0, GROUPS)
        valid = gs < num_groups
        ends = tl.load(offsets_ptr + gs, mask=valid, other=0)
        starts = tl.load(offsets_ptr + gs - 1, mask=valid & (gs > 0), other=0)
        m_tiles = tl.where(valid, (ends - starts + BM - 1) // BM, 0)
        n_tiles: tl.constexpr = N_OUT // BN
        w_cols: tl.constexpr = 2 * N_OUT if SWIGLU else N_OUT
        item_end = tl.cumsum(m_tiles * n_tiles, 0)
        total = tl.sum(m_tiles * n_tiles)
        dtype = x_ptr.dtype.element_ty
        item = tl.program_id(0)
        while item < total:   # a while loop: the interpreter cannot range() over tensors
            group = tl.sum((item_end <= item).to(tl.int32))
            here = gs == group
            g_mt = tl.sum(tl.where(here, m_tiles, 0))
            local = item - (tl.sum(tl.where(here, item_end, 0)) - g_mt * n_tiles)
            n_tile = local // g_mt
            row0 = tl.sum(tl.where(here, starts, 0)) + (local % g_mt) * BM
            rows = row0 + tl.arange(0, BM)
            row_ok = rows < tl.sum(tl.where(here, ends, 0))
            w_ptr = w_base + tl.multiple_of(tl.load(w_offsets + group), 16)
            cols = n_tile * BN + tl.arange(0, BN)
            ks = tl.arange(0, BK)
            a_ptrs = x_ptr + rows.to(tl.int64)[:, None] * K_DIM + ks[None, :]
            b_ptrs = w_ptr + ks.to(tl.int64)[:, None] * w_cols + cols[None, :]
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            if SWIGLU:
                acc_up = tl.zeros((BM, BN), dtype=tl.float32)
            for _ in range(0, K_DIM, BK):
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                acc = tl.dot(a, tl.load(b_ptrs), acc)
                if SWIGLU:
                    acc_up = tl.dot(a, tl.load(b_ptrs + N_OUT), acc_up)
                a_ptrs += BK
                b_ptrs += BK * w_cols
            if SWIGLU:
                acc = acc * tl.sigmoid(acc) * acc_up
            out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * N_OUT + cols[None, :]
            tl.store(out_ptrs, acc.to(dtype), mask=row_ok[:, None])
            item += tl.num_programs(0)

    _grouped_gemm_tuned = triton.autotune(
        configs=[triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_stages=st, num_warps=wp)
                 for bm, bn, bk, st, wp in _TILE_CONFIGS],
        key=["rows_bucket", "N_OUT", "K_DIM", "SWIGLU"],
        prune_configs_by={"early_config_prune": _prune_tiles})(_grouped_gemm_kernel)
