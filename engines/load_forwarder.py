"""Send an engine's load windows per logical expert to the node's agent, off the engine's path.

``LoadForwarder.offer`` never blocks and never raises: it puts the window in a bounded queue
(a full queue drops the new window and counts it) and one daemon thread sends each window as
``AgentService.ReportEngineLoad`` with a short deadline. When the agent is unreachable the window
is dropped and counted (``dropped_unreachable``); the next window is tried again. A window is the
placement's whole load over the engine's window, so a lost one loses a sample, not a count that
would have to be made up later.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np

from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.security import LOCAL_TOKEN_ENV, SecurityConfig
from expertplane.rpc.tensors import double_tensor

log = logging.getLogger("vllm.plugins.expertplane")

QUEUE_WINDOWS = 4          # windows waiting to be sent; more are dropped (counted)
DEADLINE_SECONDS = 2.0     # one ReportEngineLoad call
_STOP = object()


@dataclass
class ForwarderCounts:
    """Windows offered, sent (the agent answered), and dropped (queue full / agent unreachable
    or refusing the window)."""

    offered: int = 0
    sent: int = 0
    dropped_full: int = 0
    dropped_unreachable: int = 0


class LoadForwarder:
    """Bounded background sender of ``[L, E]`` windows to the agent at ``address``
    (``unix:/path`` or ``host:port``) for ``placement``; ``engine`` names the sender in logs.
    The node-local bearer token comes from ``EXPERTPLANE_LOCAL_TOKEN`` when set."""

    def __init__(self, address: str, placement: str, engine: str = "vllm"):
        self.address = address
        self.placement = placement
        self.engine = engine
        self.counts = ForwarderCounts()
        self._epoch = secrets.randbits(63) or 1
        self._sequence = 0
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_WINDOWS)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def offer(self, load: np.ndarray) -> bool:
        """Queue ``load`` [L, E] (tokens per logical expert) for sending; False when dropped
        because the queue is full. Never blocks."""
        with self._lock:
            self.counts.offered += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="expertplane-load",
                                                daemon=True)
                self._thread.start()
            self._sequence += 1
            sequence = self._sequence
        try:
            self._queue.put_nowait((sequence, time.time_ns(), np.asarray(load, np.float64)))
            return True
        except queue.Full:
            with self._lock:
                self.counts.dropped_full += 1
                dropped = self.counts.dropped_full
            if dropped == 1 or dropped % 100 == 0:
                log.warning("expertplane: %d load windows dropped: the sender to the agent at %s "
                            "is behind", dropped, self.address)
            return False

    def _run(self) -> None:
        token = os.environ.get(LOCAL_TOKEN_ENV) or None
        channel = make_channel(self.address, SecurityConfig(token=token))
        stub = pb_grpc.AgentServiceStub(channel)
        try:
            while not self._stopping.is_set():
                try:
                    item = self._queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is _STOP:
                    return
                self._send(stub, *item)
        finally:
            channel.close()

    def _send(self, stub, sequence: int, end_ns: int, load: np.ndarray) -> None:
        msg = pb.EngineLoadReport(placement=self.placement, engine=self.engine,
                                  expert_load=double_tensor(load), engine_epoch=self._epoch,
                                  sequence=sequence)
        msg.window_end.FromNanoseconds(end_ns)
        try:
            stub.ReportEngineLoad(msg, timeout=DEADLINE_SECONDS, wait_for_ready=False)
        except grpc.RpcError as exc:
            with self._lock:
                self.counts.dropped_unreachable += 1
                dropped = self.counts.dropped_unreachable
            if dropped == 1 or dropped % 100 == 0:
                log.warning("expertplane: load window not delivered to the agent at %s (%s: %s); "
                            "%d dropped so far", self.address,
                            exc.code().name if hasattr(exc, "code") else "error",
                            exc.details() if hasattr(exc, "details") else exc, dropped)
            return
        with self._lock:
            self.counts.sent += 1

    def close(self, timeout: float = 5.0) -> None:
        """Stop the sender: windows queued before are sent when the agent answers within
        ``timeout`` seconds in all; a send still running then ends on its own deadline."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            self._stopping.set()       # the sender is stuck on an unreachable agent
        thread.join(timeout)
        self._stopping.set()
