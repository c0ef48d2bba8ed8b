"""Periodic refresh of PipelinePlans without a kopf timer (a timer would make kopf put a
finalizer on every PipelinePlan, which then blocks its deletion whenever the operator is gone).

Every ``interval`` seconds the leader lists the PipelinePlans it watches and reconciles each
(not forced: only a changed profile ConfigMap, a new generation or a Degraded object is
recomputed), patching the changed status fields through the status subresource.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Mapping

import kubernetes
from kubernetes.client.exceptions import ApiException

from expertplane.controller.operator.crd import GROUP, PIPELINES, VERSION
from expertplane.controller.operator.handlers import post_events, status_changes
from expertplane.controller.operator.kube import REQUEST_TIMEOUT
from expertplane.controller.operator.reconcile import OperatorContext, reconcile_pipeline

log = logging.getLogger(__name__)


def _objects(api: kubernetes.client.CustomObjectsApi, namespaces: tuple[str, ...]) -> list[dict]:
    if not namespaces:
        return api.list_cluster_custom_object(GROUP, VERSION, PIPELINES,
                                              _request_timeout=REQUEST_TIMEOUT)["items"]
    return [obj for ns in namespaces for obj in api.list_namespaced_custom_object(
        GROUP, VERSION, ns, PIPELINES, _request_timeout=REQUEST_TIMEOUT)["items"]]


def refresh_pipelines_once(ctx: OperatorContext, api: kubernetes.client.CustomObjectsApi,
                           namespaces: tuple[str, ...], locks: Mapping[str, threading.Lock]) -> int:
    """Reconcile every watched PipelinePlan once; returns how many got a status patch."""
    patched = 0
    for obj in _objects(api, namespaces):
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        with locks[meta["uid"]]:
            outcome = reconcile_pipeline(ctx, obj, force=False)
            changes = status_changes(obj.get("status"), outcome) if outcome else {}
            if not changes:
                continue
            api.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PIPELINES, meta["name"], {"status": changes},
                _request_timeout=REQUEST_TIMEOUT)
            post_events(ctx, obj, outcome.events)
            patched += 1
    return patched


async def refresh_pipelines(ctx: OperatorContext, api_client: kubernetes.client.ApiClient,
                            namespaces: tuple[str, ...], interval: float,
                            locks: Mapping[str, threading.Lock]) -> None:
    """Run ``refresh_pipelines_once`` every ``interval`` seconds until cancelled."""
    api = kubernetes.client.CustomObjectsApi(api_client)
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(refresh_pipelines_once, ctx, api, namespaces, locks)
        except ApiException as exc:
            log.warning("PipelinePlan refresh failed: %s %s", exc.status, exc.reason)
        except Exception:  # keep refreshing: a network error must not end the loop for good
            log.exception("PipelinePlan refresh failed")
