"""``ControllerServer``: the controller as a gRPC server (in-process or as ``expertplane controller``).

Serves LoadService, PlanService, PlanningService and RolloutService, plus standard health
checking (``grpc.health.v1``) and server reflection; Prometheus metrics over HTTP when
``config.metrics`` is set.

The server is a ``grpc.aio`` server on an event loop of its own thread. Every streaming handler
is a coroutine on that loop: load reports (the hot path, thousands per second) are read, counted
and acknowledged there; WatchPlans and RolloutService.Connect wait there for plans and commands
(an open stream holds no thread) and hand blocking controller/store calls to a pool of
``config.max_workers`` threads, which also runs the synchronous unary handlers.
"""

from __future__ import annotations

from concurrent import futures
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expertplane.controller.config import ControllerConfig
from expertplane.controller.core import Controller
from expertplane.controller.metrics import serve as serve_metrics
from expertplane.controller.placement_files import load_placements
from expertplane.controller.servicers import (LoadServicer, PlanningServicer, PlanServicer,
                                              RolloutServicer, Streams, add_rollout_servicer)
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import bind, make_aio_server
from expertplane.rpc.loop_thread import LoopThread

log = logging.getLogger(__name__)
SERVICES = ("LoadService", "PlanService", "PlanningService", "RolloutService")
SERVICE_NAMES = [pb.DESCRIPTOR.services_by_name[s].full_name for s in SERVICES]
STREAM_CLEANUP_SECONDS = 5.0     # after the server stopped, for stream handlers to finish


class ControllerServer:
    """Construct, ``start()`` (returns the bound port), ``stop(grace)``.

    ``controller`` is the underlying ``Controller`` (for in-process use: push_bias, rebalance...).
    """

    def __init__(self, config: ControllerConfig):
        self.config = config
        self.controller = Controller(config)
        self._server: grpc.aio.Server | None = None
        self._loop = LoopThread("controller-grpc")
        self._executor = futures.ThreadPoolExecutor(max_workers=config.max_workers,
                                                    thread_name_prefix="controller-rpc")
        self._streams = Streams(self._executor)
        self._health = health.aio.HealthServicer()   # its Watch streams hold no thread either
        self._metrics_server = None
        self.port = 0

    def start(self) -> int:
        c = self.controller
        c.open()
        if self.config.placements_dir:
            for spec in load_placements(self.config.placements_dir):
                c.apply_placement(spec)
                log.info("placement %s applied from %s", spec.name, self.config.placements_dir)
        self._loop.start()
        self.port = self._loop.run(self._serve())
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
        pb_grpc.add_PlanServiceServicer_to_server(PlanServicer(c, self._streams), server)
        pb_grpc.add_PlanningServiceServicer_to_server(PlanningServicer(c), server)
        add_rollout_servicer(RolloutServicer(c, self._streams), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(SERVICE_NAMES + [health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            server)
        port = bind(server, self.config.listen, self.config.security)
        await server.start()
        for name in SERVICE_NAMES + [""]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        return port

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking calls, end the open streams, let running calls finish for ``grace``
        seconds, close the loop once what gRPC still runs for the ended calls is done (and the
        handlers' open generators are closed), close the store."""
        if self._server is not None:
            self._loop.run(self._health.enter_graceful_shutdown())
            self.controller.end_streams()
            self._loop.run(self._stop_server(grace))
        self._executor.shutdown(wait=True)   # unary handlers and store calls still running
        self._loop.close()
        # Only now: the last grpc.aio object let go shuts gRPC's event poller down, which must
        # not happen on another thread while the loop runs (the loop would read a closed socket).
        self._server = None
        if self._metrics_server is not None:
            self._metrics_server[0].shutdown()
        self.controller.close()

    async def _stop_server(self, grace: float | None) -> None:
        """(On the loop.) Stop the server (calls still running after ``grace`` are cancelled),
        then wait for the stream handlers' clean-ups (they hand the store a last call)."""
        await self._server.stop(grace)
        if not await self._streams.closed(timeout=STREAM_CLEANUP_SECONDS):
            log.warning("controller: stream handlers still running %g s after shutdown",
                        STREAM_CLEANUP_SECONDS)

    def wait(self) -> None:
        if self._server is not None:
            self._loop.run(self._server.wait_for_termination())


def _redact(url: str) -> str:
    """Hide a password in a database URL for logs."""
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)
