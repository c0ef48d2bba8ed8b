"""Step-time model of an expert-parallel MoE cluster, every constant measured or cited.

One MoE layer takes the slowest GPU's expert compute, plus the all-to-all dispatch and combine
of the slowest GPU's rows, plus a per-layer fixed cost; a step is the sum over the MoE layers:

    layer(m) = S * gemm_per_slot + m * gemm_per_row                   (grouped GEMM, slowest GPU)
             + m * dispatch_bytes / bw(m * dispatch_bytes)            (dispatch, FP8 rows)
             + m * combine_bytes / bw(m * combine_bytes)              (combine, BF16 rows)
             + layer_fixed                                            (everything else)

``m`` is the largest number of rows (token x expert pairs) any GPU receives in that layer,
``S`` the expert slots per GPU. Sources (docs/goodput.md explains each):

* grouped GEMM: our H100 (``nvidia-h100-x1``) run 6 in benchmarks/kernels.md, FFN layer path
  of 32 local DeepSeek-V3 experts (H 7168, I 2048, bf16): 1.147 ms at 4,096 rows, 4.981 ms
  at 32,768 rows. Two points, one line: the slope is the time per row, the intercept (the
  weight streaming at ~128 rows per expert, which kernels.md shows is bound by reading the
  weights) is split evenly over the 32 experts, so it scales with the slots a GPU holds.
* all-to-all: DeepEP's published H800 + CX7 400 Gb/s figures for the DeepSeek-V3 setting
  (hidden 7168, top-8, FP8 dispatch, BF16 combine), github.com/deepseek-ai/DeepEP
  docs/legacy.md: low-latency kernels at 128 tokens per GPU and normal kernels at 4,096
  tokens per GPU, per EP size. Bandwidth is interpolated in log(bytes) between the two
  message sizes and held flat outside them; an EP size between two published ones takes the
  larger one's figures, beyond the largest published size the largest's.
* per-layer fixed cost: our H100 run 6 MoE layer step (benchmarks/kernels.md, world size 1,
  4,096 tokens): whole step 7.13 ms minus the expert GEMM 4.85 ms = 2.28 ms of router,
  replica choice, dispatch planning, permutes and combine, mostly launch and sync latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MS = 1e-3
GB = 1e9

# (rows, ms) of the H100 FFN layer path, 32 local experts (benchmarks/kernels.md, run 6).
H100_GEMM_POINTS = ((4096, 1.147), (32768, 4.981))
H100_GEMM_EXPERTS = 32
# H100 run 6 MoE layer step minus its expert GEMM (benchmarks/kernels.md).
H100_LAYER_FIXED_MS = 7.13 - 4.85

HIDDEN = 7168
DISPATCH_BYTES_PER_ROW = HIDDEN + HIDDEN // 128 * 4   # FP8 values + one fp32 scale per 128
COMBINE_BYTES_PER_ROW = HIDDEN * 2                    # BF16
DEEPEP_TOKENS = (128, 4096)  # tokens per GPU of the low-latency and the normal-kernel tables

# EP size -> ((dispatch GB/s, combine GB/s) at 128 tokens, (dispatch, combine) at 4,096 tokens),
# DeepEP docs/legacy.md (H800, CX7 400 Gb/s). The normal-kernel table stops at EP 64, the
# low-latency one at EP 256: each EP size takes the next published size of each table.
_DEEPEP_LL = {8: (98, 127), 16: (63, 74), 32: (48, 53), 64: (43, 46), 128: (39, 39),
              256: (39, 40)}
_DEEPEP_NORMAL = {8: (153, 158), 16: (43, 43), 32: (58, 57), 64: (51, 50)}


def _published(table: dict, ep: int) -> tuple[float, float]:
    sizes = sorted(table)
    return table[next((s for s in sizes if s >= ep), sizes[-1])]


@dataclass(frozen=True)
class GemmFit:
    """Grouped-GEMM time of one GPU: ``per_slot_s`` x slots + ``per_row_s`` x rows (seconds)."""

    per_slot_s: float
    per_row_s: float

    @classmethod
    def from_points(cls, points=H100_GEMM_POINTS, experts: int = H100_GEMM_EXPERTS) -> "GemmFit":
        """The line through two (rows, ms) measurements of ``experts`` local experts."""
        (r0, t0), (r1, t1) = points
        per_row = (t1 - t0) / (r1 - r0) * MS
        return cls(per_slot_s=(t0 * MS - r0 * per_row) / experts, per_row_s=per_row)

    def seconds(self, slots: int, rows):
        return slots * self.per_slot_s + np.asarray(rows, dtype=np.float64) * self.per_row_s


@dataclass(frozen=True)
class A2ACurve:
    """All-to-all bandwidth (bytes/s) of one direction as a function of the bytes one GPU moves:
    log-linear between ``(bytes_lo, bw_lo)`` and ``(bytes_hi, bw_hi)``, flat outside."""

    bytes_lo: float
    bw_lo: float
    bytes_hi: float
    bw_hi: float

    def bandwidth(self, nbytes):
        x = np.clip(np.log(np.maximum(np.asarray(nbytes, dtype=np.float64), 1.0)),
                    np.log(self.bytes_lo), np.log(self.bytes_hi))
        f = (x - np.log(self.bytes_lo)) / (np.log(self.bytes_hi) - np.log(self.bytes_lo))
        return self.bw_lo + f * (self.bw_hi - self.bw_lo)

    def seconds(self, nbytes):
        nbytes = np.asarray(nbytes, dtype=np.float64)
        return nbytes / self.bandwidth(nbytes)


def deepep_curves(ep_size: int, top_k: int = 8) -> tuple[A2ACurve, A2ACurve]:
    """(dispatch, combine) curves for ``ep_size`` GPUs from DeepEP's published tables."""
    ll, normal = _published(_DEEPEP_LL, ep_size), _published(_DEEPEP_NORMAL, ep_size)
    curves = []
    for i, per_row in enumerate((DISPATCH_BYTES_PER_ROW, COMBINE_BYTES_PER_ROW)):
        lo, hi = (t * top_k * per_row for t in DEEPEP_TOKENS)
        curves.append(A2ACurve(lo, ll[i] * GB, hi, normal[i] * GB))
    return curves[0], curves[1]


@dataclass(frozen=True)
class CostModel:
    """Step time from the rows each GPU receives. ``layer_fixed_s`` in seconds."""

    gemm: GemmFit
    dispatch: A2ACurve
    combine: A2ACurve
    layer_fixed_s: float
    slots_per_gpu: int

    @classmethod
    def measured(cls, ep_size: int, slots_per_gpu: int, top_k: int = 8) -> "CostModel":
        dispatch, combine = deepep_curves(ep_size, top_k)
        return cls(GemmFit.from_points(), dispatch, combine, H100_LAYER_FIXED_MS * MS,
                   slots_per_gpu)

    def layer_seconds(self, max_rows):
        """Seconds per layer for ``max_rows`` [...] (rows of the most loaded GPU)."""
        m = np.asarray(max_rows, dtype=np.float64)
        return (self.gemm.seconds(self.slots_per_gpu, m)
                + self.dispatch.seconds(m * DISPATCH_BYTES_PER_ROW)
                + self.combine.seconds(m * COMBINE_BYTES_PER_ROW) + self.layer_fixed_s)

    def step_seconds(self, gpu_rows) -> float:
        """One step: ``gpu_rows`` [L, P] rows per GPU and layer -> seconds (sum over layers)."""
        return float(self.layer_seconds(np.asarray(gpu_rows).max(axis=-1)).sum())
