"""Discrete-event simulation of one pipeline-parallel training step.

Model (times in seconds):

- Stage ``k`` costs ``F_k`` (forward of one micro-batch), ``B_k`` (full backward: input and
  weight gradients) and ``W_k <= B_k`` (the weight-gradient part of ``B_k``). A backward that
  defers its weight gradient (ZB1P, the zero-bubble steps of DualPipe) lasts ``B_k - W_k`` and the
  later ``W`` pass lasts ``W_k``.
- An overlapped forward&backward pair (DualPipe's ``F&B``) of a forward costing ``f`` and a full
  backward costing ``b`` lasts ``max(f, b) + (1 - overlap) * min(f, b)``: ``overlap = 0`` runs
  them back to back (``f + b``), ``overlap = 1`` hides the shorter one completely.
- Every rank runs its operations one at a time in the schedule's fixed order
  (``schedules.rank_orders``). An operation starts when the rank is free and its inputs exist:
  the forward of the previous stage / backward of the next stage for the same micro-batch, plus
  ``p2p`` seconds when that stage ran on another rank. Sends are asynchronous.

The step time is the end of the last operation. A rank's *bubble* is its idle time inside the
step, ``step_time - busy``; ``busy`` sums the durations of the rank's operations (an ``F&B``
pair counts once, with its overlapped duration). With equal stages and ``p2p = 0`` this bubble
reproduces DualPipe's table exactly (see ``tests/test_pipeline_simulate.py``):
1F1B ``(R-1)(F+B)`` on every rank (any F, B, W); ZB1P ``(R-1)(F+B-2W)`` on every rank when
``W <= F`` and ``W <= B - W``; DualPipe ``(R/2-1)(F&B+B-3W)`` on ranks 0 and ``R-1`` (DualPipeV:
``(R-1)(F&B+B-3W)`` on rank 0) when ``F = B - W`` (the proportions of DualPipe's figure) and
``overlap = 0`` (``F&B = F + B``). With ``overlap > 0`` the simulated DualPipe bubble is smaller
than the table's formula: a rank's pairs then end earlier than its neighbours wait for.

Activation memory is counted in micro-batches: a forward of a chunk holds one micro-batch of
that chunk's activations until its backward (or its deferred ``W``) ends. DualPipeV chunks are
half a rank's layers, so each counts 1/2; all other chunks count 1. With equal stages the first
rank peaks at ``R`` (1F1B, ZB1P) and ``R + 1`` (DualPipe) micro-batches, as in DualPipe's table.
DualPipeV's first rank holds ``2R + 1`` chunk activations, i.e. ``R + 1/2`` micro-batches of its
layers: the same bytes as DualPipe on ``2R`` ranks holding ``2R + 1`` half-size stages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from expertplane.errors import FieldError
from expertplane.planner.pipeline.dag import finish_times, schedule_dag
from expertplane.planner.pipeline.schedules import Layout, Op, layout, rank_orders


@dataclass(frozen=True)
class Event:
    """One operation on the timeline.

    ``stage`` is the pipeline rank (GPU) that ran it, ``chunk`` which of the rank's model chunks,
    ``model_stage`` the model stage of that chunk; for ``kind == "FB"`` the ``backward_*`` fields
    name the overlapped backward. Times in seconds from the step start.
    """

    stage: int
    kind: str
    micro_batch: int
    chunk: int
    model_stage: int
    start: float
    end: float
    backward_micro_batch: int | None = None
    backward_chunk: int | None = None
    backward_model_stage: int | None = None


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of ``simulate``; per-rank arrays have shape ``[num_ranks]``.

    ``busy``/``idle`` in seconds (``idle = step_time - busy`` is the bubble);
    ``activation_peak`` in micro-batches (see the module docstring);
    ``parameter_multiplicity`` = stage copies held over all ranks / stages (2.0 for DualPipe).
    """

    schedule: str
    num_ranks: int
    micro_batches: int
    step_time: float
    busy: np.ndarray
    idle: np.ndarray
    activation_peak: np.ndarray
    parameter_multiplicity: float
    timeline: list[Event]

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all rank-seconds: ``sum(idle) / (num_ranks * step_time)``."""
        return float(self.idle.sum() / (self.num_ranks * self.step_time)) if self.step_time else 0.0


def stage_times(stages: Sequence, field: str = "stages") -> np.ndarray:
    """Validate per-stage ``(F, B, W)`` times into a float array ``[S, 3]``."""
    try:
        arr = np.asarray([tuple(s) for s in stages], dtype=float)
    except (TypeError, ValueError):
        raise FieldError(field, "must be a sequence of (F, B, W) triples of seconds") from None
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] == 0:
        raise FieldError(field, f"must be a non-empty sequence of (F, B, W) triples, got "
                                    f"shape {arr.shape}")
    for k, (f, b, w) in enumerate(arr):
        if not all(math.isfinite(x) and x >= 0 for x in (f, b, w)):
            raise FieldError(f"{field}[{k}]", f"times must be finite and >= 0, got {(f, b, w)}")
        if w > b:
            raise FieldError(f"{field}[{k}].W", f"must be <= B ({b}), got {w}")
    return arr


def _check_scalar(field: str, value: float, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise FieldError(field, f"must be a finite number {bound}, got {value!r}")
    return float(value)


def simulate(stages: Sequence, schedule: str, micro_batches: int, *, p2p: float = 0.0,
             overlap: float = 0.0, timeline: bool = True) -> SimulationResult:
    """Simulate one training step of ``micro_batches`` micro-batches.

    ``stages``: per model stage ``(F, B, W)`` seconds, in model order (``len(stages)`` stages; R
    ranks = stages, or stages / 2 for ``"dualpipev"``). ``p2p``: seconds to send an activation
    or gradient to another rank. ``overlap``: share in [0, 1] of the shorter half of an ``F&B``
    pair hidden under the longer one. ``timeline=False`` leaves the result's timeline empty
    (same step time, busy/idle and memory; no per-operation events built).
    """
    times = stage_times(stages)
    p2p = _check_scalar("p2p", p2p)
    overlap = _check_scalar("overlap", overlap, 1.0)
    lay = layout(schedule, len(times), micro_batches)
    dag = schedule_dag(lay)
    start, end = finish_times(dag, times, p2p, overlap)
    step = float(end.max())
    busy = np.bincount(dag.rank, weights=end - start, minlength=lay.num_ranks)
    events = [_event(int(r), op, float(a), float(b))
              for r, op, a, b in zip(dag.rank, dag.ops, start, end)] if timeline else []
    events.sort(key=lambda e: (e.stage, e.start))
    copies = sum(len(lay.stages_of(r)) for r in range(lay.num_ranks))
    return SimulationResult(schedule, lay.num_ranks, micro_batches, step, busy, step - busy,
                            activation_peaks(lay).copy(), copies / lay.num_stages, events)


@lru_cache(maxsize=32)
def activation_peaks(lay: Layout) -> np.ndarray:
    """Peak activations ``[R]`` (micro-batches, see the module docstring) of every rank."""
    share = 0.5 if lay.schedule == "dualpipev" else 1.0
    return np.array([activation_counts(o, len(lay.stages_of(r))).sum(axis=1).max() * share
                     for r, o in enumerate(rank_orders(lay))])


def activation_counts(order: Sequence[Op], chunks: int) -> np.ndarray:
    """Micro-batches of activations held per chunk at each point of a rank's order.

    Returns ``[len(order), chunks]`` ints: row ``i`` is what op ``i`` holds at its peak (a
    forward's new activations counted before the paired backward frees its own). Depends only
    on the order, not on the durations.
    """
    held = np.zeros(chunks, dtype=np.int64)
    rows = np.zeros((len(order), chunks), dtype=np.int64)
    for i, op in enumerate(order):
        if op.kind in ("F", "FB"):
            held[op.chunk] += 1
        rows[i] = held
        if op.kind == "FB" or (op.kind == "B" and not op.split):
            held[op.b_chunk if op.kind == "FB" else op.chunk] -= 1
        elif op.kind == "W":
            held[op.chunk] -= 1
    return rows


def _event(r: int, op: Op, start: float, end: float) -> Event:
    if op.kind == "FB":
        return Event(r, "FB", op.micro_batch, op.chunk, op.stage, start, end,
                     op.b_micro_batch, op.b_chunk, op.b_stage)
    return Event(r, op.kind, op.micro_batch, op.chunk, op.stage, start, end)
