"""gRPC servicers: translate messages to ``Controller`` calls and errors to status codes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

import grpc
import numpy as np

from expertplane.controller.convert import (plan_message, plan_summary, rollout_message,
                                            timestamp)
from expertplane.controller.core import Controller, PlacementView
from expertplane.controller.sessions import AgentSession
from expertplane.controller.spec import restore_from_proto, spec_from_proto, spec_to_proto
from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.status import status_of
from expertplane.rpc.tensors import double_tensor, to_numpy

log = logging.getLogger(__name__)
T = TypeVar("T")

def unary(method):
    """Answer a unary handler's exceptions with their status code (``rpc.status.status_of``)."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except grpc.aio.AbortError:          # the handler aborted with its own status
            raise
        except Exception as exc:
            context.abort(*status_of(exc, method.__name__))
    return wrapper


def streaming(method):
    """Same as ``unary`` for async generator handlers (response streams on the server's loop)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for response in method(self, request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await context.abort(*status_of(exc, method.__name__))
    return wrapper


class Streams:
    """What the stream handlers (coroutines on the server's loop) share: ``call`` runs a blocking
    controller/store call on the server's ``executor``; ``closed`` waits until every open
    handler has finished (its clean-up included)."""

    def __init__(self, executor: Executor):
        self._executor = executor
        self._open: set[asyncio.Task] = set()

    async def call(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        """Count the calling handler's task as open for the ``with`` block."""
        task = asyncio.current_task()
        self._open.add(task)
        try:
            yield
        finally:
            self._open.discard(task)

    async def closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the open handlers' tasks; False if some still run."""
        if self._open:
            await asyncio.wait(set(self._open), timeout=timeout)
        return not self._open


class _Wakeup:
    """Wakes a coroutine of the loop it was created on from any thread (call it)."""

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def __call__(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the loop is closed (server stopped): nobody is left to wake
            pass

    async def wait(self) -> None:
        """Return once woken since the previous ``wait`` returned."""
        await self._event.wait()
        self._event.clear()


async def _next(q: queue.Queue, wakeup: _Wakeup):
    """The next item of ``q``, a queue fed by other threads that call ``wakeup`` after each put."""
    while True:
        try:
            return q.get_nowait()
        except queue.Empty:
            await wakeup.wait()


def _tensor(msg, field: str, **kw) -> np.ndarray | None:
    """An optional tensor field: None when empty."""
    return to_numpy(msg, field, **kw) if len(msg.shape) else None


def placement_state(view: PlacementView) -> pb.PlacementState:
    sp = view.stored
    return pb.PlacementState(spec=spec_to_proto(sp.spec), plan_version=sp.plan_version,
                             observed_balance=view.observed_balance,
                             predicted_balance=view.predicted_balance,
                             last_rebalance=timestamp(sp.last_rebalance),
                             rollout_state=view.rollout_state,
                             latest_version=view.latest_version)


class LoadServicer(pb_grpc.LoadServiceServicer):
    def __init__(self, controller: Controller):
        self._c = controller

    async def ReportLoad(self, request_iterator, context):
        """Every report is answered in order (a coroutine on the server's loop: this is the hot
        path). A report holds a place in the controller's ingest gate until its ack has been
        sent (the generator resumes after the write)."""
        c, gate = self._c, self._c.gate
        async for report in request_iterator:
            if not gate.enter():
                yield _ack(report, c.shed(report))
                continue
            try:
                yield _ack(report, c.ingest(report))
            finally:
                gate.leave()


def _ack(report: pb.LoadReport, res) -> pb.LoadAck:
    return pb.LoadAck(node=report.node, worker_rank=report.worker_rank, sequence=report.sequence,
                      status=res.status, message=res.message)


class PlanServicer(pb_grpc.PlanServiceServicer):
    def __init__(self, controller: Controller, streams: Streams):
        self._c = controller
        self._streams = streams

    @unary
    def GetPlan(self, request, context):
        if not request.placement:
            raise FieldError("placement", "is required")
        if request.in_force:
            if request.version:
                raise FieldError("in_force", "give either version or in_force, not both")
            return plan_message(self._c.plan_in_force(request.placement))
        return plan_message(self._c.get_plan(request.placement, request.version))

    @unary
    def ListPlans(self, request, context):
        plans, token = self._c.list_plans(request.placement, request.page_size, request.page_token)
        return pb.ListPlansResponse(plans=[plan_summary(p) for p in plans], next_page_token=token)

    @streaming
    async def WatchPlans(self, request, context):
        """The stored plans after ``after_version``, then new ones as they are stored, until the
        client cancels or the controller ends the stream (shutdown)."""
        wakeup = _Wakeup()
        with self._streams.opened():
            watch, backlog = await self._streams.call(self._c.watch, request.placement,
                                                      request.after_version, wakeup)
            last: dict[str, int] = {}
            try:
                for plan in backlog:
                    last[plan.placement] = plan.version
                    yield plan_summary(plan)
                while not watch.overflowed:
                    plan = await _next(watch.queue, wakeup)
                    if plan is None:
                        return
                    if plan.version > max(last.get(plan.placement, 0), request.after_version):
                        last[plan.placement] = plan.version
                        yield plan_summary(plan)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    "watch fell too far behind; reconnect with after_version")
            finally:
                self._c.unwatch(watch)

    @unary
    def ListPlacements(self, request, context):
        return pb.ListPlacementsResponse(
            placements=[placement_state(v) for v in self._c.placement_views()])

    @unary
    def GetLoad(self, request, context):
        view, bias = self._c.load_window(request.placement)
        msg = pb.LoadWindow(placement=request.placement, load=double_tensor(view.load),
                            reports=view.reports, as_of=timestamp(view.as_of),
                            gpu_load=double_tensor(view.gpu_load))
        if bias is not None:
            msg.router_bias.CopyFrom(bias.bias)
        totals = self._c.totals(request.placement)
        msg.steps, msg.failed_steps = totals.steps, totals.failed_steps
        if totals.dropped is not None:
            msg.dropped_tokens.CopyFrom(double_tensor(totals.dropped))
        msg.gpus.extend(totals.gpus[rank] for rank in sorted(totals.gpus))
        return msg

    @unary
    def GetBiasHistory(self, request, context):
        self._c.placement(request.placement)
        return pb.BiasHistory(placement=request.placement, points=[
            pb.BiasPoint(at=timestamp(p.at), bias=double_tensor(p.bias),
                         max_over_mean=p.max_over_mean.tolist(), sequence=p.sequence)
            for p in self._c.router.history(request.placement)])

    @unary
    def ApplyPlacement(self, request, context):
        spec = spec_from_proto(request)
        if request.initial_load_file:
            if request.HasField("initial_load"):
                raise FieldError("initial_load_file", "give initial_load or initial_load_file, "
                                                      "not both")
            spec = self._c.initial_load_file(spec, request.initial_load_file)
        return placement_state(self._c.apply_placement(spec, restore_from_proto(request)))

    @unary
    def DeletePlacement(self, request, context):
        if not request.placement:
            raise FieldError("placement", "is required")
        return pb.DeletePlacementResponse(deleted=self._c.delete_placement(request.placement))

    @unary
    def ListRollouts(self, request, context):
        if request.placement:
            self._c.placement(request.placement)
        recs = self._c.store.list_rollouts(request.placement, request.limit or 50)
        return pb.ListRolloutsResponse(rollouts=[rollout_message(r) for r in recs])


class PlanningServicer(pb_grpc.PlanningServiceServicer):
    def __init__(self, controller: Controller):
        self._c = controller

    @unary
    def ComputePlan(self, request, context):
        spec = spec_from_proto(request.spec, "spec.") if request.HasField("spec") else None
        if request.placement and spec is not None:
            raise FieldError("spec", "give either placement or spec, not both")
        plan = self._c.compute_plan(request.placement, spec,
                                    _tensor(request.load, "load", ndim=2),
                                    _tensor(request.previous_phy2log, "previous_phy2log", ndim=2),
                                    store=request.store or request.rollout,
                                    rollout=request.rollout)
        return plan_message(plan)

    @unary
    def ComputePipeline(self, request, context):
        from expertplane.controller.pipeline import compute_partition
        return compute_partition(request)

    @unary
    def TriggerRebalance(self, request, context):
        if request.version:
            if request.propose or request.dry_run:
                raise FieldError("version", "rolls out a stored plan: give it without propose "
                                            "or dry_run")
            out = self._c.roll_out_version(request.placement, request.version)
        else:
            out = self._c.rebalance(request.placement, manual=True, force=request.force,
                                    dry_run=request.dry_run, propose=request.propose)
        d = out.decision
        return pb.RebalanceDecision(
            placement=request.placement, rebalance=d.rebalance, reason=d.reason,
            in_force_balance_mean=d.current_balance, predicted_balance=d.predicted_balance,
            gain=d.gain,
            slots_moved=d.slots_moved, bytes_moved=d.bytes_moved,
            new_version=out.plan.version if out.plan else 0)


def serialize_command(cmd: pb.RolloutCommand | bytes) -> bytes:
    """Response serializer of Connect: commands fanned out to many agents arrive serialized."""
    return cmd if isinstance(cmd, bytes) else cmd.SerializeToString()


def add_rollout_servicer(servicer: "RolloutServicer", server: grpc.Server) -> None:
    """Register RolloutService with ``serialize_command`` (the generated helper would
    re-serialize a multi-megabyte prepare once per agent)."""
    handler = grpc.method_handlers_generic_handler("expertplane.v1.RolloutService", {
        "Connect": grpc.stream_stream_rpc_method_handler(
            servicer.Connect, request_deserializer=pb.RolloutEvent.FromString,
            response_serializer=serialize_command)})
    server.add_generic_rpc_handlers((handler,))


class RolloutServicer(pb_grpc.RolloutServiceServicer):
    """One Connect stream per agent, on the server's loop: a reader task feeds the agent's events
    to the coordinator (on the executor, in order) while the handler streams its command queue."""

    def __init__(self, controller: Controller, streams: Streams):
        self._c = controller
        self._streams = streams

    async def Connect(self, request_iterator, context):
        """Until the agent's events end (its session closes), the client cancels, or the
        controller closes the session (shutdown); the agent's workers are then lost."""
        coord, call = self._c.rollouts, self._streams.call
        wakeup = _Wakeup()
        with self._streams.opened():
            session = await call(coord.connect, wakeup)
            self._c.metrics.agents.inc()
            reader = asyncio.create_task(self._read(request_iterator, session))
            try:
                while not session.closed:
                    cmd = await _next(session.outbox, wakeup)
                    if cmd is None:
                        return
                    yield cmd
            finally:
                reader.cancel()
                self._c.metrics.agents.dec()
                await asyncio.shield(call(coord.disconnect, session))

    async def _read(self, request_iterator, session: AgentSession) -> None:
        """Hand each event of the agent to the coordinator; close the session when they end."""
        try:
            async for event in request_iterator:
                await self._streams.call(self._c.rollouts.handle, session, event)
        except grpc.RpcError:
            pass
        except Exception:
            log.exception("agent %s: bad event stream", session.node)
        finally:
            session.close()
