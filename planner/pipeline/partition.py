"""Optimal contiguous pipeline partitioning for the simulated step time, under a memory limit.

``partition`` cuts ``L`` layers into ``S`` stages (``boundaries[0] = 0 < ... < boundaries[S] =
L``) minimising ``simulate(...).step_time`` over *all* contiguous partitions whose ranks fit the
memory limit. Method: branch and bound over the boundaries.

- Incumbent: the even split and the splits balancing ``F + B`` and parameter bytes, simulated.
- Stage bounds: every stage ``s`` over layers ``[b, e)`` has lower bounds on the step time that
  depend only on the prefix sums at ``b``/``e`` and the stage itself (``_Tables._templates``:
  a dependency chain into the stage's first forward or backward, the stage's own work on its
  rank, a chain out of its last backward or forward). Two-stage ranks (DualPipe, DualPipeV) also
  get whole-rank bounds with exact operation durations once both their stages are fixed.
- One stage per rank (1F1B, ZB1P): stages are fixed left to right; ``suffix[k][b]``, the least
  possible bound of the last ``k`` stages over ``[b, L)``, comes from a dynamic program.
- Two-stage ranks (DualPipe, DualPipeV): stage pairs ``(k, S-1-k)`` are fixed from the outside
  in. On top of the stage and whole-rank bounds, every path of the step DAG gives a bound
  linear in the prefix sums at the boundaries (``paths.py``): the critical paths of simulated
  partitions (seeds, a local search from the best seed, a balanced completion of every node's
  best child, the best and the worst-bounded leaf of every batch) are kept as rows, and the
  least value of a row over the free middle boundaries is a dynamic program tabulated per
  ``(level, hi)``. Every node with two or more children left also bounds them with the convex
  combination of the rows that maximises its own bound (Kelley's cutting planes on the
  Lagrangian dual, a small LP), kept as a row at shallow nodes (``COMBINE_DEPTH``): single
  paths can each be dodged by moving layers between middle stages, their combination cannot.
- Children are tried in increasing bound order and dropped once a bound reaches the incumbent;
  complete partitions are simulated in batches on the compiled step DAG (``dag.step_times``).
- Stage bound rows are linear in the prefix sums at the stage's two boundaries, so each splits
  into a start and an end term tabulated once per boundary (``_Problem.stage_terms``); the
  time-independent tables of a layout are cached (``_tables``).

A partition is only discarded when a valid lower bound of its step time is within a relative
``RELATIVE_TOLERANCE`` (1e-12, floating-point rounding of the prefix sums) of a simulated one,
so a finished search is exact up to that rounding (tests compare with brute force for every
schedule). ``node_limit`` caps the nodes; a capped search returns the best plan found with
``optimal=False``. Two-stage ranks are proven within the default cap up to 8 stages on the
shipped profiles; at 16 stages the search stays capped (docs/pipeline.md, "Limits").

Memory of a rank (bytes) = parameter bytes of its stages + the peak over its operation order of
``sum(chunk activations held x activation_bytes of the chunk's stage)``; the order, hence which
micro-batches are held when, does not depend on the times.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from expertplane.errors import FieldError
from expertplane.planner.pipeline.baselines import balanced_boundaries, even_boundaries
from expertplane.planner.pipeline.dag import op_parts, part_durations, schedule_dag, step_times
from expertplane.planner.pipeline.paths import PathBounds, critical_path
from expertplane.planner.pipeline.profile import Profile, profile_from_layers
from expertplane.planner.pipeline.schedules import Layout, Op, layout, rank_orders
from expertplane.planner.pipeline.simulate import _check_scalar, activation_counts, simulate


DEFAULT_NODE_LIMIT = 500
#: Nodes are pruned when their bound is within this relative distance of the incumbent, so that
#: bounds equal to the optimum up to floating-point rounding of the prefix sums prune.
RELATIVE_TOLERANCE = 1e-12
#: Two-stage-rank search nodes up to this depth (stage pairs fixed; 6 covers every level of a
#: 16-stage search) add their Lagrangian combination of the path bounds as a row while the
#: row set has room (``PathBounds.add_combination``). Deeper nodes of many-stage searches do
#: not: each new row makes every cached middle table grow.
COMBINE_DEPTH = 6


class MemoryLimitError(FieldError):
    """No partition fits: ``stage``/``rank`` is the tightest one of the least-overflow plan."""

    def __init__(self, rank: int, stages: tuple[int, ...], need: float, limit: float,
                 qualifier: str = "at best"):
        self.rank, self.stages, self.need, self.limit = rank, stages, need, limit
        super().__init__("memory_limit", f"no partition fits {_gib(limit)} per rank: {qualifier}, "
                                         f"rank {rank} (stages {', '.join(map(str, stages))}) "
                                         f"needs {_gib(need)}, {_gib(need - limit)} over "
                                         f"the limit")


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


@dataclass(frozen=True)
class PipelinePlan:
    """A partition and its simulated step.

    ``boundaries``: ``S + 1`` layer indices; stage ``s`` is layers ``[boundaries[s],
    boundaries[s+1])``. ``stage_times``: ``[S, 3]`` seconds. Per-rank arrays (``[R]``, bytes):
    ``peak_memory = param_memory + activation_memory``. ``rank_stages[r]``: stages on rank r.
    ``step_time`` seconds; ``bubble_fraction`` = idle share of all rank-seconds. ``explored``:
    search nodes visited; ``optimal``: the search proved no contiguous partition is faster
    (False for plans from ``evaluate``).
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
    optimal: bool = False


class _Tables:
    """The time-independent tables of one layout (cached per layout by ``_tables``)."""

    def __init__(self, lay: Layout):
        self.lay = lay
        self.orders = rank_orders(lay)
        self.dag = schedule_dag(lay)
        self.states = [np.unique(activation_counts(o, len(lay.stages_of(r))), axis=0)
                       for r, o in enumerate(self.orders)]
        self.classes = [sorted(set(map(self._class, o)), key=repr) for o in self.orders]
        self.class_parts = [self._local_parts(r, c) for r, c in enumerate(self.classes)]

    @cached_property
    def templates(self) -> list[np.ndarray]:
        """Per stage: its path-bound rows (``_templates``) over the ranks holding it."""
        lay = self.lay
        return [np.vstack([self._templates(s, r) for r in range(lay.num_ranks)
                           if s in lay.stages_of(r)]) for s in range(lay.num_stages)]

    @cached_property
    def rank_paths(self) -> list:
        """Per two-stage rank: its whole-rank path bounds (``_rank_templates``)."""
        return [self._rank_templates(r) if len(self.lay.stages_of(r)) > 1 else []
                for r in range(self.lay.num_ranks)]

    def _hops(self, chain: list[int], mb: int) -> int:
        """Rank changes along the consecutive stages ``chain`` for micro-batch ``mb``."""
        hosts = [self.lay.host(k, mb) for k in chain]
        return sum(a != b for a, b in zip(hosts, hosts[1:]))

    def _ends(self, s: int, r: int):
        """Chains into the first and out of the last operations of stage ``s`` on rank ``r``.

        Returns ``(firsts, lasts, work)``: lists of ``(op index, row)`` where a row
        ``(0,0,0 | cum[b] F,B,W | cum[e] F,B,W | total F,B,W | p2p)`` (``[b, e)`` = the stage)
        gives the chain's length: into the first forward, the micro-batch's forward through the
        stages before ``s``; into the first backward, the forward through all stages and the
        backward back to ``s + 1``; out of the last backward, the backward down to stage 0; out
        of the last forward, the forward to the last stage and the whole backward; out of the
        rank's last operation, nothing. Other stages' backwards count ``B`` under 1F1B and
        ``B - W`` otherwise. ``work[i]`` is op ``i``'s own ``(F, B, W)`` count for stage ``s``.
        """
        S = self.lay.num_stages
        order = self.orders[r]
        back = np.array([0.0, 1.0, 0.0 if self.lay.schedule == "1f1b" else -1.0])
        fwd = np.array([1.0, 0.0, 0.0])
        work = np.zeros((len(order), 3))
        f_mb: dict[int, int] = {}
        b_mb: dict[int, int] = {}
        for i, op in enumerate(order):
            if op.kind in ("F", "FB") and op.stage == s:
                work[i, 0] += 1
                f_mb[i] = op.micro_batch
            if op.kind == "FB" and op.b_stage == s:
                work[i, 1] += 1
                b_mb[i] = op.b_micro_batch
            if op.kind == "B" and op.stage == s:
                work[i] += (0, 1, -1) if op.split else (0, 1, 0)
                b_mb[i] = op.micro_batch
            if op.kind == "W" and op.stage == s:
                work[i, 2] += 1
        xf, xb, yf, yb = min(f_mb), min(b_mb), max(f_mb), max(b_mb)
        rows = np.zeros((4, 13))
        rows[0, 3:6], rows[0, 12] = fwd, self._hops(list(range(s + 1)), f_mb[xf])
        rows[1, 9:12], rows[1, 6:9] = fwd + back, -back
        rows[1, 12] = self._hops(list(range(S)) + list(range(S - 1, s - 1, -1)), b_mb[xb])
        rows[2, 3:6], rows[2, 12] = back, self._hops(list(range(s, -1, -1)), b_mb[yb])
        rows[3, 9:12], rows[3, 6:9] = fwd + back, -fwd
        rows[3, 12] = self._hops(list(range(s, S)) + list(range(S - 1, -1, -1)), f_mb[yf])
        last = int(np.flatnonzero(work.any(axis=1))[-1])
        return ([(xf, rows[0]), (xb, rows[1])],
                [(yb, rows[2]), (yf, rows[3]), (last, np.zeros(13))], work)

    def _templates(self, s: int, r: int) -> np.ndarray:
        """Stage-local path bounds through stage ``s`` on rank ``r``: rows ``[n, 13]``.

        Row ``(segment F,B,W | cum[b] F,B,W | cum[e] F,B,W | total F,B,W | p2p)``: a chain into
        a first operation X of the stage (``_ends``), the stage's own work on the rank from X to
        a later operation Y (work of the rank's other stage counted as zero, a lower bound since
        an ``F&B`` pair lasts at least as long as either half), and a chain out of Y.
        """
        firsts, lasts, work = self._ends(s, r)
        cum = np.vstack([np.zeros((1, 3)), np.cumsum(work, axis=0)])
        rows = []
        for x, into in firsts:
            for y, out in lasts:
                if y >= x:
                    row = into + out
                    row[0:3] += cum[y + 1] - cum[x]
                    rows.append(row)
        return np.array(rows)

    def _rank_templates(self, r: int) -> tuple[np.ndarray, ...]:
        """Whole-rank path bounds of a two-stage rank, with exact durations of both stages.

        Returns ``(x_stage [n], in_rows [n, 13], y_stage [n], out_rows [n, 13], counts [n, C])``:
        path ``i`` enters at an end of stage ``x_stage[i]`` (``_ends``), runs ``counts[i]``
        operations of each of the rank's op classes (``classes[r]``) and leaves from stage
        ``y_stage[i]``.
        """
        order = self.orders[r]
        classes = {c: i for i, c in enumerate(self.classes[r])}
        onehot = np.zeros((len(order) + 1, len(classes)))
        for i, op in enumerate(order):
            onehot[i + 1, classes[self._class(op)]] = 1
        cum = np.cumsum(onehot, axis=0)
        ends = {s: self._ends(s, r) for s in self.lay.stages_of(r)}
        rows = [(sx, into, sy, tail, cum[y + 1] - cum[x])
                for sx, (firsts, _, _) in ends.items() for x, into in firsts
                for sy, (_, lasts, _) in ends.items() for y, tail in lasts if y >= x]
        return tuple(np.array(col) for col in zip(*rows))

    def _local_parts(self, r: int, ops: list[Op]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``op_parts`` of rank ``r``'s ops with stages renumbered as the rank's chunks."""
        f_stage, b_stage, b_coef = op_parts(ops)
        chunk = {s: c for c, s in enumerate(self.lay.stages_of(r))}
        local = np.vectorize(lambda s: chunk.get(s, -1), otypes=[np.int64])
        return local(f_stage), local(b_stage), b_coef

    @staticmethod
    def _class(op: Op) -> Op:
        """The op with its micro-batch numbers erased: ops of one class last equally long."""
        return Op(op.kind, -1, op.stage, op.chunk, op.split, -1, op.b_stage, op.b_chunk)


@lru_cache(maxsize=32)
def _tables(lay: Layout) -> _Tables:
    return _Tables(lay)


class _Problem:
    """Prefix sums of a profile, ``p2p``/``overlap`` and the layout's tables."""

    def __init__(self, profile: Profile, lay: Layout, p2p: float, overlap: float):
        self.lay, self.p2p, self.overlap = lay, p2p, overlap
        self.tables = _tables(lay)
        self.dag = self.tables.dag
        zero = np.zeros((1, 3))
        self.cum = np.vstack([zero, np.cumsum(profile.times, axis=0)])            # [L+1, 3]
        self.act = np.concatenate([[0.0], np.cumsum(profile.activation_bytes)])   # [L+1]
        self.par = np.concatenate([[0.0], np.cumsum(profile.param_bytes)])        # [L+1]
        self.tot = self.cum[-1]

    def stage_times(self, cuts: np.ndarray) -> np.ndarray:
        """Stage ``(F, B, W)`` seconds ``[K, S, 3]`` of partitions ``cuts`` ``[K, S+1]``, from
        the prefix sums; ``W`` is clipped to ``B`` (layers with ``W = B`` can otherwise give a
        stage ``W`` one rounding step above its ``B``)."""
        times = self.cum[cuts[:, 1:]] - self.cum[cuts[:, :-1]]
        times[..., 2] = np.minimum(times[..., 2], times[..., 1])
        return times

    def _chains(self, rows: np.ndarray, stage: np.ndarray, cuts: np.ndarray) -> np.ndarray:
        """Chain lengths ``[K, n]`` of ``rows`` ``[n, 13]`` at stages ``stage`` ``[n]`` for
        partitions ``cuts`` ``[K, S+1]``."""
        cb, ce = self.cum[cuts[:, stage]], self.cum[cuts[:, stage + 1]]            # [K, n, 3]
        return (np.einsum("knj,nj->kn", cb, rows[:, 3:6])
                + np.einsum("knj,nj->kn", ce, rows[:, 6:9])
                + rows[:, 9:12] @ self.tot + rows[:, 12] * self.p2p)

    def rank_bound(self, r: int, cuts: np.ndarray) -> np.ndarray:
        """Lower bounds ``[K]`` on the step time from two-stage rank ``r`` for partitions
        ``cuts`` ``[K, S+1]`` whose stages on ``r`` are fixed."""
        sx, into, sy, tail, counts = self.tables.rank_paths[r]
        stages = np.array(self.lay.stages_of(r))
        times = self.cum[cuts[:, stages + 1]] - self.cum[cuts[:, stages]]       # [K, chunks, 3]
        times[..., 2] = np.minimum(times[..., 2], times[..., 1])
        dur = part_durations(*self.tables.class_parts[r], times, self.overlap)           # [K, C]
        return (self._chains(into, sx, cuts) + dur @ counts.T
                + self._chains(tail, sy, cuts)).max(axis=1)

    # ---- bounds -------------------------------------------------------------------------
    @cached_property
    def stage_terms(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per stage ``s``: ``(start [L+1, n], end [L+1, n])`` with ``start[b] + end[e]`` the
        values of its ``n`` template rows for the stage ``[b, e)`` (the rows are linear in
        ``cum[b]`` and ``cum[e]``)."""
        terms = []
        for t in self.tables.templates:
            base = t[:, 9:12] @ self.tot + t[:, 12] * self.p2p                # [n]
            terms.append((self.cum @ (t[:, 3:6] - t[:, 0:3]).T,
                          self.cum @ (t[:, 0:3] + t[:, 6:9]).T + base))
        return terms

    def stage_bound(self, s: int, b, e) -> np.ndarray:
        """Lower bound (seconds) on the step time from stage ``s`` = layers ``[b, e)``
        (``b``, ``e`` broadcastable index arrays)."""
        start, end = self.stage_terms[s]
        return (start[b] + end[e]).max(axis=-1)

    def single_memory(self, s: int, b, e) -> np.ndarray:
        """Bytes of rank ``s`` for schedules with one stage per rank."""
        peak = self.tables.states[s][:, 0].max()
        return (self.par[e] - self.par[b]) + peak * (self.act[e] - self.act[b])

    def rank_memory(self, r: int, cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(parameter bytes ``[K]``, activation peak bytes ``[K]``) of rank ``r`` for partitions
        ``cuts`` ``[K, S+1]`` whose stages on ``r`` are fixed."""
        stages = np.array(self.lay.stages_of(r))
        par = (self.par[cuts[:, stages + 1]] - self.par[cuts[:, stages]]).sum(axis=1)
        act = self.act[cuts[:, stages + 1]] - self.act[cuts[:, stages]]            # [K, chunks]
        return par, (act @ self.tables.states[r].T).max(axis=1)


def _suffix_bounds(pb: _Problem, limit: float | None, cap: float) -> np.ndarray:
    """``suffix[k][b]``: least ``max stage_bound`` of the last ``k`` stages over ``[b, L)``.

    Values at or above ``cap`` (a step time already reached) only matter as "too slow", so a
    stage is never longer than the longest segment whose ``M * (F + B)`` stays under ``cap``.
    """
    S, L = pb.lay.num_stages, len(pb.cum) - 1
    work = pb.lay.micro_batches * (pb.cum[:, 0] + pb.cum[:, 1]) * \
        (1 if pb.lay.schedule in ("1f1b", "zb1p") else 0)
    far = np.searchsorted(work, work + cap, side="right") if np.isfinite(cap) else \
        np.full(L + 1, L + 1)
    width = int(max(1, min(L, (far - np.arange(L + 1)).max())))
    b = np.arange(L + 1)[:, None]
    e = b + 1 + np.arange(width)[None, :]                                       # [L+1, W]
    valid = e <= L
    e = np.minimum(e, L)
    suffix = np.full((S + 1, L + 1), np.inf)
    suffix[0, L] = 0.0
    for k in range(1, S + 1):
        s = S - k
        cost = np.where(valid, pb.stage_bound(s, b, e), np.inf)
        if limit is not None:
            cost = np.where(pb.single_memory(s, b, e) > limit, np.inf, cost)
        suffix[k] = np.min(np.maximum(cost, suffix[k - 1][e]), axis=1)
    return suffix


def partition(layers, num_stages: int, *, schedule: str = "1f1b",
              micro_batches: int | None = None, memory_limit: float | None = None,
              p2p: float = 0.0, overlap: float = 0.0,
              node_limit: int | None = DEFAULT_NODE_LIMIT) -> PipelinePlan:
    """Cut ``layers`` into ``num_stages`` contiguous stages minimising the simulated step time.

    ``layers``: a ``Profile`` or a sequence of mappings with keys ``F``, ``B``, ``W`` (seconds,
    times of one micro-batch) and optional ``activation_bytes``, ``param_bytes``, ``kind``,
    ``ep_imbalance``. ``num_stages``: model stages (ranks = stages, or stages / 2 for
    ``"dualpipev"``). ``micro_batches`` defaults to twice the ranks. ``memory_limit``: bytes per
    rank. ``p2p``/``overlap`` as in ``simulate``. Raises ``MemoryLimitError`` when nothing fits.

    ``node_limit`` caps the branch-and-bound nodes (``None``: no cap). The plan's ``optimal`` is
    True when the search finished, i.e. the partition is proven optimal; when the cap stopped it
    (in practice only DualPipe/DualPipeV with 16+ stages), the plan is the best one found.
    """
    profile = profile_from_layers(layers)
    pb, lay = _setup(profile, num_stages, schedule, micro_batches, p2p, overlap, memory_limit)
    if lay.num_stages > len(profile):
        raise FieldError("num_stages", f"must be <= the number of layers ({len(profile)}), "
                                           f"got {lay.num_stages}")
    if node_limit is not None and (isinstance(node_limit, bool) or not isinstance(node_limit, int)
                                   or node_limit < 1):
        raise FieldError("node_limit", f"must be an integer >= 1 or None, got {node_limit!r}")
    search = _search_single if schedule in ("1f1b", "zb1p") else _search_dual
    st = search(pb, memory_limit, node_limit, _seeds(pb, profile, memory_limit))
    if st.found is None and st.complete:
        raise _memory_error(pb, profile, memory_limit)
    if st.found is None:
        raise FieldError("node_limit", f"no partition found within {node_limit} search "
                                           "nodes; raise it")
    plan = evaluate(profile, st.found, schedule=schedule, micro_batches=lay.micro_batches,
                    p2p=p2p, overlap=overlap)
    return PipelinePlan(**{**plan.__dict__, "explored": st.explored, "optimal": st.complete})


class _Search:
    """Incumbent of a branch and bound and the partial boundaries of the current node."""

    def __init__(self, pb: _Problem, node_limit: int | None):
        self.pb, self.node_limit, self.complete = pb, node_limit, True
        S, L = pb.lay.num_stages, len(pb.cum) - 1
        self.bounds = np.zeros(S + 1, dtype=np.int64)
        self.bounds[S] = L
        self.best, self.found, self.explored = np.inf, None, 0
        self.cutoff = np.inf
        self.paths: PathBounds | None = None

    def enter(self) -> bool:
        """Count a node; False (and the search marked incomplete) once over ``node_limit``."""
        if self.node_limit is not None and self.explored >= self.node_limit:
            self.complete = False
            return False
        self.explored += 1
        return True

    def children(self, fixed: dict[int, np.ndarray]) -> np.ndarray:
        """Partitions ``[K, S+1]``: the current boundaries with ``fixed[index] = values [K]``."""
        k = len(next(iter(fixed.values())))
        cuts = np.repeat(self.bounds[None, :], k, axis=0)
        for index, values in fixed.items():
            cuts[:, index] = values
        return cuts

    def leaves(self, cuts: np.ndarray) -> None:
        """Simulate complete partitions ``[K, S+1]`` in one batch; keep the best."""
        if len(cuts) == 0:
            return
        steps = self.probe(cuts)
        i = int(np.argmin(steps))
        if steps[i] < self.best:
            self.best, self.found = float(steps[i]), tuple(int(x) for x in cuts[i])
            self.cutoff = self.best * (1.0 - RELATIVE_TOLERANCE)

    def probe(self, cuts: np.ndarray) -> np.ndarray:
        """Step times ``[K]`` of partitions ``cuts`` ``[K, S+1]``; with path bounds, add the
        critical paths of the fastest one and of the one the bounds miss most."""
        times = self.pb.stage_times(cuts)
        steps = step_times(self.pb.dag, times, self.pb.p2p, self.pb.overlap)
        if self.paths is not None:
            miss = steps - self.paths.value(cuts)
            for j in {int(np.argmin(steps)), int(np.argmax(miss))}:
                self.paths.add(*critical_path(self.pb.dag, times[j], self.pb.p2p,
                                              self.pb.overlap))
        return steps


def _seeds(pb: _Problem, profile: Profile, limit: float | None) -> np.ndarray:
    """Starting incumbents ``[K, S+1]`` that fit the memory limit: the even split and splits
    balancing ``F + B`` and parameter bytes (they only speed up pruning)."""
    S = pb.lay.num_stages
    times = profile.times
    cands = np.array([even_boundaries(len(profile), S),
                      balanced_boundaries(times[:, 0] + times[:, 1], S),
                      balanced_boundaries(profile.param_bytes, S)])
    return cands[_fits(pb, cands, limit)]


def _fits(pb: _Problem, cuts: np.ndarray, limit: float | None) -> np.ndarray:
    """Mask ``[K]``: partitions ``cuts`` ``[K, S+1]`` whose every rank fits ``limit`` bytes."""
    if limit is None:
        return np.ones(len(cuts), dtype=bool)
    need = np.max([sum(pb.rank_memory(r, cuts)) for r in range(pb.lay.num_ranks)], axis=0)
    return need <= limit


def _search_single(pb: _Problem, limit: float | None, node_limit: int | None,
                   seeds: np.ndarray) -> _Search:
    """One stage per rank: fix stages left to right; prune with ``suffix`` bounds."""
    S, L = pb.lay.num_stages, len(pb.cum) - 1
    st = _Search(pb, node_limit)
    st.leaves(seeds)
    suffix = _suffix_bounds(pb, limit, st.best)

    def visit(s: int, b: int, reached: float) -> None:
        if not st.enter():
            return
        ends = np.arange(b + 1, L - (S - s - 1) + 1)
        own = np.maximum(pb.stage_bound(s, b, ends), reached)
        if limit is not None:
            own = np.where(pb.single_memory(s, b, ends) > limit, np.inf, own)
        key = np.maximum(own, suffix[S - s - 1][ends])
        if s == S - 2:                                   # children are complete partitions
            st.leaves(st.children({s + 1: ends[key < st.cutoff]}))
            return
        for i in np.argsort(key, kind="stable"):
            if key[i] >= st.cutoff or not st.complete:
                break
            st.bounds[s + 1] = ends[i]
            visit(s + 1, int(ends[i]), float(own[i]))

    if S == 1:
        st.leaves(st.bounds[None, :])
    else:
        visit(0, 0, 0.0)
    return st


def _search_dual(pb: _Problem, limit: float | None, node_limit: int | None,
                 seeds: np.ndarray) -> _Search:
    """Two stages per rank (``k`` and ``S-1-k``): fix the stage pairs from the outside in.

    A pair is pruned by the stage bounds, the path bounds (``PathBounds``: critical paths and
    their Lagrangian combination for the node, ``path_keys``), the
    exact-duration bounds of its ranks, memory, and a bound on the stages still in the middle:
    after the first micro-batch's forward reached them, their ranks share at least
    ``(1 - overlap/2) * M * (F + B)`` of their work (an ``F&B`` pair lasts at least
    ``(1 - overlap/2)`` times the sum of its halves).
    """
    S, L = pb.lay.num_stages, len(pb.cum) - 1
    lay, st = pb.lay, _Search(pb, node_limit)
    st.paths = PathBounds(pb.cum, S, pb.p2p)
    st.leaves(seeds)
    _improve(st, limit)
    pair_ranks = [[r for r in range(lay.num_ranks) if min(lay.stages_of(r)) == k]
                  for k in range(S // 2)]
    share = (1 - pb.overlap / 2) * lay.micro_batches

    def middle(k: int, e: np.ndarray, f: np.ndarray) -> np.ndarray:
        """Bound from the stages k+1..S-2-k covering [e, f)."""
        ranks = sum(len(x) for x in pair_ranks[k + 1:])
        seg = pb.cum[f] - pb.cum[e]
        return pb.cum[e, 0] + share * (seg[:, 0] + seg[:, 1]) / ranks

    def screen(k: int, cuts: np.ndarray, key: np.ndarray) -> np.ndarray:
        """Raise ``key`` by the rank bounds of pair ``k``; infinite where memory overflows."""
        for r in pair_ranks[k]:
            key = np.maximum(key, pb.rank_bound(r, cuts))
            if limit is not None:
                key = np.where(sum(pb.rank_memory(r, cuts)) > limit, np.inf, key)
        return key

    def path_keys(k: int, e: np.ndarray, f: np.ndarray, key: np.ndarray):
        """Raise the keys ``[n]`` of children ``x_{k+1} = e``, ``x_{S-1-k} = f`` by the path
        rows, then (two or more children left, depth up to ``COMBINE_DEPTH``, room in the row
        set) by the node's Lagrangian combination, kept as a row. Returns the children left
        under the cutoff after the rows and their raised keys."""
        key = np.maximum(key, st.paths.child_bounds(st.bounds, k, e, f))
        sel = key < st.cutoff
        e, f, key = e[sel], f[sel], key[sel]
        if len(key) > 1 and k <= COMBINE_DEPTH and st.paths.add_combination(st.bounds, k):
            key = np.maximum(key, st.paths.child_bounds(st.bounds, k, e, f))
        return e, f, key

    weight = pb.cum[:, 0] + pb.cum[:, 1]

    def complete(cut: np.ndarray, k: int) -> np.ndarray:
        """``cut`` ``[S+1]`` with boundaries ``k+1 .. S-1-k`` balancing ``F + B`` inside
        ``[cut[k], cut[S-k])``, as a batch of one."""
        lo, hi = int(cut[k]), int(cut[S - k])
        inner = balanced_boundaries(np.diff(weight[lo:hi + 1]), S - 2 * k)
        out = cut.copy()
        out[k:S - k + 1] = lo + np.array(inner)
        return out[None]

    def visit(k: int, lo: int, hi: int, reached: float) -> None:
        if not st.enter():
            return
        j = S - 1 - k
        if k == j - 1:                                   # the two middle stages: one cut
            cut = np.arange(lo + 1, hi)
            key = np.maximum.reduce([pb.stage_bound(k, lo, cut), pb.stage_bound(j, cut, hi),
                                     np.full(cut.shape, reached)])
            cuts = st.children({k + 1: cut[key < st.cutoff]})
            key = screen(k, cuts, np.maximum(key[key < st.cutoff], st.paths.value(cuts)))
            st.leaves(cuts[key < st.cutoff])
            return
        cut = np.arange(lo + 1, hi)
        outer_k, outer_j = pb.stage_bound(k, lo, cut), pb.stage_bound(j, cut, hi)
        ends, starts = cut[outer_k < st.cutoff], cut[outer_j < st.cutoff]
        e, f = np.meshgrid(ends, starts, indexing="ij")
        keep = f - e >= j - k - 1                        # room for the stages in between
        e, f = e[keep], f[keep]
        key = np.maximum.reduce([outer_k[e - lo - 1], outer_j[f - lo - 1], middle(k, e, f),
                                 np.full(e.shape, reached)])
        sel = key < st.cutoff
        e, f, key = path_keys(k, e[sel], f[sel], key[sel])
        sel = key < st.cutoff
        cuts = st.children({k + 1: e[sel], j: f[sel]})
        key = screen(k, cuts, key[sel])
        if len(key) and key.min() < st.cutoff:
            st.probe(complete(cuts[int(np.argmin(key))], k + 1))
        for i in np.argsort(key, kind="stable"):
            if key[i] >= st.cutoff or not st.complete:
                break
            st.bounds[k + 1], st.bounds[j] = cuts[i, k + 1], cuts[i, j]
            visit(k + 1, int(cuts[i, k + 1]), int(cuts[i, j]), float(key[i]))

    visit(0, 0, L, 0.0)
    return st


def _improve(st: _Search, limit: float | None, reach: int = 2) -> None:
    """Hill-climb from the incumbent: move one boundary by up to ``reach`` layers, or two
    boundaries by one layer each (any directions; neighbours and the partner boundaries
    ``j``, ``S-j`` of a two-stage rank), take the best move, repeat while it helps."""
    if st.found is None:
        return
    S = len(st.found) - 1
    eye = np.eye(S + 1, dtype=np.int64)
    single = [d * eye[j] for j in range(1, S) for d in range(-reach, reach + 1) if d]
    pairs = {(j, j + 1) for j in range(1, S - 1)} | {(j, S - j) for j in range(1, S // 2)}
    double = [a * eye[i] + b * eye[j] for i, j in sorted(pairs) for a in (-1, 1) for b in (-1, 1)]
    moves = np.array(single + double)
    while True:
        cands = np.array(st.found)[None] + moves
        cands = cands[(np.diff(cands, axis=1) > 0).all(axis=1)]
        cands = cands[_fits(st.pb, cands, limit)]
        before = st.best
        st.leaves(cands)
        if st.best >= before:
            return


def _setup(profile: Profile, num_stages, schedule, micro_batches, p2p, overlap, memory_limit):
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise FieldError("num_stages", f"must be an integer >= 1, got {num_stages!r}")
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
    times = pb.stage_times(np.array([bounds]))[0]
    result = simulate(times, schedule, lay.micro_batches, p2p=p2p, overlap=overlap,
                      timeline=False)
    mem = np.array([[x[0] for x in pb.rank_memory(r, np.array([bounds]))]
                    for r in range(lay.num_ranks)])
    return PipelinePlan(schedule, tuple(bounds), lay.micro_batches, lay.num_ranks,
                        tuple(lay.stages_of(r) for r in range(lay.num_ranks)), result.step_time,
                        result.bubble_fraction, times, mem.sum(axis=1), mem[:, 0], mem[:, 1])


def _check_boundaries(boundaries: Sequence[int], num_layers: int) -> list[int]:
    bounds = [int(x) for x in boundaries]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != num_layers or any(
            a >= b for a, b in zip(bounds, bounds[1:])):
        raise FieldError("boundaries", f"must rise strictly from 0 to {num_layers}, "
                                           f"got {list(boundaries)}")
    return bounds


def _memory_error(pb: _Problem, profile: Profile, limit: float) -> MemoryLimitError:
    """Name the rank that cannot fit and by how much.

    One stage per rank: the partition minimising the largest rank memory, by dynamic
    programming (exact). Two-stage ranks: the most frugal of the even and balanced splits.
    """
    S, L = pb.lay.num_stages, len(profile)
    if pb.lay.schedule in ("1f1b", "zb1p"):
        idx = np.arange(L + 1)
        b, e = np.meshgrid(idx, idx, indexing="ij")
        best = np.full((S + 1, L + 1), np.inf)
        best[0, L] = 0.0
        choice = np.zeros((S + 1, L + 1), dtype=np.int64)
        for k in range(1, S + 1):
            cost = np.where(e > b, pb.single_memory(S - k, b, e), np.inf)
            total = np.maximum(cost, best[k - 1][None, :])
            choice[k] = total.argmin(axis=1)
            best[k] = total.min(axis=1)
        cuts = [0]
        for k in range(S, 0, -1):
            cuts.append(int(choice[k][cuts[-1]]))
        cands = np.array([cuts])
        frugal = "at best"
    else:
        cands = np.array([even_boundaries(L, S), balanced_boundaries(profile.param_bytes, S),
                          balanced_boundaries(profile.activation_bytes, S)])
        frugal = "in the most frugal of the even and balanced splits"
    need = np.array([sum(pb.rank_memory(r, cands)) for r in range(pb.lay.num_ranks)])  # [R, K]
    k = int(need.max(axis=0).argmin())
    r = int(need[:, k].argmax())
    return MemoryLimitError(r, pb.lay.stages_of(r), float(need[r, k]), limit, frugal)
