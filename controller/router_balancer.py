"""Controller-side router balancing loop and per-placement report totals.

``RouterBalancer.tick`` runs on the controller's background thread: for every placement with
``router_bias.enabled`` whose interval has elapsed and whose window holds load, it computes the
next bias from the global window load (``controller.bias.global_bias_step``), pushes it to the
agents (``push(name, bias, sequence)``, i.e. ``Controller.push_bias`` -> RolloutCommand.bias),
keeps the last ``history`` updates and exports gauges. ``ReportTotals`` sums the steps,
failed steps and capacity-dropped tokens of one placement's accepted load reports.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Gauge

from expertplane.controller.aggregation import WindowView
from expertplane.controller.bias import global_bias_step, max_over_mean
from expertplane.controller.spec import PlacementSpec
from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import to_numpy

log = logging.getLogger(__name__)

__all__ = ["BiasPoint", "PlacementTotals", "ReportTotals", "RouterBalancer"]

HISTORY = 256


@dataclass(frozen=True)
class BiasPoint:
    """One update: at (unix s), bias [L, E] pushed, max/mean logical load [L] of the window it
    was computed on, sequence (RouterBias.sequence) and agents reached."""

    at: float
    bias: np.ndarray
    max_over_mean: np.ndarray
    sequence: int
    agents: int


class _State:
    def __init__(self, spec: PlacementSpec, history: int):
        self.bias = np.zeros((spec.num_layers, spec.num_experts))
        self.due = 0.0
        self.history: collections.deque[BiasPoint] = collections.deque(maxlen=history)


class RouterBalancer:
    """Per-placement bias state. ``view(name)`` gives the window (None if unknown), ``push``
    sends a bias and returns the agents reached; ``replicas(name)`` the plan in force's logcnt
    [L, E] (None: balance per expert); ``clock`` is monotonic seconds for the intervals,
    ``wall`` unix seconds for the history."""

    def __init__(self, view: Callable[[str], WindowView | None],
                 push: Callable[[str, np.ndarray, int], int], registry: CollectorRegistry, *,
                 replicas: Callable[[str], np.ndarray | None] = lambda name: None,
                 history: int = HISTORY, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self._view, self._push, self._clock, self._wall = view, push, clock, wall
        self._replicas = replicas
        self._history = history
        self._lock = threading.Lock()
        self._states: dict[str, _State] = {}
        self._last_sequence = 0
        p = "expertplane_controller_router_"
        self.bias_abs_max = Gauge(p + "bias_abs_max", "max |bias| over the experts of a layer",
                                  ["placement", "layer"], registry=registry)
        self.bias_spread = Gauge(p + "bias_spread", "max bias - min bias over the experts of a "
                                 "layer", ["placement", "layer"], registry=registry)
        self.load_max_over_mean = Gauge(p + "load_max_over_mean", "max / mean logical-expert "
                                        "load of the window of the last update",
                                        ["placement", "layer"], registry=registry)
        self.updates = Gauge(p + "bias_sequence", "sequence of the last bias pushed",
                             ["placement"], registry=registry)

    def _sequence(self) -> int:
        """Strictly increasing and above any earlier controller's (microseconds since the
        epoch), so workers never ignore a restarted controller's bias as a duplicate."""
        self._last_sequence = max(int(self._wall() * 1e6), self._last_sequence + 1)
        return self._last_sequence

    def tick(self, specs: dict[str, PlacementSpec]) -> list[str]:
        """Update every enabled placement that is due; returns the names updated."""
        done = []
        for name, spec in specs.items():
            rb = spec.router_bias
            if rb is None or not rb.enabled:
                continue
            now = self._clock()
            with self._lock:
                state = self._states.get(name)
                if state is None or state.bias.shape != (spec.num_layers, spec.num_experts):
                    state = self._states[name] = _State(spec, self._history)
                if now < state.due:
                    continue
            view = self._view(name)
            if view is None or view.reports == 0 or not view.load.sum():
                continue
            new = global_bias_step(state.bias, view.load, rb.update, self._replicas(name))
            ratio = max_over_mean(view.load)
            with self._lock:
                sequence = self._sequence()
            agents = self._push(name, new, sequence)
            with self._lock:
                state.bias, state.due = new, now + rb.interval_seconds
                state.history.append(BiasPoint(self._wall(), new, ratio, sequence, agents))
            for layer in range(spec.num_layers):
                labels = (name, str(layer))
                self.bias_abs_max.labels(*labels).set(float(np.abs(new[layer]).max()))
                self.bias_spread.labels(*labels).set(float(np.ptp(new[layer])))
                self.load_max_over_mean.labels(*labels).set(float(ratio[layer]))
            self.updates.labels(name).set(sequence)
            log.info("router bias %s seq %d -> %d agents: max/mean load %s", name, sequence,
                     agents, np.array2string(ratio, precision=3))
            done.append(name)
        return done

    def history(self, name: str) -> list[BiasPoint]:
        with self._lock:
            state = self._states.get(name)
            return list(state.history) if state else []

    def forget(self, name: str) -> None:
        with self._lock:
            self._states.pop(name, None)
        for gauge in (self.bias_abs_max, self.bias_spread, self.load_max_over_mean, self.updates):
            for labels in [k for k in list(gauge._metrics) if k[0] == name]:
                gauge.remove(*labels)


@dataclass
class PlacementTotals:
    """Sums over accepted reports: steps, failed_steps, dropped [L, num_gpus] tokens (None
    until a report carries dropped_tokens)."""

    steps: int = 0
    failed_steps: int = 0
    dropped: np.ndarray | None = None
    gpus: dict[int, pb.GpuReport] = field(default_factory=dict)   # latest per rank


class ReportTotals:
    """Steps / failed steps / capacity drops of one placement, from accepted LoadReports
    (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = PlacementTotals()

    def add(self, report: pb.LoadReport, spec: PlacementSpec) -> None:
        """Count an ACCEPTED report; a malformed dropped_tokens is ignored (logged)."""
        dropped = None
        if len(report.dropped_tokens.shape):
            try:
                dropped = to_numpy(report.dropped_tokens, "dropped_tokens",
                                   shape=(spec.num_layers, spec.slots_per_gpu)).sum(axis=1)
            except FieldError as exc:
                log.warning("report of %s rank %d: %s", spec.name, report.worker_rank, exc)
        with self._lock:
            t = self._totals
            t.steps += report.steps
            t.failed_steps += report.failed_steps
            if report.HasField("gpu"):
                t.gpus[report.worker_rank] = pb.GpuReport(
                    worker_rank=report.worker_rank, node=report.node, stats=report.gpu)
            if dropped is not None and report.worker_rank < spec.num_gpus:
                if t.dropped is None or t.dropped.shape != (spec.num_layers, spec.num_gpus):
                    t.dropped = np.zeros((spec.num_layers, spec.num_gpus))
                t.dropped[:, report.worker_rank] += dropped

    def get(self) -> PlacementTotals:
        """A copy of the sums."""
        with self._lock:
            t = self._totals
            return PlacementTotals(t.steps, t.failed_steps,
                                   None if t.dropped is None else t.dropped.copy(), dict(t.gpus))
