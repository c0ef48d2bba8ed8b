"""The controller's state and operations, independent of gRPC.

``Controller`` ties together the plan store, the load aggregator, the rebalance policy and the
rollout coordinator. The gRPC servicers (``servicers.py``) only translate messages and errors.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from expertplane.controller.aggregation import IngestResult, LoadAggregator, WindowView
from expertplane.controller.config import ControllerConfig
from expertplane.controller.convert import plan_message
from expertplane.controller.metrics import ControllerMetrics
from expertplane.controller.planning import Candidate, check_load, compute_candidate, warm_up
from expertplane.controller.policy import Decision, PolicyState, decide, record
from expertplane.controller.rollout import RolloutCoordinator
from expertplane.controller.router_balancer import ReportTotals, RouterBalancer
from expertplane.controller.spec import PlacementSpec
from expertplane.controller.store import PlanRecord, RolloutRecord, Store, StoredPlacement, utcnow
from expertplane.errors import FailedPrecondition, FieldError, NotFound
from expertplane.planner.metrics import balance_of_gpu_loads
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import double_tensor

MAX_VERSION = 2 ** 63 - 1      # plan versions are stored as signed 64-bit integers

log = logging.getLogger(__name__)
Ack = pb.LoadAck


@dataclass(frozen=True)
class PlacementView:
    """A placement with its live figures: balances per layer (max GPU load / mean GPU load)."""

    stored: StoredPlacement
    current_balance: list[float]
    predicted_balance: list[float]
    rollout_state: str


@dataclass(frozen=True)
class RebalanceOutcome:
    decision: Decision
    plan: PlanRecord | None
    rollout: RolloutRecord | None


class PlanWatch:
    """A subscriber to new plans: a bounded queue; ``overflowed`` when it fell too far behind.
    ``wake()`` is called (from the offering thread) after every offer, so that the reader can
    wait without holding a thread."""

    def __init__(self, placement: str, maxsize: int, wake: Callable[[], None] = lambda: None):
        self.placement = placement
        self.queue: queue.Queue[PlanRecord | None] = queue.Queue(maxsize)
        self.overflowed = False
        self._wake = wake

    def offer(self, plan: PlanRecord) -> None:
        if not self.placement or plan.placement == self.placement:
            self._put(plan)

    def offer_end(self) -> None:
        """Tell the reader that the stream is over (a None in the queue)."""
        self._put(None)

    def _put(self, item: PlanRecord | None) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.overflowed = True
        self._wake()


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


class Controller:
    """Controller state over one plan store. Call ``open()`` once, then the operations;
    ``run_background()`` starts the policy/rollout-timeout thread, ``close()`` stops it."""

    def __init__(self, config: ControllerConfig, metrics: ControllerMetrics | None = None,
                 clock=time.time):
        self.config = config
        self.metrics = metrics or ControllerMetrics()
        self.clock = clock
        self.store = Store(config.db_url, observe=self.metrics.observe_store)
        self.aggregator = LoadAggregator(self._stored_phy2log, clock)
        self.rollouts = RolloutCoordinator(
            self.store, timeout_seconds=config.rollout_timeout_seconds,
            in_force=self._in_force_plan, on_finished=self._rollout_finished,
            on_committing=self._rollout_committing)
        self.router = RouterBalancer(  # balances load per replica of the plan in force
            self.aggregator.view, self.push_bias, self.metrics.registry,
            replicas=lambda name: (e := self._in_force.get(name)) and e[0].logcnt)
        self.totals = ReportTotals()
        self._lock = threading.RLock()
        self._placements: dict[str, StoredPlacement] = {}
        self._in_force: dict[str, tuple[PlanRecord, pb.Plan]] = {}
        self._policy: dict[str, PolicyState] = {}
        self._predicted: dict[str, list[float]] = {}
        self._snapshotted: dict[str, int] = {}
        self._watches: set[PlanWatch] = set()
        self.gate = IngestGate(config.ingest_queue)
        self.metrics.ingest_inflight.set_function(lambda: self.gate.held)
        self._report_counters: dict[tuple[str, int], object] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle

    def open(self) -> None:
        """Load placements and plans in force from the store; finish interrupted rollouts."""
        for rec in self.rollouts.resume():
            log.warning("rollout %s of %s v%d: %s -> %s", rec.id, rec.placement, rec.to_version,
                        rec.reason, rec.state)
        for sp in self.store.list_placements():
            self._load(sp)

    def _load(self, sp: StoredPlacement) -> None:
        name = sp.spec.name
        with self._lock:
            self._placements[name] = sp
            self._policy.setdefault(name, PolicyState(
                last_rebalance=sp.last_rebalance.timestamp() if sp.last_rebalance else None))
            win = self.aggregator.register(sp.spec, sp.plan_version)
            latest = self.store.latest_version(name)
            if sp.plan_version:
                plan = self.store.get_plan(name, sp.plan_version)
                self._in_force[name] = (plan, plan_message(plan, with_load=False))
                win.add_plan(plan.version, plan.phy2log, in_force=True)
                self.metrics.plan_version.labels(name, "in_force").set(plan.version)
            if latest > sp.plan_version:
                win.add_plan(latest, self.store.get_plan(name, latest).phy2log)
            self.metrics.plan_version.labels(name, "latest").set(latest)
        warm_up(sp.spec)  # compile the planner for this placement before its policy needs it

    def run_background(self) -> None:
        self._thread = threading.Thread(target=self._background, name="controller-policy",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.store.close()

    def _background(self) -> None:
        next_policy = next_snapshot = time.monotonic()
        while not self._stop.wait(self.config.tick_seconds):
            try:
                self.rollouts.expire()
                now = time.monotonic()
                if now >= next_policy:
                    next_policy = now + self.config.policy_interval_seconds
                    for name in list(self._placements):
                        self._auto(name)
                if now >= next_snapshot:
                    next_snapshot = now + self.config.snapshot_interval_seconds
                    self.snapshot_loads()
                self.router.tick({n: sp.spec for n, sp in list(self._placements.items())})
            except Exception:  # keep the loop alive; the error is logged with its traceback
                log.exception("controller background step failed")

    def _auto(self, name: str) -> None:
        sp = self._placements.get(name)
        if sp is None or sp.spec.policy.mode != "auto":
            return
        view = self.aggregator.view(name)
        if view is None or view.reports == 0:
            return
        try:
            self.rebalance(name)
        except (NotFound, FailedPrecondition) as exc:
            log.info("policy for %s skipped: %s", name, exc)

    # ------------------------------------------------------------------ placements

    def apply_placement(self, spec: PlacementSpec) -> PlacementView:
        """Register or update a placement; computes and puts in force its first plan."""
        stored = self.store.upsert_placement(spec)
        if stored.plan_version == 0 and self.store.latest_version(spec.name) == 0:
            cand = compute_candidate(spec, None)
            plan = self._store_plan(spec, cand, "initial", 0, in_force=True)
            stored = dataclasses.replace(stored, plan_version=plan.version)
            log.info("placement %s: initial plan v%d (balance %.3f)", spec.name, plan.version,
                     float(np.mean(plan.predicted_balance)))
        self._load(stored)
        if stored.plan_version:
            self.rollouts.reconcile_placement(spec.name)
        return self.placement_view(spec.name)

    def delete_placement(self, name: str) -> bool:
        deleted = self.store.delete_placement(name)
        with self._lock:
            self._placements.pop(name, None)
            self._in_force.pop(name, None)
            self._policy.pop(name, None)
            self._predicted.pop(name, None)
        self.aggregator.remove(name)
        self.router.forget(name)
        self.totals.forget(name)
        self.rollouts.forget(name)
        self.metrics.forget(name)
        self._report_counters = {k: v for k, v in self._report_counters.items() if k[0] != name}
        return deleted

    def placement(self, name: str) -> StoredPlacement:
        sp = self._placements.get(name)
        if sp is None:
            raise NotFound("placement", f"unknown placement {name!r}")
        return sp

    def placement_view(self, name: str) -> PlacementView:
        sp = self.placement(name)
        view = self.aggregator.view(name)
        current = balance_of_gpu_loads(view.gpu_load).tolist() if view and view.gpu_load.sum() else []
        in_force = self._in_force.get(name)
        return PlacementView(
            stored=dataclasses.replace(sp, plan_version=in_force[0].version if in_force else 0),
            current_balance=current, predicted_balance=self._predicted.get(name, []),
            rollout_state=self.rollouts.state(name))

    def placement_views(self) -> list[PlacementView]:
        return [self.placement_view(n) for n in sorted(self._placements)]

    # ------------------------------------------------------------------ plans

    def _store_plan(self, spec: PlacementSpec, cand: Candidate, reason: str, previous: int,
                    *, in_force: bool = False) -> PlanRecord:
        plan = PlanRecord(
            placement=spec.name, version=0, algorithm=cand.algorithm, reason=reason,
            previous_version=previous, num_nodes=spec.num_nodes, gpus_per_node=spec.gpus_per_node,
            phy2log=cand.phy2log, log2phy=cand.log2phy, logcnt=cand.logcnt,
            load_snapshot=cand.load, predicted_balance=cand.predicted_balance.tolist(),
            current_balance=cand.current_balance.tolist(), slots_moved=cand.slots_moved,
            bytes_moved=cand.bytes_moved, created_at=utcnow())
        plan = self.store.add_plan(plan, in_force=in_force)
        win = self.aggregator.get(spec.name)
        if win is not None:
            win.add_plan(plan.version, plan.phy2log, in_force=in_force)
        if in_force:
            with self._lock:
                self._in_force[spec.name] = (plan, plan_message(plan, with_load=False))
            self.metrics.plan_version.labels(spec.name, "in_force").set(plan.version)
        self.metrics.plan_version.labels(spec.name, "latest").set(plan.version)
        for w in list(self._watches):
            w.offer(plan)
        return plan

    def get_plan(self, name: str, version: int = 0) -> PlanRecord:
        if version > MAX_VERSION:            # a valid uint64 on the wire, beyond the store's BIGINT
            self.placement(name)
            raise NotFound("version", f"placement {name!r} has no plan version {version}")
        return self.store.get_plan(name, version)

    def plan_in_force(self, name: str) -> PlanRecord:
        """The plan in force on ``name``'s workers: its initial plan or the version its last
        committed rollout put in force (never an aborted rollout's). ``NotFound`` naming the
        placement when it is unknown or has no plan in force."""
        self.placement(name)
        entry = self._in_force.get(name)
        if entry is None:
            raise NotFound("placement", f"placement {name!r} has no plan in force")
        return entry[0]

    def list_plans(self, name: str, page_size: int, page_token: str) -> tuple[list[PlanRecord], str]:
        """A page of plan summaries in version order; the token is the last version returned."""
        self.placement(name)
        if page_token and not (page_token.isascii() and page_token.isdigit()
                               and int(page_token) <= MAX_VERSION):
            raise FieldError("page_token", f"not a token from a previous page: {page_token!r}")
        size = min(page_size or 100, 1000)
        plans = self.store.list_plans(name, after_version=int(page_token or 0), limit=size + 1)
        more = len(plans) > size
        plans = plans[:size]
        return plans, (str(plans[-1].version) if more else "")

    def watch(self, placement: str, after_version: int, wake: Callable[[], None] = lambda: None
              ) -> tuple[PlanWatch, list[PlanRecord]]:
        """Subscribe to new plans (``wake`` as in ``PlanWatch``); returns the watch and the stored
        plans after ``after_version`` (the watch may repeat some of them: callers skip versions
        already sent)."""
        if placement:
            self.placement(placement)
        w = PlanWatch(placement, self.config.watch_queue, wake)
        self._watches.add(w)
        return w, self.store.list_plans(placement, after_version=min(after_version, MAX_VERSION),
                                        limit=10_000)

    def unwatch(self, w: PlanWatch) -> None:
        self._watches.discard(w)

    def end_streams(self) -> None:
        """Shutting down: end every open WatchPlans stream and agent rollout stream, so that no
        stream handler waits for a message that will never come."""
        for w in list(self._watches):
            w.offer_end()
        self.rollouts.close_sessions()

    def _stored_phy2log(self, name: str, version: int) -> np.ndarray | None:
        try:
            return self.store.get_plan(name, version).phy2log
        except NotFound:
            return None

    def _in_force_plan(self, name: str) -> tuple[int, pb.Plan | None]:
        entry = self._in_force.get(name)
        return (entry[0].version, entry[1]) if entry else (0, None)

    # ------------------------------------------------------------------ load

    def ingest(self, report: pb.LoadReport) -> IngestResult:
        """Count one report (callers hold a place in ``self.gate``, or shed with ``shed``)."""
        t0 = time.perf_counter()
        res = self.aggregator.ingest(report)
        sp = self._placements.get(report.placement)
        if res.status == Ack.ACCEPTED and sp is not None:
            self.totals.add(report, sp.spec)
        self.metrics.ingest_seconds.observe(time.perf_counter() - t0)
        if res.lag_seconds:
            self.metrics.report_lag.observe(res.lag_seconds)
        self._count(report, res.status)
        return res

    def shed(self, report: pb.LoadReport) -> IngestResult:
        """Answer a report that found the gate full: OVERLOADED, not counted."""
        self._count(report, Ack.OVERLOADED)
        return _SHED

    def _count(self, report: pb.LoadReport, status: int) -> None:
        key = (report.placement if report.placement in self._placements else "", status)
        counter = self._report_counters.get(key)
        if counter is None:
            counter = self._report_counters[key] = self.metrics.reports.labels(
                key[0], Ack.Status.Name(status))
        counter.inc()

    def load_window(self, name: str) -> tuple[WindowView, pb.RouterBias | None]:
        self.placement(name)
        view = self.aggregator.view(name)
        if view is None:
            raise NotFound("placement", f"unknown placement {name!r}")
        return view, self.rollouts.bias(name)

    def snapshot_loads(self) -> None:
        """Write each placement's window to the store if new reports arrived since the last."""
        for name in list(self._placements):
            view = self.aggregator.view(name)
            if view is None or view.reports == self._snapshotted.get(name, 0):
                continue
            self.store.add_load_snapshot(name, view.load, view.reports)
            self._snapshotted[name] = view.reports
            if view.gpu_load.sum():
                self.metrics.set_balance(self.metrics.current_balance, name,
                                         balance_of_gpu_loads(view.gpu_load))

    # ------------------------------------------------------------------ planning and policy

    def compute_plan(self, name: str, spec: PlacementSpec | None, load: np.ndarray | None,
                     previous: np.ndarray | None, *, store: bool, rollout: bool) -> PlanRecord:
        """Plan on demand for a registered placement (``name``) or an inline ``spec``.

        ``load`` [L, E] defaults to the placement's window; ``previous`` [L, R] to its latest
        plan. The result has version 0 unless ``store``; ``rollout`` implies ``store``.
        """
        if name:
            spec = self.placement(name).spec
            if previous is None and self.store.latest_version(name):
                previous = self.store.get_plan(name).phy2log
            if load is None:
                view = self.aggregator.view(name)
                load = view.load if view is not None and view.reports else None
        elif spec is None:
            raise FieldError("placement", "give a registered placement name or an inline spec")
        elif store or rollout:
            raise FailedPrecondition("store", "only plans of registered placements can be stored")
        if load is not None:
            load = check_load(spec, load)
        cand = compute_candidate(spec, load, previous)
        in_force = self._in_force.get(spec.name)
        prev_version = in_force[0].version if (name and in_force) else 0
        if not (store or rollout):
            return PlanRecord(
                placement=spec.name, version=0, algorithm=cand.algorithm, reason="api",
                previous_version=prev_version, num_nodes=spec.num_nodes,
                gpus_per_node=spec.gpus_per_node, phy2log=cand.phy2log, log2phy=cand.log2phy,
                logcnt=cand.logcnt, load_snapshot=cand.load,
                predicted_balance=cand.predicted_balance.tolist(),
                current_balance=cand.current_balance.tolist(), slots_moved=cand.slots_moved,
                bytes_moved=cand.bytes_moved, created_at=utcnow())
        if rollout and self.rollouts.busy(name):
            raise FailedPrecondition("rollout", f"placement {name!r} has a rollout in progress")
        plan = self._store_plan(spec, cand, "api", prev_version)
        if rollout:
            self.rollouts.start(name, plan_message(plan, with_load=False), prev_version, spec.num_gpus)
        return plan

    def rebalance(self, name: str, *, manual: bool = False, force: bool = False,
                  dry_run: bool = False) -> RebalanceOutcome:
        """Evaluate the policy for ``name`` on its window; store and roll out a plan if it says so.

        Every decision is logged with its numbers.
        """
        sp = self.placement(name)
        spec = sp.spec
        view = self.aggregator.view(name)
        in_force = self._in_force.get(name)
        if in_force is None:
            raise FailedPrecondition("placement", f"placement {name!r} has no plan in force")
        load = view.load if view is not None and view.reports else None
        if load is None and not force:
            return RebalanceOutcome(Decision(False, "no load reported yet", 0.0, 0.0, 0.0, 0, 0),
                                    None, None)
        cand = compute_candidate(spec, load, in_force[0].phy2log)
        self._predicted[name] = cand.predicted_balance.tolist()
        self.metrics.set_balance(self.metrics.predicted_balance, name, cand.predicted_balance)
        state = self._policy.setdefault(name, PolicyState())
        now = self.clock()
        decision = decide(spec.policy, cand, state, now, manual=manual, force=force)
        dry = dry_run or spec.policy.dry_run
        if decision.rebalance and dry:
            decision = dataclasses.replace(decision, rebalance=False,
                                           reason=f"dry run: would rebalance ({decision.reason})")
        if decision.rebalance and self.rollouts.busy(name):
            decision = dataclasses.replace(decision, rebalance=False,
                                           reason="a rollout is in progress")
        log.info("decision %s: rebalance=%s reason=%r current=%.4f predicted=%.4f gain=%.4f "
                 "slots_moved=%d bytes_moved=%d", name, decision.rebalance, decision.reason,
                 decision.current_balance, decision.predicted_balance, decision.gain,
                 decision.slots_moved, decision.bytes_moved)
        self.metrics.decisions.labels(name, str(decision.rebalance).lower()).inc()
        plan = rollout = None
        if decision.rebalance:
            reason = "manual" if manual or force else "auto"
            plan = self._store_plan(spec, cand, reason, in_force[0].version)
            rollout = self.rollouts.start(name, plan_message(plan, with_load=False),
                                          in_force[0].version,
                                          spec.num_gpus)
        record(state, decision, spec.policy, now, rolled_out=decision.rebalance)
        return RebalanceOutcome(decision, plan, rollout)

    def push_bias(self, name: str, bias: np.ndarray, sequence: int) -> int:
        """Send router selection bias [L, E] to the placement's agents; returns agents reached."""
        spec = self.placement(name).spec
        bias = np.asarray(bias, dtype=np.float64)
        if bias.shape != (spec.num_layers, spec.num_experts):
            raise FieldError("bias", f"must have shape {[spec.num_layers, spec.num_experts]}, "
                                          f"got {list(bias.shape)}")
        return self.rollouts.push_bias(pb.RouterBias(placement=name, sequence=sequence,
                                                     bias=double_tensor(bias)))

    # ------------------------------------------------------------------ rollout callbacks

    def _rollout_committing(self, rec: RolloutRecord) -> None:
        plan = self.store.get_plan(rec.placement, rec.to_version)
        with self._lock:
            self._in_force[rec.placement] = (plan, plan_message(plan, with_load=False))
        win = self.aggregator.get(rec.placement)
        if win is not None:
            win.add_plan(plan.version, plan.phy2log, in_force=True)
        self.metrics.plan_version.labels(rec.placement, "in_force").set(plan.version)

    def _rollout_finished(self, rec: RolloutRecord) -> None:
        self.metrics.rollouts.labels(rec.placement, rec.state).inc()
        if not rec.sync:
            self.metrics.rollout_seconds.labels("prepare").observe(rec.prepare_seconds)
            if rec.state == "committed":
                self.metrics.rollout_seconds.labels("commit").observe(rec.commit_seconds)
        log.info("rollout %s of %s v%d %s in %.3f+%.3f s%s", rec.id, rec.placement,
                 rec.to_version, rec.state, rec.prepare_seconds, rec.commit_seconds,
                 f": {rec.reason}" if rec.reason else "")
