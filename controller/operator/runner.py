"""Run the operator: load Kubernetes credentials, win the leader Lease, run kopf until told to
stop or until leadership is lost (then exit non-zero so that the pod restarts and campaigns)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections import defaultdict

import kopf
import kubernetes

from expertplane.controller.operator.client import ControllerClient
from expertplane.controller.operator.config import OperatorConfig
from expertplane.controller.operator.handlers import build_registry, operator_settings
from expertplane.controller.operator.kube import Kube
from expertplane.controller.operator.leader import LeaseElector
from expertplane.controller.operator.reconcile import OperatorContext, ProposalClock
from expertplane.controller.operator.sweep import refresh_pipelines

log = logging.getLogger(__name__)
EXIT_LOST_LEADERSHIP = 3


def load_kube_config(kubeconfig: str | None) -> kubernetes.client.Configuration:
    """Client configuration from ``kubeconfig``, else in-cluster, else ``~/.kube/config``."""
    cfg = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        return cfg
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=cfg)
    return cfg


async def run_operator(config: OperatorConfig, stop: asyncio.Event | None = None) -> int:
    """Run until ``stop`` is set or SIGINT/SIGTERM (0), or leadership is lost
    (``EXIT_LOST_LEADERSHIP``). Only the Lease holder runs handlers."""
    stop = stop or asyncio.Event()
    _handle_signals(stop)
    api_config = load_kube_config(config.kubeconfig)
    api_client = kubernetes.client.ApiClient(api_config)
    client = ControllerClient(config.controller, config.security, config.rpc_timeout_seconds)
    elector = LeaseElector(api_client, config.lease_namespace, config.lease_name, config.identity,
                           lease_duration=config.lease_duration_seconds,
                           renew_deadline=config.renew_deadline_seconds,
                           retry_period=config.retry_period_seconds)
    try:
        if not await elector.acquire(stop):
            return 0
        ctx = OperatorContext(client, Kube(api_client, config.identity), config.controller,
                              proposals=ProposalClock(config.proposal_interval_seconds))
        locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        kopf_stop, kopf_ready = asyncio.Event(), asyncio.Event()
        # Tasks made before kopf starts: kopf waits at exit for tasks spawned while it runs.
        holding = asyncio.create_task(elector.hold(stop))
        stopping = asyncio.create_task(stop.wait())
        relay = asyncio.create_task(_set_when_first(kopf_stop, holding, stopping))
        # kopf installs its own SIGINT/SIGTERM handlers; once it is up, ours take over again so
        # that a signal stops kopf through ``kopf_stop`` (its stop-flag waiter then ends at once).
        resignal = asyncio.create_task(_after(kopf_ready, lambda: _handle_signals(stop)))
        sweep = asyncio.create_task(refresh_pipelines(ctx, api_client, config.namespaces,
                                                      config.refresh_seconds, locks))
        tasks = (relay, holding, stopping, resignal, sweep)
        try:
            await kopf.operator(
                registry=build_registry(ctx, api_config, config.refresh_seconds,
                                        config.cleanup_timeout_seconds, locks),
                settings=operator_settings(config.identity), standalone=True,
                clusterwide=not config.namespaces, namespaces=list(config.namespaces),
                stop_flag=kopf_stop, ready_flag=kopf_ready, liveness_endpoint=config.liveness)
        finally:
            lost = holding.done() and not stop.is_set()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if lost:
            log.error("%s lost leadership; exiting", config.identity)
            return EXIT_LOST_LEADERSHIP
        await asyncio.to_thread(elector.release)
        return 0
    finally:
        client.close()
        api_client.close()


def _handle_signals(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set ``stop`` (only possible in the main thread)."""
    if threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)


async def _after(event: asyncio.Event, action) -> None:
    await event.wait()
    action()


async def _set_when_first(flag: asyncio.Event, *tasks: asyncio.Task) -> None:
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    flag.set()


def run_operator_blocking(config: OperatorConfig) -> int:
    """``run_operator`` in a fresh event loop (for CLIs)."""
    return asyncio.run(run_operator(config))


class OperatorThread:
    """``run_operator`` on a background thread with its own event loop, for running the operator
    inside another process (e.g. next to a controller in tests or the demo):
    ``start()``, later ``stop(timeout)``; ``exit_code`` once it has ended."""

    def __init__(self, config: OperatorConfig):
        self.config = config
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="expertplane-operator", daemon=True)

    def _main(self) -> None:
        async def body():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._started.set()
            return await run_operator(self.config, self._stop)
        try:
            self.exit_code = asyncio.run(body())
        except BaseException as exc:  # reported through .error / .exit_code to the owner
            log.exception("operator thread failed")
            self.error, self.exit_code = exc, 1
        finally:
            self._started.set()

    def start(self) -> "OperatorThread":
        self._thread.start()
        self._started.wait()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> int | None:
        """Ask the operator to stop (releasing the Lease) and wait up to ``timeout`` seconds."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        return self.exit_code
