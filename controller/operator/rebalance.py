"""Rebalancing driven from kubectl, modelled on Strimzi's KafkaRebalance.

One-shot requests are annotations that the operator removes once it has acted on them:
``expertplane.io/rebalance`` = ``approve`` (roll out the proposal in ``status.proposal``),
``refresh`` (recompute the proposal now; resume after ``stop``), ``stop`` (pause re-planning);
``expertplane.io/rollback-to`` = ``N`` (roll out the map of plan version N as a new version).
With ``spec.rebalancePolicy.approval: Manual`` the operator asks the controller for proposals
(stored versions, not rolled out) instead of letting it roll out; with ``Auto`` a change of a
planning field of the spec is re-planned at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from expertplane.controller.operator.client import NotKnown, Rejected
from expertplane.controller.operator.conditions import now_rfc3339
from expertplane.controller.operator.crd import GROUP, approval_of
from expertplane.controller.operator.reconcile import NORMAL, WARNING, OperatorContext, Outcome
from expertplane.proto import expertplane_pb2 as pb

REBALANCE_ANNOTATION = f"{GROUP}/rebalance"
ROLLBACK_ANNOTATION = f"{GROUP}/rollback-to"
ROLLING = ("preparing", "committing")


@dataclass(frozen=True)
class Requests:
    """The one-shot requests found on an object (already consumed)."""

    approve: bool = False
    refresh: bool = False
    rollback_to: int = 0


def take_requests(obj: Mapping, status: dict, out: Outcome) -> Requests:
    """Consume the object's request annotations: ``stop`` / ``refresh`` set ``status.stopped``;
    unknown values get a Warning event ``InvalidRequest``."""
    annotations = obj["metadata"].get("annotations") or {}
    request, rollback = annotations.get(REBALANCE_ANNOTATION), annotations.get(ROLLBACK_ANNOTATION)
    approve = refresh = False
    if request is not None:
        out.annotations[REBALANCE_ANNOTATION] = None
        if request == "stop":
            status["stopped"] = True
            out.events.append((NORMAL, "RebalanceStopped", "rebalancing paused; resume with "
                                                           f"{REBALANCE_ANNOTATION}=refresh"))
        elif request == "refresh":
            refresh = True
            if status.get("stopped"):
                status["stopped"] = None
                out.events.append((NORMAL, "RebalanceRefreshed", "rebalancing resumed"))
        elif request == "approve":
            approve = True
        else:
            out.events.append((WARNING, "InvalidRequest", f"{REBALANCE_ANNOTATION}={request!r} "
                                                          "ignored: use approve, refresh or stop"))
    version = 0
    if rollback is not None:
        out.annotations[ROLLBACK_ANNOTATION] = None
        if rollback.isdigit() and int(rollback) > 0:
            version = int(rollback)
        else:
            out.events.append((WARNING, "InvalidRequest", f"{ROLLBACK_ANNOTATION}={rollback!r} "
                                                          "ignored: give a plan version (1, 2, ...)"))
    return Requests(approve, refresh, version)


def planning_changes(registered: pb.Placement, desired: pb.Placement) -> list[str]:
    """The spec fields whose change calls for a new plan of the same shape."""
    out = []
    if registered.algorithm != desired.algorithm:
        out.append("spec.algorithm")
    if registered.model.num_groups != desired.model.num_groups:
        out.append("spec.model.groups")
    if registered.model.expert_bytes != desired.model.expert_bytes:
        out.append("spec.model.expertBytes")
    if not desired.initial_load_file and registered.initial_load != desired.initial_load:
        out.append("the initial load")         # (a file is read by the controller on apply)
    return out


def _proposal(d: pb.RebalanceDecision, base: int) -> dict:
    return {"version": int(d.new_version), "previousVersion": base, "reason": d.reason,
            "currentBalance": round(d.in_force_balance_mean, 6),
            "predictedBalance": round(d.predicted_balance, 6),
            "slotsMoved": int(d.slots_moved), "bytesMoved": int(d.bytes_moved),
            "time": now_rfc3339()}


def act(ctx: OperatorContext, pname: str, spec: Mapping, state: pb.PlacementState,
        requests: Requests, changed: list[str], status: dict,
        out: Outcome) -> tuple[bool, str, str] | None:
    """Carry out rollbacks, approvals, proposals and re-plans for a registered placement.

    Sets ``status.proposal``. Returns the ProposalReady condition as (status, reason, message),
    or None when approval is Auto (no such condition). Controller refusals become events;
    ``ControllerCallError`` for an unreachable controller propagates (Degraded).
    """
    manual = approval_of(spec) == "Manual"
    base = int(state.plan_version)
    busy = state.rollout_state in ROLLING
    proposal = status.get("proposal") if manual else None      # proposals are Manual's only
    if proposal and (proposal.get("previousVersion") != base or changed):
        proposal = None             # the plan in force or the spec changed since: superseded
    outcome: tuple[bool, str, str] | None = None
    if requests.rollback_to:
        try:
            d = ctx.client.trigger_rebalance(pname, version=requests.rollback_to)
            out.events.append((NORMAL, "RollbackStarted", f"rolling out v{d.new_version} with "
                                                          f"the map of v{requests.rollback_to}"))
            proposal, busy = None, True
        except (Rejected, NotKnown) as exc:
            out.events.append((WARNING, "RollbackFailed", f"v{requests.rollback_to}: {exc.details}"))
    if requests.approve:
        if proposal and not busy:
            try:
                ctx.client.trigger_rebalance(pname, version=proposal["version"])
                out.events.append((NORMAL, "ProposalApproved",
                                   f"rolling out v{proposal['version']}"))
                outcome = (False, "Approved", f"v{proposal['version']} approved and rolling out")
                proposal, busy = None, True
            except (Rejected, NotKnown) as exc:
                out.events.append((WARNING, "ApprovalFailed", f"v{proposal['version']}: "
                                                              f"{exc.details}"))
                proposal = None
        else:
            why = "a rollout is in progress" if busy else "no proposal waits for approval"
            out.events.append((WARNING, "NothingToApprove", why))
    stopped = bool(status.get("stopped"))
    if manual and not stopped and not busy and proposal is None and (
            requests.refresh or changed or ctx.proposals.due(pname)):
        try:
            d = ctx.client.trigger_rebalance(pname, propose=True,
                                             force=requests.refresh or bool(changed))
        except Rejected as exc:
            d = pb.RebalanceDecision(reason=exc.details)
        if d.new_version:
            proposal = _proposal(d, base)
            out.events.append((NORMAL, "ProposalReady", _describe(proposal)))
        elif outcome is None:
            outcome = (False, "NoProposal", d.reason)
    elif not manual and changed and not stopped:
        try:
            d = ctx.client.trigger_rebalance(pname, force=True)
            new, reason = int(d.new_version), d.reason
        except Rejected as exc:
            new, reason = 0, exc.details
        what = ", ".join(changed)
        out.events.append((NORMAL, "Replanned", f"{what} changed: plan v{new} rolling out") if new
                          else (NORMAL, "NotReplanned", f"{what} changed; no new plan: {reason}"))
    status["proposal"] = proposal
    if not manual:
        return None
    if proposal:
        return True, "ProposalReady", _describe(proposal)
    if stopped:
        return False, "Stopped", f"paused by {REBALANCE_ANNOTATION}=stop"
    return outcome or (False, "NoProposal", "no rebalance proposed yet")


def _describe(p: Mapping) -> str:
    return (f"v{p['version']}: balance {p['currentBalance']:.4g} -> {p['predictedBalance']:.4g}, "
            f"{p['slotsMoved']} slots ({p['bytesMoved']} bytes) to move ({p['reason']}); "
            f"approve with: kubectl annotate epl NAME {REBALANCE_ANNOTATION}=approve")
