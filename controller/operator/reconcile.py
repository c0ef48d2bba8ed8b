"""Level-triggered reconciliation of one object: read the spec and the controller's state, make
the world match (register/update the placement, publish the plan, compute the pipeline) and
return the complete status the object should have. Calling it again changes nothing."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from kubernetes.client.exceptions import ApiException

from expertplane.controller.operator import conditions as cond
from expertplane.controller.operator.client import (
    ControllerClient,
    ControllerCallError,
    Rejected,
)
from expertplane.controller.operator.crd import (
    GROUP,
    PLAN_KEY,
    VERSION,
    SpecError,
    label_selector,
    load_matrix,
    parse_load_document,
    pipeline_request_from_cr,
    placement_from_cr,
    placement_name,
    plan_configmap_name,
    topology_from_spec,
)
from expertplane.controller.operator.kube import Kube, NoWorkers, Owner, plan_identity
from expertplane.proto import expertplane_pb2 as pb

_ROLLING = ("preparing", "committing")


@dataclass
class OperatorContext:
    """What reconcilers share: the controller client, Kubernetes calls, the controller address
    (published in status.planRef)."""

    client: ControllerClient
    kube: Kube
    controller_address: str


@dataclass
class Outcome:
    """New ``status`` of an object, and Kubernetes events to post as (reason, message)."""

    status: dict
    events: list[tuple[str, str]] = field(default_factory=list)


def _health(conds: list[dict], gen: int, ready: bool | None, reason: str, message: str,
            degraded: tuple[str, str] | None) -> list[dict]:
    """Conditions with Ready set (left as is when ``ready`` is None and no ``reason``) and
    Degraded True with ``degraded`` = (reason, message), or False when None."""
    if ready is not None or reason:
        conds = cond.set_condition(conds, cond.READY, ready, reason, message, gen)
    d_reason, d_message = degraded or ("AsExpected", "operating normally")
    return cond.set_condition(conds, cond.DEGRADED, degraded is not None, d_reason, d_message, gen)


def _mean(values) -> float | None:
    return round(float(np.mean(values)), 6) if len(values) else None


def _rfc3339(ts) -> str:
    return ts.ToDatetime().replace(microsecond=0).isoformat() + "Z"


# ------------------------------------------------------------------ ExpertPlacement


def _placement_message(ctx: OperatorContext, namespace: str, pname: str, spec: Mapping,
                       generation: int) -> pb.Placement:
    topology = topology_from_spec(spec)
    if topology is None:
        topo = spec["topology"]
        topology = ctx.kube.worker_topology(namespace, label_selector(topo["workerSelector"]),
                                            topo.get("gpuResource", "nvidia.com/gpu"),
                                            topo.get("gpusPerNode"))
    initial = None
    load = spec.get("initialLoad") or {}
    if "values" in load:
        initial = load_matrix(load["values"], "spec.initialLoad.values")
    elif "configMapRef" in load:
        text, _ = ctx.kube.read_config_value(namespace, load["configMapRef"],
                                             "spec.initialLoad.configMapRef")
        initial = parse_load_document(text, "spec.initialLoad.configMapRef")
    return placement_from_cr(pname, spec, topology, generation, initial)


def _shape(p: pb.Placement) -> tuple:
    """What plans depend on: layers, experts, slots per layer, GPUs."""
    return (p.model.num_layers, p.model.num_experts, p.num_replicas, p.topology.num_nodes,
            p.topology.gpus_per_node)


def reconcile_placement(ctx: OperatorContext, obj: Mapping, *, apply: bool) -> Outcome | None:
    """Reconcile one ExpertPlacement ``obj`` (the full object as a mapping).

    ``apply``: register the spec with the controller even if it already knows this generation
    (change handlers); otherwise only when the controller lacks it or holds another generation
    (periodic refresh). A change of shape (layers, experts, slots, GPUs, e.g. worker pods scaled)
    deletes and re-registers the placement, since plans of another shape cannot carry over.
    Returns None when ``obj`` is older than what the controller holds (a stale copy; the next
    refresh sees the new one).
    """
    meta, spec = obj["metadata"], obj["spec"]
    namespace, name, gen = meta["namespace"], meta["name"], int(meta.get("generation", 1))
    old = copy.deepcopy(dict(obj.get("status") or {}))
    conds = list(old.get("conditions") or [])
    pname = placement_name(namespace, name)
    cm_name = plan_configmap_name(name, spec)
    status = dict(old, placement=pname, observedGeneration=gen)
    events: list[tuple[str, str]] = []

    def done(ready, reason="", message="", degraded=None):
        status["conditions"] = _health(conds, gen, ready, reason, message, degraded)
        return Outcome(status, events)

    try:
        placement = _placement_message(ctx, namespace, pname, spec, gen)
    except SpecError as exc:
        conds = cond.set_condition(conds, cond.REBALANCING, False, "InvalidSpec", "no plan", gen)
        return done(False, "InvalidSpec", str(exc))
    except NoWorkers as exc:
        return done(False, "NoWorkers", str(exc))
    except ApiException as exc:
        return done(None, degraded=("KubernetesError", f"reading the spec's references failed: "
                                                       f"{exc.status} {exc.reason}"))
    status.update(numGPUs=placement.topology.num_nodes * placement.topology.gpus_per_node,
                  replicas=placement.num_replicas)
    try:
        state = ctx.client.placement_state(pname)
        if state is not None and state.spec.generation > gen:
            return None
        if state is not None and _shape(state.spec) != _shape(placement):
            # The controller keeps plans of one shape per placement: start it afresh.
            ctx.client.delete_placement(pname)
            events.append(("Reshaped", f"re-registered with {placement.num_replicas} slots per "
                                       f"layer on {status['numGPUs']} GPUs; plan history restarts"))
            state = None
        if apply or state is None or state.spec.generation != gen:
            state = ctx.client.apply_placement(placement)
        _publish(ctx, obj, namespace, cm_name, placement, state, old, status, events)
    except Rejected as exc:
        return done(False, "InvalidSpec", f"rejected by the controller: {exc.details}")
    except ControllerCallError as exc:
        return done(None, degraded=("ControllerUnavailable", str(exc)))
    except ApiException as exc:
        return done(None, degraded=("PublishFailed", f"could not write ConfigMap {cm_name!r}: "
                                                     f"{exc.status} {exc.reason}"))
    rolling = state.rollout_state in _ROLLING
    conds = cond.set_condition(
        conds, cond.REBALANCING, rolling, "RolloutInProgress" if rolling else "Idle",
        f"rollout {state.rollout_state}" if rolling else "no rollout in progress", gen)
    if not state.plan_version:
        return done(False, "Pending", "the controller has no plan in force yet")
    return done(True, "PlanPublished",
                f"plan v{state.plan_version} published in ConfigMap {cm_name} key {PLAN_KEY}")


def _publish(ctx: OperatorContext, obj: Mapping, namespace: str, cm_name: str,
             placement: pb.Placement, state: pb.PlacementState, old: dict, status: dict,
             events: list) -> None:
    """Publish the plan in force if the ConfigMap lacks it; fill the plan fields of ``status``."""
    version = int(state.plan_version)
    previous_cm = (old.get("planRef") or {}).get("configMap")
    if previous_cm and previous_cm != cm_name:
        ctx.kube.delete_configmap(namespace, previous_cm)
    if version:
        plan_balance = old.get("planBalance")
        identity = plan_identity(placement, version)
        if ctx.kube.published_identity(namespace, cm_name) != identity:
            plan = ctx.client.get_plan(placement.name, version)
            meta = obj["metadata"]
            owner = Owner(f"{GROUP}/{VERSION}", "ExpertPlacement", meta["name"], meta["uid"])
            ctx.kube.publish_plan(namespace, cm_name, owner, plan, identity)
            plan_balance = _mean(plan.summary.predicted_balance)
            status.update(slotsMoved=int(plan.summary.slots_moved),
                          bytesMoved=int(plan.summary.bytes_moved), planBalance=plan_balance)
            events.append(("PlanPublished", f"plan v{version} ({plan.summary.reason}, "
                           f"{plan.summary.slots_moved} slots moved) in ConfigMap {cm_name}"))
        current = list(state.current_balance)
        status["currentBalance"] = _mean(current) if current else plan_balance
        status["worstLayerBalance"] = round(max(current), 6) if current else None
        predicted = list(state.predicted_balance)
        status["predictedBalance"] = _mean(predicted) if predicted else plan_balance
    if state.HasField("last_rebalance"):
        status["lastRebalanceTime"] = _rfc3339(state.last_rebalance)
    status.update(planVersion=version, rolloutState=state.rollout_state or None,
                  planRef={"controller": ctx.controller_address, "placement": placement.name,
                           "version": version, "configMap": cm_name, "key": PLAN_KEY})


def cleanup_placement(ctx: OperatorContext, obj: Mapping) -> list[str]:
    """Forget a deleted ExpertPlacement: delete it from the controller and delete its plan
    ConfigMap(s). Raises ``ControllerCallError`` when the controller cannot be reached (the
    finalizer then stays until it can). Returns what was removed, for the log."""
    meta, spec = obj["metadata"], obj["spec"]
    pname = placement_name(meta["namespace"], meta["name"])
    removed = []
    if ctx.client.delete_placement(pname):
        removed.append(f"placement {pname}")
    names = {plan_configmap_name(meta["name"], spec),
             ((obj.get("status") or {}).get("planRef") or {}).get("configMap")}
    for cm in sorted(n for n in names if n):
        if ctx.kube.delete_configmap(meta["namespace"], cm):
            removed.append(f"ConfigMap {cm}")
    return removed


# ------------------------------------------------------------------ PipelinePlan

_RESULT_FIELDS = ("boundaries", "stepTime", "bubbleFraction", "peakMemoryBytes", "stageBusy", "layers")


def reconcile_pipeline(ctx: OperatorContext, obj: Mapping, *, force: bool) -> Outcome | None:
    """Reconcile one PipelinePlan: compute the partition through the controller unless the
    status already holds it for this generation and profile ConfigMap version (``force``
    recomputes). Returns None when nothing needs doing."""
    meta, spec = obj["metadata"], obj["spec"]
    namespace, gen = meta["namespace"], int(meta.get("generation", 1))
    old = copy.deepcopy(dict(obj.get("status") or {}))
    conds = list(old.get("conditions") or [])
    status = dict(old, observedGeneration=gen)

    def done(ready, reason="", message="", degraded=None, clear=False):
        status["conditions"] = _health(conds, gen, ready, reason, message, degraded)
        if clear:
            status.update({k: None for k in _RESULT_FIELDS})
        return Outcome(status)

    text = version = None
    try:
        ref = spec["profile"].get("configMapRef")
        if ref:
            text, version = ctx.kube.read_config_value(namespace, ref, "spec.profile.configMapRef")
        degraded = cond.get_condition(conds, cond.DEGRADED)
        if (not force and old.get("observedGeneration") == gen
                and old.get("profileVersion") == version
                and not (degraded and degraded["status"] == "True")):
            return None
        request = pipeline_request_from_cr(spec, text)
        part = ctx.client.compute_pipeline(request)
    except SpecError as exc:
        return done(False, "InvalidSpec", str(exc), clear=True)
    except Rejected as exc:
        return done(False, "InvalidSpec", f"rejected by the controller: {exc.details}", clear=True)
    except ControllerCallError as exc:
        return done(None, degraded=("ControllerUnavailable", str(exc)))
    except ApiException as exc:
        return done(None, degraded=("KubernetesError", f"{exc.status} {exc.reason}"))
    status.update(boundaries=list(part.boundaries), stepTime=round(part.step_time, 9),
                  bubbleFraction=round(part.bubble_fraction, 6),
                  peakMemoryBytes=list(part.peak_memory_bytes),
                  stageBusy=[round(b, 9) for b in part.stage_busy],
                  layers=int(part.boundaries[-1]) if part.boundaries else 0,
                  profileVersion=version)
    return done(True, "Computed", f"{len(part.boundaries) - 1} stages, step {part.step_time:.4g} s, "
                                  f"bubble {100 * part.bubble_fraction:.1f}%")
