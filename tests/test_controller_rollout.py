"""Two-phase rollout: commit only when every rank prepared; abort on failure, timeout or loss;
resume after a restart; bring stragglers to the version in force. Agents are plain sessions
here (the gRPC path is in test_controller_grpc.py); the state machine is also driven alone."""

import numpy as np
import pytest

from expertplane.controller.config import ControllerConfig
from expertplane.controller.convert import plan_message
from expertplane.controller.core import Controller
from expertplane.controller.rollout import RolloutMachine
from expertplane.controller.sessions import AgentSession
from expertplane.controller.spec import PlacementSpec
from expertplane.controller.store import PlanRecord, utcnow
from expertplane.errors import FailedPrecondition
from expertplane.proto import expertplane_pb2 as pb

Event = pb.RolloutEvent
SPEC = PlacementSpec(name="m", num_layers=2, num_experts=8, num_nodes=2, gpus_per_node=2,
                     num_replicas=12, num_groups=2, expert_bytes=100)


def make(db_url, timeout=30.0) -> Controller:
    c = Controller(ControllerConfig(db_url=db_url, rollout_timeout_seconds=timeout))
    c.open()
    return c


def store_v2(c: Controller) -> pb.Plan:
    """Store a second plan (a permutation of v1) without putting it in force."""
    v1 = c.get_plan("m", 1)
    rec = PlanRecord(**{**v1.__dict__, "version": 0, "reason": "api", "previous_version": 1,
                        "phy2log": v1.phy2log[:, ::-1].copy(), "created_at": utcnow()})
    return plan_message(c.store.add_plan(rec))


def agents(c: Controller, version=1):
    """Two agent sessions, node n0 with ranks 0,1 and n1 with ranks 2,3, said HELLO."""
    out = []
    for node, ranks in (("n0", (0, 1)), ("n1", (2, 3))):
        s = c.rollouts.connect()
        c.rollouts.handle(s, Event(kind=Event.HELLO, node=node, workers=[
            pb.WorkerInfo(node=node, rank=r, placement="m", plan_version=version) for r in ranks]))
        out.append((s, node, ranks))
    return out


def drain(session) -> list[pb.RolloutCommand]:
    cmds = []
    while not session.outbox.empty():
        cmd = session.outbox.get_nowait()
        cmds.append(pb.RolloutCommand.FromString(cmd) if isinstance(cmd, bytes) else cmd)
    return cmds


def answer(c, session, node, ranks, kind, rollout_id, version, message=""):
    for r in ranks:
        c.rollouts.handle(session, Event(kind=kind, node=node, rollout_id=rollout_id,
                                         placement="m", version=version, message=message,
                                         workers=[pb.WorkerInfo(node=node, rank=r, placement="m")]))


@pytest.fixture
def ctl(db_url):
    c = make(db_url)
    c.apply_placement(SPEC)
    yield c
    c.close()


def test_commit_only_after_every_rank_prepared(ctl):
    ags = agents(ctl)
    plan = store_v2(ctl)
    rec = ctl.rollouts.start("m", plan, 1, 4)
    for s, _, _ in ags:
        [cmd] = drain(s)
        assert cmd.WhichOneof("command") == "prepare" and cmd.prepare.summary.version == 2
    (s0, n0, r0), (s1, n1, r1) = ags
    answer(ctl, s0, n0, r0, Event.PREPARED, rec.id, 2)
    answer(ctl, s1, n1, r1[:1], Event.PREPARED, rec.id, 2)
    assert drain(s0) == [] and ctl.rollouts.state("m") == "preparing"
    assert ctl.placement_view("m").stored.plan_version == 1
    answer(ctl, s1, n1, r1[1:], Event.PREPARED, rec.id, 2)
    assert [c.commit for s, _, _ in ags for c in drain(s)] == [2, 2]
    assert ctl.store.get_placement("m").plan_version == 2      # decision is durable
    assert ctl.rollouts.state("m") == "committing"
    answer(ctl, s0, n0, r0, Event.COMMITTED, rec.id, 2)
    answer(ctl, s1, n1, r1, Event.COMMITTED, rec.id, 2)
    [done] = ctl.store.list_rollouts("m")
    assert done.state == "committed" and sorted(done.acks["committed"]) == [0, 1, 2, 3]
    assert ctl.rollouts.state("m") == ""


@pytest.mark.parametrize("how", ["failed", "lost", "disconnect", "timeout"])
def test_abort_before_the_decision(db_url, how):
    c = make(db_url, timeout=0.05 if how == "timeout" else 30.0)
    try:
        c.apply_placement(SPEC)
        (s0, n0, r0), (s1, n1, r1) = agents(c)
        rec = c.rollouts.start("m", store_v2(c), 1, 4)
        drain(s0), drain(s1)
        answer(c, s0, n0, r0, Event.PREPARED, rec.id, 2)
        if how == "failed":
            answer(c, s1, n1, r1[:1], Event.FAILED, rec.id, 2, "out of memory")
        elif how == "lost":
            c.rollouts.handle(s1, Event(kind=Event.WORKER_LOST, node=n1,
                                        workers=[pb.WorkerInfo(node=n1, rank=3, placement="m")]))
        elif how == "disconnect":
            c.rollouts.disconnect(s1)
        else:
            import time
            time.sleep(0.1)
            c.rollouts.expire()
        assert [cmd.abort for cmd in drain(s0)] == [2]
        [done] = c.store.list_rollouts("m")
        assert done.state == "aborted" and done.reason
        assert c.store.get_placement("m").plan_version == 1
        # late answers for the aborted rollout change nothing
        answer(c, s0, n0, r0, Event.PREPARED, rec.id, 2)
        assert c.store.get_placement("m").plan_version == 1
    finally:
        c.close()


def test_missing_ranks_abort_and_no_workers_commit(ctl):
    rec = ctl.rollouts.start("m", store_v2(ctl), 1, 4)
    assert rec.state == "committed" and "no workers" in rec.reason
    assert ctl.placement_view("m").stored.plan_version == 2
    s = ctl.rollouts.connect()
    ctl.rollouts.handle(s, Event(kind=Event.HELLO, node="n0", workers=[
        pb.WorkerInfo(node="n0", rank=0, placement="m", plan_version=2)]))
    v1 = ctl.get_plan("m", 1)
    again = PlanRecord(**{**v1.__dict__, "version": 0, "created_at": utcnow()})
    rec = ctl.rollouts.start("m", plan_message(ctl.store.add_plan(again)), 2, 4)
    assert rec.state == "aborted" and rec.reason == "ranks 1-3 not connected"


def test_restart_resumes_from_the_store(db_url):
    c = make(db_url)
    c.apply_placement(SPEC)
    (s0, n0, r0), (s1, n1, r1) = agents(c)
    rec = c.rollouts.start("m", store_v2(c), 1, 4)
    answer(c, s0, n0, r0, Event.PREPARED, rec.id, 2)
    answer(c, s1, n1, r1, Event.PREPARED, rec.id, 2)        # decision recorded: committing
    c.close()                                               # "crash" before COMMITTED arrives

    c2 = make(db_url)
    try:
        assert c2.placement_view("m").stored.plan_version == 2
        [done] = c2.store.list_rollouts("m")
        assert done.state == "committed" and "restarted after the commit decision" in done.reason
        # an agent reconnects: rank 0 has v2 staged -> commit; rank 1 never got it -> sync
        s = c2.rollouts.connect()
        c2.rollouts.handle(s, Event(kind=Event.HELLO, node="n0", workers=[
            pb.WorkerInfo(node="n0", rank=0, placement="m", plan_version=1, prepared_version=2),
            pb.WorkerInfo(node="n0", rank=1, placement="m", plan_version=1)]))
        kinds = [(cmd.WhichOneof("command"), cmd.rollout_id.startswith("sync-")) for cmd in drain(s)]
        assert kinds == [("prepare", True), ("prepare", True)]
        sync_id = c2.rollouts.active_ids()[0]
        answer(c2, s, "n0", (0, 1), Event.PREPARED, sync_id, 2)
        assert [cmd.commit for cmd in drain(s)] == [2]
    finally:
        c2.close()


def test_restart_aborts_an_undecided_rollout(db_url):
    c = make(db_url)
    c.apply_placement(SPEC)
    agents(c)
    c.rollouts.start("m", store_v2(c), 1, 4)
    c.close()
    c2 = make(db_url)
    try:
        [done] = c2.store.list_rollouts("m")
        assert done.state == "aborted" and "before the commit decision" in done.reason
        assert c2.placement_view("m").stored.plan_version == 1
        # a worker that still holds the staged v2 is told to drop it
        s = c2.rollouts.connect()
        c2.rollouts.handle(s, Event(kind=Event.HELLO, node="n0", workers=[
            pb.WorkerInfo(node="n0", rank=0, placement="m", plan_version=1, prepared_version=2)]))
        assert [cmd.abort for cmd in drain(s)] == [2]
    finally:
        c2.close()


def test_bias_goes_to_every_agent_of_the_placement(ctl):
    ags = agents(ctl)
    assert ctl.push_bias("m", np.zeros((2, 8)), 7) == 2
    for s, _, _ in ags:
        [cmd] = drain(s)
        assert cmd.bias.sequence == 7
    assert ctl.load_window("m")[1].sequence == 7


def test_the_state_machine_returns_its_effects_and_does_no_io():
    """``RolloutMachine`` alone (no store, no controller): each event returns the records to save
    and the commands to send, in order; the machine itself sends and saves nothing."""
    machine = RolloutMachine(timeout_seconds=5.0)
    s = AgentSession(node="n0")
    workers = {r: (s, pb.WorkerInfo(node="n0", rank=r, placement="m")) for r in (0, 1)}
    plan = pb.Plan(summary=pb.PlanSummary(placement="m", version=2))
    rec, eff = machine.start("m", plan, 1, 2, workers, now=0.0)
    assert [op for op, _ in eff.saves] == ["create"] and eff.saves[0][1].state == "preparing"
    [(to, cmd)] = eff.sends                       # one prepare per agent, serialized once
    assert to is s and pb.RolloutCommand.FromString(cmd).prepare.summary.version == 2
    assert s.outbox.empty() and machine.busy("m")
    with pytest.raises(FailedPrecondition, match="^rollout:"):
        machine.start("m", plan, 1, 2, workers, now=0.0)
    prepared = Event(kind=Event.PREPARED, rollout_id=rec.id, workers=[
        pb.WorkerInfo(node="n0", rank=r, placement="m") for r in (0, 1)])
    eff = machine.answer(s, prepared, now=1.0)
    assert [op for op, _ in eff.saves] == ["decide"] and [r.to_version for r in eff.committed] == [2]
    assert [c.commit for _, c in eff.sends] == [2] and machine.state("m") == "committing"
    eff = machine.expire(now=7.0)                 # the commit outlived its deadline: it stands
    assert [(op, r.state) for op, r in eff.saves] == [("finish", "committed")]
    assert [r.id for r in eff.finished] == [rec.id] and not machine.busy("m")
    late = machine.answer(s, prepared, now=8.0)
    assert (late.saves, late.sends, late.finished) == ([], [], [])
