"""Load reports into the placements' windows: the ingest gate, per-outcome counters and the
periodic load snapshots written to the store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from expertplane.controller.aggregation import IngestResult
from expertplane.controller.metrics import ControllerMetrics
from expertplane.controller.placements import Placements
from expertplane.controller.report_checks import report_problem
from expertplane.controller.store import Store
from expertplane.planner.metrics import balance_of_gpu_loads
from expertplane.proto import expertplane_pb2 as pb

Ack = pb.LoadAck


class IngestGate:
    """Bounds the load reports the controller holds at once: received from a stream and not yet
    answered (being validated and counted, or their ack waiting to be sent). A report that finds
    ``limit`` reports held is answered OVERLOADED at once, without being counted: under a flood
    the handlers of many streams hold reports while they wait for the CPU (the GIL), so the
    count rises with the backlog and the excess is shed cheaply instead of queueing."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        """Take a place; False when ``limit`` reports are already held."""
        with self._lock:
            if self.held >= self.limit:
                return False
            self.held += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.held -= 1


_SHED = IngestResult(Ack.OVERLOADED, "ingest queue full; retry later")


class LoadIngest:
    """Counts reports into the window of their placement; ``clock`` gives unix seconds."""

    def __init__(self, placements: Placements, store: Store, metrics: ControllerMetrics,
                 clock: Callable[[], float], gate_limit: int):
        self._placements = placements
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self.gate = IngestGate(gate_limit)
        metrics.ingest_inflight.set_function(lambda: self.gate.held)
        self._counters: dict[tuple[str, int], object] = {}

    def ingest(self, report: pb.LoadReport) -> IngestResult:
        """Count one report (callers hold a place in ``gate``, or shed with ``shed``)."""
        t0 = time.perf_counter()
        state = self._placements.get(report.placement)
        now = self._clock()
        problem = None if state is None else report_problem(report, now)
        if state is None:
            res = IngestResult(Ack.REJECTED, f"placement: unknown placement {report.placement!r}")
        elif problem is not None:
            res = IngestResult(Ack.REJECTED, problem)
        else:
            res = state.window.ingest(report, now)
            if res.status == Ack.ACCEPTED:
                state.totals.add(report, state.spec)
                if report.HasField("gpu"):
                    self._metrics.set_gpu(report.placement, report.worker_rank, report.gpu)
        self._metrics.ingest_seconds.observe(time.perf_counter() - t0)
        if res.lag_seconds:
            self._metrics.report_lag.observe(res.lag_seconds)
        self._count(report, res.status)
        return res

    def shed(self, report: pb.LoadReport) -> IngestResult:
        """Answer a report that found the gate full: OVERLOADED, not counted."""
        self._count(report, Ack.OVERLOADED)
        return _SHED

    def _count(self, report: pb.LoadReport, status: int) -> None:
        name = report.placement if self._placements.get(report.placement) else ""
        counter = self._counters.get((name, status))
        if counter is None:
            counter = self._counters[(name, status)] = self._metrics.reports.labels(
                name, Ack.Status.Name(status))
        counter.inc()

    def forget(self, name: str) -> None:
        """The placement was deleted: drop its counters."""
        self._counters = {k: v for k, v in self._counters.items() if k[0] != name}

    def snapshot_loads(self) -> None:
        """Write each placement's window to the store if new reports arrived since the last."""
        now = self._clock()
        for state in self._placements.states():
            view = state.view(now)
            if view.reports == state.snapshotted:
                continue
            self._store.add_load_snapshot(state.name, view.load, view.reports)
            state.snapshotted = view.reports
            if view.gpu_load.sum():
                self._metrics.set_balance(self._metrics.current_balance, state.name,
                                          balance_of_gpu_loads(view.gpu_load))
