"""kopf handlers: one per event (create/update/resume, timer, delete) for each resource, all
delegating to the idempotent reconcilers in ``reconcile``. Handlers never store results in
kopf's own status fields (the CRD schemas would prune them): kopf's progress and diff-base go to
annotations, and each handler writes the object's status through kopf's ``patch``."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

import kopf
import kubernetes

from expertplane.controller.operator.client import ControllerCallError
from expertplane.controller.operator.crd import GROUP, PIPELINES, PLACEMENTS, VERSION
from expertplane.controller.operator.reconcile import (
    OperatorContext,
    Outcome,
    cleanup_placement,
    reconcile_pipeline,
    reconcile_placement,
)

FINALIZER = f"{GROUP}/finalizer"


def operator_settings() -> kopf.OperatorSettings:
    """kopf settings: our finalizer name, no CRD/namespace scanning, progress and diff-base in
    annotations, timeouts."""
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    # The resources and namespaces are known up front: no need to list/watch CRDs and namespaces
    # (which would need cluster-wide permissions the operator does not otherwise use).
    settings.scanning.disabled = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 15
    settings.execution.max_workers = 8
    settings.posting.level = logging.INFO
    return settings


def _write(body, patch, outcome: Outcome | None) -> None:
    """Put the changed top-level status fields into kopf's patch (None deletes a field) and
    post the outcome's events."""
    if outcome is None:
        return
    old = dict(body.get("status") or {})
    for key, value in outcome.status.items():
        if old.get(key) != value:
            patch.status[key] = value
    for reason, message in outcome.events:
        kopf.info(body, reason=reason, message=message)


def _plain(body) -> dict:
    return {"metadata": dict(body["metadata"]), "spec": dict(body["spec"]),
            "status": dict(body.get("status") or {})}


def build_registry(ctx: OperatorContext, api_config: kubernetes.client.Configuration,
                   refresh_seconds: float) -> kopf.OperatorRegistry:
    """A registry with every handler of the operator bound to ``ctx``."""
    registry = kopf.OperatorRegistry()
    locks: dict[str, threading.Lock] = defaultdict(threading.Lock)

    @kopf.on.login(registry=registry)
    def login(**_):
        return connection_info(api_config)

    # ---------------------------------------------------------------- ExpertPlacement

    @kopf.on.resume(GROUP, VERSION, PLACEMENTS, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLACEMENTS, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLACEMENTS, registry=registry)
    def placement_changed(body, patch, uid, **_):
        with locks[uid]:
            _write(body, patch, reconcile_placement(ctx, _plain(body), apply=True))

    @kopf.timer(GROUP, VERSION, PLACEMENTS, interval=refresh_seconds,
                initial_delay=refresh_seconds, registry=registry)
    def placement_refresh(body, patch, uid, **_):
        with locks[uid]:
            _write(body, patch, reconcile_placement(ctx, _plain(body), apply=False))

    @kopf.on.delete(GROUP, VERSION, PLACEMENTS, registry=registry)
    def placement_deleted(body, uid, logger, **_):
        with locks[uid]:
            try:
                removed = cleanup_placement(ctx, _plain(body))
            except ControllerCallError as exc:
                raise kopf.TemporaryError(f"controller: {exc}", delay=5) from None
        locks.pop(uid, None)
        logger.info("cleaned up: %s", ", ".join(removed) or "nothing to remove")

    # ---------------------------------------------------------------- PipelinePlan

    @kopf.on.resume(GROUP, VERSION, PIPELINES, registry=registry)
    @kopf.on.create(GROUP, VERSION, PIPELINES, registry=registry)
    @kopf.on.update(GROUP, VERSION, PIPELINES, registry=registry)
    def pipeline_changed(body, patch, uid, **_):
        with locks[uid]:
            _write(body, patch, reconcile_pipeline(ctx, _plain(body), force=True))

    @kopf.timer(GROUP, VERSION, PIPELINES, interval=refresh_seconds,
                initial_delay=refresh_seconds, registry=registry)
    def pipeline_refresh(body, patch, uid, **_):
        with locks[uid]:
            _write(body, patch, reconcile_pipeline(ctx, _plain(body), force=False))

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
