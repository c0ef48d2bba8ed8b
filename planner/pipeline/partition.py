"""Optimal contiguous pipeline partitioning for the simulated step time, under a memory limit.

``partition`` cuts ``L`` layers into ``S`` stages (``boundaries[0] = 0 < ... < boundaries[S] =
L``) minimising ``simulate(...).step_time`` over *all* contiguous partitions whose ranks fit the
memory limit. Method: depth-first branch and bound over the boundaries, stage by stage:

- Every stage ``s`` over layers ``[b, e)`` has a lower bound ``lb(s, b, e)`` on the step time
  that depends only on the prefix sums up to ``b`` and the stage itself: all operations touching
  the stage run after the first micro-batch's forward reached layer ``b`` and one after another on
  the stage's rank (1F1B adds the backward of the last micro-batch travelling back to layer 0;
  ZB1P its input-gradient part). Overlapped ``F&B`` pairs count only the stage's own part, which
  is a lower bound because the pair time grows with both parts.
- ``suffix[k][b]``, the least possible ``max lb`` over the last ``k`` stages covering ``[b, L)``,
  is computed by dynamic programming (vectorised over all segments), so a partial partition is
  pruned as soon as ``max(lb of its stages, suffix)`` reaches the best step time found so far.
- Children are visited in increasing bound order, so the first complete partition is the one of
  least bound; every complete partition reached is simulated exactly.

The result is exact: a partition is only discarded when a valid lower bound of its step time is
no better than a simulated one (tests check it against brute force for every schedule).

Memory of a rank (bytes) = parameter bytes of its stages + the peak over its operation order of
``sum(chunk activations held x activation_bytes of the chunk's stage)``; the order, hence which
micro-batches are held when, does not depend on the times.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from expertplane.planner.errors import PlanInputError
from expertplane.planner.pipeline.profile import Profile, profile_from_layers
from expertplane.planner.pipeline.schedules import Layout, layout, rank_orders
from expertplane.planner.pipeline.simulate import (_check_scalar, activation_counts, simulate,
                                                   step_time)


class MemoryLimitError(PlanInputError):
    """No partition fits: ``stage``/``rank`` is the tightest one of the least-overflow plan."""

    def __init__(self, rank: int, stages: tuple[int, ...], need: float, limit: float):
        self.rank, self.stages, self.need, self.limit = rank, stages, need, limit
        super().__init__("memory_limit", f"no partition fits {_gib(limit)} per rank: at best "
                                         f"rank {rank} (stages {', '.join(map(str, stages))}) needs "
                                         f"{_gib(need)}, {_gib(need - limit)} over the limit")


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


@dataclass(frozen=True)
class PipelinePlan:
    """A partition and its simulated step.

    ``boundaries``: ``S + 1`` layer indices; stage ``s`` is layers ``[boundaries[s],
    boundaries[s+1])``. ``stage_times``: ``[S, 3]`` seconds. Per-rank arrays (``[R]``, bytes):
    ``peak_memory = param_memory + activation_memory``. ``rank_stages[r]``: stages on rank r.
    ``step_time`` seconds; ``bubble_fraction`` = idle share of all rank-seconds.
    """

    schedule: str
    boundaries: tuple[int, ...]
    micro_batches: int
    num_ranks: int
    rank_stages: tuple[tuple[int, ...], ...]
    step_time: float
    bubble_fraction: float
    stage_times: np.ndarray
    peak_memory: np.ndarray
    param_memory: np.ndarray
    activation_memory: np.ndarray
    explored: int = 0


class _Problem:
    """Prefix sums of a profile and the schedule's time-independent tables."""

    def __init__(self, profile: Profile, lay: Layout, p2p: float, overlap: float):
        self.lay, self.p2p, self.overlap = lay, p2p, overlap
        zero = np.zeros((1, 3))
        self.cum = np.vstack([zero, np.cumsum(profile.times, axis=0)])            # [L+1, 3]
        self.act = np.concatenate([[0.0], np.cumsum(profile.activation_bytes)])   # [L+1]
        self.par = np.concatenate([[0.0], np.cumsum(profile.param_bytes)])        # [L+1]
        self.orders = rank_orders(lay)
        self.states = [np.unique(activation_counts(o, len(lay.stages_of(r))), axis=0)
                       for r, o in enumerate(self.orders)]
        self.ops = [Counter((op.kind, op.chunk, op.split, op.b_chunk) for op in o)
                    for o in self.orders]
        self.coef = np.array([self._stage_coef(s) for s in range(lay.num_stages)])  # [S, 3]
        self.hops = np.array([self._hops(s) for s in range(lay.num_stages)], dtype=float)
        self.pending_w = np.array([self._pending_w(s) for s in range(lay.num_stages)])

    def rank_of(self, s: int) -> tuple[int, int]:
        """(rank, chunk) hosting stage ``s``'s weights (DualPipe: direction-0 copy)."""
        for r in range(self.lay.num_ranks):
            if s in self.lay.stages_of(r):
                return r, self.lay.stages_of(r).index(s)
        raise AssertionError(s)

    def _stage_coef(self, s: int) -> tuple[float, float, float]:
        """Seconds of stage-``s`` work on its rank per unit (F, B, W) of the stage."""
        cf = cb = cw = 0.0
        for r in range(self.lay.num_ranks):
            for (kind, chunk, split, b_chunk), n in self.ops[r].items():
                stages = self.lay.stages_of(r)
                if kind in ("F", "FB") and stages[chunk] == s:
                    cf += n
                if kind == "FB" and stages[b_chunk] == s:
                    cb += n
                if kind == "B" and stages[chunk] == s:
                    cb += n
                    cw -= n if split else 0
                if kind == "W" and stages[chunk] == s:
                    cw += n
        if self.lay.schedule == "dualpipe":  # both copies of a stage: count the busier rank only
            cf, cb, cw = cf / 2, cb / 2, cw / 2
        return cf, cb, cw

    def _hops(self, s: int) -> int:
        if self.lay.schedule == "dualpipev":
            return s if s < self.lay.num_ranks else s - 1
        return s

    def _pending_w(self, s: int) -> int:
        """ZB1P: weight passes rank ``s`` still runs after its last backward."""
        if self.lay.schedule != "zb1p":
            return 0
        order = self.orders[s]
        last_b = max(i for i, op in enumerate(order) if op.kind == "B")
        return len(order) - 1 - last_b

    # ---- bounds -------------------------------------------------------------------------
    def stage_bound(self, s: int, b: int | np.ndarray, e: int | np.ndarray) -> np.ndarray:
        """Lower bound (seconds) on the step time from stage ``s`` = layers ``[b, e)``."""
        seg = self.cum[e] - self.cum[b]
        head = self.cum[b, ..., 0] + self.p2p * self.hops[s]
        busy = seg @ self.coef[s] if np.ndim(seg) == 1 else np.einsum("...k,k->...", seg,
                                                                        self.coef[s])
        bound = head + busy
        if self.lay.schedule == "1f1b":
            bound = bound + self.cum[b, ..., 1] + self.p2p * self.hops[s]
        elif self.lay.schedule == "zb1p":
            back = self.cum[b, ..., 1] - self.cum[b, ..., 2] + self.p2p * self.hops[s]
            bound = np.maximum(bound, bound - self.pending_w[s] * seg[..., 2] + back)
        return bound

    def single_memory(self, s: int, b, e) -> np.ndarray:
        """Bytes of rank ``s`` for schedules with one stage per rank."""
        peak = self.states[s][:, 0].max()
        return (self.par[e] - self.par[b]) + peak * (self.act[e] - self.act[b])

    def rank_memory(self, r: int, bounds: Sequence[int]) -> tuple[float, float]:
        """(parameter bytes, activation peak bytes) of rank ``r`` for complete ``bounds``."""
        stages = self.lay.stages_of(r)
        par = sum(self.par[bounds[s + 1]] - self.par[bounds[s]] for s in stages)
        act = np.array([self.act[bounds[s + 1]] - self.act[bounds[s]] for s in stages])
        return float(par), float((self.states[r] @ act).max())

    def rank_busy(self, r: int, times: np.ndarray) -> float:
        """Exact busy seconds of rank ``r`` for stage times ``[S, 3]``."""
        stages = self.lay.stages_of(r)
        total = 0.0
        for (kind, chunk, split, b_chunk), n in self.ops[r].items():
            f, b, w = times[stages[chunk]]
            if kind == "F":
                total += n * f
            elif kind == "B":
                total += n * (b - w if split else b)
            elif kind == "W":
                total += n * w
            else:
                bb = times[stages[b_chunk]][1]
                total += n * (max(f, bb) + (1 - self.overlap) * min(f, bb))
        return total


def _suffix_bounds(pb: _Problem, limit: float | None) -> np.ndarray:
    """``suffix[k][b]``: least ``max stage_bound`` of the last ``k`` stages over ``[b, L)``."""
    S, L = pb.lay.num_stages, len(pb.cum) - 1
    idx = np.arange(L + 1)
    b, e = np.meshgrid(idx, idx, indexing="ij")
    valid = e > b
    single = pb.lay.schedule in ("1f1b", "zb1p")
    suffix = np.full((S + 1, L + 1), np.inf)
    suffix[0, L] = 0.0
    for k in range(1, S + 1):
        s = S - k
        cost = np.where(valid, pb.stage_bound(s, b, e), np.inf)
        if single and limit is not None:
            cost = np.where(pb.single_memory(s, b, e) > limit, np.inf, cost)
        suffix[k] = np.min(np.maximum(cost, suffix[k - 1][None, :]), axis=1)
    return suffix


def partition(layers, num_stages: int, *, schedule: str = "1f1b",
              micro_batches: int | None = None, memory_limit: float | None = None,
              p2p: float = 0.0, overlap: float = 0.0) -> PipelinePlan:
    """Cut ``layers`` into ``num_stages`` contiguous stages minimising the simulated step time.

    ``layers``: a ``Profile`` or a sequence of mappings with keys ``F``, ``B``, ``W`` (seconds,
    times of one micro-batch) and optional ``activation_bytes``, ``param_bytes``, ``kind``,
    ``ep_imbalance``. ``num_stages``: model stages (ranks = stages, or stages / 2 for
    ``"dualpipev"``). ``micro_batches`` defaults to twice the ranks. ``memory_limit``: bytes per
    rank. ``p2p``/``overlap`` as in ``simulate``. Raises ``MemoryLimitError`` when nothing fits.
    """
    profile = profile_from_layers(layers)
    pb, lay = _setup(profile, num_stages, schedule, micro_batches, p2p, overlap, memory_limit)
    S, L = lay.num_stages, len(profile)
    suffix = _suffix_bounds(pb, memory_limit)
    best = [np.inf, None]
    explored = [0]
    bounds = [0] * (S + 1)
    bounds[S] = L
    times = np.zeros((S, 3))
    single = schedule in ("1f1b", "zb1p")

    def fits(s: int, e: int) -> bool:
        if memory_limit is None or single or s < S - 1 - s:
            return True
        bounds[s + 1] = e
        par, act = pb.rank_memory(pb.rank_of(s)[0], bounds)
        return par + act <= memory_limit

    def visit(s: int, b: int, reached: float) -> None:
        explored[0] += 1
        if s == S - 1:
            if not fits(s, L):
                return
            times[s] = pb.cum[L] - pb.cum[b]
            t = step_time(lay, pb.orders, times, p2p, overlap)
            if t < best[0]:
                best[0], best[1] = t, tuple(bounds)
            return
        ends = np.arange(b + 1, L - (S - s - 1) + 1)
        own = np.maximum(pb.stage_bound(s, b, ends), reached)
        if single and memory_limit is not None:
            own = np.where(pb.single_memory(s, b, ends) > memory_limit, np.inf, own)
        key = np.maximum(own, suffix[S - s - 1][ends])
        for i in np.argsort(key, kind="stable"):
            if key[i] >= best[0]:
                break
            e = int(ends[i])
            if not fits(s, e):
                continue
            bounds[s + 1] = e
            times[s] = pb.cum[e] - pb.cum[b]
            if not single and s >= S - 1 - s and _rank_bound(pb, s, bounds, times) >= best[0]:
                continue
            visit(s + 1, e, float(own[i]))

    if S > L:
        raise PlanInputError("num_stages", f"must be <= the number of layers ({L}), got {S}")
    visit(0, 0, 0.0)
    if best[1] is None:
        raise _memory_error(pb, profile, memory_limit)
    plan = evaluate(profile, best[1], schedule=schedule, micro_batches=lay.micro_batches,
                    p2p=p2p, overlap=overlap)
    return PipelinePlan(**{**plan.__dict__, "explored": explored[0]})


def _rank_bound(pb: _Problem, s: int, bounds: list[int], times: np.ndarray) -> float:
    """Two-stage ranks, once both stages are fixed: first stage's head + the rank's busy time."""
    r = pb.rank_of(s)[0]
    low = min(pb.lay.stages_of(r))
    return pb.cum[bounds[low], 0] + pb.rank_busy(r, times)


def _setup(profile: Profile, num_stages, schedule, micro_batches, p2p, overlap, memory_limit):
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise PlanInputError("num_stages", f"must be an integer >= 1, got {num_stages!r}")
    ranks = num_stages // 2 if schedule == "dualpipev" else num_stages
    lay = layout(schedule, num_stages, 2 * max(ranks, 1) if micro_batches is None
                 else micro_batches)
    if memory_limit is not None:
        _check_scalar("memory_limit", memory_limit)
    return _Problem(profile, lay, _check_scalar("p2p", p2p),
                    _check_scalar("overlap", overlap, 1.0)), lay


def evaluate(layers, boundaries: Sequence[int], *, schedule: str = "1f1b",
             micro_batches: int | None = None, p2p: float = 0.0,
             overlap: float = 0.0) -> PipelinePlan:
    """Simulate a given partition (``boundaries`` as in ``PipelinePlan``) and report it."""
    profile = profile_from_layers(layers)
    bounds = _check_boundaries(boundaries, len(profile))
    pb, lay = _setup(profile, len(bounds) - 1, schedule, micro_batches, p2p, overlap, None)
    times = np.array([pb.cum[bounds[s + 1]] - pb.cum[bounds[s]] for s in range(lay.num_stages)])
    result = simulate(times, schedule, lay.micro_batches, p2p=p2p, overlap=overlap)
    mem = np.array([pb.rank_memory(r, bounds) for r in range(lay.num_ranks)])
    return PipelinePlan(schedule, tuple(bounds), lay.micro_batches, lay.num_ranks,
                        tuple(lay.stages_of(r) for r in range(lay.num_ranks)), result.step_time,
                        result.bubble_fraction, times, mem.sum(axis=1), mem[:, 0], mem[:, 1])


def _check_boundaries(boundaries: Sequence[int], num_layers: int) -> list[int]:
    bounds = [int(x) for x in boundaries]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != num_layers or any(
            a >= b for a, b in zip(bounds, bounds[1:])):
        raise PlanInputError("boundaries", f"must rise strictly from 0 to {num_layers}, "
                                           f"got {list(boundaries)}")
    return bounds


def _memory_error(pb: _Problem, profile: Profile, limit: float) -> MemoryLimitError:
    """The partition with the least worst-rank memory, as an error naming its worst rank."""
    S, L = pb.lay.num_stages, len(profile)
    best: list = [np.inf, None]
    bounds = [0] * (S + 1)
    bounds[S] = L

    def worst(upto: int) -> tuple[float, int]:
        top, arg = -np.inf, -1
        for r in range(pb.lay.num_ranks):
            if max(pb.lay.stages_of(r)) < upto:
                need = sum(pb.rank_memory(r, bounds))
                if need > top:
                    top, arg = need, r
        return top, arg

    def visit(s: int, b: int) -> None:
        for e in (range(b + 1, L - (S - s - 1) + 1) if s < S - 1 else (L,)):
            bounds[s + 1] = e
            need, _ = worst(s + 1)
            if need < best[0]:
                if s == S - 1:
                    best[0], best[1] = need, tuple(bounds)
                else:
                    visit(s + 1, e)

    visit(0, 0)
    bounds[:] = best[1]
    need, rank = worst(S)
    return MemoryLimitError(rank, pb.lay.stages_of(rank), need, limit)
