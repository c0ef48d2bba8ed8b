"""Plans on demand and the rebalance policy of a placement, always against the plan in force.

Every decision that stores a plan of a registered placement runs under the placement's lock,
from planning to the start of its rollout: a policy pass and an API call never both pass the
"no rollout in progress" check, and no stored plan is left without its rollout.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from expertplane.controller.convert import plan_message, plan_record
from expertplane.controller.coordinator import RolloutCoordinator
from expertplane.controller.metrics import ControllerMetrics
from expertplane.controller.placements import PlacementState, Placements
from expertplane.controller.planning import (
    Candidate,
    candidate_from_map,
    check_load,
    compute_candidate,
)
from expertplane.controller.plans import Plans
from expertplane.controller.policy import Decision, candidate_for, decide, record
from expertplane.controller.spec import PlacementSpec
from expertplane.controller.store import PlanRecord, RolloutRecord
from expertplane.errors import FailedPrecondition, FieldError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebalanceOutcome:
    decision: Decision
    plan: PlanRecord | None
    rollout: RolloutRecord | None


class Rebalancer:
    """Computes plans and applies the policy; ``clock`` gives unix seconds."""

    def __init__(self, placements: Placements, plans: Plans, rollouts: RolloutCoordinator,
                 metrics: ControllerMetrics, clock: Callable[[], float]):
        self._placements = placements
        self._plans = plans
        self._rollouts = rollouts
        self._metrics = metrics
        self._clock = clock

    def compute_plan(self, name: str, spec: PlacementSpec | None, load: np.ndarray | None,
                     previous: np.ndarray | None, *, store: bool, rollout: bool) -> PlanRecord:
        """Plan on demand for a registered placement (``name``) or an inline ``spec``.

        ``load`` [L, E] defaults to the placement's window; ``previous`` [L, R] to the plan in
        force. The result has version 0 unless ``store``; ``rollout`` implies ``store``.
        """
        if not name:
            if spec is None:
                raise FieldError("placement", "give a registered placement name or an inline spec")
            if store or rollout:
                raise FailedPrecondition("store", "only plans of registered placements can be "
                                                  "stored")
            cand = compute_candidate(spec, None if load is None else check_load(spec, load),
                                     previous)
            return plan_record(spec, cand, "api", 0)
        state = self._placements.require(name)
        with state.lock:
            spec, in_force = state.spec, state.in_force
            if previous is None and in_force is not None:
                previous = in_force.plan.phy2log
            if load is None:
                view = state.view(self._clock())
                load = view.load if view.reports else None
            else:
                load = check_load(spec, load)
            cand = compute_candidate(spec, load, previous)
            prev_version = state.version_in_force
            if not (store or rollout):
                return plan_record(spec, cand, "api", prev_version)
            if rollout and self._rollouts.busy(name):
                raise FailedPrecondition("rollout", f"placement {name!r} has a rollout in progress")
            plan = self._plans.add(state, cand, "api", prev_version)
            if rollout:
                self._start(state, plan, prev_version)
            return plan

    def rebalance(self, name: str, *, manual: bool = False, force: bool = False,
                  dry_run: bool = False, propose: bool = False) -> RebalanceOutcome:
        """Evaluate the policy for ``name`` on its window; store and roll out a plan if it says so
        (``propose``: store it as a proposal, not rolled out, reason ``proposal``).

        Every decision is logged with its numbers.
        """
        state = self._placements.require(name)
        with state.lock:
            return self._rebalance(state, manual=manual, force=force, dry_run=dry_run,
                                   propose=propose)

    def roll_out_version(self, name: str, version: int) -> RebalanceOutcome:
        """Roll out stored plan ``version`` of ``name`` (an approval or a rollback; no policy
        check): a proposal made against the plan in force as it is, any other plan as a new
        version holding its map (reason ``rollback to vN``). ``FailedPrecondition`` when it is
        in force already, has another shape, or a rollout is in progress."""
        state = self._placements.require(name)
        with state.lock:
            in_force = state.in_force
            if in_force is None:
                raise FailedPrecondition("placement", f"placement {name!r} has no plan in force")
            plan = self._plans.get(name, version)
            current = in_force.plan.version
            if version == current:
                raise FailedPrecondition("version", f"v{version} is the plan in force")
            if self._rollouts.busy(name):
                raise FailedPrecondition("rollout", f"placement {name!r} has a rollout in progress")
            view = state.view(self._clock())
            load = view.load if view.reports else None
            try:
                cand = candidate_from_map(state.spec, load, plan.phy2log, in_force.plan.phy2log,
                                          field="version")
            except FieldError:
                raise FailedPrecondition("version", f"v{version} was planned for another shape "
                                                    "of the placement") from None
            if not (plan.reason == "proposal" and plan.previous_version == current
                    and version > current):
                plan = self._plans.add(state, cand, f"rollback to v{version}", current)
            decision = Decision.about(cand, True, plan.reason)
            log.info("placement %s: rolling out v%d (%s)", name, plan.version, plan.reason)
            rollout = self._start(state, plan, current)
            record(state.policy, decision, state.spec.policy, self._clock(), rolled_out=True)
            return RebalanceOutcome(decision, plan, rollout)

    def _rebalance(self, state: PlacementState, *, manual: bool, force: bool,
                   dry_run: bool, propose: bool = False) -> RebalanceOutcome:
        name, spec, in_force = state.name, state.spec, state.in_force
        if in_force is None:
            raise FailedPrecondition("placement", f"placement {name!r} has no plan in force")
        view = state.view(self._clock())
        load = view.load if view.reports else None
        if load is None and not force:
            return RebalanceOutcome(Decision(False, "no load reported yet", 0.0, 0.0, 0.0, 0, 0),
                                    None, None)
        cand = candidate_for(spec, load, in_force.plan.phy2log, state.policy, manual=manual,
                             force=force)
        state.predicted = cand.predicted_balance.tolist()
        self._metrics.set_balance(self._metrics.predicted_balance, name, cand.predicted_balance)
        now = self._clock()
        decision = self._decide(state, cand, now, manual=manual, force=force, dry_run=dry_run)
        plan = rollout = None
        if decision.rebalance and propose:
            plan = self._plans.add(state, cand, "proposal", in_force.plan.version)
            decision = dataclasses.replace(decision, rebalance=False,
                                           reason=f"proposed as v{plan.version}: {decision.reason}")
        elif decision.rebalance:
            reason = "manual" if manual or force else "auto"
            plan = self._plans.add(state, cand, reason, in_force.plan.version)
            rollout = self._start(state, plan, in_force.plan.version)
        record(state.policy, decision, spec.policy, now, rolled_out=decision.rebalance)
        return RebalanceOutcome(decision, plan, rollout)

    def _decide(self, state: PlacementState, cand: Candidate, now: float, *, manual: bool,
                force: bool, dry_run: bool) -> Decision:
        """The policy's decision, held back by a dry run or a rollout in progress; logged."""
        name, spec = state.name, state.spec
        decision = decide(spec.policy, cand, state.policy, now, manual=manual, force=force)
        if decision.rebalance and (dry_run or spec.policy.dry_run):
            decision = dataclasses.replace(decision, rebalance=False,
                                           reason=f"dry run: would rebalance ({decision.reason})")
        if decision.rebalance and self._rollouts.busy(name):
            decision = dataclasses.replace(decision, rebalance=False,
                                           reason="a rollout is in progress")
        log.info("decision %s: rebalance=%s reason=%r current=%.4f predicted=%.4f gain=%.4f "
                 "slots_moved=%d bytes_moved=%d", name, decision.rebalance, decision.reason,
                 decision.current_balance, decision.predicted_balance, decision.gain,
                 decision.slots_moved, decision.bytes_moved)
        self._metrics.decisions.labels(name, str(decision.rebalance).lower()).inc()
        return decision

    def _start(self, state: PlacementState, plan: PlanRecord, from_version: int) -> RolloutRecord:
        return self._rollouts.start(state.name, plan_message(plan, with_load=False), from_version,
                                    state.spec.num_gpus)
