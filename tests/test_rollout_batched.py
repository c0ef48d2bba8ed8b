"""Batched commands and the HELLO answer (rollout protocol BATCHED).

The pure ``RolloutMachine`` first: one agent's workers brought to the plan in force share one
prepare (the plan once, their ranks named) and one commit; an agent of the original protocol
still gets a command per worker; a sync goes on without a worker that fails, is lost or times
out. Then the real controller over gRPC on loopback with simulated agents of both protocols."""

import time

import numpy as np
import pytest

from expertplane.benchmarks.simagent import SimulatedAgent
from expertplane.controller.config import ControllerConfig
from expertplane.controller.convert import plan_message
from expertplane.controller.rollout import RolloutMachine
from expertplane.controller.server import ControllerServer
from expertplane.controller.sessions import AgentSession
from expertplane.controller.spec import PlacementSpec
from expertplane.controller.store import PlanRecord, utcnow
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.channels import make_channel

Event = pb.RolloutEvent
BATCHED, ORIGINAL = pb.ROLLOUT_PROTOCOL_BATCHED, pb.ROLLOUT_PROTOCOL_ORIGINAL
PLAN = pb.Plan(summary=pb.PlanSummary(placement="m", version=2))
pytestmark = pytest.mark.timeout(120)


def session(protocol: int, node: str = "n0") -> AgentSession:
    s = AgentSession(node=node)
    s.protocol = protocol
    return s


def infos(ranks, plan_version=1, prepared_version=0) -> list[pb.WorkerInfo]:
    return [pb.WorkerInfo(node="n0", rank=r, placement="m", plan_version=plan_version,
                          prepared_version=prepared_version) for r in ranks]


def answer(machine, s, kind, rollout_id, ranks, now=1.0, message=""):
    return machine.answer(s, Event(kind=kind, rollout_id=rollout_id, message=message,
                                   workers=infos(ranks)), now=now)


def commands(eff) -> list[tuple[str, int, list[int]]]:
    """(kind, version, ranks) of each command sent."""
    out = []
    for _, cmd in eff.sends:
        cmd = pb.RolloutCommand.FromString(cmd) if isinstance(cmd, bytes) else cmd
        which = cmd.WhichOneof("command")
        version = cmd.prepare.summary.version if which == "prepare" else getattr(cmd, which)
        out.append((which, version, list(cmd.ranks)))
    return out


# ---------------------------------------------------------------- the pure machine


def test_a_batching_agent_gets_one_prepare_and_one_commit_for_all_its_workers_behind():
    machine = RolloutMachine(timeout_seconds=5.0)
    s = session(BATCHED)
    eff = machine.joined(s, infos(range(8)), (2, PLAN), now=0.0)
    assert [(op, r.sync, r.to_version) for op, r in eff.saves] == [("create", True, 2)]
    assert commands(eff) == [("prepare", 2, list(range(8)))]      # the plan once, 8 ranks named
    [sync_id] = machine.active_ids()
    assert answer(machine, s, Event.PREPARED, sync_id, range(7)).sends == []
    eff = answer(machine, s, Event.PREPARED, sync_id, [7])
    assert [op for op, _ in eff.saves] == ["decide"] and eff.committed == []   # a sync: no news
    assert commands(eff) == [("commit", 2, list(range(8)))]
    eff = answer(machine, s, Event.COMMITTED, sync_id, range(8), now=2.0)
    assert [(op, r.state, r.reason) for op, r in eff.saves] == [("finish", "committed", "")]
    assert not machine.active_ids()


def test_an_agent_of_the_original_protocol_still_gets_a_command_per_worker():
    machine = RolloutMachine(timeout_seconds=5.0)
    s = session(ORIGINAL)
    eff = machine.joined(s, infos(range(3)), (2, PLAN), now=0.0)
    assert commands(eff) == [("prepare", 2, [])] * 3 and len(machine.active_ids()) == 3
    for sync_id in machine.active_ids():
        eff = machine.answer(s, Event(kind=Event.PREPARED, rollout_id=sync_id,
                                      workers=infos(range(3))), now=1.0)
        assert commands(eff) == [("commit", 2, [])]


def test_a_placement_wide_rollout_names_no_ranks_even_to_a_batching_agent():
    machine = RolloutMachine(timeout_seconds=5.0)
    s = session(BATCHED)
    workers = {r: (s, info) for r, info in enumerate(infos(range(2)))}
    rec, eff = machine.start("m", PLAN, 1, 2, workers, now=0.0)
    assert commands(eff) == [("prepare", 2, [])]
    eff = answer(machine, s, Event.PREPARED, rec.id, range(2))
    assert commands(eff) == [("commit", 2, [])]


def test_reconnecting_workers_get_one_commit_and_one_abort_per_stale_version():
    """A decided rollout's staged workers are committed together; versions staged for nothing
    are dropped with one abort per version; workers already syncing are left alone."""
    machine = RolloutMachine(timeout_seconds=5.0)
    old, s = session(BATCHED, "n0"), session(BATCHED, "n1")
    workers = {r: (old, info) for r, info in enumerate(infos(range(4)))}
    rec, _ = machine.start("m", PLAN, 1, 4, workers, now=0.0)
    answer(machine, old, Event.PREPARED, rec.id, range(4))          # decided: committing
    back = infos((0, 1), prepared_version=2) + infos((2, 3), prepared_version=5)
    eff = machine.joined(s, back, (1, None), now=1.0)
    assert commands(eff) == [("commit", 2, [0, 1]), ("abort", 5, [2, 3]), ("prepare", 2, [2, 3])]
    assert machine.reconcile(s, infos((2, 3)), (1, None), now=1.5).sends == []     # syncing


def test_a_sync_goes_on_without_a_worker_that_fails_or_is_lost():
    machine = RolloutMachine(timeout_seconds=5.0)
    s = session(BATCHED)
    machine.joined(s, infos(range(4)), (2, PLAN), now=0.0)
    [sync_id] = machine.active_ids()
    eff = answer(machine, s, Event.FAILED, sync_id, [1], message="no memory")
    assert commands(eff) == [("abort", 2, [1])] and machine.active(sync_id)
    answer(machine, s, Event.PREPARED, sync_id, (0, 3))
    eff = machine.lost(s, "m", 3, "worker crashed", now=1.0)     # prepared, then lost
    assert commands(eff) == [("abort", 2, [3])]
    eff = answer(machine, s, Event.PREPARED, sync_id, [2])
    [(op, decided)] = eff.saves
    assert op == "decide" and sorted(decided.acks["prepared"]) == [0, 2]
    assert commands(eff) == [("commit", 2, [0, 2])]
    eff = answer(machine, s, Event.COMMITTED, sync_id, (0, 2), now=2.0)
    [(_, done)] = eff.saves
    assert done.state == "committed"
    assert done.reason == "rank 1 on n0 failed: no memory; rank 3 lost during prepare: worker crashed"


def test_a_sync_timeout_drops_the_workers_that_did_not_prepare():
    machine = RolloutMachine(timeout_seconds=5.0)
    s = session(BATCHED)
    machine.joined(s, infos(range(3)), (2, PLAN), now=0.0)
    [sync_id] = machine.active_ids()
    answer(machine, s, Event.PREPARED, sync_id, (0, 1))
    eff = machine.expire(now=6.0)
    assert commands(eff) == [("abort", 2, [2]), ("commit", 2, [0, 1])]
    assert "ranks 2 did not prepare within 5 s" in eff.saves[-1][1].reason
    answer(machine, s, Event.COMMITTED, sync_id, (0, 1), now=7.0)
    assert not machine.active_ids()
    # none prepared in time: the sync ends aborted, every worker told to drop the version
    machine.joined(s, infos((5, 6)), (2, PLAN), now=10.0)
    eff = machine.expire(now=16.0)
    assert [r.state for _, r in eff.saves] == ["aborted"]
    assert commands(eff) == [("abort", 2, [5, 6])]


def test_the_only_worker_of_a_sync_failing_aborts_it():
    machine = RolloutMachine(timeout_seconds=5.0)
    s = session(BATCHED)
    machine.joined(s, infos([0]), (2, PLAN), now=0.0)
    [sync_id] = machine.active_ids()
    eff = answer(machine, s, Event.FAILED, sync_id, [0], message="bad plan")
    assert [r.state for _, r in eff.saves] == ["aborted"] and commands(eff) == [("abort", 2, [0])]
    assert not machine.active_ids()


# ---------------------------------------------------------------- the controller over gRPC

SPEC = PlacementSpec(name="m", num_layers=2, num_experts=8, num_nodes=2, gpus_per_node=2,
                     num_replicas=12, num_groups=2, expert_bytes=100)


@pytest.fixture
def server(sqlite_url):
    srv = ControllerServer(ControllerConfig(listen="127.0.0.1:0", db_url=sqlite_url,
                                            tick_seconds=0.02, policy_interval_seconds=3600,
                                            rollout_timeout_seconds=20))
    port = srv.start()
    srv.controller.apply_placement(SPEC)
    channel = make_channel(f"127.0.0.1:{port}")
    yield srv, channel
    channel.close()
    srv.stop(0.5)


def next_plan(srv) -> tuple[pb.Plan, int]:
    """Store the next version of "m" (a permutation of the one in force), not in force yet."""
    c = srv.controller
    cur = c.placement_view("m").stored.plan_version
    base = c.get_plan("m", cur)
    rec = PlanRecord(**{**base.__dict__, "version": 0, "reason": "api", "previous_version": cur,
                        "created_at": utcnow(), "phy2log": np.roll(base.phy2log, 1, axis=1)})
    return plan_message(c.store.add_plan(rec)), cur


def connect(channel, protocol, plan_version=1) -> list[SimulatedAgent]:
    return [SimulatedAgent(channel, f"n{i}", "m", (2 * i, 2 * i + 1), plan_version=plan_version,
                           protocol=protocol).start() for i in range(2)]


def rollout(srv) -> "pb.RolloutRecord":
    plan, cur = next_plan(srv)
    started = srv.controller.rollouts.start("m", plan, cur, 4)
    assert srv.controller.rollouts.wait(started.id, 20)
    [done] = [r for r in srv.controller.store.list_rollouts("m", 5) if r.id == started.id]
    return done


def test_a_rollout_started_right_after_the_hello_answer_commits(server):
    """Five times: two agents connect; as soon as each has its HELLO answered (listing its
    workers as registered) a rollout starts, and commits on all four ranks."""
    srv, channel = server
    for round_ in range(5):
        agents = connect(channel, BATCHED, plan_version=srv.controller.placement_view("m")
                         .stored.plan_version)
        try:
            for a in agents:
                assert a.wait_for(lambda ag: ag.hello is not None, timeout=10)
                assert a.hello.protocol == BATCHED
                assert sorted(w.rank for w in a.hello.workers) == sorted(a.workers)
            done = rollout(srv)
            assert (done.state, done.reason) == ("committed", ""), round_
            assert sorted(done.acks["committed"]) == [0, 1, 2, 3]
        finally:
            for a in agents:
                a.stop()
        deadline = time.monotonic() + 10
        while srv.controller.rollouts.workers("m") and time.monotonic() < deadline:
            time.sleep(0.02)


def test_an_agent_of_the_original_protocol_is_not_answered_and_still_works(server):
    srv, channel = server
    agents = connect(channel, ORIGINAL)
    try:
        deadline = time.monotonic() + 10
        while len(srv.controller.rollouts.workers("m")) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        done = rollout(srv)
        assert (done.state, sorted(done.acks["committed"])) == ("committed", [0, 1, 2, 3])
        assert all(a.hello is None for a in agents)
        assert all(a.wait_for(lambda ag: set(ag.versions().values()) == {2}) for a in agents)
    finally:
        for a in agents:
            a.stop()


@pytest.mark.parametrize("protocol", [BATCHED, ORIGINAL])
def test_workers_behind_are_brought_to_the_plan_in_force(server, protocol):
    """Agents whose workers run plan 1 connect while plan 2 is in force: an agent that batches
    gets ONE prepare (ranks named) and ONE commit, an older one a prepare and commit per worker;
    both end with every worker on plan 2."""
    srv, channel = server
    plan, cur = next_plan(srv)
    srv.controller.rollouts.start("m", plan, cur, 4)          # no worker connected: in force
    assert srv.controller.placement_view("m").stored.plan_version == 2
    agents = connect(channel, protocol)
    try:
        expected = {BATCHED: [("prepare", [0, 1]), ("commit", [0, 1])],
                    ORIGINAL: [("prepare", [])] * 2 + [("commit", [])] * 2}[protocol]
        for a in agents:
            assert a.wait_for(lambda ag: set(ag.versions().values()) == {2}
                              and len(ag.commands) >= len(expected))
            kinds = [(c.WhichOneof("command"), [r % 2 for r in c.ranks]) for c in a.commands]
            assert sorted(kinds, key=lambda k: k[0] == "commit") == expected
        deadline = time.monotonic() + 10
        while srv.controller.rollouts.active_ids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.controller.rollouts.active_ids() == []
        syncs = [r for r in srv.controller.store.list_rollouts("m", 10) if r.sync]
        assert len(syncs) == {BATCHED: 2, ORIGINAL: 4}[protocol]
        assert all((r.state, r.reason) == ("committed", "") for r in syncs)
    finally:
        for a in agents:
            a.stop()
