"""Two-phase plan rollout to the workers of a placement: a pure state machine.

``RolloutMachine`` does no I/O and takes no locks. Each method takes an event (a rollout to
start, an agent's answer, a worker joining or lost, the clock passing a deadline) and returns
``Effects``: the records to save, the commands to send to agent sessions, the decisions that
put a version in force and the rollouts that ended. ``coordinator.RolloutCoordinator`` applies
them in order: records first, then commands ("durable first, then tell the workers").

A rollout of version v to a placement with G GPUs:

1. *prepare*: needs a connected worker for every rank 0..G-1 (none at all: nothing to switch, v
   is in force at once; some missing: aborted). ``prepare=Plan`` goes to each agent serving
   participants; each worker answers PREPARED or FAILED.
2. when all G ranks are PREPARED the decision to commit is saved (state ``committing``, v in
   force) and ``commit=v`` goes out; COMMITTED answers end the rollout.
3. abort (``abort=v`` to every participant agent) on timeout, any FAILED, or the loss of a
   participant (WORKER_LOST or its agent's stream closing) before the decision.

After a restart ``resume`` finishes what the store shows: ``preparing`` rollouts are aborted (no
decision was made), ``committing`` ones keep their version in force. Workers that (re)appear
with an older plan than the one in force are brought to it by a *sync* rollout (prepare + commit
sent to their agent alone); a worker holding a staged version nobody is rolling out gets
``abort``. A sync has no all-or-nothing step (its version is already in force): a worker of it
that fails, is lost or times out during prepare is dropped from it (told to abort) and the others
go on.

Commands meant for some of an agent's workers (a sync, a reconnecting worker's commit, an abort
of a stale staged version) go to an agent of protocol ``ROLLOUT_PROTOCOL_BATCHED`` once, naming
the workers in ``ranks``: one prepare carries the plan once for all of them. An older agent gets
one command per worker without ``ranks`` and forwards each to all its local workers of the
placement, so workers already up to date see an idempotent prepare/commit of the version in force.
A rollout of the whole placement sends its commands without ``ranks``: every local worker of the
placement takes part.
"""

from __future__ import annotations

import copy
import logging
import uuid
from dataclasses import dataclass, field

from expertplane.controller.sessions import AgentSession
from expertplane.controller.store import RolloutRecord, utcnow
from expertplane.errors import FailedPrecondition
from expertplane.proto import expertplane_pb2 as pb

log = logging.getLogger(__name__)
Event = pb.RolloutEvent
InForce = tuple[int, "pb.Plan | None"]     # (version in force, its plan message) of a placement
BATCHED = pb.ROLLOUT_PROTOCOL_BATCHED
Workers = dict[int, tuple[AgentSession, pb.WorkerInfo]]     # rank -> (session, info)


@dataclass
class Effects:
    """What an event asks of the outside world, in the order to apply it. ``saves`` are
    (operation, copy of the record) with operation ``create``, ``decide`` or ``finish``;
    ``committed`` are decisions of (non-sync) rollouts: their version is in force."""

    saves: list[tuple[str, RolloutRecord]] = field(default_factory=list)
    committed: list[RolloutRecord] = field(default_factory=list)
    sends: list[tuple[AgentSession, pb.RolloutCommand | bytes]] = field(default_factory=list)
    finished: list[RolloutRecord] = field(default_factory=list)

    def extend(self, other: Effects) -> None:
        self.saves += other.saves
        self.committed += other.committed
        self.sends += other.sends
        self.finished += other.finished

    def save(self, op: str, rec: RolloutRecord) -> None:
        self.saves.append((op, copy.deepcopy(rec)))


@dataclass
class _Active:
    rec: RolloutRecord
    plan: pb.Plan
    participants: dict[int, AgentSession]      # rank -> agent session serving it
    deadline: float
    t0: float
    t_commit: float = 0.0

    def sessions(self) -> list[AgentSession]:
        return list({s.id: s for s in self.participants.values()}.values())

    def commands(self, **body) -> list[tuple[AgentSession, pb.RolloutCommand]]:
        """The command ``body`` of this rollout for each agent serving its participants: a sync's
        as ``_per_agent`` splits it, a placement-wide rollout's naming no ranks."""
        body.update(rollout_id=self.rec.id, placement=self.rec.placement)
        if not self.rec.sync:
            return [(s, pb.RolloutCommand(**body)) for s in self.sessions()]
        return [sent for s in self.sessions() for sent in _per_agent(
            s, [r for r, x in self.participants.items() if x is s], **body)]

    def waiting(self, phase: str) -> list[int]:
        """Participants without a ``phase`` ("prepared", "committed") answer, ascending."""
        return sorted(set(self.participants) - set(self.rec.acks.get(phase, {})))


class RolloutMachine:
    """The active rollouts. Times are monotonic seconds (``now``); a phase that outlives
    ``timeout_seconds`` ends (``expire``)."""

    def __init__(self, timeout_seconds: float = 30.0):
        self.timeout = timeout_seconds
        self._active: dict[str, _Active] = {}        # rollout id -> state
        self._by_placement: dict[str, str] = {}      # placement -> id of its main rollout

    # ------------------------------------------------------------------ queries

    def active(self, rollout_id: str) -> bool:
        return rollout_id in self._active

    def active_ids(self) -> list[str]:
        return list(self._active)

    def state(self, placement: str) -> str:
        act = self._main(placement)
        return act.rec.state if act else ""

    def busy(self, placement: str) -> bool:
        return placement in self._by_placement

    def _main(self, placement: str) -> _Active | None:
        return self._active.get(self._by_placement.get(placement, ""))

    # ------------------------------------------------------------------ rollouts

    def start(self, placement: str, plan: pb.Plan, from_version: int, num_gpus: int,
              workers: Workers, now: float) -> tuple[RolloutRecord, Effects]:
        """Begin rolling ``plan`` out to ranks 0..num_gpus-1 of ``placement`` (``workers``: its
        connected ones). The record is ``preparing``, or already ``committed`` when no worker is
        connected, or ``aborted`` when only some ranks are. ``FailedPrecondition`` if a rollout
        of the placement is in progress."""
        if placement in self._by_placement:
            raise FailedPrecondition("rollout", f"placement {placement!r} has a rollout in progress")
        rec = RolloutRecord(id=uuid.uuid4().hex, placement=placement, from_version=from_version,
                            to_version=plan.summary.version, state="preparing")
        eff = Effects()
        eff.save("create", rec)
        missing = [r for r in range(num_gpus) if r not in workers]
        act = _Active(rec, plan, {r: workers[r][0] for r in range(num_gpus) if r in workers},
                      deadline=now + self.timeout, t0=now)
        self._active[rec.id] = act
        self._by_placement[placement] = rec.id
        if len(missing) == num_gpus:
            rec.reason = "no workers connected: nothing to switch"
            self._decide(act, now, eff)
            self._finish(act, "committed", now, eff)
        elif missing:
            self._abort(act, f"ranks {_ranges(missing)} not connected", now, eff)
        else:
            # serialized once for every agent (see servicers.serialize_command)
            cmd = pb.RolloutCommand(rollout_id=rec.id, placement=placement,
                                    prepare=plan).SerializeToString()
            eff.sends += [(s, cmd) for s in act.sessions()]
        return rec, eff

    def unreachable(self, rollout_id: str, session: AgentSession, now: float) -> Effects:
        """A command of rollout ``rollout_id`` could not be queued for ``session``."""
        eff = Effects()
        act = self._active.get(rollout_id)
        if act is not None and act.rec.state == "preparing" and session in act.sessions():
            self._abort(act, f"agent {session.node} unreachable", now, eff)
        return eff

    def answer(self, session: AgentSession, ev: pb.RolloutEvent, now: float) -> Effects:
        """An agent's PREPARED, COMMITTED, ABORTED or FAILED for its workers in ``ev``."""
        eff = Effects()
        act = self._active.get(ev.rollout_id)
        if act is None:
            log.debug("event %s for finished rollout %s ignored", Event.Kind.Name(ev.kind),
                      ev.rollout_id)
            return eff
        rec = act.rec
        for w in ev.workers:
            if w.rank not in act.participants:
                continue
            node = w.node or session.node
            if ev.kind == Event.FAILED:
                rec.acks.setdefault("failed", {})[w.rank] = node
                if rec.state == "preparing":
                    self._fail(act, w.rank, f"rank {w.rank} on {node} failed: {ev.message}", now, eff)
                    if not self.active(rec.id):
                        return eff
                    continue
                log.error("rollout %s: rank %d failed to commit: %s", rec.id, w.rank, ev.message)
            elif ev.kind == Event.PREPARED and rec.state == "preparing":
                rec.acks.setdefault("prepared", {})[w.rank] = node
                _note(session, rec.placement, w.rank, prepared=rec.to_version)
            elif ev.kind == Event.COMMITTED and rec.state == "committing":
                rec.acks.setdefault("committed", {})[w.rank] = node
                _note(session, rec.placement, w.rank, committed=rec.to_version)
        self._progress(act, now, eff)
        return eff

    def joined(self, session: AgentSession, infos: list[pb.WorkerInfo], in_force: InForce,
               now: float) -> Effects:
        """Workers ``infos`` (of one placement) are served by ``session`` now (a HELLO or
        WORKER_JOINED)."""
        eff = Effects()
        keep = []
        for info in infos:
            act = self._main(info.placement)
            if act is not None and act.participants.get(info.rank, session) is not session:
                if act.rec.state == "preparing":
                    self._abort(act, f"rank {info.rank} changed agents during prepare", now, eff)
                    continue
                act.participants[info.rank] = session
            keep.append(info)
        eff.extend(self.reconcile(session, keep, in_force, now))
        return eff

    def reconcile(self, session: AgentSession, infos: list[pb.WorkerInfo], in_force: InForce,
                  now: float) -> Effects:
        """Bring ``session``'s workers ``infos`` (of one placement) to the version in force, and
        drop versions staged for nothing: a commit for the workers that staged a decided version,
        an abort per stale staged version, one sync for the workers behind (per worker for an
        agent that does not batch, see the module docstring)."""
        eff = Effects()
        if not infos:
            return eff
        placement = infos[0].placement
        main = self._main(placement)
        deciding = main if main is not None and main.rec.state == "committing" else None
        version, plan = (deciding.rec.to_version, deciding.plan) if deciding else in_force
        to_commit, stale, behind = [], {}, []
        for info in infos:
            if deciding and info.plan_version < version and info.prepared_version == version \
                    and info.rank not in deciding.rec.acks.get("committed", {}):
                to_commit.append(info.rank)
                continue
            staged = info.prepared_version
            if staged and staged != version and not (main and main.rec.to_version == staged):
                stale.setdefault(staged, []).append(info.rank)
            if info.plan_version > version and version:
                log.warning("worker %s rank %d of %s reports plan %d, newer than the %d in force",
                            info.node, info.rank, placement, info.plan_version, version)
            if plan is not None and info.plan_version < version \
                    and not self._syncing(placement, info.rank):
                behind.append(info.rank)
        if to_commit:
            eff.sends += _per_agent(session, to_commit, rollout_id=deciding.rec.id,
                                    placement=placement, commit=version)
        for staged, ranks in stale.items():
            eff.sends += _per_agent(session, ranks, rollout_id="", placement=placement,
                                    abort=staged)
        if behind:
            self._start_sync(session, placement, behind, version, plan, now, eff)
        return eff

    def lost(self, session: AgentSession, placement: str, rank: int, why: str,
             now: float) -> Effects:
        """``session`` no longer serves (placement, rank): abort prepares that needed it."""
        eff = Effects()
        for act in list(self._active.values()):
            if act.rec.placement == placement and act.participants.get(rank) is session \
                    and act.rec.state == "preparing":
                self._fail(act, rank, f"rank {rank} lost during prepare: {why}", now, eff)
        return eff

    def expire(self, now: float) -> Effects:
        """Abort prepares past their deadline; end commits past theirs (decision stands)."""
        eff = Effects()
        for act in [a for a in self._active.values() if a.deadline < now]:
            if act.rec.state == "preparing":
                waiting = act.waiting("prepared")
                why = f"timeout: ranks {_ranges(waiting)} did not prepare within {self.timeout:g} s"
                if act.rec.sync and len(waiting) < len(act.participants):
                    self._drop(act, waiting, why, eff)
                    self._progress(act, now, eff)
                else:
                    self._abort(act, why, now, eff)
            else:
                waiting = act.waiting("committed")
                act.rec.reason = (f"ranks {_ranges(waiting)} did not confirm the commit; they "
                                  "are synced when they reconnect")
                self._finish(act, "committed", now, eff)
        return eff

    def forget(self, placement: str) -> None:
        """The placement was deleted: drop its rollouts (nothing is saved: its rows are gone)."""
        for act in [a for a in self._active.values() if a.rec.placement == placement]:
            act.rec.state = "aborted"
            self._active.pop(act.rec.id, None)
        self._by_placement.pop(placement, None)

    # ------------------------------------------------------------------ transitions

    def _syncing(self, placement: str, rank: int) -> bool:
        return any(a.rec.sync and a.rec.placement == placement and rank in a.participants
                   for a in self._active.values())

    def _start_sync(self, session: AgentSession, placement: str, ranks: list[int], version: int,
                    plan: pb.Plan, now: float, eff: Effects) -> None:
        """Sync rollouts of ``ranks`` (served by ``session``) to ``version``: one for all of
        them if the agent batches, else one per rank."""
        for group in _groups(session, ranks):
            rec = RolloutRecord(id=f"sync-{uuid.uuid4().hex}", placement=placement,
                                from_version=0, to_version=version, state="preparing", sync=True)
            eff.save("create", rec)
            act = _Active(rec, plan, {r: session for r in group}, deadline=now + self.timeout,
                          t0=now)
            self._active[rec.id] = act
            log.info("syncing ranks %s of %s (agent %s) to plan %d", _ranges(sorted(group)),
                     placement, session.node, version)
            eff.sends += act.commands(prepare=plan)

    def _progress(self, act: _Active, now: float, eff: Effects) -> None:
        """Decide once every participant prepared; end once every one answered the commit
        (COMMITTED, or FAILED after it had prepared)."""
        rec = act.rec
        prepared = rec.acks.get("prepared", {})      # of participants only (see _drop)
        if rec.state == "preparing" and len(prepared) == len(act.participants):
            self._decide(act, now, eff)
            eff.sends += act.commands(commit=rec.to_version)
        done = len(rec.acks.get("committed", {})) + sum(
            1 for r in rec.acks.get("failed", {}) if r in prepared)
        if rec.state == "committing" and done >= len(act.participants):
            self._finish(act, "committed", now, eff)

    def _fail(self, act: _Active, rank: int, reason: str, now: float, eff: Effects) -> None:
        """Participant ``rank`` failed or was lost during prepare: a sync drops it and goes on
        with its other workers, anything else aborts."""
        if act.rec.sync and len(act.participants) > 1:
            self._drop(act, [rank], reason, eff)
            self._progress(act, now, eff)
        else:
            self._abort(act, reason, now, eff)

    def _drop(self, act: _Active, ranks: list[int], reason: str, eff: Effects) -> None:
        """Take ``ranks`` (some of its participants) out of sync ``act`` during prepare: they
        are told to abort."""
        [session] = act.sessions()           # a sync is for the workers of one agent
        for r in ranks:
            del act.participants[r]
            act.rec.acks.get("prepared", {}).pop(r, None)     # not part of the decision
        act.rec.reason = f"{act.rec.reason}; {reason}" if act.rec.reason else reason
        log.warning("sync %s of %s v%d goes on without ranks %s: %s", act.rec.id,
                    act.rec.placement, act.rec.to_version, _ranges(ranks), reason)
        eff.sends += _per_agent(session, ranks, rollout_id=act.rec.id,
                                placement=act.rec.placement, abort=act.rec.to_version)

    def _decide(self, act: _Active, now: float, eff: Effects) -> None:
        act.rec.prepare_seconds = now - act.t0
        act.t_commit = now
        act.rec.state = "committing"
        act.deadline = now + self.timeout
        eff.save("decide", act.rec)
        if not act.rec.sync:
            eff.committed.append(copy.deepcopy(act.rec))

    def _abort(self, act: _Active, reason: str, now: float, eff: Effects) -> None:
        rec = act.rec
        rec.reason = reason
        rec.prepare_seconds = now - act.t0
        log.warning("rollout %s of %s v%d aborted: %s", rec.id, rec.placement, rec.to_version, reason)
        self._finish(act, "aborted", now, eff)
        eff.sends += act.commands(abort=rec.to_version)

    def _finish(self, act: _Active, state: str, now: float, eff: Effects) -> None:
        rec = act.rec
        if state == "committed" and act.t_commit:
            rec.commit_seconds = now - act.t_commit
        rec.state, rec.finished_at = state, utcnow()
        eff.save("finish", rec)
        self._active.pop(rec.id, None)
        if self._by_placement.get(rec.placement) == rec.id:
            del self._by_placement[rec.placement]
        eff.finished.append(copy.deepcopy(rec))


def resume(records: list[RolloutRecord]) -> list[RolloutRecord]:
    """After a restart: the active rollouts ``records`` of the store, finished (their copies to
    save): ``preparing`` ones aborted, ``committing`` ones committed (the decision stands)."""
    out = []
    for rec in records:
        rec = copy.deepcopy(rec)
        if rec.state == "preparing":
            rec.reason = "controller restarted before the commit decision"
            rec.state = "aborted"
        else:
            rec.reason = "controller restarted after the commit decision; workers are " \
                         "synced to it as they reconnect"
            rec.state = "committed"
        rec.finished_at = utcnow()
        out.append(rec)
    return out


def _note(session: AgentSession, placement: str, rank: int, *, prepared: int = 0,
          committed: int = 0) -> None:
    """Keep the session's view of a worker's plan versions current."""
    info = session.workers.get((placement, rank))
    if info is None:
        return
    if prepared:
        info.prepared_version = prepared
    if committed:
        info.plan_version, info.prepared_version = committed, 0


def _groups(session: AgentSession, ranks: list[int]) -> list[list[int]]:
    """How commands for ``session``'s workers ``ranks`` are split: one for all of them if the
    agent batches, else one per worker."""
    return [list(ranks)] if session.protocol >= BATCHED else [[r] for r in ranks]


def _per_agent(session: AgentSession, ranks: list[int],
               **body) -> list[tuple[AgentSession, pb.RolloutCommand]]:
    """The command ``body`` for ``session``'s workers ``ranks``: one naming them for an agent
    that batches, else one (naming none) per worker."""
    out = []
    for group in _groups(session, ranks):
        cmd = pb.RolloutCommand(**body)
        if session.protocol >= BATCHED:
            cmd.ranks.extend(sorted(group))
        out.append((session, cmd))
    return out


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
