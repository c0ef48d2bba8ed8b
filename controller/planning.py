"""Compute a candidate plan for a placement with the planner, and score it against the plan in force."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from expertplane.controller.spec import PlacementSpec
from expertplane.errors import FieldError
from expertplane.planner.eplb import rebalance_experts
from expertplane.planner.metrics import balance
from expertplane.planner.plan import build_log2phy, migration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A plan not yet stored.

    phy2log [L, R], log2phy [L, E, X] (-1 padded), logcnt [L, E] int64; load [L, E] float64 tokens
    it was computed from; predicted_balance [L] of this plan on ``load``; current_balance [L] of
    the previous plan on the same ``load`` (equal to predicted when there is no previous plan);
    slots_moved / bytes_moved versus the previous plan.
    """

    algorithm: str
    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray
    load: np.ndarray
    predicted_balance: np.ndarray
    current_balance: np.ndarray
    slots_moved: int
    bytes_moved: int

    @property
    def gain(self) -> float:
        """Relative improvement of the mean per-layer balance: (current - predicted) / current."""
        cur = float(np.mean(self.current_balance))
        return (cur - float(np.mean(self.predicted_balance))) / cur if cur > 0 else 0.0


def planning_load(spec: PlacementSpec, load: np.ndarray | None) -> np.ndarray:
    """The load [L, E] to plan from: ``load`` if it holds any tokens, else the spec's initial
    load, else uniform (every expert weighs 1)."""
    if load is not None and np.asarray(load).sum() > 0:
        return np.asarray(load, dtype=np.float64)
    if spec.initial_load is not None and spec.initial_load.sum() > 0:
        return spec.initial_load.astype(np.float64)
    return np.ones((spec.num_layers, spec.num_experts))


def check_load(spec: PlacementSpec, load: np.ndarray, field: str = "load") -> np.ndarray:
    """Check a load [L, E] against ``spec``: shape, finite, non-negative."""
    load = np.asarray(load, dtype=np.float64)
    if load.shape != (spec.num_layers, spec.num_experts):
        raise FieldError(field, f"must have shape {[spec.num_layers, spec.num_experts]}, "
                                     f"got {list(load.shape)}")
    if not np.all(np.isfinite(load)) or (load < 0).any():
        raise FieldError(field, "must be finite and non-negative")
    return load


def compute_candidate(spec: PlacementSpec, load: np.ndarray | None,
                      previous: np.ndarray | None = None, *,
                      movement_aware: bool = True, fresh: np.ndarray | None = None) -> Candidate:
    """Plan ``spec`` for ``load`` [L, E] (see ``planning_load``), scored against ``previous``
    (the phy2log [L, R] in force) when given, and movement-aware against it unless
    ``movement_aware`` is False (a fresh plan). ``fresh``: the fresh plan [L, R] of the same
    spec and load, when the caller has it (the movement-aware plan starts from it).
    Raises ``FieldError`` naming the field."""
    weight = planning_load(spec, load)
    previous = _checked_map(spec, previous, "previous_phy2log")
    aware = movement_aware and previous is not None
    phy2log, log2phy, logcnt = (t.numpy() for t in rebalance_experts(
        weight, spec.num_replicas, spec.num_groups, spec.num_nodes, spec.num_gpus,
        algorithm=spec.algorithm, previous=previous if aware else None,
        fresh=fresh if aware else None))
    return _scored(spec, weight, phy2log, log2phy, logcnt, previous)


def candidate_from_map(spec: PlacementSpec, load: np.ndarray | None, phy2log: np.ndarray,
                       previous: np.ndarray | None = None, field: str = "phy2log") -> Candidate:
    """A given map phy2log [L, R] as a candidate (restoring a lost plan, rolling back), scored on
    ``load`` like ``compute_candidate``. Raises ``FieldError`` on ``field`` for a map of another
    shape, an expert id out of range or an expert without a slot."""
    weight = planning_load(spec, load)
    phy2log = _checked_map(spec, phy2log, field)
    if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= spec.num_experts):
        raise FieldError(field, f"expert ids must lie in [0, {spec.num_experts})")
    log2phy, logcnt = build_log2phy(phy2log, spec.num_experts)
    if (logcnt == 0).any():
        raise FieldError(field, "every expert of every layer needs a slot")
    return _scored(spec, weight, phy2log, log2phy, logcnt, _checked_map(spec, previous, "previous"))


def _checked_map(spec: PlacementSpec, phy2log: np.ndarray | None, field: str) -> np.ndarray | None:
    if phy2log is None:
        return None
    phy2log = np.asarray(phy2log, dtype=np.int64)
    if phy2log.shape != (spec.num_layers, spec.num_replicas):
        raise FieldError(field, f"must have shape {[spec.num_layers, spec.num_replicas]}, "
                                f"got {list(phy2log.shape)}")
    return phy2log


def _scored(spec: PlacementSpec, weight: np.ndarray, phy2log: np.ndarray, log2phy: np.ndarray,
            logcnt: np.ndarray, previous: np.ndarray | None) -> Candidate:
    """The candidate ``phy2log`` with its balance on ``weight`` [L, E] and its migration from
    ``previous`` [L, R] (None: a first plan)."""
    predicted = balance(weight, phy2log, logcnt, spec.num_gpus)
    if previous is None:
        current, moved = predicted, None
    else:
        prev_cnt = np.zeros_like(logcnt)
        np.add.at(prev_cnt, (np.arange(spec.num_layers)[:, None], previous), 1)
        current = balance(weight, previous, prev_cnt, spec.num_gpus)
        moved = migration(previous, phy2log, spec.expert_bytes, num_gpus=spec.num_gpus,
                          num_nodes=spec.num_nodes)
    return Candidate(algorithm=spec.algorithm, phy2log=phy2log, log2phy=log2phy, logcnt=logcnt,
                     load=weight, predicted_balance=predicted, current_balance=current,
                     slots_moved=moved.slots_moved if moved else 0,
                     bytes_moved=moved.bytes_moved if moved else 0)


def _compile_planner(spec: PlacementSpec) -> None:
    """Run ``compute_candidate`` fresh and movement-aware on a one-layer copy of ``spec``.

    The planner's numba kernels compile per argument type (and parallel kernels per layout), not
    per size, so one layer of the spec's experts, replicas, groups, nodes and algorithm goes
    through the same kernels as the real plan. Loads are float64 Zipf-like; the second one is the
    first reversed, so that the movement-aware plan has work for every stage (the Python-level
    stages call their kernels only when a plan needs them)."""
    small = replace(spec, num_layers=1, initial_load=None)
    load = (1.0 + np.random.default_rng(0).permutation(spec.num_experts))[None, :] ** -1.0
    first = compute_candidate(small, load)
    compute_candidate(small, load[:, ::-1].copy(), previous=first.phy2log)


def warm_up_key(spec: PlacementSpec) -> tuple[str, int, int, int, int, int]:
    """What the compiled planner code for ``spec`` depends on: the inputs of the one-layer plans
    ``_compile_planner`` makes (algorithm, experts, replicas, groups, nodes, GPUs per node).
    Placements with the same key need nothing more compiled once one of them was warmed."""
    return (spec.algorithm, spec.num_experts, spec.num_replicas, spec.num_groups, spec.num_nodes,
            spec.gpus_per_node)


class PlannerWarmUp:
    """Compiles the planner code that plans for a placement need, in a daemon thread, once per
    ``warm_up_key`` (thread-safe). Call it with a ``PlacementSpec``; it returns the thread that
    warms (or warmed) that key, started, so that callers and tests may ``join`` it.

    numba compiles on first use (loading from its on-disk cache when warm); without this the
    first policy cycle of a placement paid it, once 84 s on a loaded machine. Where the cache
    lacks kernels, they are built in a background process (``planner.compiled``): the fresh plan
    here takes the numpy path and the movement-aware one waits for that build. Once compiled, a
    warm-up takes 0.02-0.4 s of that thread (measured on 2 shared vCPUs: 288 slots on 32 GPUs
    "deepseek" to 640 slots on 320 GPUs "balanced"), which a placement of a key already warmed
    (re-applied, or another model of the same shape) no longer spends.
    ``compile_planner(spec)`` does the work (``_compile_planner``; tests pass their own)."""

    def __init__(self, compile_planner: Callable[[PlacementSpec], None] = _compile_planner):
        self._compile = compile_planner
        self._lock = threading.Lock()
        self._threads: dict[tuple, threading.Thread] = {}

    def __call__(self, spec: PlacementSpec) -> threading.Thread:
        key = warm_up_key(spec)
        with self._lock:
            thread = self._threads.get(key)
            if thread is None:
                thread = threading.Thread(target=self._warm, args=(spec,), daemon=True,
                                          name=f"planner-warm-up-{spec.name}")
                self._threads[key] = thread
                thread.start()
        return thread

    def _warm(self, spec: PlacementSpec) -> None:
        try:
            self._compile(spec)
        except Exception:  # a failed warm-up only costs the first plan its compile time
            log.exception("planner warm-up for placement %r failed", spec.name)
        else:
            log.info("planner compiled for placement %r (algorithm %s)", spec.name, spec.algorithm)


warm_up = PlannerWarmUp()  # the process's: compiled code is shared by every controller in it
