"""AgentService: where the node's workers register (thin servicer over ``WorkerRegistry``) and
engines send their load windows per logical expert (``EngineLoadSink``)."""

from __future__ import annotations

import grpc

from expertplane.agent.registry import WorkerRegistry
from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.status import status_of


class AgentServicer(pb_grpc.AgentServiceServicer):
    """Register: validate the WorkerInfo and add the worker; answers the pull interval.
    ReportEngineLoad: hand the window to ``engine_load`` (``EngineLoadSink.accept``)."""

    def __init__(self, registry: WorkerRegistry, interval: float, on_registered=None,
                 engine_load=None):
        self._registry = registry
        self._interval = interval
        self._on_registered = on_registered
        self._engine_load = engine_load

    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        if not request.HasField("worker"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "worker: required")
        try:
            self._registry.register(request.worker)
        except FieldError as exc:
            context.abort(*status_of(exc))
        if self._on_registered is not None:
            self._on_registered()
        return pb.RegisterResponse(node=self._registry.node, pull_interval_seconds=self._interval)

    def ReportEngineLoad(self, request: pb.EngineLoadReport, context) -> pb.EngineLoadAck:
        if self._engine_load is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "agent is not reporting yet")
        try:
            queued = self._engine_load(request)
        except FieldError as exc:
            context.abort(*status_of(exc))
        return pb.EngineLoadAck(queued=queued)
