"""The operator's Kubernetes calls besides kopf's own: plan ConfigMaps, referenced ConfigMaps,
worker pods. Every call uses the kubernetes client with a request timeout."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Mapping

import kubernetes
import numpy as np
from kubernetes.client.exceptions import ApiException

from expertplane.controller.operator.crd import GROUP, PLAN_KEY, SpecError, Topology
from expertplane.controller.operator.plan_form import PlanForm, parse_annotation
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import to_numpy

VERSION_ANNOTATION = f"{GROUP}/plan-version"
PLACEMENT_ANNOTATION = f"{GROUP}/placement"
IDENTITY_ANNOTATION = f"{GROUP}/plan-identity"
FORM_ANNOTATION = f"{GROUP}/plan-form"
REQUEST_TIMEOUT = 30
COMPONENT = "expertplane-operator"      # events' reporting component ("From" in kubectl describe)


@dataclass(frozen=True)
class Owner:
    """The object a published ConfigMap belongs to (for ownerReferences)."""

    api_version: str
    kind: str
    name: str
    uid: str

    def reference(self) -> dict:
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.name,
                "uid": self.uid, "controller": True, "blockOwnerDeletion": True}


def plan_identity(placement: pb.Placement, version: int) -> str:
    """What a published plan must match: version and shape (a re-registered placement restarts
    its versions at 1), e.g. ``v3 58x288 4x8``."""
    return (f"v{version} {placement.model.num_layers}x{placement.num_replicas} "
            f"{placement.topology.num_nodes}x{placement.topology.gpus_per_node}")


@dataclass(frozen=True)
class Published:
    """What a plan ConfigMap holds: its ``plan_identity`` (``shape`` is the part after the
    version), the plan ``version`` (0 if unreadable), the uid of the object owning it, the raw
    ``expert_location.json`` text and the ``form`` it was written in (None if unreadable)."""

    identity: str
    version: int
    shape: str
    owner_uid: str | None
    document: str
    form: PlanForm | None

    def phy2log(self) -> np.ndarray | None:
        """The published plan [MoE layers, slots], dense rows dropped (None if unreadable)."""
        return None if self.form is None else self.form.plan_rows(self.document)


class NoWorkers(Exception):
    """A workerSelector matched no worker pods (yet)."""


class Kube:
    """ConfigMap and Pod operations on one ``ApiClient``."""

    def __init__(self, api_client: kubernetes.client.ApiClient, instance: str = ""):
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.instance = instance

    def post_event(self, obj: Mapping, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about ``obj`` (its ``apiVersion``, ``kind``, ``metadata``) from
        ``COMPONENT``; ``type_`` Normal or Warning."""
        meta = obj["metadata"]
        now = dt.datetime.now(dt.timezone.utc)
        body = kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(generate_name=f"{meta['name']}.",
                                                    namespace=meta["namespace"]),
            involved_object=kubernetes.client.V1ObjectReference(
                api_version=obj["apiVersion"], kind=obj["kind"], name=meta["name"],
                namespace=meta["namespace"], uid=meta["uid"]),
            type=type_, reason=reason, message=message, count=1,
            first_timestamp=now, last_timestamp=now,
            source=kubernetes.client.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT, reporting_instance=self.instance)
        self.core.create_namespaced_event(meta["namespace"], body, _request_timeout=REQUEST_TIMEOUT)

    def read_config_value(self, namespace: str, ref: Mapping, field: str) -> tuple[str, str]:
        """Value of ``ref`` = {name, key} and the ConfigMap's resourceVersion.

        A missing ConfigMap or key is a ``SpecError`` on ``field``.
        """
        try:
            cm = self.core.read_namespaced_config_map(ref["name"], namespace,
                                                      _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                raise SpecError(field, f"ConfigMap {ref['name']!r} not found in namespace "
                                       f"{namespace!r}") from None
            raise
        data = cm.data or {}
        if ref["key"] not in data:
            raise SpecError(field, f"ConfigMap {ref['name']!r} has no key {ref['key']!r} "
                                   f"(keys: {sorted(data)})")
        return data[ref["key"]], cm.metadata.resource_version

    def published_plan(self, namespace: str, name: str) -> Published | None:
        """What plan ConfigMap ``name`` holds, or None if it does not exist."""
        try:
            cm = self.core.read_namespaced_config_map(name, namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        annotations = cm.metadata.annotations or {}
        identity = annotations.get(IDENTITY_ANNOTATION, "")
        version = annotations.get(VERSION_ANNOTATION, "")
        owners = [o.uid for o in cm.metadata.owner_references or [] if o.controller]
        return Published(identity, int(version) if version.isdigit() else 0,
                         identity.partition(" ")[2], owners[0] if owners else None,
                         (cm.data or {}).get(PLAN_KEY, ""),
                         parse_annotation(annotations.get(FORM_ANNOTATION)))

    def publish_plan(self, namespace: str, name: str, owner: Owner, plan: pb.Plan,
                     identity: str, form: PlanForm, num_experts: int) -> None:
        """Create or replace ConfigMap ``name`` holding ``plan`` in SGLang's expert-location
        format: key ``expert_location.json`` = {"physical_to_logical_map": [rows][slots]}, rows
        as ``form`` says (MoE layers, or SGLang's hidden layers); ``identity`` (see
        ``plan_identity``) and ``form`` are recorded to tell later whether it is current and how
        to read it back."""
        phy2log = to_numpy(plan.phy2log, "phy2log", ndim=2)
        body = kubernetes.client.V1ConfigMap(
            metadata=kubernetes.client.V1ObjectMeta(
                name=name, namespace=namespace,
                labels={"app.kubernetes.io/managed-by": "expertplane-operator",
                        "app.kubernetes.io/part-of": "expertplane"},
                annotations={VERSION_ANNOTATION: str(plan.summary.version),
                             PLACEMENT_ANNOTATION: plan.summary.placement,
                             IDENTITY_ANNOTATION: identity,
                             FORM_ANNOTATION: form.annotation()},
                owner_references=[owner.reference()]),
            data={PLAN_KEY: json.dumps(form.document(phy2log, num_experts), separators=(",", ":"))})
        try:
            self.core.create_namespaced_config_map(namespace, body, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.replace_namespaced_config_map(name, namespace, body,
                                                    _request_timeout=REQUEST_TIMEOUT)

    def delete_configmap(self, namespace: str, name: str) -> bool:
        """Delete ConfigMap ``name``; False if it was already gone."""
        try:
            self.core.delete_namespaced_config_map(name, namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def worker_topology(self, namespace: str, selector: str, gpu_resource: str,
                        gpus_per_node: int | None) -> Topology:
        """Topology from worker pods: one pod per node, GPUs per node from the pods' limits of
        ``gpu_resource`` (or ``gpus_per_node`` when given). Pods being deleted or finished are
        not counted. Raises ``NoWorkers`` if none match, ``SpecError`` if pods disagree."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector,
                                             _request_timeout=REQUEST_TIMEOUT).items
        live = [p for p in pods if p.metadata.deletion_timestamp is None
                and (p.status is None or p.status.phase not in ("Succeeded", "Failed"))]
        if not live:
            raise NoWorkers(f"no worker pods match {selector!r} in namespace {namespace!r}")
        if gpus_per_node is not None:
            return Topology(len(live), int(gpus_per_node))
        counts = {p.metadata.name: _pod_gpus(p, gpu_resource) for p in live}
        distinct = set(counts.values())
        if len(distinct) != 1 or 0 in distinct:
            raise SpecError("spec.topology.workerSelector",
                            f"worker pods must each have the same non-zero {gpu_resource} limit, "
                            f"got {dict(sorted(counts.items()))}")
        return Topology(len(live), distinct.pop())


def _pod_gpus(pod, resource: str) -> int:
    total = 0
    for c in pod.spec.containers:
        limits = (c.resources.limits if c.resources else None) or {}
        total += int(limits.get(resource, 0))
    return total
