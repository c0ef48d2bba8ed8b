"""Pacing of a hot-swap's copies (pure): spreads a plan's copies over step boundaries, at most a
byte budget per rank and step (:data:`DEFAULT_STEP_BUDGET_BYTES`), so staging never takes more
than a small share of a serving step's memory bandwidth."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from expertplane.kernels.hotswap.transfers import DUP, REMOTE, SwapError, TransferPlan

__all__ = ["DEFAULT_STEP_BUDGET_BYTES", "CopyChunk", "paced_copies", "pieces", "rank_batches",
           "schedule_chunks"]

# Bytes of expert weights each rank copies, receives or sends per serving step when staging is
# paced (HotSwapEngine's default). 256 MiB is ~0.19 ms of device copy at the 1.3-1.5 TB/s an
# H100 reached in benchmarks/hotswap.md, <= 3% of its 7.6-9 ms step (DeepSeek-V3 experts, 32
# slots, 4,096 tokens): the staging steps keep within 1.1x normal even if the copy and the step
# were fully serialized, and 16 such experts (1.4 GB) land in 6 steps.
DEFAULT_STEP_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CopyChunk:
    """One piece of one fill's weights, issued at one step boundary.

    ``fill``: index into :attr:`TransferPlan.fills`; ``tensor``: 0 = w13, 1 = w2;
    ``start``/``stop``: element range of that expert tensor flattened; ``step``: the step
    boundary it is issued at, counted from the prepare's (0); ``tag``: its index in the
    schedule, the point-to-point tag on both ends of a remote fill.
    """

    fill: int
    tensor: int
    start: int
    stop: int
    step: int
    tag: int


def pieces(numel: int, element_size: int, budget_bytes: int | None) -> list[tuple[int, int]]:
    """[start, stop) element ranges cutting a tensor of ``numel`` elements into near-equal
    pieces of at most ``budget_bytes`` (one piece when it fits, or when unpaced)."""
    count = 1 if budget_bytes is None else max(1, -(-numel * element_size // budget_bytes))
    bounds = [numel * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def schedule_chunks(plan: TransferPlan, numels: tuple[int, int], element_size: int,
                    budget_bytes: int | None) -> tuple[CopyChunk, ...]:
    """Spread the copies of ``plan`` over step boundaries, at most ``budget_bytes`` per rank
    and step.

    ``numels``: elements of one expert's (w13, w2); ``element_size``: their bytes per element.
    A chunk costs its bytes to the rank it lands on and, for a remote fill, to the sender too.
    Walking the fills in plan order (dup fills last, after the fills they copy from), each
    chunk goes to the first step where every rank it costs has budget left, never before a
    step that rank already used (each rank issues its chunks in order); a rank takes at least
    one chunk per step, so tensors larger than the budget are cut into pieces of at most the
    budget. ``budget_bytes`` None: every whole tensor at step 0 (unpaced). Pure: every rank
    computes the same schedule, so both ends of a transfer issue it at the same step.
    """
    if budget_bytes is not None and budget_bytes < 1:
        raise SwapError(f"budget_bytes: must be >= 1 or None, got {budget_bytes}")
    step = [0] * plan.world_size   # per rank: the step it fills now
    load = [0] * plan.world_size   # per rank: bytes it already has at that step
    order = sorted(range(len(plan.fills)), key=lambda i: plan.fills[i].source == DUP)
    chunks: list[CopyChunk] = []
    for i in order:
        fill = plan.fills[i]
        ranks = {fill.rank, fill.src_rank}
        for tensor, numel in enumerate(numels):
            for start, stop in pieces(numel, element_size, budget_bytes):
                size = (stop - start) * element_size
                at = max(step[r] + (budget_bytes is not None and load[r] > 0
                                    and load[r] + size > budget_bytes) for r in ranks)
                for r in ranks:
                    if at > step[r]:
                        step[r], load[r] = at, 0
                    load[r] += size
                chunks.append(CopyChunk(i, tensor, start, stop, at, len(chunks)))
    return tuple(chunks)


def rank_batches(plan: TransferPlan, chunks: Sequence[CopyChunk],
                 rank: int) -> list[list[CopyChunk]]:
    """The chunks ``rank`` issues (lands, or sends) at each step, one list per step of the
    whole schedule (empty where it has none), so every rank pumps the same number of steps."""
    batches: list[list[CopyChunk]] = [[] for _ in range(max((c.step for c in chunks),
                                                            default=0) + 1)]
    for c in chunks:
        fill = plan.fills[c.fill]
        if fill.rank == rank or (fill.source == REMOTE and fill.src_rank == rank):
            batches[c.step].append(c)
    return batches


def paced_copies(pairs: list[tuple[Tensor, Tensor]],
                 budget_bytes: int | None) -> list[list[tuple[Tensor, Tensor]]]:
    """(dst, src) tensor copies cut into pieces of at most ``budget_bytes`` (:func:`pieces`)
    and packed in order into per-step lists of at most ``budget_bytes`` each (all in one list
    when None)."""
    steps: list[list[tuple[Tensor, Tensor]]] = [[]]
    load = 0
    for dst, src in pairs:
        for start, stop in pieces(dst.numel(), dst.element_size(), budget_bytes):
            size = (stop - start) * dst.element_size()
            if budget_bytes is not None and steps[-1] and load + size > budget_bytes:
                steps.append([])
                load = 0
            load += size
            whole = stop - start == dst.numel()
            steps[-1].append((dst, src) if whole else
                             (dst.view(-1)[start:stop], src.view(-1)[start:stop]))
    return steps

