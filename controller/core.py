"""The controller's state and operations, independent of gRPC.

``Controller`` ties together the plan store, the placements' state (``placements``), load
ingest (``ingest.py``), stored plans and their watchers (``plans.py``), planning and the
rebalance policy (``rebalance.py``) and the rollout coordinator. The gRPC servicers
(``servicers.py``) only translate messages and errors.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from expertplane.controller.aggregation import IngestResult, PlacementWindow, WindowView
from expertplane.controller.config import ControllerConfig
from expertplane.controller.coordinator import RolloutCoordinator
from expertplane.controller.ingest import LoadIngest
from expertplane.controller.metrics import ControllerMetrics
from expertplane.controller.placements import PlacementState, Placements
from expertplane.controller.planning import (
    candidate_from_map,
    check_load,
    compute_candidate,
    warm_up,
)
from expertplane.controller.plans import Plans, PlanWatch
from expertplane.controller.policy import PolicyState
from expertplane.controller.rebalance import RebalanceOutcome, Rebalancer
from expertplane.controller.router_balancer import PlacementTotals, RouterBalancer
from expertplane.controller.spec import PlacementSpec, Restore
from expertplane.controller.store import PlanRecord, RolloutRecord, Store, StoredPlacement
from expertplane.errors import FailedPrecondition, FieldError, NotFound
from expertplane.planner.io import load_loads
from expertplane.planner.metrics import balance_of_gpu_loads
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import double_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlacementView:
    """A placement with its live figures: balances per layer (max GPU load / mean GPU load)."""

    stored: StoredPlacement
    observed_balance: list[float]
    predicted_balance: list[float]
    rollout_state: str
    latest_version: int = 0


class Controller:
    """Controller state over one plan store. Call ``open()`` once, then the operations;
    ``run_background()`` starts the policy/rollout-timeout thread, ``close()`` stops it."""

    def __init__(self, config: ControllerConfig, metrics: ControllerMetrics | None = None,
                 clock=time.time):
        self.config = config
        self.metrics = metrics or ControllerMetrics()
        self.clock = clock
        self.store = Store(config.db_url, observe=self.metrics.observe_store)
        self.placements = Placements()
        self.plans = Plans(self.store, self.placements, self.metrics, config.watch_queue)
        self.loads = LoadIngest(self.placements, self.store, self.metrics, clock,
                                config.ingest_queue)
        self.gate = self.loads.gate
        self.rollouts = RolloutCoordinator(
            self.store, timeout_seconds=config.rollout_timeout_seconds,
            in_force=self._in_force_message, on_finished=self._rollout_finished,
            on_committing=self._rollout_committing)
        self.planner = Rebalancer(self.placements, self.plans, self.rollouts, self.metrics, clock)
        self.router = RouterBalancer(  # balances load per replica of the plan in force
            self.window, self.push_bias, self.metrics.registry,
            replicas=self._replicas)
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
        """(Re)build the state of a stored placement: keeps its window while the shape is the
        same, its policy memory always."""
        name = sp.spec.name
        state = self.placements.get(name)
        if state is None:
            state = PlacementState(sp, PlacementWindow(sp.spec, self._stored_phy2log), PolicyState(
                last_rebalance=sp.last_rebalance.timestamp() if sp.last_rebalance else None))
        with state.lock:
            state.stored = sp
            if state.window.fits(sp.spec):
                state.window.spec = sp.spec
            else:
                state.window = PlacementWindow(sp.spec, self._stored_phy2log)
            if sp.plan_version:
                self.plans.put_in_force(state, self.store.get_plan(name, sp.plan_version))
            else:                       # a new shape: the plan in force no longer applies
                state.in_force = None
            latest = self.store.latest_version(name)
            if latest > sp.plan_version:
                plan = self.store.get_plan(name, latest)
                if plan.phy2log.shape == (sp.spec.num_layers, sp.spec.num_replicas) and \
                        (plan.num_nodes, plan.gpus_per_node) == (sp.spec.num_nodes,
                                                                 sp.spec.gpus_per_node):
                    state.window.add_plan(latest, plan.phy2log)
            self.metrics.plan_version.labels(name, "latest").set(latest)
        self.placements.put(state)
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
                    for state in self.placements.states():
                        self._auto(state)
                if now >= next_snapshot:
                    next_snapshot = now + self.config.snapshot_interval_seconds
                    self.loads.snapshot_loads()
                self.router.tick({s.name: s.spec for s in self.placements.states()})
            except Exception:  # keep the loop alive; the error is logged with its traceback
                log.exception("controller background step failed")

    def _auto(self, state: PlacementState) -> None:
        if state.spec.policy.mode != "auto" or state.view(self.clock()).reports == 0:
            return
        try:
            self.planner.rebalance(state.name)
        except (NotFound, FailedPrecondition) as exc:
            log.info("policy for %s skipped: %s", state.name, exc)

    # ------------------------------------------------------------------ placements

    def apply_placement(self, spec: PlacementSpec, restore: Restore | None = None) -> PlacementView:
        """Register or update a placement and put a plan in force when it has none: its first
        plan (``restore``'s map under its version when given: the store was lost), or, for a
        new shape, the next version planned for the new shape (reason ``reshape``) on the
        window's load when layers and experts stay the same. Versions only grow."""
        old = self.placements.get(spec.name)
        carried = None
        if old is not None and (old.spec.num_layers, old.spec.num_experts) == \
                (spec.num_layers, spec.num_experts):
            view = old.view(self.clock())
            carried = view.load if view.reports else None
        previous = old.version_in_force if old is not None else 0
        stored = self.store.upsert_placement(spec)
        self._load(stored)
        if stored.plan_version == 0:
            state = self.placements.require(spec.name)
            latest = self.store.latest_version(spec.name)
            with state.lock:
                if latest:
                    plan = self.plans.add(state, compute_candidate(spec, carried), "reshape",
                                          previous, in_force=True)
                elif restore is not None:
                    plan = self.plans.add(state, candidate_from_map(
                        spec, None, restore.phy2log, field="restore_phy2log"), "restored", 0,
                        in_force=True, version=restore.version)
                else:
                    plan = self.plans.add(state, compute_candidate(spec, None), "initial", 0,
                                          in_force=True)
            state.stored = dataclasses.replace(stored, plan_version=plan.version)
            log.info("placement %s: %s plan v%d (balance %.3f)", spec.name, plan.reason,
                     plan.version, float(np.mean(plan.predicted_balance)))
        if self.placements.require(spec.name).in_force is not None:
            self.rollouts.reconcile_placement(spec.name)
        return self.placement_view(spec.name)

    def initial_load_file(self, spec: PlacementSpec, name: str) -> PlacementSpec:
        """``spec`` with its initial load read from file ``name`` (relative to
        ``config.load_dir``); ``FieldError`` on ``initial_load_file`` otherwise."""
        field = "initial_load_file"
        if not self.config.load_dir:
            raise FailedPrecondition(field, "this controller has no --load-dir")
        base = pathlib.Path(self.config.load_dir).resolve()
        path = (base / name).resolve()
        if base not in path.parents:
            raise FieldError(field, f"must name a file inside the load directory, got {name!r}")
        try:
            load = load_loads(path)
        except FileNotFoundError:
            raise FieldError(field, f"no file {name!r} in the load directory") from None
        except FieldError as exc:
            raise exc.at(field) from None
        return dataclasses.replace(spec, initial_load=check_load(spec, load, field))

    def delete_placement(self, name: str) -> bool:
        deleted = self.store.delete_placement(name)
        self.placements.pop(name)
        self.router.forget(name)
        self.rollouts.forget(name)
        self.metrics.forget(name)
        self.loads.forget(name)
        return deleted

    def placement(self, name: str) -> StoredPlacement:
        return self.placements.require(name).stored

    def placement_view(self, name: str) -> PlacementView:
        state = self.placements.require(name)
        view = state.view(self.clock())
        current = balance_of_gpu_loads(view.gpu_load).tolist() if view.gpu_load.sum() else []
        return PlacementView(
            stored=dataclasses.replace(state.stored, plan_version=state.version_in_force),
            observed_balance=current, predicted_balance=state.predicted,
            rollout_state=self.rollouts.state(name), latest_version=self.store.latest_version(name))

    def placement_views(self) -> list[PlacementView]:
        return [self.placement_view(s.name) for s in self.placements.states()]

    def window(self, name: str) -> WindowView | None:
        """The load window of ``name`` now (None if unknown)."""
        state = self.placements.get(name)
        return None if state is None else state.view(self.clock())

    def load_window(self, name: str) -> tuple[WindowView, pb.RouterBias | None]:
        """The window of ``name`` and the last router bias pushed to it; ``NotFound`` if unknown."""
        return self.placements.require(name).view(self.clock()), self.rollouts.bias(name)

    def totals(self, name: str) -> PlacementTotals:
        """Steps, failed steps and dropped tokens of ``name``'s accepted reports."""
        return self.placements.require(name).totals.get()

    def push_bias(self, name: str, bias: np.ndarray, sequence: int) -> int:
        """Send router selection bias [L, E] to the placement's agents; returns agents reached."""
        spec = self.placements.require(name).spec
        bias = np.asarray(bias, dtype=np.float64)
        if bias.shape != (spec.num_layers, spec.num_experts):
            raise FieldError("bias", f"must have shape {[spec.num_layers, spec.num_experts]}, "
                                     f"got {list(bias.shape)}")
        return self.rollouts.push_bias(pb.RouterBias(placement=name, sequence=sequence,
                                                     bias=double_tensor(bias)))

    # ------------------------------------------------------------------ the jobs' entry points

    def ingest(self, report: pb.LoadReport) -> IngestResult:
        return self.loads.ingest(report)

    def shed(self, report: pb.LoadReport) -> IngestResult:
        return self.loads.shed(report)

    def snapshot_loads(self) -> None:
        self.loads.snapshot_loads()

    def get_plan(self, name: str, version: int = 0) -> PlanRecord:
        return self.plans.get(name, version)

    def plan_in_force(self, name: str) -> PlanRecord:
        return self.plans.in_force(name)

    def list_plans(self, name: str, page_size: int, page_token: str) -> tuple[list[PlanRecord], str]:
        return self.plans.page(name, page_size, page_token)

    def watch(self, placement: str, after_version: int, wake: Callable[[], None] = lambda: None
              ) -> tuple[PlanWatch, list[PlanRecord]]:
        return self.plans.watch(placement, after_version, wake)

    def unwatch(self, w: PlanWatch) -> None:
        self.plans.unwatch(w)

    def compute_plan(self, name: str, spec: PlacementSpec | None, load: np.ndarray | None,
                     previous: np.ndarray | None, *, store: bool, rollout: bool) -> PlanRecord:
        return self.planner.compute_plan(name, spec, load, previous, store=store, rollout=rollout)

    def rebalance(self, name: str, *, manual: bool = False, force: bool = False,
                  dry_run: bool = False, propose: bool = False) -> RebalanceOutcome:
        return self.planner.rebalance(name, manual=manual, force=force, dry_run=dry_run,
                                      propose=propose)

    def roll_out_version(self, name: str, version: int) -> RebalanceOutcome:
        return self.planner.roll_out_version(name, version)

    def end_streams(self) -> None:
        """Shutting down: end every open WatchPlans stream and agent rollout stream, so that no
        stream handler waits for a message that will never come."""
        self.plans.end_watches()
        self.rollouts.close_sessions()

    def _stored_phy2log(self, name: str, version: int) -> np.ndarray | None:
        try:
            return self.store.get_plan(name, version).phy2log
        except NotFound:
            return None

    # ------------------------------------------------------------------ rollout callbacks

    def _replicas(self, name: str) -> np.ndarray | None:
        """Replicas per expert [L, E] of the plan in force on ``name`` (None: none in force)."""
        state = self.placements.get(name)
        entry = state.in_force if state else None
        return entry.plan.logcnt if entry else None

    def _in_force_message(self, name: str) -> tuple[int, pb.Plan | None]:
        state = self.placements.get(name)
        entry = state.in_force if state else None
        return (entry.plan.version, entry.message) if entry else (0, None)

    def _rollout_committing(self, rec: RolloutRecord) -> None:
        state = self.placements.get(rec.placement)
        if state is None:
            return
        plan = self.store.get_plan(rec.placement, rec.to_version)
        if plan.phy2log.shape != (state.spec.num_layers, state.spec.num_replicas):
            log.warning("rollout %s of %s v%d committed after the placement changed shape; "
                        "its plan stays out of force", rec.id, rec.placement, rec.to_version)
            return
        self.plans.put_in_force(state, plan)
        # The store recorded the commit's time: keep the in-memory copy (status) current.
        state.stored = self.store.get_placement(rec.placement)

    def _rollout_finished(self, rec: RolloutRecord) -> None:
        self.metrics.rollouts.labels(rec.placement, rec.state).inc()
        if not rec.sync:
            self.metrics.rollout_seconds.labels("prepare").observe(rec.prepare_seconds)
            if rec.state == "committed":
                self.metrics.rollout_seconds.labels("commit").observe(rec.commit_seconds)
        log.info("rollout %s of %s v%d %s in %.3f+%.3f s%s", rec.id, rec.placement,
                 rec.to_version, rec.state, rec.prepare_seconds, rec.commit_seconds,
                 f": {rec.reason}" if rec.reason else "")
