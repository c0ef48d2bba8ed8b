"""The rollout coordinator: agent sessions, the worker registry and the rollout state machine,
applied to the store and the agents.

Under its lock the coordinator only updates memory: the sessions, the registry and the
``RolloutMachine``, whose ``Effects`` it queues. It then applies the queued effects outside the
lock, one batch at a time in the order they were made: rollout records saved to the store,
decisions reported (``on_committing``), commands queued to the agents' sessions, finished
rollouts reported (``on_finished``). The plan in force comes from ``in_force(placement)``,
read before the lock is taken.

An agent whose HELLO announces ``ROLLOUT_PROTOCOL_BATCHED`` (or newer) is answered
``RolloutCommand.hello`` once its session and the workers it listed are registered, after the
commands that HELLO caused: a rollout started from then on finds those workers.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from expertplane.controller.rollout import Effects, InForce, RolloutMachine, resume
from expertplane.controller.sessions import AgentSession, WorkerRegistry
from expertplane.controller.store import RolloutRecord, Store
from expertplane.proto import expertplane_pb2 as pb

log = logging.getLogger(__name__)
Event = pb.RolloutEvent
PROTOCOL = pb.ROLLOUT_PROTOCOL_BATCHED     # the newest rollout protocol the controller speaks


class RolloutCoordinator:
    """Runs rollouts; thread-safe. ``in_force(placement) -> (version, pb.Plan | None)`` gives the
    plan in force; ``on_committing(record)`` is called when a rollout's decision to commit is
    saved, ``on_finished(record)`` after every rollout ends (both outside the lock)."""

    def __init__(self, store: Store, *, timeout_seconds: float = 30.0,
                 in_force: Callable[[str], InForce],
                 on_finished: Callable[[RolloutRecord], None] = lambda rec: None,
                 on_committing: Callable[[RolloutRecord], None] = lambda rec: None,
                 clock: Callable[[], float] = time.monotonic):
        self._store = store
        self._in_force = in_force
        self._on_finished = on_finished
        self._on_committing = on_committing
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._machine = RolloutMachine(timeout_seconds)
        self._sessions: dict[str, AgentSession] = {}
        self._registry = WorkerRegistry()
        self._bias: dict[str, pb.RouterBias] = {}
        self._pending: collections.deque[Effects] = collections.deque()
        self._unsettled: set[str] = set()            # rollouts ended, their records not saved yet
        self._apply_lock = threading.Lock()          # one thread applies effects at a time

    # ------------------------------------------------------------------ sessions and workers

    def connect(self, wake: Callable[[], None] = lambda: None) -> AgentSession:
        """A new agent stream; ``wake`` as in ``AgentSession``."""
        s = AgentSession(wake=wake)
        with self._lock:
            self._sessions[s.id] = s
        return s

    def disconnect(self, session: AgentSession) -> None:
        """The agent's stream ended: all its workers are lost."""
        with self._lock:
            session.close()
            self._sessions.pop(session.id, None)
            for placement, rank in list(session.workers):
                self._lose(session, placement, rank, "agent stream closed")
        self._apply()

    def close_sessions(self) -> None:
        """Shutting down: end every agent's command stream (its handler returns)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s.close()

    def workers(self, placement: str) -> dict[int, pb.WorkerInfo]:
        with self._lock:
            return {r: info for r, (_, info) in self._registry.of(placement).items()}

    def handle(self, session: AgentSession, ev: pb.RolloutEvent) -> None:
        """Process one event from ``session``'s agent."""
        in_force = {p: self._in_force(p) for p in {w.placement for w in ev.workers}}
        now = self._clock()
        with self._lock:
            if ev.node:
                session.node = ev.node
            if ev.kind in (Event.HELLO, Event.WORKER_JOINED):
                if ev.kind == Event.HELLO:
                    session.protocol = min(ev.protocol, PROTOCOL)
                    listed = {(w.placement, w.rank) for w in ev.workers}
                    for key in [k for k in session.workers if k not in listed]:
                        self._lose(session, *key, "not listed in HELLO")
                registered = []
                for placement, infos in _by_placement(ev.workers).items():
                    joined = [self._registry.join(session, w) for w in infos]
                    registered += joined
                    self._queue(self._machine.joined(session, joined, in_force[placement], now))
                if ev.kind == Event.HELLO and session.protocol >= pb.ROLLOUT_PROTOCOL_BATCHED:
                    ack = pb.HelloAck(protocol=session.protocol, workers=registered)
                    self._queue(Effects(sends=[(session, pb.RolloutCommand(hello=ack))]))
            elif ev.kind == Event.WORKER_LOST:
                for w in ev.workers:
                    self._lose(session, w.placement, w.rank, ev.message or "worker lost")
            elif ev.kind in (Event.PREPARED, Event.COMMITTED, Event.ABORTED, Event.FAILED):
                self._queue(self._machine.answer(session, ev, now))
            elif ev.kind == Event.BIAS_APPLIED:
                log.debug("agent %s applied router bias %d of %s", session.node, ev.version,
                          ev.placement)
        self._apply()

    def reconcile_placement(self, placement: str) -> None:
        """Bring every connected worker of ``placement`` to the plan in force."""
        in_force = self._in_force(placement)
        now = self._clock()
        with self._lock:
            by_session: dict[str, tuple[AgentSession, list[pb.WorkerInfo]]] = {}
            for session, info in self._registry.of(placement).values():
                by_session.setdefault(session.id, (session, []))[1].append(info)
            for session, infos in by_session.values():
                self._queue(self._machine.reconcile(session, infos, in_force, now))
        self._apply()

    def _lose(self, session: AgentSession, placement: str, rank: int, why: str) -> None:
        """(Under the lock.)"""
        self._registry.lose(session, placement, rank)
        self._queue(self._machine.lost(session, placement, rank, why, self._clock()))

    # ------------------------------------------------------------------ rollouts

    def start(self, placement: str, plan: pb.Plan, from_version: int, num_gpus: int) -> RolloutRecord:
        """Begin rolling ``plan`` out to all ranks 0..num_gpus-1 of ``placement``.

        Returns the record: ``preparing``, or already ``committed`` when no worker is connected,
        or ``aborted`` when only some ranks are connected. Raises ``FailedPrecondition`` if a
        rollout of the placement is in progress.
        """
        with self._lock:
            rec, eff = self._machine.start(placement, plan, from_version, num_gpus,
                                           self._registry.of(placement), self._clock())
            self._queue(eff)
        self._apply()
        return rec

    def expire(self) -> None:
        """Abort prepares past their deadline; end commits past theirs (decision stands)."""
        with self._lock:
            self._queue(self._machine.expire(self._clock()))
        self._apply()

    def resume(self) -> list[RolloutRecord]:
        """After a restart: abort rollouts that were preparing, keep committed decisions.

        Returns the records it touched.
        """
        touched = resume(self._store.active_rollouts())
        for rec in touched:
            self._store.finish_rollout(rec, rec.state)
        return touched

    def wait(self, rollout_id: str, timeout: float) -> bool:
        """Block until rollout ``rollout_id`` has ended and its record is saved; False on
        timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._machine.active(rollout_id) and rollout_id not in self._unsettled,
                timeout)

    def active_ids(self) -> list[str]:
        """Ids of the rollouts in progress (sync rollouts included)."""
        with self._lock:
            return self._machine.active_ids()

    def state(self, placement: str) -> str:
        with self._lock:
            return self._machine.state(placement)

    def busy(self, placement: str) -> bool:
        with self._lock:
            return self._machine.busy(placement)

    def forget(self, placement: str) -> None:
        """The placement was deleted: drop its rollouts, its workers' registry and its bias."""
        with self._lock:
            self._machine.forget(placement)
            self._registry.drop(placement)
            self._bias.pop(placement, None)
            self._changed.notify_all()

    # ------------------------------------------------------------------ router bias

    def push_bias(self, bias: pb.RouterBias) -> int:
        """Send a router bias to every agent serving the placement; returns how many agents."""
        with self._lock:
            self._bias[bias.placement] = bias
            sessions = {s.id: s for s, _ in self._registry.of(bias.placement).values()}
        cmd = pb.RolloutCommand(placement=bias.placement, bias=bias)
        return sum(s.send(cmd) for s in sessions.values())

    def bias(self, placement: str) -> pb.RouterBias | None:
        with self._lock:
            return self._bias.get(placement)

    # ------------------------------------------------------------------ effects

    def _queue(self, eff: Effects) -> None:
        """(Under the lock.)"""
        if eff.saves or eff.sends or eff.committed or eff.finished:
            self._pending.append(eff)
            self._unsettled.update(rec.id for rec in eff.finished)

    def _apply(self) -> None:
        """Apply the queued effects in order, outside the lock (see the module docstring)."""
        with self._apply_lock:
            while True:
                with self._lock:
                    if not self._pending:
                        return
                    eff = self._pending.popleft()
                self._apply_one(eff)

    def _apply_one(self, eff: Effects) -> None:
        """Save, then report decisions and send: if a record cannot be saved (its placement
        was deleted meanwhile, or the store failed) nothing of the batch is told to anyone."""
        try:
            for op, rec in eff.saves:
                if op == "create":
                    self._store.create_rollout(rec)
                elif op == "decide":
                    self._store.decide_commit(rec)
                else:
                    self._store.finish_rollout(rec, rec.state)
        except Exception:
            log.exception("saving rollout records failed; their commands are not sent")
            eff = Effects(finished=eff.finished)
        for rec in eff.committed:
            self._on_committing(rec)
        for session, cmd in eff.sends:
            if not session.send(cmd) and isinstance(cmd, bytes):     # a prepare for many agents
                rollout_id = pb.RolloutCommand.FromString(cmd).rollout_id
                with self._lock:
                    self._queue(self._machine.unreachable(rollout_id, session, self._clock()))
        if eff.finished:
            with self._changed:
                self._unsettled.difference_update(rec.id for rec in eff.finished)
                self._changed.notify_all()
        for rec in eff.finished:
            self._on_finished(rec)


def _by_placement(workers) -> dict[str, list[pb.WorkerInfo]]:
    """``workers`` grouped by placement, in their order."""
    out: dict[str, list[pb.WorkerInfo]] = {}
    for w in workers:
        out.setdefault(w.placement, []).append(w)
    return out
