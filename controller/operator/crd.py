"""Custom resources -> controller messages: ExpertPlacement -> ``Placement``, PipelinePlan ->
``ComputePipelineRequest``, with every rule the OpenAPI schema cannot express (divisibility,
shapes, one-of choices) checked here and reported as ``SpecError`` naming the field path."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import yaml

from expertplane.controller.spec import DEFAULT_WINDOW_SECONDS, PolicySpec, spec_from_proto
from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import double_tensor

GROUP = "expertplane.io"
VERSION = "v1alpha1"
PLACEMENTS = "expertplacements"
PIPELINES = "pipelineplans"
PLAN_KEY = "expert_location.json"

_MODES = {"Auto": pb.RebalancePolicy.AUTO, "Manual": pb.RebalancePolicy.MANUAL,
          "Off": pb.RebalancePolicy.OFF}
MODE_NAMES = {v: k for k, v in _MODES.items()}
# Placement message field -> ExpertPlacement field path, for the controller's validation messages.
_FIELD_PATHS = {
    "name": "metadata.name",
    "model": "spec.model", "model.num_layers": "spec.model.layers",
    "model.num_experts": "spec.model.experts", "model.num_groups": "spec.model.groups",
    "topology": "spec.topology", "topology.num_nodes": "spec.topology.nodes",
    "topology.gpus_per_node": "spec.topology.gpusPerNode",
    "num_replicas": "spec.replicas", "algorithm": "spec.algorithm",
    "policy.mode": "spec.rebalancePolicy.mode",
    "policy.window_seconds": "spec.rebalancePolicy.windowSeconds",
    "policy.half_life_seconds": "spec.rebalancePolicy.halfLifeSeconds",
    "policy.threshold": "spec.rebalancePolicy.threshold",
    "policy.hysteresis": "spec.rebalancePolicy.hysteresis",
    "policy.cooldown_seconds": "spec.rebalancePolicy.cooldownSeconds",
    "policy.min_gain_per_gib": "spec.rebalancePolicy.minGainPerGiB",
}


class SpecError(FieldError):
    """An object's spec cannot be reconciled; ``field`` is its path, e.g. ``spec.replicas``."""


@dataclass(frozen=True)
class Topology:
    """GPUs of a placement: ``nodes`` x ``gpus_per_node``."""

    nodes: int
    gpus_per_node: int


def placement_name(namespace: str, name: str) -> str:
    """The controller's name for the ExpertPlacement ``namespace/name``: ``<namespace>-<name>``,
    shortened with a hash suffix when longer than 63 characters."""
    full = f"{namespace}-{name}"
    if len(full) <= 63:
        return full
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:8]
    return f"{full[:54].rstrip('-')}-{digest}"


def plan_configmap_name(name: str, spec: Mapping) -> str:
    """ConfigMap that receives the plan of ExpertPlacement ``name``."""
    return spec.get("planConfigMap") or f"{name}-expert-location"


def replicas_of(spec: Mapping) -> int:
    """Physical slots per layer: ``replicas``, else ``experts + redundantExperts``."""
    if "replicas" in spec and "redundantExperts" in spec:
        raise SpecError("spec.replicas", "give replicas or redundantExperts, not both "
                                         f"(replicas: {spec['replicas']}, redundantExperts: "
                                         f"{spec['redundantExperts']})")
    if "replicas" in spec:
        return int(spec["replicas"])
    return int(spec["model"]["experts"]) + int(spec.get("redundantExperts", 0))


def load_matrix(values, field: str) -> np.ndarray:
    """A load ``[layers][experts]`` (nested lists) as float64 [L, E]; ragged lists are refused."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise SpecError(field, "must be a list of equally long lists of numbers "
                               "[layers][experts]") from None
    if array.ndim != 2:
        raise SpecError(field, f"must be [layers][experts], got {array.ndim} dimension(s)")
    return array


def parse_load_document(text: str, field: str) -> np.ndarray:
    """A load from a ConfigMap value: JSON/YAML ``[[...]]`` or ``{"load": [[...]]}``."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(field, f"is not valid JSON/YAML: {exc}") from None
    if isinstance(doc, Mapping):
        if "load" not in doc:
            raise SpecError(field, "a mapping must hold the matrix under key 'load'")
        doc = doc["load"]
    return load_matrix(doc, field)


def initial_load_source(spec: Mapping) -> tuple[str, object] | None:
    """Where the initial load comes from: ``("spec.initialLoad.values", matrix)`` inline,
    ``("spec.initialLoadFrom.configMapKeyRef", {name, key})``, ``("spec.initialLoadFrom.file",
    path)`` (read by the controller), or None (uniform)."""
    inline, ref = spec.get("initialLoad"), spec.get("initialLoadFrom")
    if inline and ref:
        raise SpecError("spec.initialLoadFrom", "give initialLoad or initialLoadFrom, not both")
    if inline:
        return "spec.initialLoad.values", inline["values"]
    if ref and "file" in ref:
        return "spec.initialLoadFrom.file", ref["file"]
    if ref:
        return "spec.initialLoadFrom.configMapKeyRef", ref["configMapKeyRef"]
    return None


def approval_of(spec: Mapping) -> str:
    """``Auto`` (roll out as decided) or ``Manual`` (propose, wait for approval)."""
    return (spec.get("rebalancePolicy") or {}).get("approval", "Auto")


def _policy(spec: Mapping, mode: int | None) -> pb.RebalancePolicy:
    pol = spec.get("rebalancePolicy") or {}
    return pb.RebalancePolicy(
        mode=_MODES[pol.get("mode", "Auto")] if mode is None else mode,
        window_seconds=float(pol.get("windowSeconds", DEFAULT_WINDOW_SECONDS)),
        half_life_seconds=float(pol.get("halfLifeSeconds", 0)),
        threshold=float(pol.get("threshold", PolicySpec.threshold)),
        hysteresis=float(pol.get("hysteresis", 0)),
        cooldown_seconds=float(pol.get("cooldownSeconds", 0)),
        move_budget_bytes=int(pol.get("moveBudgetBytes", 0)),
        min_gain_per_gib=float(pol.get("minGainPerGiB", 0)),
        dry_run=bool(pol.get("dryRun", False)),
    )


def placement_from_cr(name: str, spec: Mapping, topology: Topology, generation: int,
                      initial_load: np.ndarray | None = None, *, mode: int | None = None,
                      load_field: str = "spec.initialLoad.values",
                      initial_load_file: str = "") -> pb.Placement:
    """The ``Placement`` for an ExpertPlacement spec, validated like the controller does.

    ``name`` is the controller-side name (``placement_name``); ``topology`` the resolved GPUs;
    ``initial_load`` [layers, experts] or None, read from ``load_field`` (or
    ``initial_load_file``, a file the controller reads); ``mode`` overrides
    ``rebalancePolicy.mode`` (a ``RebalancePolicy.Mode``: the operator pauses or takes over
    approval). Raises ``SpecError`` with the CR field path.
    """
    model = spec["model"]
    msg = pb.Placement(
        name=name,
        model=pb.ModelSpec(num_layers=int(model["layers"]), num_experts=int(model["experts"]),
                           num_groups=int(model.get("groups", 1)),
                           expert_bytes=int(model.get("expertBytes", 0))),
        topology=pb.Topology(num_nodes=topology.nodes, gpus_per_node=topology.gpus_per_node),
        num_replicas=replicas_of(spec),
        algorithm=spec.get("algorithm", "deepseek"),
        policy=_policy(spec, mode),
        generation=int(generation),
        initial_load_file=initial_load_file,
    )
    if initial_load is not None:
        msg.initial_load.CopyFrom(double_tensor(initial_load))
    try:
        spec_from_proto(msg)
    except FieldError as exc:
        field = load_field if exc.field == "initial_load" else _FIELD_PATHS.get(exc.field, exc.field)
        if field == "spec.replicas" and "redundantExperts" in spec:
            field = "spec.redundantExperts"
        raise SpecError(field, exc.message) from None
    return msg


def topology_from_spec(spec: Mapping) -> Topology | None:
    """``nodes`` x ``gpusPerNode`` when given explicitly; None when a worker selector decides.

    Raises ``SpecError`` when both or neither are given or ``gpusPerNode`` is missing.
    """
    topo = spec["topology"]
    if "workerSelector" in topo:
        if "nodes" in topo:
            raise SpecError("spec.topology", "give nodes or workerSelector, not both")
        return None
    if "nodes" not in topo or "gpusPerNode" not in topo:
        raise SpecError("spec.topology", "needs nodes and gpusPerNode, or a workerSelector")
    return Topology(int(topo["nodes"]), int(topo["gpusPerNode"]))


# Kubernetes label syntax (apimachinery validation): a name segment of <= 63 alphanumerics,
# '-', '_', '.' starting and ending alphanumeric; a key is [DNS-subdomain prefix '/'] name.
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _check_label_key(key, field: str) -> None:
    prefix, _, name = str(key).rpartition("/")
    if not name or not _LABEL_NAME.fullmatch(name) or (
            prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix))):
        raise SpecError(field, f"{key!r} is not a valid label key ([prefix/]name, name of <= 63 "
                               "alphanumerics, '-', '_' or '.')")


def _check_label_value(value, field: str) -> None:
    if not _LABEL_NAME.fullmatch(str(value)):
        raise SpecError(field, f"{value!r} is not a valid label value (<= 63 alphanumerics, "
                               "'-', '_' or '.', starting and ending alphanumeric)")


def label_selector(selector: Mapping) -> str:
    """A LabelSelector (matchLabels / matchExpressions) as the API's selector string; keys and
    values are checked against the label syntax (the apiserver would refuse the pod list)."""
    field = "spec.topology.workerSelector"
    labels = sorted((selector.get("matchLabels") or {}).items())
    for k, v in labels:
        _check_label_key(k, f"{field}.matchLabels")
        _check_label_value(v, f"{field}.matchLabels")
    terms = [f"{k}={v}" for k, v in labels]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        _check_label_key(key, f"{field}.matchExpressions")
        for v in values:
            _check_label_value(v, f"{field}.matchExpressions")
        if op in ("In", "NotIn"):
            if not values:
                raise SpecError("spec.topology.workerSelector.matchExpressions",
                                f"operator {op} on {key!r} needs values")
            terms.append(f"{key} {op.lower()} ({','.join(values)})")
        elif op == "Exists":
            terms.append(key)
        else:
            terms.append(f"!{key}")
    if not terms:
        raise SpecError("spec.topology.workerSelector", "must have matchLabels or matchExpressions")
    return ",".join(terms)


def _expand_layers(layers: list[Mapping]) -> list[pb.LayerProfile]:
    out = []
    for layer in layers:
        msg = pb.LayerProfile(
            kind=layer["kind"], forward=float(layer["forward"]), backward=float(layer["backward"]),
            weight_grad=float(layer.get("weightGrad", 0)),
            activation_bytes=int(layer.get("activationBytes", 0)),
            param_bytes=int(layer.get("paramBytes", 0)),
            ep_imbalance=float(layer.get("epImbalance", 0)))
        out.extend(msg for _ in range(int(layer.get("repeat", 1))))
    return out


def memory_limit_bytes(value) -> int:
    """``spec.memoryLimit`` (bytes or a quantity such as ``80Gi``) in bytes; absent = 0 (none)."""
    if value is None:
        return 0
    from kubernetes.utils import parse_quantity

    try:
        out = int(parse_quantity(value))
    except ValueError as exc:
        raise SpecError("spec.memoryLimit", str(exc)) from None
    if not 0 <= out < 2 ** 64:
        raise SpecError("spec.memoryLimit", f"must be between 0 and 2^64 - 1 bytes, got {value}")
    return out


def pipeline_request_from_cr(spec: Mapping, profile_text: str | None = None) -> pb.ComputePipelineRequest:
    """The ``ComputePipelineRequest`` for a PipelinePlan spec.

    ``profile_text``: the referenced ConfigMap value when ``spec.profile.configMapRef`` is used.
    Raises ``SpecError`` for rules the schema cannot express (stages vs layers).
    """
    req = pb.ComputePipelineRequest(
        num_stages=int(spec["stages"]), schedule=spec["schedule"],
        micro_batches=int(spec["microBatches"]),
        memory_limit_bytes=memory_limit_bytes(spec.get("memoryLimit")),
        p2p_seconds=float(spec.get("p2pSeconds", 0)))
    profile = spec["profile"]
    if "layers" in profile:
        layers = _expand_layers(profile["layers"])
        if len(layers) < req.num_stages:
            raise SpecError("spec.stages", f"must be <= the number of layers ({len(layers)}), "
                                           f"got {req.num_stages}")
        req.layers.extend(layers)
    else:
        if profile_text is None:
            raise SpecError("spec.profile.configMapRef", "profile text was not read")
        req.profile_yaml = profile_text
    return req
