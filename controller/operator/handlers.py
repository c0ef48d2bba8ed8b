"""kopf handlers: one per event (create/update/resume, timer, delete) for ExpertPlacements and
create/update/resume for PipelinePlans, all delegating to the idempotent reconcilers. Handlers
never store results in kopf's own status fields (the CRD schemas would prune them): kopf keeps
small ``kopf.expertplane.io/*`` annotations (progress, a digest of the last-handled spec) and
each handler writes the object's status through kopf's ``patch``.

Only ExpertPlacements carry a finalizer (their delete handler forgets the placement in the
controller). PipelinePlans have no delete or timer handler, so kopf puts no finalizer on them;
their periodic refresh is ``sweep.refresh_pipelines``.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Mapping

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

from expertplane.controller.operator.client import ControllerCallError
from expertplane.controller.operator.crd import GROUP, PIPELINES, PLACEMENTS, VERSION
from expertplane.controller.operator.kube import COMPONENT
from expertplane.controller.operator.placement import cleanup_placement, reconcile_placement
from expertplane.controller.operator.reconcile import (
    WARNING,
    OperatorContext,
    Outcome,
    reconcile_pipeline,
)
from expertplane.controller.operator.storage import PREFIX, DigestDiffBaseStorage

FINALIZER = f"{GROUP}/finalizer"
log = logging.getLogger(__name__)


def operator_settings(identity: str = "") -> kopf.OperatorSettings:
    """kopf settings: our finalizer name, no CRD/namespace scanning, small annotations for
    progress and diff base, events from ``expertplane-operator``, timeouts."""
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    # The resources and namespaces are known up front: no need to list/watch CRDs and namespaces
    # (which would need cluster-wide permissions the operator does not otherwise use).
    settings.scanning.disabled = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = DigestDiffBaseStorage()
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 15
    settings.execution.max_workers = 8
    # A deleted object's timer may be running (a sync handler cannot be cancelled): check every
    # second whether it has ended, not kopf's default 60 s, or its deletion waits that long.
    settings.background.cancellation_polling = 1.0
    # kopf's own events (handler failures) under our name; our events are posted by Kube.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = COMPONENT
    settings.posting.reporting_instance = identity or "operator"
    return settings


def post_events(ctx: OperatorContext, obj: Mapping, events) -> None:
    """Post (type, reason, message) events about ``obj``; a failure is logged, not raised."""
    for type_, reason, message in events:
        try:
            ctx.kube.post_event(obj, type_, reason, message)
        except ApiException as exc:
            log.warning("could not post event %s on %s/%s: %s %s", reason,
                        obj["metadata"]["namespace"], obj["metadata"]["name"], exc.status, exc.reason)


def status_changes(old_status: Mapping | None, outcome: Outcome) -> dict:
    """The top-level status fields that differ (None deletes a field)."""
    old = dict(old_status or {})
    return {k: v for k, v in outcome.status.items() if old.get(k) != v}


def _write(ctx: OperatorContext, obj: dict, patch, outcome: Outcome | None) -> None:
    """Put the changed status fields and annotations into kopf's patch; post the events."""
    if outcome is None:
        return
    for key, value in status_changes(obj.get("status"), outcome).items():
        patch.status[key] = value
    for key, value in outcome.annotations.items():
        patch.metadata.annotations[key] = value
    post_events(ctx, obj, outcome.events)


def _plain(body) -> dict:
    return {"apiVersion": body["apiVersion"], "kind": body["kind"],
            "metadata": dict(body["metadata"]), "spec": dict(body["spec"]),
            "status": dict(body.get("status") or {})}


def build_registry(ctx: OperatorContext, api_config: kubernetes.client.Configuration,
                   refresh_seconds: float, cleanup_timeout_seconds: float,
                   locks: dict[str, threading.Lock] | None = None) -> kopf.OperatorRegistry:
    """A registry with every handler of the operator bound to ``ctx``; ``locks`` (per object
    uid) are shared with ``sweep.refresh_pipelines``."""
    registry = kopf.OperatorRegistry()
    locks = locks if locks is not None else defaultdict(threading.Lock)

    @kopf.on.login(registry=registry)
    def login(**_):
        return connection_info(api_config)

    # ---------------------------------------------------------------- ExpertPlacement

    @kopf.on.resume(GROUP, VERSION, PLACEMENTS, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLACEMENTS, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLACEMENTS, registry=registry)
    def placement_changed(body, patch, uid, **_):
        with locks[uid]:
            obj = _plain(body)
            _write(ctx, obj, patch, reconcile_placement(ctx, obj, apply=True))

    @kopf.timer(GROUP, VERSION, PLACEMENTS, interval=refresh_seconds,
                initial_delay=refresh_seconds, registry=registry)
    def placement_refresh(body, patch, uid, **_):
        with locks[uid]:
            obj = _plain(body)
            _write(ctx, obj, patch, reconcile_placement(ctx, obj, apply=False))

    @kopf.on.delete(GROUP, VERSION, PLACEMENTS, registry=registry)
    def placement_deleted(body, uid, logger, runtime, **_):
        obj = _plain(body)
        with locks[uid]:
            try:
                removed = cleanup_placement(ctx, obj)
            except ControllerCallError as exc:
                if runtime.total_seconds() < cleanup_timeout_seconds:
                    raise kopf.TemporaryError(f"controller: {exc}", delay=5) from None
                # Uninstalling in any order: the controller may be gone for good.
                post_events(ctx, obj, [(WARNING, "CleanupIncomplete",
                                        f"controller unreachable for {cleanup_timeout_seconds:.0f} s "
                                        f"({exc}); releasing the object anyway")])
                removed = []
        locks.pop(uid, None)
        logger.info("cleaned up: %s", ", ".join(removed) or "nothing to remove")

    # ---------------------------------------------------------------- PipelinePlan

    @kopf.on.resume(GROUP, VERSION, PIPELINES, registry=registry)
    @kopf.on.create(GROUP, VERSION, PIPELINES, registry=registry)
    @kopf.on.update(GROUP, VERSION, PIPELINES, registry=registry)
    def pipeline_changed(body, patch, uid, **_):
        with locks[uid]:
            obj = _plain(body)
            _write(ctx, obj, patch, reconcile_pipeline(ctx, obj, force=True))

    return registry


def connection_info(cfg: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf credentials from a loaded kubernetes-client configuration (kubeconfig or in-cluster)."""
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        username=cfg.username or None, password=cfg.password or None, scheme=scheme, token=token,
        certificate_path=cfg.cert_file, private_key_path=cfg.key_file)
