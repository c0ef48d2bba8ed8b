"""Agent sessions and the registry of the workers they serve, for the rollout coordinator.

An agent holds one ``RolloutService.Connect`` stream: an ``AgentSession`` here, with a bounded
outbox of commands. ``WorkerRegistry`` records which session serves each (placement, rank) and
that worker's latest ``WorkerInfo``. Neither locks: the coordinator's lock guards them (an
outbox is a thread-safe queue read by the stream's writer).
"""

from __future__ import annotations

import logging
import queue
import uuid
from typing import Callable

from expertplane.proto import expertplane_pb2 as pb

log = logging.getLogger(__name__)
OUTBOX_SIZE = 4096


class AgentSession:
    """One agent's Connect stream: a bounded outbox of commands and the workers it serves.

    ``protocol`` is the ``pb.RolloutProtocol`` its HELLO announced (the original until then).
    ``wake()`` is called (from any thread) after every change of the outbox or of ``closed``, so
    that the stream's writer can wait for commands without holding a thread."""

    def __init__(self, node: str = "", outbox_size: int = OUTBOX_SIZE,
                 wake: Callable[[], None] = lambda: None):
        self.id = uuid.uuid4().hex[:12]
        self.node = node
        # commands, or bytes of a command serialized once for many agents; None ends the stream
        self.outbox: queue.Queue[pb.RolloutCommand | bytes | None] = queue.Queue(outbox_size)
        self.workers: dict[tuple[str, int], pb.WorkerInfo] = {}
        self.protocol = pb.ROLLOUT_PROTOCOL_ORIGINAL
        self.closed = False
        self._wake = wake

    def send(self, cmd: pb.RolloutCommand | bytes) -> bool:
        """Queue ``cmd``; False (and the session closes) if the agent is too far behind."""
        if self.closed:
            return False
        try:
            self.outbox.put_nowait(cmd)
        except queue.Full:
            log.warning("agent %s: command queue full, closing its stream", self.node)
            self.close()
            return False
        self._wake()
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.outbox.put_nowait(None)
            except queue.Full:      # the writer sees ``closed`` once woken
                pass
            self._wake()


class WorkerRegistry:
    """The connected workers of every placement: rank -> (session, WorkerInfo)."""

    def __init__(self) -> None:
        self._workers: dict[str, dict[int, tuple[AgentSession, pb.WorkerInfo]]] = {}

    def join(self, session: AgentSession, w: pb.WorkerInfo) -> pb.WorkerInfo:
        """``session`` serves worker ``w`` now (the node defaults to the session's); returns the
        registry's copy of its info."""
        info = pb.WorkerInfo()
        info.CopyFrom(w)
        if not info.node:
            info.node = session.node
        key = (w.placement, w.rank)
        prev = self._workers.setdefault(w.placement, {}).get(w.rank)
        self._workers[w.placement][w.rank] = (session, info)
        session.workers[key] = info
        if prev is not None and prev[0] is not session:
            prev[0].workers.pop(key, None)
        return info

    def lose(self, session: AgentSession, placement: str, rank: int) -> None:
        """``session`` no longer serves (placement, rank)."""
        session.workers.pop((placement, rank), None)
        cur = self._workers.get(placement, {}).get(rank)
        if cur is not None and cur[0] is session:
            del self._workers[placement][rank]

    def of(self, placement: str) -> dict[int, tuple[AgentSession, pb.WorkerInfo]]:
        """rank -> (session, info) of the placement's connected workers (a copy)."""
        return dict(self._workers.get(placement, {}))

    def drop(self, placement: str) -> None:
        """The placement was deleted."""
        self._workers.pop(placement, None)
