"""Relay rollout commands from the controller (RolloutService.Connect) to local workers and back."""

from __future__ import annotations

import logging
import time
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import grpc

from expertplane.agent.config import AgentConfig
from expertplane.agent.metrics import AgentMetrics
from expertplane.agent.reconnect import StreamFailed, keep_open
from expertplane.agent.registry import WorkerHandle, WorkerRegistry
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

OUTBOX_LIMIT = 4096
PROTOCOL = pb.ROLLOUT_PROTOCOL_BATCHED      # the newest rollout protocol this agent speaks

# command -> (WorkerService method, deadline field of config.deadlines, event kind on success)
_COMMANDS = {
    "prepare": ("Prepare", "prepare", pb.RolloutEvent.PREPARED),
    "commit": ("Commit", "commit", pb.RolloutEvent.COMMITTED),
    "abort": ("Abort", "abort", pb.RolloutEvent.ABORTED),
    "bias": ("SetBias", "bias", pb.RolloutEvent.BIAS_APPLIED),
}


def command_placement(cmd: pb.RolloutCommand) -> str:
    """The placement a command is for: ``cmd.placement``, else the plan's or bias's own."""
    if cmd.placement:
        return cmd.placement
    which = cmd.WhichOneof("command")
    if which == "prepare":
        return cmd.prepare.summary.placement
    if which == "bias":
        return cmd.bias.placement
    return ""


def command_version(cmd: pb.RolloutCommand) -> int:
    """The plan version a command is about (the bias sequence for ``bias``)."""
    which = cmd.WhichOneof("command")
    if which == "prepare":
        return int(cmd.prepare.summary.version)
    if which == "bias":
        return int(cmd.bias.sequence)
    return int(getattr(cmd, which)) if which else 0


class RolloutRelay:
    """Keeps RolloutService.Connect open and forwards commands to local workers.

    On every (re)connect it first sends HELLO listing every registered worker and announcing
    ``PROTOCOL``, then queued events (WORKER_JOINED / WORKER_LOST and answers; at most
    ``OUTBOX_LIMIT`` are held while disconnected, oldest dropped). The controller answers the
    HELLO (``hello``) once it has registered them: ``registered`` is set until the stream ends;
    without that answer within ``config.hello_timeout`` seconds an error is logged (the stream
    stays open: a controller older than ``PROTOCOL`` never answers). Each command goes to every
    local worker of its placement (only those in ``ranks`` when it names some) in parallel, with
    the command's deadline; each worker's outcome is ONE event: PREPARED / COMMITTED / ABORTED, or
    FAILED with a message (a SetBias success is answered BIAS_APPLIED with ``version`` = the bias
    sequence). A worker that is UNAVAILABLE is also dropped (WORKER_LOST).
    """

    def __init__(self, config: AgentConfig, channel: grpc.Channel, registry: WorkerRegistry,
                 metrics: AgentMetrics):
        self._config = config
        self._stub = pb_grpc.RolloutServiceStub(channel)
        self._registry = registry
        self._metrics = metrics
        self._outbox: deque[pb.RolloutEvent] = deque(maxlen=OUTBOX_LIMIT)
        self._cond = threading.Condition()
        self._stream_id = 0
        self._stopping = threading.Event()
        self._call = None
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="agent-rollout")
        self._opened = 0
        self._thread: threading.Thread | None = None
        self.registered = threading.Event()
        self._stream_state = "not opened yet"

    # ------------------------------------------------------------------ events
    def send(self, event: pb.RolloutEvent) -> None:
        """Queue ``event`` for the controller (sent now if connected, else after the next HELLO)."""
        event.node = self._config.node
        with self._cond:
            self._outbox.append(event)
            self._cond.notify_all()

    def worker_joined(self, info: pb.WorkerInfo) -> None:
        self.send(pb.RolloutEvent(kind=pb.RolloutEvent.WORKER_JOINED, placement=info.placement,
                                  version=info.plan_version, workers=[info]))

    def worker_lost(self, info: pb.WorkerInfo, reason: str) -> None:
        self.send(pb.RolloutEvent(kind=pb.RolloutEvent.WORKER_LOST, placement=info.placement,
                                  version=info.plan_version, workers=[info], message=reason))

    # ------------------------------------------------------------------ stream
    def start(self) -> None:
        self._thread = threading.Thread(target=keep_open, name="agent-rollout", daemon=True,
                                        args=("rollout", self._stream_once, self._stopping),
                                        kwargs={"initial": self._config.backoff_initial,
                                                "maximum": self._config.backoff_max})
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._stream_id += 1
            self._cond.notify_all()
            if self._call is not None:
                self._call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wait_registered(self, timeout: float) -> None:
        """Block until the controller has acknowledged this stream's HELLO; ``TimeoutError``
        saying why not after ``timeout`` seconds."""
        if not self.registered.wait(timeout):
            raise TimeoutError(
                f"the controller at {self._config.controller} has not registered node "
                f"{self._config.node} within {timeout:g} s: rollout stream {self._stream_state}; "
                f"rollouts to this node's workers may abort with 'ranks not connected' until it does")

    def _stream_once(self) -> None:
        with self._cond:
            self._stream_id += 1
            stream_id = self._stream_id
            self.registered.clear()
            self._stream_state = "connecting"
        if self._opened:
            self._metrics.reconnects.labels(stream="rollout").inc()
        self._opened += 1
        call = self._stub.Connect(self._events(stream_id))
        with self._cond:
            self._call = call
        if self._stopping.is_set():
            call.cancel()
        commands, opened_at = 0, time.monotonic()
        try:
            for cmd in call:
                commands += 1
                self._dispatch(cmd)
            error = "controller closed the stream"
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
        finally:
            with self._cond:
                self._stream_id += 1
                self._call = None
                self.registered.clear()
                self._cond.notify_all()
        self._stream_state = f"closed ({error})"
        if self._stopping.is_set():
            return
        if not commands and time.monotonic() - opened_at < self._config.backoff_max:
            raise StreamFailed(error)
        log.warning("rollout stream ended after %d commands (%s); re-opening", commands, error)

    def _events(self, stream_id: int):
        """The request stream of one Connect call: HELLO, then queued events until it ends."""
        self._stream_state = "open, HELLO not answered (a controller older than rollout " \
                             "protocol BATCHED never answers it)"
        yield pb.RolloutEvent(kind=pb.RolloutEvent.HELLO, node=self._config.node,
                              workers=self._registry.infos(), protocol=PROTOCOL)
        overdue = time.monotonic() + self._config.hello_timeout
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._outbox or self._stream_id != stream_id, timeout=1.0)
                if self._stream_id != stream_id or self._stopping.is_set():
                    return
                if overdue and time.monotonic() > overdue and not self.registered.is_set():
                    overdue = 0.0
                    log.error("controller %s has not acknowledged the HELLO of node %s within "
                              "%g s; rollouts to its workers may abort with 'ranks not "
                              "connected'", self._config.controller, self._config.node,
                              self._config.hello_timeout)
                if not self._outbox:
                    continue
                event = self._outbox.popleft()
            yield event

    # ------------------------------------------------------------------ commands
    def _dispatch(self, cmd: pb.RolloutCommand) -> None:
        which = cmd.WhichOneof("command")
        placement = command_placement(cmd)
        if which is None:
            log.warning("rollout %s: command without a body ignored", cmd.rollout_id)
            return
        if which == "hello":
            self._stream_state = "open, registered"
            self.registered.set()
            log.info("controller %s registered node %s (%d workers, rollout protocol %d)",
                     self._config.controller, self._config.node, len(cmd.hello.workers),
                     cmd.hello.protocol)
            return
        workers = self._registry.handles(placement)
        if cmd.ranks:
            named = set(cmd.ranks)
            workers = [h for h in workers if h.info.rank in named]
        if not workers:
            log.warning("rollout %s: %s for placement %r but no local worker serves it%s",
                        cmd.rollout_id, which, placement,
                        f" (ranks {list(cmd.ranks)})" if cmd.ranks else "")
            return
        log.info("rollout %s: %s v%d for %r -> %d local workers", cmd.rollout_id, which,
                 command_version(cmd), placement, len(workers))
        for handle in workers:
            self._pool.submit(self._relay, which, cmd, placement, handle)

    def _relay(self, which: str, cmd: pb.RolloutCommand, placement: str, handle: WorkerHandle) -> None:
        method, deadline_name, ok_kind = _COMMANDS[which]
        version = command_version(cmd)
        if which == "prepare":
            request = pb.PrepareRequest(rollout_id=cmd.rollout_id, plan=cmd.prepare)
        elif which == "bias":
            request = cmd.bias
        else:
            request = pb.VersionRequest(rollout_id=cmd.rollout_id, placement=placement, version=version)
        event = pb.RolloutEvent(rollout_id=cmd.rollout_id, placement=placement, version=version)
        try:
            ack = getattr(handle.stub, method)(request, timeout=getattr(self._config.deadlines,
                                                                        deadline_name))
        except grpc.RpcError as exc:
            event.kind = pb.RolloutEvent.FAILED
            event.message = f"rank {handle.info.rank}: {method}: {exc.code().name}: {exc.details()}"
            event.workers.append(self._registry.update(handle))
            self._metrics.rollout_calls.labels(command=which, outcome=exc.code().name).inc()
            self.send(event)
            if exc.code() == grpc.StatusCode.UNAVAILABLE and self._registry.lose(handle, event.message):
                self._metrics.workers_lost.inc()
                self._metrics.workers.set(len(self._registry))
            return
        if ack.HasField("worker"):
            info = self._registry.update(handle, plan_version=ack.worker.plan_version or None,
                                         prepared_version=ack.worker.prepared_version)
        else:
            info = self._registry.update(handle)
        event.workers.append(info)
        event.kind = ok_kind if ack.ok else pb.RolloutEvent.FAILED
        event.message = ack.message if ack.ok else f"rank {handle.info.rank}: {method}: {ack.message}"
        self._metrics.rollout_calls.labels(command=which, outcome="ok" if ack.ok else "failed").inc()
        self.send(event)
