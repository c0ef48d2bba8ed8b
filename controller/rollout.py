"""Two-phase plan rollout to the workers of a placement, through their node agents.

Agents hold a ``RolloutService.Connect`` stream (an ``AgentSession`` here). A rollout of version
v to a placement with G GPUs:

1. *prepare*: needs a connected worker for every rank 0..G-1 (none at all: nothing to switch, v
   is in force at once; some missing: aborted). ``prepare=Plan`` goes to each agent serving
   participants; each worker answers PREPARED or FAILED.
2. when all G ranks are PREPARED the decision to commit is written to the store (state
   ``committing``, v in force) and ``commit=v`` goes out; COMMITTED answers end the rollout.
3. abort (``abort=v`` to every participant agent) on timeout, any FAILED, or the loss of a
   participant (WORKER_LOST or its agent's stream closing) before the decision.

After a restart ``resume`` finishes what the store shows: ``preparing`` rollouts are aborted (no
decision was made), ``committing`` ones keep their version in force. Any worker that (re)appears
with an older plan than the one in force is brought to it by a *sync* rollout (prepare + commit
sent to its agent alone); a worker holding a staged version nobody is rolling out gets
``abort``. Agents forward a command to all their local workers of the placement, so workers
already up to date see an idempotent prepare/commit of the version in force.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from expertplane.controller.store import RolloutRecord, Store, utcnow
from expertplane.proto import expertplane_pb2 as pb

log = logging.getLogger(__name__)
Event = pb.RolloutEvent
OUTBOX_SIZE = 4096


class AgentSession:
    """One agent's Connect stream: a bounded outbox of commands and the workers it serves.

    ``wake()`` is called (from any thread) after every change of the outbox or of ``closed``, so
    that the stream's writer can wait for commands without holding a thread."""

    def __init__(self, node: str = "", outbox_size: int = OUTBOX_SIZE,
                 wake: Callable[[], None] = lambda: None):
        self.id = uuid.uuid4().hex[:12]
        self.node = node
        # commands, or bytes of a command serialized once for many agents; None ends the stream
        self.outbox: queue.Queue[pb.RolloutCommand | bytes | None] = queue.Queue(outbox_size)
        self.workers: dict[tuple[str, int], pb.WorkerInfo] = {}
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


@dataclass
class _Active:
    rec: RolloutRecord
    plan: pb.Plan
    participants: dict[int, AgentSession]      # rank -> agent session serving it
    deadline: float
    t0: float = field(default_factory=time.perf_counter)
    t_commit: float = 0.0

    def sessions(self) -> list[AgentSession]:
        return list({s.id: s for s in self.participants.values()}.values())


class RolloutCoordinator:
    """Runs rollouts; thread-safe. ``in_force(placement) -> (version, pb.Plan | None)`` gives the
    plan in force; ``on_finished(record)`` is called after every rollout ends (not under lock)."""

    def __init__(self, store: Store, *, timeout_seconds: float = 30.0,
                 in_force: Callable[[str], tuple[int, "pb.Plan | None"]],
                 on_finished: Callable[[RolloutRecord], None] = lambda rec: None,
                 on_committing: Callable[[RolloutRecord], None] = lambda rec: None):
        self._store = store
        self._timeout = timeout_seconds
        self._in_force = in_force
        self._on_finished = on_finished
        self._on_committing = on_committing
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, AgentSession] = {}
        self._workers: dict[str, dict[int, tuple[AgentSession, pb.WorkerInfo]]] = {}
        self._active: dict[str, _Active] = {}        # rollout id -> state
        self._by_placement: dict[str, str] = {}      # placement -> id of its main rollout
        self._bias: dict[str, pb.RouterBias] = {}
        self._finished: list[RolloutRecord] = []

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
            for (placement, rank) in list(session.workers):
                self._lose(session, placement, rank, "agent stream closed")
        self._flush()

    def close_sessions(self) -> None:
        """Shutting down: end every agent's command stream (its handler returns)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s.close()

    def workers(self, placement: str) -> dict[int, pb.WorkerInfo]:
        with self._lock:
            return {r: info for r, (_, info) in self._workers.get(placement, {}).items()}

    def handle(self, session: AgentSession, ev: pb.RolloutEvent) -> None:
        """Process one event from ``session``'s agent."""
        with self._lock:
            if ev.node:
                session.node = ev.node
            if ev.kind in (Event.HELLO, Event.WORKER_JOINED):
                if ev.kind == Event.HELLO:
                    listed = {(w.placement, w.rank) for w in ev.workers}
                    for key in [k for k in session.workers if k not in listed]:
                        self._lose(session, *key, "not listed in HELLO")
                for w in ev.workers:
                    self._join(session, w)
            elif ev.kind == Event.WORKER_LOST:
                for w in ev.workers:
                    self._lose(session, w.placement, w.rank, ev.message or "worker lost")
            elif ev.kind in (Event.PREPARED, Event.COMMITTED, Event.ABORTED, Event.FAILED):
                act = self._active.get(ev.rollout_id)
                if act is not None:
                    self._answer(act, session, ev)
                else:
                    log.debug("event %s for finished rollout %s ignored",
                              Event.Kind.Name(ev.kind), ev.rollout_id)
        self._flush()

    def _join(self, session: AgentSession, w: pb.WorkerInfo) -> None:
        placement = w.placement
        info = pb.WorkerInfo()
        info.CopyFrom(w)
        if not info.node:
            info.node = session.node
        prev = self._workers.setdefault(placement, {}).get(w.rank)
        self._workers[placement][w.rank] = (session, info)
        session.workers[(placement, w.rank)] = info
        if prev is not None and prev[0] is not session:
            prev[0].workers.pop((placement, w.rank), None)
        act = self._active.get(self._by_placement.get(placement, ""))
        if act is not None and w.rank in act.participants and act.participants[w.rank] is not session:
            if act.rec.state == "preparing":
                self._abort(act, f"rank {w.rank} changed agents during prepare")
                return
            act.participants[w.rank] = session
        self._reconcile(session, info)

    def _reconcile(self, session: AgentSession, info: pb.WorkerInfo) -> None:
        """Bring a worker to the version in force, or drop a version staged for nothing."""
        placement = info.placement
        version, plan = self._in_force(placement)
        main = self._active.get(self._by_placement.get(placement, ""))
        if main is not None and main.rec.state == "committing" and \
                info.plan_version < main.rec.to_version and info.rank not in main.rec.acks.get("committed", {}):
            if info.prepared_version == main.rec.to_version:
                session.send(pb.RolloutCommand(rollout_id=main.rec.id, placement=placement,
                                               commit=main.rec.to_version))
                return
        staged = info.prepared_version
        if staged and staged != version and not (main and main.rec.to_version == staged):
            session.send(pb.RolloutCommand(rollout_id="", placement=placement, abort=staged))
        if info.plan_version > version and version:
            log.warning("worker %s rank %d of %s reports plan %d, newer than the %d in force",
                        info.node, info.rank, placement, info.plan_version, version)
        if plan is not None and info.plan_version < version and not self._syncing(placement, info.rank):
            self._start_sync(session, placement, info.rank, version, plan)

    def reconcile_placement(self, placement: str) -> None:
        """Bring every connected worker of ``placement`` to the plan in force (see _reconcile)."""
        with self._lock:
            for session, info in list(self._workers.get(placement, {}).values()):
                self._reconcile(session, info)

    def _syncing(self, placement: str, rank: int) -> bool:
        return any(a.rec.sync and a.rec.placement == placement and rank in a.participants
                   for a in self._active.values())

    def _lose(self, session: AgentSession, placement: str, rank: int, why: str) -> None:
        session.workers.pop((placement, rank), None)
        cur = self._workers.get(placement, {}).get(rank)
        if cur is not None and cur[0] is session:
            del self._workers[placement][rank]
        for act in list(self._active.values()):
            if act.rec.placement == placement and act.participants.get(rank) is session \
                    and act.rec.state == "preparing":
                self._abort(act, f"rank {rank} lost during prepare: {why}")

    # ------------------------------------------------------------------ rollouts

    def start(self, placement: str, plan: pb.Plan, from_version: int, num_gpus: int) -> RolloutRecord:
        """Begin rolling ``plan`` out to all ranks 0..num_gpus-1 of ``placement``.

        Returns the record: ``preparing``, or already ``committed`` when no worker is connected,
        or ``aborted`` when only some ranks are connected. Raises ``RuntimeError`` if a rollout of
        the placement is in progress.
        """
        version = plan.summary.version
        rec = RolloutRecord(id=uuid.uuid4().hex, placement=placement, from_version=from_version,
                            to_version=version, state="preparing")
        with self._lock:
            if placement in self._by_placement:
                raise RuntimeError(f"placement {placement!r} has a rollout in progress")
            workers = self._workers.get(placement, {})
            missing = [r for r in range(num_gpus) if r not in workers]
            self._store.create_rollout(rec)
            act = _Active(rec, plan, {r: workers[r][0] for r in range(num_gpus) if r in workers},
                          deadline=time.monotonic() + self._timeout)
            self._active[rec.id] = act
            self._by_placement[placement] = rec.id
            if len(missing) == num_gpus:
                rec.reason = "no workers connected: nothing to switch"
                self._decide(act)
                self._finish(act, "committed")
            elif missing:
                self._abort(act, f"ranks {_ranges(missing)} not connected")
            else:
                # serialized once for every agent (see servicers.serialize_command)
                cmd = pb.RolloutCommand(rollout_id=rec.id, placement=placement,
                                        prepare=plan).SerializeToString()
                for s in act.sessions():
                    if not s.send(cmd):
                        self._abort(act, f"agent {s.node} unreachable")
                        break
        self._flush()
        return rec

    def _start_sync(self, session: AgentSession, placement: str, rank: int, version: int,
                    plan: pb.Plan) -> None:
        rec = RolloutRecord(id=f"sync-{uuid.uuid4().hex}", placement=placement,
                            from_version=0, to_version=version, state="preparing", sync=True)
        self._store.create_rollout(rec)
        act = _Active(rec, plan, {rank: session}, deadline=time.monotonic() + self._timeout)
        self._active[rec.id] = act
        log.info("syncing rank %d of %s (agent %s) to plan %d", rank, placement, session.node, version)
        session.send(pb.RolloutCommand(rollout_id=rec.id, placement=placement, prepare=plan))

    def _answer(self, act: _Active, session: AgentSession, ev: pb.RolloutEvent) -> None:
        rec = act.rec
        for w in ev.workers:
            if w.rank not in act.participants:
                continue
            node = w.node or session.node
            if ev.kind == Event.FAILED:
                rec.acks.setdefault("failed", {})[w.rank] = node
                if rec.state == "preparing":
                    self._abort(act, f"rank {w.rank} on {node} failed: {ev.message}")
                    return
                log.error("rollout %s: rank %d failed to commit: %s", rec.id, w.rank, ev.message)
            elif ev.kind == Event.PREPARED and rec.state == "preparing":
                rec.acks.setdefault("prepared", {})[w.rank] = node
                self._note(session, rec.placement, w.rank, prepared=rec.to_version)
            elif ev.kind == Event.COMMITTED and rec.state == "committing":
                rec.acks.setdefault("committed", {})[w.rank] = node
                self._note(session, rec.placement, w.rank, committed=rec.to_version)
        if rec.state == "preparing" and len(rec.acks.get("prepared", {})) == len(act.participants):
            self._decide(act)
            cmd = pb.RolloutCommand(rollout_id=rec.id, placement=rec.placement, commit=rec.to_version)
            for s in act.sessions():
                s.send(cmd)
        done = len(rec.acks.get("committed", {})) + sum(
            1 for r in rec.acks.get("failed", {}) if r in rec.acks.get("prepared", {}))
        if rec.state == "committing" and done >= len(act.participants):
            self._finish(act, "committed")

    def _note(self, session: AgentSession, placement: str, rank: int, *, prepared: int = 0,
              committed: int = 0) -> None:
        """Keep the registry's view of a worker's versions current."""
        info = session.workers.get((placement, rank))
        if info is None:
            return
        if prepared:
            info.prepared_version = prepared
        if committed:
            info.plan_version, info.prepared_version = committed, 0

    def _decide(self, act: _Active) -> None:
        act.rec.prepare_seconds = time.perf_counter() - act.t0
        act.t_commit = time.perf_counter()
        self._store.decide_commit(act.rec)
        act.rec.state = "committing"
        act.deadline = time.monotonic() + self._timeout
        if not act.rec.sync:
            self._on_committing(act.rec)

    def _abort(self, act: _Active, reason: str) -> None:
        rec = act.rec
        rec.reason = reason
        rec.prepare_seconds = time.perf_counter() - act.t0
        log.warning("rollout %s of %s v%d aborted: %s", rec.id, rec.placement, rec.to_version, reason)
        self._finish(act, "aborted")          # durable first, then tell the workers
        cmd = pb.RolloutCommand(rollout_id=rec.id, placement=rec.placement, abort=rec.to_version)
        for s in act.sessions():
            s.send(cmd)

    def _finish(self, act: _Active, state: str) -> None:
        rec = act.rec
        if state == "committed" and act.t_commit:
            rec.commit_seconds = time.perf_counter() - act.t_commit
        rec.state, rec.finished_at = state, utcnow()
        self._store.finish_rollout(rec, state)
        self._active.pop(rec.id, None)
        if self._by_placement.get(rec.placement) == rec.id:
            del self._by_placement[rec.placement]
        self._finished.append(rec)
        self._changed.notify_all()

    def _flush(self) -> None:
        """Run ``on_finished`` callbacks outside the lock."""
        with self._lock:
            done, self._finished = self._finished, []
        for rec in done:
            self._on_finished(rec)

    def expire(self) -> None:
        """Abort prepares past their deadline; end commits past theirs (decision stands)."""
        now = time.monotonic()
        with self._lock:
            for act in [a for a in self._active.values() if a.deadline < now]:
                if act.rec.state == "preparing":
                    waiting = sorted(set(act.participants) - set(act.rec.acks.get("prepared", {})))
                    self._abort(act, f"timeout: ranks {_ranges(waiting)} did not prepare "
                                     f"within {self._timeout:g} s")
                else:
                    waiting = sorted(set(act.participants) - set(act.rec.acks.get("committed", {})))
                    act.rec.reason = (f"ranks {_ranges(waiting)} did not confirm the commit; they "
                                      "are synced when they reconnect")
                    self._finish(act, "committed")
        self._flush()

    def resume(self) -> list[RolloutRecord]:
        """After a restart: abort rollouts that were preparing, keep committed decisions.

        Returns the records it touched.
        """
        touched = []
        with self._lock:
            for rec in self._store.active_rollouts():
                if rec.state == "preparing":
                    rec.reason = "controller restarted before the commit decision"
                    rec.finished_at = utcnow()
                    self._store.finish_rollout(rec, "aborted")
                    rec.state = "aborted"
                else:
                    rec.reason = "controller restarted after the commit decision; workers are " \
                                 "synced to it as they reconnect"
                    rec.finished_at = utcnow()
                    self._store.finish_rollout(rec, "committed")
                    rec.state = "committed"
                touched.append(rec)
        return touched

    def wait(self, rollout_id: str, timeout: float) -> bool:
        """Block until rollout ``rollout_id`` is no longer active; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: rollout_id not in self._active, timeout)

    def state(self, placement: str) -> str:
        with self._lock:
            act = self._active.get(self._by_placement.get(placement, ""))
            return act.rec.state if act else ""

    def busy(self, placement: str) -> bool:
        with self._lock:
            return placement in self._by_placement

    def forget(self, placement: str) -> None:
        """The placement was deleted: abort its rollouts and drop its workers' registry."""
        with self._lock:
            for act in [a for a in self._active.values() if a.rec.placement == placement]:
                act.rec.state = "aborted"
                self._active.pop(act.rec.id, None)
            self._by_placement.pop(placement, None)
            self._workers.pop(placement, None)
            self._bias.pop(placement, None)
            self._changed.notify_all()

    # ------------------------------------------------------------------ router bias

    def push_bias(self, bias: pb.RouterBias) -> int:
        """Send a router bias to every agent serving the placement; returns how many agents."""
        with self._lock:
            self._bias[bias.placement] = bias
            sessions = {s.id: s for s, _ in self._workers.get(bias.placement, {}).values()}
            cmd = pb.RolloutCommand(placement=bias.placement, bias=bias)
            return sum(s.send(cmd) for s in sessions.values())

    def bias(self, placement: str) -> pb.RouterBias | None:
        with self._lock:
            return self._bias.get(placement)


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}-{r}" if r != start else f"{r}")
            start = None
    return ",".join(out)
