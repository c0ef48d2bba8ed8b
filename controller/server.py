"""``ControllerServer``: the controller as a gRPC server (in-process or as ``expertplane controller``).

Serves LoadService, PlanService, PlanningService and RolloutService, plus standard health
checking (``grpc.health.v1``) and server reflection; Prometheus metrics over HTTP when
``config.metrics`` is set.

The server is a ``grpc.aio`` server on an event loop of its own thread: load reports (the hot
path, thousands per second) are read, counted and acknowledged by a coroutine on that loop; the
other services' handlers are synchronous and run in a pool of ``config.max_workers`` threads
(each open stream, such as an agent's RolloutService.Connect, holds one thread).
"""

from __future__ import annotations

import asyncio
from concurrent import futures
import logging
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expertplane.controller.config import ControllerConfig
from expertplane.controller.core import Controller
from expertplane.controller.metrics import serve as serve_metrics
from expertplane.controller.placement_files import load_placements
from expertplane.controller.servicers import (LoadServicer, PlanningServicer, PlanServicer,
                                              RolloutServicer, add_rollout_servicer)
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import bind, make_aio_server

log = logging.getLogger(__name__)
SERVICES = ("LoadService", "PlanService", "PlanningService", "RolloutService")
SERVICE_NAMES = [pb.DESCRIPTOR.services_by_name[s].full_name for s in SERVICES]


class ControllerServer:
    """Construct, ``start()`` (returns the bound port), ``stop(grace)``.

    ``controller`` is the underlying ``Controller`` (for in-process use: push_bias, rebalance...).
    """

    def __init__(self, config: ControllerConfig):
        self.config = config
        self.controller = Controller(config)
        self._server: grpc.aio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever,
                                             name="controller-grpc", daemon=True)
        self._executor = futures.ThreadPoolExecutor(max_workers=config.max_workers,
                                                    thread_name_prefix="controller-rpc")
        self._health = health.HealthServicer()
        self._metrics_server = None
        self.port = 0

    def start(self) -> int:
        c = self.controller
        c.open()
        if self.config.placements_dir:
            for spec in load_placements(self.config.placements_dir):
                c.apply_placement(spec)
                log.info("placement %s applied from %s", spec.name, self.config.placements_dir)
        self._loop_thread.start()
        self.port = self._on_loop(self._serve())
        for name in SERVICE_NAMES + [""]:
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics:
            self._metrics_server = serve_metrics(c.metrics, self.config.metrics)
        c.run_background()
        log.info("controller listening on %s (port %d), store %s", self.config.listen, self.port,
                 _redact(self.config.db_url))
        return self.port

    async def _serve(self) -> int:
        """Build, bind and start the server (on the loop); returns the bound port."""
        c = self.controller
        server = make_aio_server(self._executor, self.config.security,
                                 max_concurrent_rpcs=self.config.max_concurrent_rpcs)
        pb_grpc.add_LoadServiceServicer_to_server(LoadServicer(c), server)
        pb_grpc.add_PlanServiceServicer_to_server(PlanServicer(c), server)
        pb_grpc.add_PlanningServiceServicer_to_server(PlanningServicer(c), server)
        add_rollout_servicer(RolloutServicer(c), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(SERVICE_NAMES + [health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            server)
        port = bind(server, self.config.listen, self.config.security)
        await server.start()
        self._server = server
        return port

    def _on_loop(self, coro):
        """Run ``coro`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking calls, let running ones finish for ``grace`` seconds, close the store."""
        self._health.enter_graceful_shutdown()
        self.controller.end_streams()
        if self._server is not None:
            self._on_loop(self._server.stop(grace))
            self._server = None
        self._drain_handlers(grace)
        if self._loop_thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join()
            self._loop.close()
        if self._metrics_server is not None:
            self._metrics_server[0].shutdown()
        self.controller.close()

    def _drain_handlers(self, grace: float | None) -> None:
        """Wait (bounded) for the synchronous handlers' threads to finish while the loop still
        runs, so none is left blocked on it and the interpreter can exit."""
        done = threading.Thread(target=self._executor.shutdown,
                                kwargs={"wait": True, "cancel_futures": True}, daemon=True)
        done.start()
        deadline = time.monotonic() + (grace or 0.0) + 5.0
        while done.is_alive() and time.monotonic() < deadline:
            # a synchronous handler reading requests waits on a task of the loop that a stopped
            # server never finishes: cancel those, so the handler sees the end of its stream
            self._on_loop(_cancel_other_tasks())
            done.join(timeout=0.05)
        if done.is_alive():
            log.warning("controller: RPC handler threads still running after shutdown")

    def wait(self) -> None:
        if self._server is not None:
            self._on_loop(self._server.wait_for_termination())


async def _cancel_other_tasks() -> None:
    """Cancel every task of the running loop except the caller's."""
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.cancel()


def _redact(url: str) -> str:
    """Hide a password in a database URL for logs."""
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)
