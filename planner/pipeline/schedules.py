"""Per-rank operation orders of the pipeline schedules (independent of the op durations).

A schedule places ``S`` model stages (consecutive layer ranges, stage 0 holds the embedding) on
pipeline ranks and fixes, for every rank, the order in which it runs its operations:

- ``"1f1b"``: rank ``r`` hosts stage ``r`` (``R = S`` ranks). Warm-up ``min(R-1-r, M)`` forwards,
  then one-forward-one-backward, then the remaining backwards. Backward ``B`` is the full backward.
- ``"zb1p"``: ZB-H1 (zero bubble, 1F1B memory): same forwards as 1F1B, but each backward is split
  into the input-gradient part (``B - W``) and the weight-gradient part ``W``; rank ``r`` keeps up
  to ``r`` weight-gradient passes pending during the steady state (filling the bubbles of the
  cool-down) and runs one pending ``W`` after every backward in the cool-down, so that every rank
  holds at most ``R`` micro-batches of activations, like rank 0 of 1F1B.
- ``"dualpipe"``: DeepSeek's bidirectional DualPipe. ``R = S`` ranks (even), ``M`` even,
  ``M >= 2R``. Half the micro-batches enter at rank 0 (direction 0: stage ``k`` on rank ``k``),
  the other half at rank ``R-1`` (direction 1: stage ``k`` on rank ``R-1-k``); every rank keeps a
  copy of two stages (2x parameters). Chunk ``c`` of a rank is the stage used by direction ``c``.
- ``"dualpipev"``: DualPipe's V-shaped variant. ``R = S / 2`` ranks, ``M >= 2R``; rank ``r``
  hosts stage ``r`` (chunk 0) and stage ``S-1-r`` (chunk 1), every micro-batch runs down the V and
  back, so each stage exists once (1x parameters).

The DualPipe orders follow the eight phases of DeepSeek's reference schedule (warm-up forwards,
paired forwards, zero-bubble backward/weight/forward steps, overlapped forward&backward main
phase, backward/weight cool-down). Operation kinds: ``F`` forward, ``B`` backward (full, or only
the input gradient when ``split``), ``W`` deferred weight gradient, ``FB`` an overlapped
forward of one chunk with a full backward of another.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from expertplane.errors import FieldError

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Op:
    """One operation of a rank.

    ``stage``/``micro_batch`` name the forward (kind F or FB), backward (B) or weight pass (W);
    for ``FB`` ``b_stage``/``b_micro_batch`` name the overlapped backward. ``split`` marks a
    backward that leaves its weight gradient to a later ``W`` (it then lasts ``B - W``).
    ``chunk``/``b_chunk`` say which of the rank's chunks (0 or 1) the stage is.
    """

    kind: str
    micro_batch: int
    stage: int
    chunk: int
    split: bool = False
    b_micro_batch: int = -1
    b_stage: int = -1
    b_chunk: int = -1


@dataclass(frozen=True)
class Layout:
    """How stages map to ranks: ``host(stage, micro_batch)`` is the rank that runs it."""

    schedule: str
    num_stages: int
    num_ranks: int
    micro_batches: int

    def host(self, stage: int, micro_batch: int) -> int:
        if self.schedule == "dualpipe" and micro_batch >= self.micro_batches // 2:
            return self.num_stages - 1 - stage
        if self.schedule == "dualpipev" and stage >= self.num_ranks:
            return self.num_stages - 1 - stage
        return stage

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """Stages whose weights live on ``rank``, indexed by chunk."""
        if self.schedule in ("dualpipe", "dualpipev"):
            return (rank, self.num_stages - 1 - rank)
        return (rank,)


def layout(schedule: str, num_stages: int, micro_batches: int) -> Layout:
    """Check the (schedule, stages, micro-batches) combination and return its layout."""
    if schedule not in SCHEDULES:
        raise FieldError("schedule", f"must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    for field, value in (("num_stages", num_stages), ("micro_batches", micro_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FieldError(field, f"must be an integer >= 1, got {value!r}")
    ranks = num_stages
    if schedule == "zb1p" and micro_batches < num_stages:
        raise FieldError("micro_batches", f"zb1p needs at least as many micro-batches as "
                                              f"stages ({num_stages}), got {micro_batches}")
    if schedule in ("dualpipe", "dualpipev"):
        if num_stages % 2:
            raise FieldError("num_stages", f"{schedule} needs an even number of stages, "
                                               f"got {num_stages}")
        if schedule == "dualpipev":
            ranks = num_stages // 2
        if schedule == "dualpipe" and micro_batches % 2:
            raise FieldError("micro_batches", f"dualpipe needs an even number of "
                                                  f"micro-batches, got {micro_batches}")
        if micro_batches < 2 * ranks:
            raise FieldError("micro_batches", f"{schedule} needs at least 2 x ranks "
                                                  f"({2 * ranks}) micro-batches, got {micro_batches}")
    return Layout(schedule, num_stages, ranks, micro_batches)


def rank_orders(lay: Layout) -> list[list[Op]]:
    """The operation order of every rank: ``orders[r]`` lists rank ``r``'s ops in run order."""
    if lay.schedule in ("1f1b", "zb1p"):
        return [_one_f_one_b(lay, r, lay.schedule == "zb1p") for r in range(lay.num_ranks)]
    return [_dual(lay, r) for r in range(lay.num_ranks)]


def _one_f_one_b(lay: Layout, r: int, zero_bubble: bool) -> list[Op]:
    m, p = lay.micro_batches, lay.num_ranks
    warmup = min(p - 1 - r, m)
    ops = [Op("F", i, r, 0) for i in range(warmup)]
    pending: deque[int] = deque()

    def backward(i: int, keep: int) -> None:
        ops.append(Op("B", i, r, 0, split=zero_bubble))
        if zero_bubble:
            pending.append(i)
            if len(pending) > keep:
                ops.append(Op("W", pending.popleft(), r, 0))

    for k in range(m - warmup):
        ops.append(Op("F", warmup + k, r, 0))
        backward(k, r)
    for k in range(m - warmup, m):
        backward(k, 0)
    ops.extend(Op("W", i, r, 0) for i in pending)
    return ops


class _DualRank:
    """Builds one rank's DualPipe/DualPipeV order, tracking per-chunk micro-batch counters."""

    def __init__(self, lay: Layout, r: int):
        self.lay, self.r = lay, r
        self.ops: list[Op] = []
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        self.weights: deque[tuple[int, int, int]] = deque()
        # DualPipe: chunk c is direction c, micro-batches of direction 1 are numbered after
        # direction 0's. DualPipeV: both chunks see micro-batches 0..M-1.
        half = lay.micro_batches // 2
        self.offset = (0, half) if lay.schedule == "dualpipe" else (0, 0)

    def _stage(self, chunk: int) -> int:
        return self.lay.stages_of(self.r)[chunk]

    def _take_f(self, chunk: int) -> tuple[int, int]:
        mb = self.offset[chunk] + self.next_f[chunk]
        self.next_f[chunk] += 1
        return mb, self._stage(chunk)

    def _take_b(self, chunk: int) -> tuple[int, int]:
        mb = self.offset[chunk] + self.next_b[chunk]
        self.next_b[chunk] += 1
        return mb, self._stage(chunk)

    def forward(self, chunk: int) -> None:
        mb, st = self._take_f(chunk)
        self.ops.append(Op("F", mb, st, chunk))

    def backward(self, chunk: int, split: bool = False) -> None:
        mb, st = self._take_b(chunk)
        self.ops.append(Op("B", mb, st, chunk, split=split))
        if split:
            self.weights.append((mb, st, chunk))

    def weight(self) -> None:
        mb, st, chunk = self.weights.popleft()
        self.ops.append(Op("W", mb, st, chunk))

    def forward_backward(self, f_chunk: int, b_chunk: int) -> None:
        fmb, fst = self._take_f(f_chunk)
        bmb, bst = self._take_b(b_chunk)
        self.ops.append(Op("FB", fmb, fst, f_chunk, b_micro_batch=bmb, b_stage=bst,
                           b_chunk=b_chunk))


def _dual(lay: Layout, r: int) -> list[Op]:
    """DualPipe (``n`` = half the ranks, chunks per direction) or DualPipeV (``n`` = ranks)."""
    v = lay.schedule == "dualpipev"
    if v:
        n, pos, chunks = lay.num_ranks, r, lay.micro_batches
        swap = 0
        middle = r == lay.num_ranks - 1
    else:
        n = lay.num_ranks // 2
        pos = min(r, lay.num_ranks - 1 - r)
        chunks = lay.micro_batches // 2
        swap = int(r >= n)  # phase 0 is direction 0 on the first half, direction 1 on the second
        middle = pos == n - 1
    rank = _DualRank(lay, r)

    def ch(phase: int) -> int:
        return phase ^ swap

    for _ in range((n - pos - 1) * 2):                      # 1: forwards of phase 0
        rank.forward(ch(0))
    for _ in range(pos + 1):                                # 2: paired forwards
        rank.forward(ch(0))
        rank.forward(ch(1))
    for _ in range(n - pos - 1):                            # 3: B1 (zero bubble) W F1
        rank.backward(ch(1), split=True)
        rank.weight()
        rank.forward(ch(1))
    main = chunks - 2 * n + pos + 1
    for i in range(main):                                   # 4: F0&B1, F1&B0
        if i == 0 and middle:
            rank.forward(ch(0))
            rank.backward(ch(1))
        else:
            rank.forward_backward(ch(0), ch(1))
        rank.forward_backward(ch(1), ch(0))
    for _ in range(n - pos - 1):                            # 5: B1, F1&B0
        rank.backward(ch(1))
        rank.forward_backward(ch(1), ch(0))
    steps = pos + 1                                         # 6: B1 B0, second half zero bubble
    split = False
    for i in range(steps):
        if i == steps // 2 and pos % 2 == 1:
            split = True
        rank.backward(ch(1), split=split)
        if i == steps // 2 and pos % 2 == 0:
            split = True
        rank.backward(ch(0), split=split)
    for _ in range(n - pos - 1):                            # 7: W B0 (zero bubble)
        rank.weight()
        rank.backward(ch(0), split=True)
    while rank.weights:                                     # 8: remaining weight passes
        rank.weight()
    assert not v or rank.next_f == [chunks, chunks]
    return rank.ops
