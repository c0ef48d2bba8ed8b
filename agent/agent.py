"""The node agent: workers register, counters become LoadReports, rollouts are relayed.

In-process use (the demo starts one per simulated node)::

    agent = Agent(AgentConfig(controller="127.0.0.1:50051", node="node-0"))
    address = agent.start()          # workers register at this AgentService address
    ...
    agent.stop()                     # final pull, flush (bounded), close

Sidecars: ``Agent(config, sidecars=[factory, ...])``; each factory gets the started agent's
``SidecarContext`` and returns an object with ``start()`` and ``stop()`` (started after the
agent's own loops, stopped before them). The engines' plan-file writer and load sources use it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expertplane.agent.buffer import ReportBuffer
from expertplane.agent.collector import Collector
from expertplane.agent.config import AgentConfig
from expertplane.agent.engine_load import EngineLoadSink
from expertplane.agent.gpu import GpuSampler
from expertplane.agent.metrics import AgentMetrics
from expertplane.agent.registry import WorkerRegistry
from expertplane.agent.reports import new_agent_epoch
from expertplane.agent.rollout import RolloutRelay
from expertplane.agent.service import AgentServicer
from expertplane.agent.uplink import LoadUplink
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import bind_local, make_channel, make_server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SidecarContext:
    """What a sidecar may use: the controller ``channel``, ``engine_load`` (queues an
    ``EngineLoadReport`` as the agent's AgentService.ReportEngineLoad does; True when queued),
    and ``registry``, the agent's Prometheus registry (served on ``--metrics``)."""

    config: AgentConfig
    channel: grpc.Channel
    engine_load: Callable[[object], bool]
    registry: CollectorRegistry


class Sidecar(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class Agent:
    """One node agent. ``start()`` returns the AgentService address; ``stop()`` shuts down.

    ``epoch`` is this start's ``agent_epoch`` (sequences restart with it). ``metrics`` holds its
    Prometheus metrics; ``registry`` the registered workers; ``buffer`` the unacknowledged reports.
    """

    def __init__(self, config: AgentConfig,
                 sidecars: Sequence[Callable[[SidecarContext], Sidecar]] = ()):
        self.config = config
        self._sidecar_factories = tuple(sidecars)
        self.sidecars: list[Sidecar] = []
        self.epoch = new_agent_epoch()
        self.metrics = AgentMetrics(config.node)
        self.buffer = ReportBuffer(config.buffer)
        self._relay: RolloutRelay | None = None
        self.registry = WorkerRegistry(config.node, on_joined=self._joined, on_lost=self._lost,
                                       security=config.local_security)
        self._gpu: GpuSampler | None = None
        self._channel = None
        self._server = None
        self._collector: Collector | None = None
        self._uplink: LoadUplink | None = None
        self._engine_sink: EngineLoadSink | None = None
        self.address: str | None = None
        self.metrics_port: int | None = None
        self._lock = threading.Lock()
        self._started = False

    # --------------------------------------------------------------- lifecycle
    def start(self) -> str:
        """Serve AgentService, connect to the controller, start pulling; returns the address."""
        with self._lock:
            if self._started:
                raise RuntimeError("agent already started")
            self._started = True
        cfg = self.config
        self._server, health_servicer = self._serve_agent_service()
        try:
            if cfg.metrics:
                self.metrics_port = self.metrics.serve(cfg.metrics)
        except BaseException:
            self._server.stop(0)
            with self._lock:
                self._started = False
            raise
        self._gpu = GpuSampler()
        self._channel = make_channel(cfg.controller, cfg.security)
        self._relay = RolloutRelay(cfg, self._channel, self.registry, self.metrics)
        self._uplink = LoadUplink(cfg, self._channel, self.buffer, self.metrics)
        self._collector = Collector(cfg, self.registry, self.buffer, self._gpu, self.metrics, self.epoch)
        self._engine_sink = EngineLoadSink(cfg.node, self.epoch, self._collector.enqueue, self.metrics)
        self._server.start()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self._relay.start()
        self._uplink.start()
        self._collector.start()
        context = SidecarContext(cfg, self._channel, self._engine_load, self.metrics.registry)
        for factory in self._sidecar_factories:
            sidecar = factory(context)
            sidecar.start()
            self.sidecars.append(sidecar)
        log.info("agent %s (epoch %d) serving workers at %s, reporting to %s every %.3gs",
                 cfg.node, self.epoch, self.address, cfg.controller, cfg.interval)
        return self.address

    def _serve_agent_service(self):
        """Build and bind (not start) the AgentService server; sets ``self.address``."""
        cfg = self.config
        server = make_server(cfg.local_security, max_workers=8)
        pb_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(self.registry, cfg.interval,
                          on_registered=lambda: self.metrics.workers.set(len(self.registry)),
                          engine_load=self._engine_load),
            server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        try:
            self.address = bind_local(server, cfg.listen, cfg.local_security)
        except BaseException:
            with self._lock:
                self._started = False
            raise
        return server, health_servicer

    def stop(self, flush_timeout: float | None = None) -> bool:
        """Graceful shutdown: stop registrations and pulls, pull every worker once more, wait up to
        ``flush_timeout`` (default ``config.flush_timeout``) seconds for the controller to ACK
        what is buffered, then close. Returns True when everything held was acknowledged."""
        with self._lock:
            if not self._started:
                return True
            self._started = False
        timeout = self.config.flush_timeout if flush_timeout is None else flush_timeout
        stopped = self._server.stop(grace=1.0)
        for sidecar in reversed(self.sidecars):
            sidecar.stop()
        self._collector.stop(final_pull=True)
        flushed = self.buffer.wait_empty(timeout)
        if not flushed:
            log.warning("agent %s stopping with %d unacknowledged reports", self.config.node,
                        len(self.buffer))
        self._uplink.stop()
        self._relay.stop()
        stopped.wait(2.0)
        self.registry.close()
        self._channel.close()
        self._gpu.close()
        self.metrics.close()
        return flushed

    def __enter__(self) -> "Agent":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --------------------------------------------------------------- introspection
    @property
    def registered(self) -> threading.Event:
        """Set while the controller has registered this agent (see ``wait_registered``)."""
        if self._relay is None:
            raise RuntimeError("agent not started")
        return self._relay.registered

    def wait_registered(self, timeout: float | None = None) -> None:
        """Block until the controller has registered this agent and the workers its HELLO listed
        (answered the HELLO of the current rollout stream): a rollout started from then on finds
        them. ``TimeoutError`` saying why not after ``timeout`` seconds (default
        ``config.hello_timeout``)."""
        if self._relay is None:
            raise RuntimeError("agent not started")
        self._relay.wait_registered(self.config.hello_timeout if timeout is None else timeout)

    @property
    def load_stream_connected(self) -> bool:
        """True while the load stream to the controller is open and has been acknowledged."""
        return self._uplink is not None and self._uplink.connected.is_set()

    def _engine_load(self, msg) -> bool:
        """AgentService.ReportEngineLoad: an engine's logical load window (the sink exists before
        the server starts serving)."""
        return self._engine_sink.accept(msg)

    # --------------------------------------------------------------- registry callbacks
    def _joined(self, info) -> None:
        if self._relay is not None:
            self._relay.worker_joined(info)

    def _lost(self, info, reason: str) -> None:
        if self._relay is not None:
            self._relay.worker_lost(info, reason)
