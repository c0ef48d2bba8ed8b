"""The dependency graph of one training step, compiled once per (schedule, stages, micro-batches).

Every rank runs its operations in the schedule's fixed order, so the step is a fixed DAG: an
operation waits for the previous operation on its rank and for the results it consumes from
other stages (``p2p`` seconds later when those ran on another rank). ``compile_dag`` finds the
order in which the operations can run (a dependency-driven pass over the ranks; a schedule whose
orders wait on each other in a cycle raises ``RuntimeError``) and stores the operations in that
order, so every operation comes after its predecessors. ``finish_times`` then computes start and
end times in one pass over that order (a numba kernel), for one set of stage times or a whole
batch of them at once.

Operation durations (stage times ``(F, B, W)``): F -> ``F``; B -> ``B`` (``B - W`` when its
weight gradient is deferred); W -> ``W``; an overlapped F&B pair with forward part ``f`` and
full-backward part ``b`` -> ``max(f, b) + (1 - overlap) * min(f, b)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from dataclasses import dataclass

import numpy as np
from numba import njit

from expertplane.planner.pipeline.schedules import Layout, Op, rank_orders

Key = tuple[str, int, int]


@dataclass(frozen=True)
class Dag:
    """Flattened operations (index ``i`` over all ranks) and their dependencies.

    ``rank[i]``; forward part: stage ``f_stage[i]`` (-1 if none); backward part: stage
    ``b_stage[i]`` (-1 if none) weighted ``b_coef[i]`` on ``(B, W)``; ``preds[i]``: up to three
    predecessor ops (``N`` = none, a sentinel ending at 0) with ``remote[i]`` marking those on
    another rank (they add ``p2p``). Ops are in dependency order: ``preds[i] < i`` or ``N``.
    """

    layout: Layout
    ops: tuple[Op, ...]
    rank: np.ndarray
    f_stage: np.ndarray
    b_stage: np.ndarray
    b_coef: np.ndarray
    preds: np.ndarray
    remote: np.ndarray


def _needs(op: Op, last: int) -> list[Key]:
    """Results ``(kind, micro_batch, stage)`` that ``op`` consumes from neighbouring stages."""
    keys = []
    if op.kind in ("F", "FB") and op.stage > 0:
        keys.append(("F", op.micro_batch, op.stage - 1))
    if op.kind in ("B", "FB"):
        mb, st = (op.b_micro_batch, op.b_stage) if op.kind == "FB" else (op.micro_batch, op.stage)
        keys.append(("B", mb, st + 1) if st < last else ("F", mb, st))
    return keys


def _produces(op: Op) -> list[Key]:
    if op.kind == "FB":
        return [("F", op.micro_batch, op.stage), ("B", op.b_micro_batch, op.b_stage)]
    return [(op.kind, op.micro_batch, op.stage)]


def compile_dag(lay: Layout, orders: Sequence[Sequence[Op]]) -> Dag:
    """Build the DAG of ``orders`` (one list per rank, see ``schedules.rank_orders``)."""
    last = lay.num_stages - 1
    producer: dict[Key, int] = {}
    waiting: dict[Key, int] = {}
    pos = [0] * lay.num_ranks
    prev = [-1] * lay.num_ranks
    flat: list[Op] = []
    ranks: list[int] = []
    preds: list[list[int]] = []
    remote: list[list[bool]] = []
    ready = list(range(lay.num_ranks))
    while ready:
        r = ready.pop()
        while pos[r] < len(orders[r]):
            op = orders[r][pos[r]]
            keys = _needs(op, last)
            missing = next((k for k in keys if k not in producer), None)
            if missing is not None:
                waiting[missing] = r
                break
            i = len(flat)
            flat.append(op)
            ranks.append(r)
            preds.append([prev[r]] + [producer[k] for k in keys])
            remote.append([False] + [lay.host(k[2], k[1]) != r for k in keys])
            prev[r] = i
            pos[r] += 1
            for key in _produces(op):
                producer[key] = i
                if key in waiting:
                    ready.append(waiting.pop(key))
    if any(p < len(o) for p, o in zip(pos, orders)):
        raise RuntimeError(f"schedule {lay.schedule} deadlocks at positions {pos}")
    n = len(flat)
    pred_arr = np.full((n, 3), n, dtype=np.int64)
    rem_arr = np.zeros((n, 3), dtype=bool)
    for i, (p, m) in enumerate(zip(preds, remote)):
        p = [x if x >= 0 else n for x in p]
        pred_arr[i, :len(p)] = p
        rem_arr[i, :len(m)] = m
    f_stage, b_stage, b_coef = op_parts(flat)
    return Dag(lay, tuple(flat), np.array(ranks), f_stage, b_stage, b_coef, pred_arr, rem_arr)


def op_parts(ops: Sequence[Op]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(f_stage, b_stage, b_coef)`` of ops: the stage of the forward part (-1: none), the
    stage of the backward/weight part (-1: none) and its weights on that stage's ``(B, W)``."""
    f_stage = np.array([op.stage if op.kind in ("F", "FB") else -1 for op in ops], dtype=np.int64)
    b_stage = np.array([op.b_stage if op.kind == "FB" else op.stage if op.kind in ("B", "W")
                        else -1 for op in ops], dtype=np.int64)
    b_coef = np.array([(1.0, 0.0) if op.kind == "FB" or (op.kind == "B" and not op.split)
                       else (1.0, -1.0) if op.kind == "B" else (0.0, 1.0) if op.kind == "W"
                       else (0.0, 0.0) for op in ops]).reshape(-1, 2)
    return f_stage, b_stage, b_coef


def part_durations(f_stage: np.ndarray, b_stage: np.ndarray, b_coef: np.ndarray,
                   times: np.ndarray, overlap: float) -> np.ndarray:
    """Durations ``[..., N]`` of ops given by ``op_parts`` for stage times ``[..., S, 3]``."""
    f = np.where(f_stage >= 0, times[..., np.maximum(f_stage, 0), 0], 0.0)
    bs = np.maximum(b_stage, 0)
    b = times[..., bs, 1] * b_coef[:, 0] + times[..., bs, 2] * b_coef[:, 1]
    b = np.where(b_stage >= 0, b, 0.0)
    return np.maximum(f, b) + (1.0 - overlap) * np.minimum(f, b)


def finish_times(dag: Dag, times: np.ndarray, p2p: float, overlap: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(start, end)`` of every op, each ``[..., N]`` seconds, for stage times ``[..., S, 3]``."""
    batch = np.ascontiguousarray(times, dtype=float).reshape(-1, *times.shape[-2:])
    start = np.empty((len(batch), len(dag.ops)))
    end = np.empty((len(batch), len(dag.ops)))
    _longest_paths(batch, dag.f_stage, dag.b_stage, dag.b_coef, dag.preds, dag.remote * p2p,
                   overlap, start, end, np.empty(len(batch)))
    shape = times.shape[:-2] + (len(dag.ops),)
    return start.reshape(shape), end.reshape(shape)


def step_times(dag: Dag, times: np.ndarray, p2p: float, overlap: float) -> np.ndarray:
    """Step times ``[K]`` (seconds, the last op's end) for stage times ``[K, S, 3]``; the
    same numbers as ``finish_times(...)[1].max(axis=-1)`` without keeping every op's times."""
    batch = np.ascontiguousarray(times, dtype=float)
    row = np.empty((1, len(dag.ops)))
    steps = np.empty(len(batch))
    _longest_paths(batch, dag.f_stage, dag.b_stage, dag.b_coef, dag.preds, dag.remote * p2p,
                   overlap, row, row, steps)
    return steps


@njit(cache=True)
def _longest_paths(times, f_stage, b_stage, b_coef, preds, lag, overlap, start, end, steps):
    """Run the ops (in dependency order) for each stage-time set ``times[k]`` ``[S, 3]``.

    An op starts when its rank's previous op and its inputs (``lag`` ``[N, 3]`` seconds later)
    are done; its duration follows ``part_durations``. Writes ``start``/``end`` row ``k`` (row
    0 when they have one row, i.e. are scratch) and ``steps[k]`` = the last end.
    """
    n = len(f_stage)
    for k in range(times.shape[0]):
        row = k if start.shape[0] > 1 else 0
        last = 0.0
        for i in range(n):
            s = 0.0
            for j in range(3):
                p = preds[i, j]
                if p < n:
                    s = max(s, end[row, p] + lag[i, j])
            f = times[k, f_stage[i], 0] if f_stage[i] >= 0 else 0.0
            b = 0.0
            if b_stage[i] >= 0:
                b = times[k, b_stage[i], 1] * b_coef[i, 0] + times[k, b_stage[i], 2] * b_coef[i, 1]
            start[row, i] = s
            end[row, i] = s + max(f, b) + (1.0 - overlap) * min(f, b)
            last = max(last, end[row, i])
        steps[k] = last


@lru_cache(maxsize=32)
def schedule_dag(lay: Layout) -> Dag:
    """``compile_dag(lay, rank_orders(lay))``, cached per layout (it depends on nothing else)."""
    return compile_dag(lay, rank_orders(lay))
