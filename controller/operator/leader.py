"""Leader election on a coordination.k8s.io/v1 Lease (the client-go protocol).

A candidate takes the Lease when it does not exist, when it holds it already, or when the
holder's ``renewTime + leaseDurationSeconds`` has passed; every write carries the
resourceVersion it read, so two candidates can never both win (the loser gets 409 Conflict).
The leader renews every ``retry_period``; if it cannot renew within ``renew_deadline`` it must
stop acting as leader before anyone else may take over (``lease_duration`` > ``renew_deadline``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

import kubernetes
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)
REQUEST_TIMEOUT = 10


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class LeaseElector:
    """Acquire, renew and release one Lease for ``identity``."""

    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str, name: str,
                 identity: str, *, lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0):
        self.api = kubernetes.client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration, self.renew_deadline = lease_duration, renew_deadline
        self.retry_period = retry_period

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True if this identity holds the Lease afterwards."""
        now = _now()
        spec = kubernetes.client.V1LeaseSpec(
            holder_identity=self.identity, lease_duration_seconds=int(round(self.lease_duration)),
            acquire_time=now, renew_time=now, lease_transitions=0)
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace,
                                                   _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = kubernetes.client.V1Lease(
                metadata=kubernetes.client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=spec)
            return self._write(self.api.create_namespaced_lease, self.namespace, body)
        held = lease.spec.holder_identity
        if held == self.identity:
            spec.acquire_time = lease.spec.acquire_time or now
            spec.lease_transitions = lease.spec.lease_transitions or 0
        else:
            if held and not self._expired(lease.spec, now):
                return False
            spec.lease_transitions = (lease.spec.lease_transitions or 0) + 1
            log.info("taking over lease %s/%s from %r", self.namespace, self.name, held)
        lease.spec = spec
        return self._write(self.api.replace_namespaced_lease, self.name, self.namespace, lease)

    def _expired(self, spec, now: dt.datetime) -> bool:
        renewed = spec.renew_time or spec.acquire_time
        duration = spec.lease_duration_seconds or self.lease_duration
        return renewed is None or (now - renewed).total_seconds() > duration

    def _write(self, method, *args) -> bool:
        try:
            method(*args, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status in (409, 422):  # somebody else wrote first
                return False
            raise
        return True

    def release(self) -> None:
        """Give the Lease up (empty holder) if this identity holds it, so a standby takes over
        at once instead of after ``lease_duration``."""
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace,
                                                   _request_timeout=REQUEST_TIMEOUT)
            if lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.renew_time = None
            lease.spec.acquire_time = None
            self._write(self.api.replace_namespaced_lease, self.name, self.namespace, lease)
        except ApiException as exc:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc.reason)

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this identity leads (True) or ``stop`` is set (False)."""
        announced = False
        while not stop.is_set():
            try:
                won = await self._attempt()
            except Exception as exc:  # API unreachable: keep campaigning
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                won = False
            if won:
                log.info("%s leads (lease %s/%s)", self.identity, self.namespace, self.name)
                return True
            if not announced:
                log.info("%s is standing by for lease %s/%s", self.identity, self.namespace, self.name)
                announced = True
            try:
                await asyncio.wait_for(stop.wait(), self.retry_period)
            except asyncio.TimeoutError:
                pass
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew every ``retry_period`` until ``stop`` is set; returns early (leadership lost)
        when no renewal succeeded for ``renew_deadline`` seconds or someone else holds it."""
        last_ok = time.monotonic()
        while not stop.is_set():
            # Plain sleeps, no helper tasks: kopf waits for tasks spawned while it runs.
            await asyncio.sleep(self.retry_period)
            if stop.is_set():
                return
            try:
                ok = await self._attempt()
            except Exception as exc:  # API unreachable: keep trying until the deadline
                log.warning("lease renewal failed: %s", exc)
                ok = None
            if ok:
                last_ok = time.monotonic()
            elif ok is False:
                log.error("lease %s/%s was taken by another replica", self.namespace, self.name)
                return
            elif time.monotonic() - last_ok > self.renew_deadline:
                log.error("could not renew lease %s/%s for %.0f s", self.namespace, self.name,
                          self.renew_deadline)
                return

    async def _attempt(self) -> bool:
        return await asyncio.to_thread(self.try_acquire_or_renew)
