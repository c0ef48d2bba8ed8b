"""Reconcile one ExpertPlacement: resolve its GPUs (worker pods, debounced), register it with the
controller, act on the one-shot ``expertplane.io/rebalance`` request, publish the plan in force
in its ConfigMap (never a lower version than the one published), and return the whole status."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from kubernetes.client.exceptions import ApiException

from expertplane.controller.operator import conditions as cond
from expertplane.controller.operator.client import ControllerCallError, Rejected
from expertplane.controller.operator.crd import (
    GROUP,
    PLAN_KEY,
    VERSION,
    SpecError,
    Topology,
    approval_of,
    initial_load_source,
    label_selector,
    load_matrix,
    parse_load_document,
    placement_from_cr,
    placement_name,
    plan_configmap_name,
    topology_from_spec,
)
from expertplane.controller.operator.kube import NoWorkers, Owner, plan_identity
from expertplane.controller.operator.plan_form import PlanForm, plan_form_from_spec
from expertplane.controller.operator.rebalance import (
    REBALANCE_ANNOTATION,
    ROLLING,
    act,
    planning_changes,
    take_requests,
)
from expertplane.controller.operator.reconcile import (
    NORMAL,
    OperatorContext,
    Outcome,
    health,
    mean,
    warnings,
)
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import int64_tensor

HISTORY = 10                    # plans kept in status.history
PROPOSAL_READY = "ProposalReady"


def _rfc3339(ts) -> str:
    return ts.ToDatetime().replace(microsecond=0).isoformat() + "Z"


@dataclass(frozen=True)
class SpecInputs:
    """What an ExpertPlacement spec refers to, read without the controller: ``observed`` GPUs
    (explicit, or from the worker pods; None when no pod matches), the ``initial`` load
    [layers, experts] (None: uniform or a file) and the field it came from (``load_field``), the
    ``load_file`` the controller reads instead ("" if none)."""

    observed: Topology | None
    initial: np.ndarray | None
    load_field: str
    load_file: str = ""


def read_spec(ctx: OperatorContext, namespace: str, spec: Mapping) -> SpecInputs:
    """Read the load and worker pods ``spec`` refers to; raises ``SpecError`` naming the field
    (or ``ApiException`` when Kubernetes fails)."""
    source = initial_load_source(spec)
    initial, load_field, load_file = None, "spec.initialLoad.values", ""
    if source is not None:
        load_field, value = source
        if load_field == "spec.initialLoad.values":
            initial = load_matrix(value, load_field)
        elif load_field == "spec.initialLoadFrom.file":
            load_file = value
        else:
            text, _ = ctx.kube.read_config_value(namespace, value, load_field)
            initial = parse_load_document(text, load_field)
    topology = topology_from_spec(spec)
    if topology is None:
        topo = spec["topology"]
        try:
            topology = ctx.kube.worker_topology(namespace, label_selector(topo["workerSelector"]),
                                                topo.get("gpuResource", "nvidia.com/gpu"),
                                                topo.get("gpusPerNode"))
        except NoWorkers:
            topology = None
    return SpecInputs(topology, initial, load_field, load_file)


def _registered_topology(state: pb.PlacementState | None) -> Topology | None:
    if state is None:
        return None
    return Topology(state.spec.topology.num_nodes, state.spec.topology.gpus_per_node)


def _shape(p: pb.Placement) -> tuple:
    """What plans depend on: layers, experts, slots per layer, GPUs."""
    return (p.model.num_layers, p.model.num_experts, p.num_replicas, p.topology.num_nodes,
            p.topology.gpus_per_node)


def _without_load(p: pb.Placement) -> pb.Placement:
    """``p`` without its initial load (inline or a file: the controller echoes a file's load)."""
    out = copy.deepcopy(p)
    out.ClearField("initial_load")
    out.ClearField("initial_load_file")
    return out


def _mode(spec: Mapping, stopped: bool) -> int | None:
    """The controller-side policy mode: OFF while stopped, MANUAL when the operator asks for
    approval (the controller must not roll out by itself), else the spec's."""
    if stopped:
        return pb.RebalancePolicy.OFF
    if approval_of(spec) == "Manual":
        return pb.RebalancePolicy.MANUAL
    return None


def reconcile_placement(ctx: OperatorContext, obj: Mapping, *, apply: bool) -> Outcome | None:
    """Reconcile one ExpertPlacement ``obj`` (the full object as a mapping).

    ``apply``: register the spec with the controller even if it already holds it (change
    handlers); otherwise only when the controller lacks it or holds something else (periodic
    refresh). Returns None when ``obj`` is being deleted (the delete handler cleans up; a refresh
    must not register it again) or older than what the controller holds (a stale copy; the next
    refresh sees the new one).
    """
    meta, spec = obj["metadata"], obj["spec"]
    if meta.get("deletionTimestamp"):
        return None
    namespace, name, gen = meta["namespace"], meta["name"], int(meta.get("generation", 1))
    old = copy.deepcopy(dict(obj.get("status") or {}))
    conds = list(old.get("conditions") or [])
    pname = placement_name(namespace, name)
    cm_name = plan_configmap_name(name, spec)
    status = dict(old, placement=pname, observedGeneration=gen)
    out = Outcome(status)

    def done(ready, reason="", message="", degraded=None):
        status["conditions"] = health(conds, gen, ready, reason, message, degraded)
        out.events.extend(warnings(old.get("conditions") or [], status["conditions"]))
        return out

    def rebalancing(active: bool, reason: str, message: str) -> None:
        nonlocal conds
        previous = cond.get_condition(conds, cond.REBALANCING)
        conds = cond.set_condition(conds, cond.REBALANCING, active, reason, message, gen)
        if reason == "WorkersSettling" and (previous or {}).get("reason") != reason:
            out.events.append((NORMAL, reason, message))

    try:
        inputs = read_spec(ctx, namespace, spec)
    except SpecError as exc:
        rebalancing(False, "InvalidSpec", "no plan")
        return done(False, "InvalidSpec", str(exc))
    except ApiException as exc:
        return done(None, degraded=("KubernetesError", f"reading the spec's references failed: "
                                                       f"{exc.status} {exc.reason}"))
    try:
        state, unreachable = ctx.client.placement_state(pname), None
    except ControllerCallError as exc:
        state, unreachable = None, exc
    if state is not None and state.spec.generation > gen:
        return None
    if "workerSelector" in spec["topology"]:
        settled = ctx.workers.settle(pname, inputs.observed, _registered_topology(state),
                                     float(spec["topology"].get("stableSeconds", 60)))
    else:
        settled = ctx.workers.settle(pname, inputs.observed, None, 0)
    if settled.topology is None:
        selector = label_selector(spec["topology"]["workerSelector"])
        return done(False, "NoWorkers", f"no worker pods match {selector!r} in namespace "
                                        f"{namespace!r}")
    if unreachable is not None:
        return done(None, degraded=("ControllerUnavailable", str(unreachable)))
    requests = take_requests(obj, status, out)
    try:
        placement = placement_from_cr(pname, spec, settled.topology, gen, inputs.initial,
                                      mode=_mode(spec, bool(status.get("stopped"))),
                                      load_field=inputs.load_field,
                                      initial_load_file=inputs.load_file)
        form = plan_form_from_spec(spec)
    except SpecError as exc:
        rebalancing(False, "InvalidSpec", "no plan")
        return done(False, "InvalidSpec", str(exc))
    status.update(numGPUs=settled.topology.nodes * settled.topology.gpus_per_node,
                  replicas=placement.num_replicas)
    reshaped = state is not None and _shape(state.spec) != _shape(placement)
    changed = planning_changes(state.spec, placement) if state is not None and not reshaped else []
    # a change the controller took in an earlier pass whose re-plan call failed is still owed:
    # the registered spec no longer differs, so only the status remembers it
    changed = sorted(set(changed) | set(old.get("replanOwed") or [])) if not reshaped else []
    status["replanOwed"] = changed or None
    try:
        if state is None:
            _restore(ctx, obj, cm_name, placement)
        if apply or state is None or _without_load(state.spec) != _without_load(placement):
            state = ctx.client.apply_placement(placement)
        if reshaped:
            out.events.append((NORMAL, "Reshaped", f"plan v{state.plan_version} for "
                                                   f"{placement.num_replicas} slots per layer on "
                                                   f"{status['numGPUs']} GPUs"))
        proposal = act(ctx, pname, spec, state, requests, changed, status, out)
        status["replanOwed"] = None
        regression = _publish(ctx, obj, cm_name, placement, form, state, old, status, out)
        _history(ctx, pname, state, status)
    except Rejected as exc:
        details = exc.details.replace("initial_load_file: ", "spec.initialLoadFrom.file: ", 1)
        return done(False, "InvalidSpec", f"rejected by the controller: {details}")
    except ControllerCallError as exc:
        return done(None, degraded=("ControllerUnavailable", str(exc)))
    except ApiException as exc:
        return done(None, degraded=("PublishFailed", f"could not write ConfigMap {cm_name!r}: "
                                                     f"{exc.status} {exc.reason}"))
    if proposal is None:
        conds = [c for c in conds if c.get("type") != PROPOSAL_READY]
    else:
        conds = cond.set_condition(conds, PROPOSAL_READY, *proposal, gen)
    if settled.waiting:
        now = settled.observed
        shown = f"{now.nodes}x{now.gpus_per_node} GPUs" if now else "no pods"
        rebalancing(False, "WorkersSettling",
                    f"worker pods changed ({shown}); the plan keeps {status['numGPUs']} GPUs "
                    f"unless they stay so for {spec['topology'].get('stableSeconds', 60)} s")
    elif state.rollout_state in ROLLING:
        rebalancing(True, "RolloutInProgress", f"rollout {state.rollout_state}")
    elif status.get("stopped"):
        rebalancing(False, "Stopped", f"paused by {REBALANCE_ANNOTATION}=stop; resume with "
                                      f"{REBALANCE_ANNOTATION}=refresh")
    else:
        rebalancing(False, "Idle", "no rollout in progress")
    if not state.plan_version:
        return done(False, "Pending", "the controller has no plan in force yet")
    return done(True, "PlanPublished",
                f"plan v{status['planVersion']} published in ConfigMap {cm_name} key {PLAN_KEY}",
                degraded=regression)


def _restore(ctx: OperatorContext, obj: Mapping, cm_name: str, placement: pb.Placement) -> None:
    """The controller does not know the placement: if this object's ConfigMap holds a plan of
    the same shape, ask the controller to restore it (same version and map) should its store
    have been lost, rather than plan anew (the controller ignores it when it has plans). The
    rows are read in the form the ConfigMap was written in (SGLang's: dense rows dropped)."""
    published = ctx.kube.published_plan(obj["metadata"]["namespace"], cm_name)
    if published is None or published.owner_uid != obj["metadata"]["uid"] or not published.version:
        return
    if published.shape != plan_identity(placement, published.version).split(" ", 1)[1]:
        return
    phy2log = published.phy2log()
    if phy2log is None or phy2log.shape != (placement.model.num_layers, placement.num_replicas):
        return
    placement.restore_phy2log.CopyFrom(int64_tensor(phy2log))
    placement.restore_version = published.version


def _publish(ctx: OperatorContext, obj: Mapping, cm_name: str, placement: pb.Placement,
             form: PlanForm, state: pb.PlacementState, old: dict, status: dict,
             out: Outcome) -> tuple[str, str] | None:
    """Publish the plan in force if the ConfigMap lacks it or holds it in another ``form``; fill
    the plan fields of ``status``.

    A plan in force older than the one the ConfigMap holds for the same shape (the controller
    lost its store) is not published: returns the Degraded (reason, message) then, else None.
    """
    meta = obj["metadata"]
    namespace = meta["namespace"]
    version = int(state.plan_version)
    previous_cm = (old.get("planRef") or {}).get("configMap")
    if previous_cm and previous_cm != cm_name:
        ctx.kube.delete_configmap(namespace, previous_cm)
    regression = None
    if version:
        plan_balance = old.get("planBalance")
        identity = plan_identity(placement, version)
        published = ctx.kube.published_plan(namespace, cm_name)
        if published is not None and published.owner_uid == meta["uid"] \
                and published.shape == identity.split(" ", 1)[1] and published.version > version:
            message = (f"the controller's plan in force is v{version} but ConfigMap {cm_name} "
                       f"holds v{published.version}: not overwritten with an older plan")
            regression = ("PlanRegression", message)
            version = published.version
        elif published is None or published.identity != identity or published.form != form:
            plan = ctx.client.get_plan(placement.name, version)
            owner = Owner(f"{GROUP}/{VERSION}", "ExpertPlacement", meta["name"], meta["uid"])
            ctx.kube.publish_plan(namespace, cm_name, owner, plan, identity, form,
                                  placement.model.num_experts)
            plan_balance = mean(plan.summary.predicted_balance)
            status.update(slotsMoved=int(plan.summary.slots_moved),
                          bytesMoved=int(plan.summary.bytes_moved), planBalance=plan_balance)
            out.events.append((NORMAL, "PlanPublished",
                               f"plan v{version} ({plan.summary.reason}, "
                               f"{plan.summary.slots_moved} slots moved) in ConfigMap {cm_name}"))
        current = list(state.observed_balance)
        status["currentBalance"] = mean(current) if current else plan_balance
        status["worstLayerBalance"] = round(max(current), 6) if current else None
        predicted = list(state.predicted_balance)
        status["predictedBalance"] = mean(predicted) if predicted else plan_balance
    if state.HasField("last_rebalance"):
        status["lastRebalanceTime"] = _rfc3339(state.last_rebalance)
    status.update(planVersion=version, rolloutState=state.rollout_state or None,
                  planRef={"controller": ctx.controller_address, "placement": placement.name,
                           "version": version, "configMap": cm_name, "key": PLAN_KEY})
    return regression


def _history(ctx: OperatorContext, pname: str, state: pb.PlacementState, status: dict) -> None:
    """``status.history``: the latest ``HISTORY`` stored plans, newest last (read again only when
    the newest version changed)."""
    top = int(state.plan_version)
    history = status.get("history") or []
    if not top or (history and history[-1]["version"] >= top):
        return
    plans = ctx.client.list_plans(pname, after_version=max(0, top - HISTORY))
    status["history"] = [
        {"version": int(p.version), "time": _rfc3339(p.created_at), "reason": p.reason,
         "balance": mean(p.predicted_balance), "slotsMoved": int(p.slots_moved)}
        for p in plans][-HISTORY:]


def cleanup_placement(ctx: OperatorContext, obj: Mapping) -> list[str]:
    """Forget a deleted ExpertPlacement: delete it from the controller and delete its plan
    ConfigMap(s). Raises ``ControllerCallError`` when the controller cannot be reached (the
    finalizer then stays until it can). Returns what was removed, for the log."""
    meta, spec = obj["metadata"], obj["spec"]
    pname = placement_name(meta["namespace"], meta["name"])
    ctx.workers.forget(pname)
    removed = []
    if ctx.client.delete_placement(pname):
        removed.append(f"placement {pname}")
    names = {plan_configmap_name(meta["name"], spec),
             ((obj.get("status") or {}).get("planRef") or {}).get("configMap")}
    for cm in sorted(n for n in names if n):
        if ctx.kube.delete_configmap(meta["namespace"], cm):
            removed.append(f"ConfigMap {cm}")
    return removed
