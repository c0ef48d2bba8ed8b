"""Local expert weights and the SwiGLU grouped GEMM.

Shapes: ``S`` physical slots on this rank, ``H`` hidden size, ``I`` expert intermediate size,
``N`` tokens routed to this rank, sorted by local slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from expertplane.kernels.triton_ops import swiglu, swiglu_torch

__all__ = ["ExpertWeightFn", "LocalExperts", "grouped_mm", "grouped_mm_loop", "make_expert_weights",
           "seeded_expert_weights", "swiglu_ffn"]

# logical expert id -> (w13 [H, 2I], w2 [I, H])
ExpertWeightFn = Callable[[int], tuple[Tensor, Tensor]]


def make_expert_weights(seed: int, layer: int, expert: int, hidden: int, intermediate: int, *,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                        ) -> tuple[Tensor, Tensor]:
    """Deterministic weights of one LOGICAL expert: (w13 [H, 2I], w2 [I, H]).

    Drawn from a generator seeded by (seed, layer, expert) on ``device`` (so the same on every
    rank of one device type), scaled so activations stay O(1): w13 ~ N(0, 1/H), w2 ~ N(0, 1/I).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + layer) * 1_000_003 + expert)
    w13 = torch.randn(hidden, 2 * intermediate, generator=gen, device=device) / hidden ** 0.5
    w2 = torch.randn(intermediate, hidden, generator=gen, device=device) / intermediate ** 0.5
    return w13.to(dtype), w2.to(dtype)


def seeded_expert_weights(seed: int, layer: int, hidden: int, intermediate: int, *,
                          dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> ExpertWeightFn:
    """An :data:`ExpertWeightFn` over :func:`make_expert_weights` for one layer."""
    def weights(expert: int) -> tuple[Tensor, Tensor]:
        return make_expert_weights(seed, layer, expert, hidden, intermediate,
                                   dtype=dtype, device=device)
    return weights


def swiglu_ffn(x: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """One expert's SwiGLU FFN: silu(x @ W1) * (x @ W3) @ W2, x [N, H] -> [N, H] (plain torch
    ops in x's dtype: the reference path)."""
    return swiglu_torch(x @ w13) @ w2


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor, counts: Sequence[int] | None = None) -> Tensor:
    """Grouped GEMM: rows ``offsets[s-1]:offsets[s]`` of x [N, K] times w[s] [K, M] -> [N, M].

    offsets: int32 [S] cumulative row counts (offsets[-1] == N). Uses ``torch._grouped_mm``
    when this build supports it for the device and dtype (Hopper or newer with bf16 on CUDA;
    the CPU build), else a loop of matmuls over the groups (``counts`` [S] host ints saves the
    device-to-host copy of the offsets there).
    """
    if _grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w, offs=offsets)
    if counts is None:
        bounds = offsets.tolist()
        counts = [b - a for a, b in zip([0] + bounds[:-1], bounds)]
    return grouped_mm_loop(x, w, counts)


def grouped_mm_loop(x: Tensor, w: Tensor, counts: Sequence[int]) -> Tensor:
    """The fallback of :func:`grouped_mm`: one matmul per non-empty group; counts [S] host ints."""
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for s, n in enumerate(counts):
        if n:
            torch.matmul(x[start:start + n], w[s], out=out[start:start + n])
        start += n
    return out


def _grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    aligned = all(t.shape[-1] * t.element_size() % 16 == 0 for t in (x, w))
    if not aligned:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu"


@dataclass
class LocalExperts:
    """The experts of this rank's physical slots.

    w13: [S, H, 2I] gate and up projections fused (gate = first I columns); w2: [S, I, H].
    Slot s of rank r is physical slot ``r * S + s``.
    """

    w13: Tensor
    w2: Tensor

    def __post_init__(self) -> None:
        if self.w13.dim() != 3 or self.w2.dim() != 3:
            raise ValueError(f"w13 must be [S, H, 2I] and w2 [S, I, H], got "
                             f"{list(self.w13.shape)} and {list(self.w2.shape)}")
        slots, hidden, two_i = self.w13.shape
        if two_i % 2 or self.w2.shape != (slots, two_i // 2, hidden):
            raise ValueError(f"w2 must be [{slots}, {two_i // 2}, {hidden}] to match w13 "
                             f"{list(self.w13.shape)}, got {list(self.w2.shape)}")

    @property
    def num_slots(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden(self) -> int:
        return self.w13.shape[1]

    @property
    def intermediate(self) -> int:
        return self.w2.shape[1]

    @classmethod
    def from_logical(cls, logical_ids: Sequence[int], weights: ExpertWeightFn) -> LocalExperts:
        """Stack the weights of the logical experts held by this rank's slots, in slot order."""
        pairs = [weights(int(e)) for e in logical_ids]
        return cls(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))

    def forward(self, x_sorted: Tensor, tokens_per_slot: Tensor,
                counts: Sequence[int] | None = None) -> Tensor:
        """SwiGLU of each slot's rows: x_sorted [N, H] (rows grouped by slot, slot 0 first),
        tokens_per_slot [S] int -> [N, H] in x_sorted's dtype. ``counts``: the same counts as
        host ints when the caller has them."""
        if tokens_per_slot.shape != (self.num_slots,):
            raise ValueError(f"tokens_per_slot must be [{self.num_slots}], "
                             f"got {list(tokens_per_slot.shape)}")
        offsets = torch.cumsum(tokens_per_slot, 0).to(torch.int32)
        x = x_sorted.to(self.w13.dtype)
        act = swiglu(grouped_mm(x, self.w13, offsets, counts))
        return grouped_mm(act.contiguous(), self.w2, offsets, counts)

    __call__ = forward
