"""The controller's state of each placement: one ``PlacementState`` object per placement.

A placement's spec, the plan in force, policy memory, load window, predicted balance, load
snapshot marker and report totals live together, so that forgetting a placement drops one
object. ``PlacementState.lock`` orders the decisions that change the placement's plans
(planning against the plan in force, storing, starting a rollout): two of them never
interleave.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from expertplane.controller.aggregation import PlacementWindow, WindowView
from expertplane.controller.convert import plan_message
from expertplane.controller.policy import PolicyState
from expertplane.controller.router_balancer import ReportTotals
from expertplane.controller.spec import PlacementSpec
from expertplane.controller.store import PlanRecord, StoredPlacement
from expertplane.errors import NotFound
from expertplane.proto import expertplane_pb2 as pb


@dataclass(frozen=True)
class InForce:
    """The plan in force and its wire form without the load snapshot (what rollouts send)."""

    plan: PlanRecord
    message: pb.Plan

    @classmethod
    def of(cls, plan: PlanRecord) -> InForce:
        return cls(plan, plan_message(plan, with_load=False))


class PlacementState:
    """One placement. ``in_force`` is the controller's only copy of the plan in force (None
    until its first plan is in force); it is replaced whole, so readers need no lock.
    ``predicted`` is the predicted balance [L] of the policy's last candidate; ``snapshotted``
    the window's report count at the last load snapshot written to the store."""

    def __init__(self, stored: StoredPlacement, window: PlacementWindow, policy: PolicyState):
        self.stored = stored
        self.window = window
        self.policy = policy
        self.in_force: InForce | None = None
        self.predicted: list[float] = []
        self.snapshotted = 0
        self.totals = ReportTotals()
        self.lock = threading.RLock()

    @property
    def spec(self) -> PlacementSpec:
        return self.stored.spec

    @property
    def name(self) -> str:
        return self.stored.spec.name

    @property
    def version_in_force(self) -> int:
        entry = self.in_force
        return entry.plan.version if entry else 0

    def put_in_force(self, plan: PlanRecord) -> None:
        """``plan`` (stored) is now in force on the placement's workers."""
        self.window.add_plan(plan.version, plan.phy2log)
        self.in_force = InForce.of(plan)

    def view(self, now: float) -> WindowView:
        """The load window at ``now`` (unix s), GPU loads under the plan in force."""
        return self.window.view(now, self.version_in_force)


class Placements:
    """The registered placements by name (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, PlacementState] = {}

    def get(self, name: str) -> PlacementState | None:
        return self._states.get(name)

    def require(self, name: str) -> PlacementState:
        """The placement ``name``; ``NotFound`` naming the field ``placement`` if unknown."""
        state = self._states.get(name)
        if state is None:
            raise NotFound("placement", f"unknown placement {name!r}")
        return state

    def put(self, state: PlacementState) -> None:
        with self._lock:
            self._states[state.name] = state

    def pop(self, name: str) -> PlacementState | None:
        with self._lock:
            return self._states.pop(name, None)

    def states(self) -> list[PlacementState]:
        """Every placement, by name."""
        with self._lock:
            return [self._states[n] for n in sorted(self._states)]
