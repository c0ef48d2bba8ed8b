"""Simulated node agents: real RolloutService / LoadService clients that play GPU workers.

The load generator of ``expertplane bench controller``, also used by the controller tests, to
drive a controller over real gRPC without GPUs (not part of the controller). A
``SimulatedAgent`` keeps one ``RolloutService.Connect`` stream open, says HELLO with its workers
and its rollout ``protocol`` (``ROLLOUT_PROTOCOL_ORIGINAL`` plays an agent older than the HELLO
answer and batched commands), and answers every command with ONE event per worker it is for
(those in ``ranks``, else all), as a real agent does (see ``agent/rollout.py``). Behaviour per
worker can be scripted (fail or stall the prepare) to exercise aborts.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.tensors import int64_tensor

Event = pb.RolloutEvent


@dataclass
class SimWorker:
    """One simulated GPU worker: its versions and scripted behaviour."""

    rank: int
    plan_version: int = 0
    prepared_version: int = 0
    fail_prepare: bool = False
    stall_prepare: bool = False
    history: list[str] = field(default_factory=list)


class SimulatedAgent:
    """Agent of ``node`` serving ``ranks`` of ``placement`` over ``channel``."""

    def __init__(self, channel: grpc.Channel, node: str, placement: str, ranks, *,
                 plan_version: int = 0, metadata: tuple = (),
                 protocol: int = pb.ROLLOUT_PROTOCOL_BATCHED):
        self.node, self.placement, self.protocol = node, placement, protocol
        self.workers = {r: SimWorker(r, plan_version) for r in ranks}
        self._stub = pb_grpc.RolloutServiceStub(channel)
        self._metadata = metadata
        self._events: queue.Queue[pb.RolloutEvent | None] = queue.Queue()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._call = None
        self._thread: threading.Thread | None = None
        self.commands: list[pb.RolloutCommand] = []     # every command but the HELLO answer
        self.hello: pb.HelloAck | None = None            # the controller's answer to HELLO
        self.error: grpc.RpcError | None = None

    def info(self, w: SimWorker) -> pb.WorkerInfo:
        return pb.WorkerInfo(node=self.node, rank=w.rank, placement=self.placement,
                             plan_version=w.plan_version, prepared_version=w.prepared_version,
                             world_size=0)

    def start(self) -> "SimulatedAgent":
        """Open the stream and say HELLO."""
        self._events.put(Event(kind=Event.HELLO, node=self.node, protocol=self.protocol,
                               workers=[self.info(w) for w in self.workers.values()]))
        self._call = self._stub.Connect(self._requests(), metadata=self._metadata)
        self._thread = threading.Thread(target=self._serve, name=f"sim-{self.node}", daemon=True)
        self._thread.start()
        return self

    def _requests(self):
        while True:
            ev = self._events.get()
            if ev is None:
                return
            yield ev

    def _serve(self) -> None:
        try:
            for cmd in self._call:
                self._handle(cmd)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc

    def _handle(self, cmd: pb.RolloutCommand) -> None:
        which = cmd.WhichOneof("command")
        with self._lock:
            if which == "hello":
                self.hello = cmd.hello
                self._changed.notify_all()
                return
            self.commands.append(cmd)
            named = set(cmd.ranks) if self.protocol >= pb.ROLLOUT_PROTOCOL_BATCHED else set()
            for w in self.workers.values():
                if named and w.rank not in named:
                    continue
                ev = Event(node=self.node, rollout_id=cmd.rollout_id, placement=self.placement)
                if which == "prepare":
                    version = cmd.prepare.summary.version
                    w.history.append(f"prepare {version}")
                    if w.stall_prepare:
                        continue
                    if w.fail_prepare:
                        ev.kind, ev.message = Event.FAILED, "simulated prepare failure"
                    else:
                        w.prepared_version, ev.kind = version, Event.PREPARED
                elif which == "commit":
                    version = cmd.commit
                    w.history.append(f"commit {version}")
                    if w.prepared_version == version or w.plan_version == version:
                        w.plan_version, w.prepared_version, ev.kind = version, 0, Event.COMMITTED
                    else:
                        ev.kind, ev.message = Event.FAILED, f"version {version} is not staged"
                elif which == "abort":
                    version = cmd.abort
                    w.history.append(f"abort {version}")
                    if w.prepared_version == version:
                        w.prepared_version = 0
                    ev.kind = Event.ABORTED
                else:  # bias
                    version = cmd.bias.sequence
                    w.history.append(f"bias {version}")
                    ev.kind = Event.COMMITTED
                ev.version = version
                ev.workers.append(self.info(w))
                self._events.put(ev)
            self._changed.notify_all()

    def send(self, kind: int, ranks, message: str = "") -> None:
        """Send a WORKER_LOST / WORKER_JOINED event for ``ranks``."""
        with self._lock:
            infos = [self.info(self.workers[r]) for r in ranks]
        self._events.put(Event(kind=kind, node=self.node, workers=infos, message=message))

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        """Wait until ``predicate(self)`` holds (checked after every command)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    def versions(self) -> dict[int, int]:
        with self._lock:
            return {r: w.plan_version for r, w in self.workers.items()}

    def stop(self) -> None:
        self._events.put(None)
        if self._call is not None:
            self._call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)


def load_report(node: str, rank: int, placement: str, plan_version: int, sequence: int,
                counts: np.ndarray, *, epoch: int = 1, window_end: float | None = None) -> pb.LoadReport:
    """A LoadReport of ``counts`` [L, R / num_gpus] tokens per local slot."""
    end = Timestamp()
    end.FromNanoseconds(int((time.time() if window_end is None else window_end) * 1e9))
    return pb.LoadReport(node=node, worker_rank=rank, placement=placement,
                         plan_version=plan_version, sequence=sequence, window_end=end,
                         slot_counts=int64_tensor(counts), agent_epoch=epoch)
