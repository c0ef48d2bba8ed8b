"""Local expert weights and the SwiGLU grouped GEMM.

Shapes: ``S`` physical slots on this rank, ``H`` hidden size, ``I`` expert intermediate size,
``N`` tokens routed to this rank, sorted by local slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import torch
from torch import Tensor

from expertplane.kernels.triton_ops import (grouped_gemm, pretune, swiglu, swiglu_torch,
                                            use_triton, weight_table)

__all__ = ["GROUPED_MM_MIN_ROWS", "ExpertWeightFn", "LocalExperts", "Segment", "grouped_mm",
           "grouped_mm_loop", "make_expert_weights",
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


def grouped_mm_loop(x: Tensor, w: Tensor | Sequence[Tensor], counts: Sequence[int]) -> Tensor:
    """The fallback of :func:`grouped_mm`: one matmul per non-empty group; ``w[s]`` [K, M] is
    group s's weight (a stacked [S, K, M] tensor or a sequence of matrices); counts [S] host
    ints."""
    out = x.new_empty(x.shape[0], w[0].shape[-1])
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


# Mean rows per slot from which the stacked layout uses torch._grouped_mm rather than the
# Triton kernel: on an H200 Triton measured 1.38x _grouped_mm (+ SwiGLU) at 128 rows per slot
# and 0.95x at 1,024 (benchmarks/kernels.md); 512 lies between the two measured points.
GROUPED_MM_MIN_ROWS = 512

Segment = tuple[Tensor, Tensor]   # (w13 [n, H, 2I], w2 [n, I, H]): n experts' weights


class LocalExperts:
    """The experts of this rank's S physical slots (slot s of rank r is physical slot
    ``r * S + s``).

    Weights live in *segments* (w13 [n, H, 2I] gate and up projections fused, gate = first I
    columns; w2 [n, I, H]); slot s reads row ``rows[s] = (segment, row)``. ``LocalExperts(w13,
    w2)`` is one stacked segment [S, ...] with slot s in row s. A hot-swap stages the experts
    that move into rows no slot reads (or a new segment of exactly the missing rows) and
    commits by pointing slots at them (:meth:`from_segments`): no weight is copied at the
    switch. On CUDA the FFN finds each slot's weights through a device table of offsets.
    """

    def __init__(self, w13: Tensor, w2: Tensor) -> None:
        self._set(((w13, w2),), tuple((0, s) for s in range(w13.shape[0])))

    @classmethod
    def from_segments(cls, segments: Sequence[Segment],
                      rows: Sequence[tuple[int, int]]) -> LocalExperts:
        """Slots reading ``rows[s] = (segment index, row)`` of ``segments``."""
        out = cls.__new__(cls)
        out._set(tuple(segments), tuple((int(g), int(r)) for g, r in rows))
        return out

    def _set(self, segments: tuple[Segment, ...], rows: tuple[tuple[int, int], ...]) -> None:
        w13, w2 = segments[0]
        if w13.dim() != 3 or w2.dim() != 3:
            raise ValueError(f"w13 must be [S, H, 2I] and w2 [S, I, H], got "
                             f"{list(w13.shape)} and {list(w2.shape)}")
        _, hidden, two_i = w13.shape
        for g13, g2 in segments:
            if two_i % 2 or g13.shape[1:] != w13.shape[1:] or g2.shape != (
                    g13.shape[0], two_i // 2, hidden) or g13.dtype != w13.dtype:
                raise ValueError(f"w2 must be [{g13.shape[0]}, {two_i // 2}, {hidden}] to match "
                                 f"w13 {list(g13.shape)}, got {list(g2.shape)}")
        for g, r in rows:
            if not (0 <= g < len(segments) and 0 <= r < segments[g][0].shape[0]):
                raise ValueError(f"rows: ({g}, {r}) is not a row of the segments")
        self.segments, self.rows = segments, rows
        stacked = len(segments) == 1 and rows == tuple((0, s) for s in range(w13.shape[0]))
        self._stacked: Segment | None = segments[0] if stacked else None
        self._tables: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    @property
    def num_slots(self) -> int:
        return len(self.rows)

    @property
    def hidden(self) -> int:
        return self.segments[0][0].shape[1]

    @property
    def intermediate(self) -> int:
        return self.segments[0][1].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.segments[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self.segments[0][0].device

    def weights(self, slot: int) -> Segment:
        """(w13 [H, 2I], w2 [I, H]) of local slot ``slot`` (views)."""
        g, r = self.rows[slot]
        return self.segments[g][0][r], self.segments[g][1][r]

    def free_rows(self) -> list[tuple[int, int]]:
        """(segment, row) pairs no slot reads, segment by segment."""
        used = set(self.rows)
        return [(g, r) for g, (w13, _) in enumerate(self.segments)
                for r in range(w13.shape[0]) if (g, r) not in used]

    @property
    def stacked(self) -> Segment | None:
        """(w13 [S, H, 2I], w2 [S, I, H]) when the slots are one segment's rows in order,
        else None (worked out once: checked at every step boundary by the hot-swap
        compaction)."""
        return self._stacked

    @classmethod
    def from_logical(cls, logical_ids: Sequence[int], weights: ExpertWeightFn) -> LocalExperts:
        """Stack the weights of the logical experts held by this rank's slots, in slot order."""
        pairs = [weights(int(e)) for e in logical_ids]
        return cls(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))

    def forward(self, x_sorted: Tensor, tokens_per_slot: Tensor,
                counts: Sequence[int] | None = None) -> Tensor:
        """SwiGLU of each slot's rows: x_sorted [N, H] (rows grouped by slot, slot 0 first),
        tokens_per_slot [S] int -> [N, H] in the weights' dtype. ``counts``: the same counts as
        host ints when the caller has them.

        Paths: CUDA + Triton + bf16/fp16 + H, I multiples of 128: two persistent Triton
        grouped GEMMs through the slots' weight tables, SwiGLU fused into the first — except
        for one stacked segment with >= :data:`GROUPED_MM_MIN_ROWS` rows per slot on average
        where ``torch._grouped_mm`` runs; else, one stacked segment: :func:`grouped_mm` +
        SwiGLU; else a matmul loop over the slots."""
        if tokens_per_slot.shape != (self.num_slots,):
            raise ValueError(f"tokens_per_slot must be [{self.num_slots}], "
                             f"got {list(tokens_per_slot.shape)}")
        offsets = torch.cumsum(tokens_per_slot, 0).to(torch.int32)
        x = x_sorted.to(self.dtype)
        hidden, inter = self.hidden, self.intermediate
        stacked = self.stacked
        large = stacked is not None and _grouped_mm_supported(x, stacked[0]) \
            and x.shape[0] >= GROUPED_MM_MIN_ROWS * self.num_slots
        if self.triton_capable and not large:
            (base13, offs13), (base2, offs2) = self.weight_tables()
            act = grouped_gemm(x, base13, offs13, offsets, inter, 2 * inter, swiglu=True)
            return grouped_gemm(act, base2, offs2, offsets, hidden, hidden)
        if stacked is not None:
            w13, w2 = stacked
            act = swiglu(grouped_mm(x, w13, offsets, counts))
            return grouped_mm(act.contiguous(), w2, offsets, counts)
        if counts is None:
            counts = tokens_per_slot.tolist()
        slots = [self.weights(s) for s in range(self.num_slots)]
        act = swiglu(grouped_mm_loop(x, [w13 for w13, _ in slots], counts))
        return grouped_mm_loop(act.contiguous(), [w2 for _, w2 in slots], counts)

    __call__ = forward

    def pretune(self, max_rows_per_slot: int) -> bool:
        """Tune the Triton path's two grouped GEMMs now for up to ``max_rows_per_slot`` mean
        rows per slot (see :func:`~expertplane.kernels.triton_ops.pretune`), so neither the
        first step on a new load level nor the first step after a hot-swap (whose weights then
        live in several buffers, the Triton path, until the compaction restacks them) stops
        serving to tune. False when this layer
        never takes the Triton path (no CUDA/Triton, fp32, sizes not multiples of 128)."""
        if not self.triton_capable:
            return False
        common = {"groups": self.num_slots, "max_rows": max_rows_per_slot, "dtype": self.dtype,
                  "device": self.device}
        pretune(self.hidden, self.intermediate, swiglu=True, **common)
        pretune(self.intermediate, self.hidden, swiglu=False, **common)
        return True

    @property
    def triton_capable(self) -> bool:
        """Whether the Triton path can serve these weights: CUDA with Triton, bf16/fp16, H and
        I multiples of 128 (:meth:`forward` takes it unless one stacked segment is large)."""
        return use_triton(self.segments[0][0]) and self.dtype in (torch.bfloat16, torch.float16) \
            and self.hidden % 128 == 0 and self.intermediate % 128 == 0

    def weight_tables(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """:func:`~expertplane.kernels.triton_ops.weight_table` of the slots' w13 and of their
        w2, on the weights' device (built once; this object keeps the segments alive, so the
        addresses stay valid). Stacked: slot s at ``s`` rows from the first, the offsets made
        on the device by the current stream (no host copy, so no wait for that stream)."""
        if self._tables is None and self.stacked is not None:
            self._tables = tuple(
                (w[0], torch.arange(w.shape[0], dtype=torch.int64, device=w.device) * w[0].numel())
                for w in self.stacked)
        if self._tables is None:
            slots = [self.weights(s) for s in range(self.num_slots)]
            self._tables = (weight_table([w13 for w13, _ in slots]),
                            weight_table([w2 for _, w2 in slots]))
        return self._tables
