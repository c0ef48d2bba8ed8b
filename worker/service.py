"""The worker's node-local gRPC face: ``WorkerService`` over a counter ledger and a
:class:`SwapCoordinator`.

The servicer never touches the model: it queues requests for the serving loop (plans,
biases) and reads what the loop publishes (counter windows, versions), so a slow or
failing RPC never stalls a step.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expertplane.errors import FieldError, NotFound
from expertplane.kernels.hotswap import SwapCoordinator, SwapError
from expertplane.kernels.moe import LayerPlacement, PlacementError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import bind_local, make_server
from expertplane.rpc.security import SecurityConfig
from expertplane.rpc.status import status_of
from expertplane.rpc.tensors import int64_tensor, to_numpy

__all__ = ["CounterLedger", "CounterWindow", "WorkerIdentity", "WorkerServicer",
           "placements_from_plan", "serve_worker_service"]

log = logging.getLogger(__name__)


@dataclass
class CounterWindow:
    """Tokens per local slot ``counts`` [L, S] counted under ``version`` between ``start``
    and ``end`` (ns since the epoch), over ``steps`` steps of which ``failed`` failed;
    ``dropped`` [L, S]: tokens dropped by the capacity (None when no step reported any);
    ``sequence``: its number once handed to an acknowledging puller (0 = none)."""

    version: int
    start: int
    end: int
    counts: np.ndarray
    steps: int = 0
    failed: int = 0
    dropped: np.ndarray | None = None
    sequence: int = 0


class CounterLedger:
    """Per-slot counts between pulls, split by plan version (thread-safe, bounded).

    The serving loop :meth:`add` s each step's counts under the version in force; a version
    change closes the open window. :meth:`pull` returns the oldest closed window, else closes
    and returns the open one, so counts never mix plan versions. At most ``max_windows``
    closed windows are kept; beyond that the oldest is dropped and counted in
    ``dropped_windows``.

    Pulls by an agent are acknowledged (at-least-once delivery): a window with steps handed out
    under a ``sequence`` stays :attr:`pending` until the same agent names (``epoch``, sequence)
    in a later pull; until then every pull of that agent gets the same window again (``resent``
    counts these). A window without steps holds nothing to lose: it gets no sequence.
    ``epoch`` is random per ledger (per worker process), so sequences of a restarted worker
    never pass for its predecessor's.

    A stopping worker waits in :meth:`wait_delivered` until every counted step has been pulled
    (and acknowledged, by a puller that acknowledges): one pull returns one window, and a plan
    version change since the last pull leaves two or more.
    """

    def __init__(self, num_layers: int, slots_per_rank: int, version: int,
                 max_windows: int = 16) -> None:
        self.shape = (num_layers, slots_per_rank)
        self._lock = threading.Lock()
        self._pulled = threading.Condition(self._lock)
        self._closed: deque[CounterWindow] = deque()
        self._max = max_windows
        self.dropped_windows = 0
        self.total_steps = 0
        self.total_failed = 0
        self.epoch = secrets.randbelow(2**63 - 1) + 1
        self.resent = 0
        self._sequence = 0
        self._pending: CounterWindow | None = None
        self._pending_agent = 0
        self._open = self._new(version, time.time_ns())

    def _new(self, version: int, start: int) -> CounterWindow:
        return CounterWindow(version, start, start, np.zeros(self.shape, dtype=np.int64))

    def add(self, version: int, counts: np.ndarray, failed: bool = False,
            dropped: np.ndarray | None = None) -> None:
        """Add one step's counts [L, S] (and capacity drops [L, S]) taken under ``version``."""
        now = time.time_ns()
        with self._lock:
            if version != self._open.version:
                self._close(now, version)
            w = self._open
            w.counts += counts
            if dropped is not None:
                w.dropped = dropped.astype(np.int64) if w.dropped is None else w.dropped + dropped
            w.steps += 1
            w.failed += int(failed)
            w.end = now
            self.total_steps += 1
            self.total_failed += int(failed)

    @property
    def pending(self) -> bool:
        """True while a window handed out is not acknowledged yet."""
        with self._lock:
            return self._pending is not None

    @property
    def undelivered_steps(self) -> int:
        """Steps whose counts no puller has received for sure: those of the closed windows, of
        the open window and of the window handed out but not acknowledged yet."""
        with self._lock:
            return self._undelivered()

    def _undelivered(self) -> int:
        return sum(w.steps for w in self._closed) + self._open.steps \
            + (self._pending.steps if self._pending is not None else 0)

    def wait_delivered(self, timeout: float) -> bool:
        """Wait until ``undelivered_steps`` is 0 (pulls of the remaining windows, and the
        acknowledgement of the last one handed out), at most ``timeout`` seconds; True if so."""
        with self._pulled:
            return self._pulled.wait_for(lambda: self._undelivered() == 0, timeout)

    def _close(self, now: int, version: int) -> None:
        self._open.end = now
        if len(self._closed) >= self._max:
            self._closed.popleft()
            self.dropped_windows += 1
        self._closed.append(self._open)
        self._open = self._new(version, now)

    def pull(self, agent_epoch: int = 0, ack: tuple[int, int] = (0, 0)) -> CounterWindow:
        """The window to answer a pull by ``agent_epoch`` that acknowledges ``ack`` =
        (epoch, sequence) of the last window it received.

        The pending window again if this agent has not acknowledged it; else (acknowledged, or a
        new agent: the previous one received it or lost it with its own reports) the oldest unread
        window, numbered with the next sequence and kept pending if it has steps. ``agent_epoch``
        0: a fresh window every time, nothing kept (sequence 0).
        """
        with self._lock:
            pending = self._pending
            if pending is not None and agent_epoch == self._pending_agent \
                    and ack != (self.epoch, pending.sequence):
                self.resent += 1
                log.info("counter window %d not acknowledged (its answer was lost?): sent again",
                         pending.sequence)
                return pending
            self._pending = None
            if not self._closed:
                self._close(time.time_ns(), self._open.version)
            window = self._closed.popleft()
            if agent_epoch and window.steps:
                self._sequence += 1
                window.sequence = self._sequence
                self._pending, self._pending_agent = window, agent_epoch
            self._pulled.notify_all()
            return window


@dataclass(frozen=True)
class WorkerIdentity:
    """Who this worker is (as registered with the agent)."""

    node: str
    rank: int
    world_size: int
    placement: str
    num_layers: int
    num_experts: int
    num_slots: int  # R physical slots per layer


def placements_from_plan(plan: pb.Plan, ident: WorkerIdentity) -> tuple[int, list[LayerPlacement]]:
    """(version, one LayerPlacement per layer) from a ``Plan`` message; raises ``FieldError``
    naming the field of the message, e.g. ``plan.log2phy[1][3]`` for expert 3 of layer 1."""
    version = int(plan.summary.version)
    if version < 1:
        raise FieldError("plan.summary.version", "must be >= 1")
    if plan.summary.placement and plan.summary.placement != ident.placement:
        raise FieldError("plan.summary.placement", f"this worker serves {ident.placement!r}, "
                                                   f"got {plan.summary.placement!r}")
    shape = (ident.num_layers, ident.num_slots)
    phy2log = to_numpy(plan.phy2log, "plan.phy2log", shape=shape)
    explicit = bool(len(plan.log2phy.shape))
    if explicit:
        log2phy = to_numpy(plan.log2phy, "plan.log2phy",
                           shape=(ident.num_layers, ident.num_experts, None))
        logcnt = to_numpy(plan.logcnt, "plan.logcnt", shape=(ident.num_layers, ident.num_experts))
    layers = []
    for l in range(shape[0]):
        try:
            layers.append(LayerPlacement(phy2log[l], log2phy[l], logcnt[l]) if explicit
                          else LayerPlacement.from_phy2log(phy2log[l], ident.num_experts))
        except PlacementError as exc:
            raise exc.at(_layer_field(exc.field, l)) from None
    return version, layers


def _layer_field(field: str, layer: int) -> str:
    """The ``Plan`` field of one layer's placement field: ``log2phy[3]`` of layer 1 is
    ``plan.log2phy[1][3]``."""
    name, bracket, rest = field.partition("[")
    return f"plan.{name}[{layer}]" + (bracket + rest if bracket else "")


def _answers_errors(method):
    """A handler whose exceptions are answered with their status code (``rpc.status.status_of``,
    as every servicer does): a ``FieldError`` (bad input, unknown placement) keeps its message,
    anything else is INTERNAL and logged with its traceback. Handlers raise, never abort."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            context.abort(*status_of(exc, method.__name__))
    return wrapper


def _deadline(context, limit: float) -> float:
    """Seconds this call may block: the client's deadline minus a margin, at most ``limit``."""
    remaining = context.time_remaining()
    return max(0.05, min(limit, remaining - 0.2 if remaining is not None else limit))


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    """WorkerService over ``coordinator`` (hot-swap) and ``ledger`` (counters).

    ``address()`` gives the endpoint to advertise; ``on_bias([L, E] array)`` receives router
    selection biases for the serving loop; ``on_pull()`` is called on every PullCounters (the
    agent's heartbeat); ``max_wait``: longest Prepare/Commit/Abort wait in seconds.
    """

    def __init__(self, ident: WorkerIdentity, coordinator: SwapCoordinator, ledger: CounterLedger,
                 *, address: Callable[[], str], on_bias: Callable[[np.ndarray], None],
                 on_pull: Callable[[], None] = lambda: None, max_wait: float = 120.0) -> None:
        self.ident, self.coord, self.ledger = ident, coordinator, ledger
        self._address, self._on_bias, self._on_pull = address, on_bias, on_pull
        self.max_wait = max_wait
        self._bias_sequence = 0
        self._bias_lock = threading.Lock()
        self.pulled = False  # PullCounters was called at least once

    def info(self) -> pb.WorkerInfo:
        return pb.WorkerInfo(node=self.ident.node, rank=self.ident.rank,
                             placement=self.ident.placement, plan_version=self.coord.version,
                             prepared_version=self.coord.prepared_version,
                             address=self._address(), world_size=self.ident.world_size)

    def _ack(self, ok: bool, message: str, started: float) -> pb.WorkerAck:
        return pb.WorkerAck(ok=ok, message=message, worker=self.info(),
                            seconds=time.monotonic() - started)

    def _check_placement(self, placement: str) -> None:
        if placement and placement != self.ident.placement:
            raise NotFound("placement", f"this worker serves {self.ident.placement!r}, "
                                        f"not {placement!r}")

    # -- RPCs

    @_answers_errors
    def PullCounters(self, request: pb.PullCountersRequest, context) -> pb.CounterSnapshot:
        self._on_pull()
        w = self.ledger.pull(request.agent_epoch, (request.ack_epoch, request.ack_sequence))
        self.pulled = True
        snap = pb.CounterSnapshot(rank=self.ident.rank, placement=self.ident.placement,
                                  plan_version=w.version, slot_counts=int64_tensor(w.counts),
                                  steps=w.steps, failed_steps=w.failed, epoch=self.ledger.epoch,
                                  sequence=w.sequence)
        if w.dropped is not None:
            snap.dropped_tokens.CopyFrom(int64_tensor(w.dropped))
        snap.window_start.FromNanoseconds(w.start)
        snap.window_end.FromNanoseconds(w.end)
        return snap

    @_answers_errors
    def Prepare(self, request: pb.PrepareRequest, context) -> pb.WorkerAck:
        started = time.monotonic()
        version, layers = placements_from_plan(request.plan, self.ident)
        try:
            stats = self.coord.prepare(version, layers, _deadline(context, self.max_wait))
        except (SwapError, TimeoutError) as exc:
            return self._ack(False, str(exc), started)
        if stats is None:
            return self._ack(True, f"version {version} already staged or in force", started)
        return self._ack(True, f"staged v{version}: {stats.layers_changed} layers, "
                               f"{stats.remote_fills} received ({stats.bytes_received} B), "
                               f"{stats.local_fills + stats.dup_fills} local copies, "
                               f"{stats.bytes_sent} B sent in {stats.seconds:.3f}s", started)

    @_answers_errors
    def Commit(self, request: pb.VersionRequest, context) -> pb.WorkerAck:
        started = time.monotonic()
        self._check_placement(request.placement)
        if request.version < 1:
            raise FieldError("version", "must be >= 1")
        try:
            self.coord.commit(request.version, _deadline(context, self.max_wait))
        except (SwapError, TimeoutError) as exc:
            return self._ack(False, str(exc), started)
        return self._ack(True, f"v{request.version} in force", started)

    @_answers_errors
    def Abort(self, request: pb.VersionRequest, context) -> pb.WorkerAck:
        started = time.monotonic()
        self._check_placement(request.placement)
        try:
            dropped = self.coord.abort(request.version, _deadline(context, self.max_wait))
        except (SwapError, TimeoutError) as exc:
            return self._ack(False, str(exc), started)
        return self._ack(True, f"v{request.version} " + ("dropped" if dropped else "was not staged"),
                         started)

    @_answers_errors
    def SetBias(self, request: pb.RouterBias, context) -> pb.WorkerAck:
        started = time.monotonic()
        self._check_placement(request.placement)
        bias = to_numpy(request.bias, "bias", shape=(self.ident.num_layers, self.ident.num_experts))
        if not np.isfinite(bias).all():
            raise FieldError("bias", "must be finite")
        with self._bias_lock:
            if request.sequence and request.sequence <= self._bias_sequence:
                return self._ack(True, f"bias sequence {request.sequence} already applied", started)
            self._bias_sequence = request.sequence
            self._on_bias(bias)
        return self._ack(True, f"bias {request.sequence} applied at the next step", started)

    @_answers_errors
    def Status(self, request, context) -> pb.WorkerInfo:
        return self.info()



def serve_worker_service(servicer: WorkerServicer, address: str,
                         security: SecurityConfig) -> tuple[grpc.Server, str]:
    """Start ``servicer`` and gRPC health checking (open without a token, for probes) on the
    node-local ``address`` (``unix:/path`` or ``host:port``, port 0 = any) with ``security``
    (TLS, mTLS when ``tls_ca`` is set, bearer token). Returns the server and the address to
    advertise to the agent."""
    server = make_server(security, max_workers=8)
    pb_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    advertised = bind_local(server, address, security)
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, advertised
