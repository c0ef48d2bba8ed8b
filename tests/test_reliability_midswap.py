"""An agent dies, or a worker is lost, in the middle of a swap (after the prepare was sent, before
every worker prepared): the rollout aborts cleanly and is recorded, the other workers keep the
old plan with nothing staged, and a restarted worker rejoins on the plan in force."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reliability_support as rs  # noqa: E402

from expertplane.benchmarks.simagent import SimulatedAgent  # noqa: E402
from expertplane.controller.config import ControllerConfig  # noqa: E402
from expertplane.controller.server import ControllerServer  # noqa: E402
from expertplane.proto import expertplane_pb2 as pb  # noqa: E402
from expertplane.proto import expertplane_pb2_grpc as pb_grpc  # noqa: E402
from expertplane.rpc.channels import make_channel  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(sqlite_url):
    """A controller with placement "m" (v1) and two simulated agents whose workers are on v1;
    the agents on n1 stall their prepare (the swap stays in flight)."""
    srv = ControllerServer(ControllerConfig(listen="127.0.0.1:0", db_url=sqlite_url,
                                            policy_interval_seconds=3600, tick_seconds=0.02,
                                            rollout_timeout_seconds=60))
    srv.start()
    channel = make_channel(f"127.0.0.1:{srv.port}")
    pb_grpc.PlanServiceStub(channel).ApplyPlacement(
        rs.small_placement("m", mode=pb.RebalancePolicy.MANUAL), timeout=60)
    agents = [SimulatedAgent(channel, f"n{i}", "m", (2 * i, 2 * i + 1), plan_version=1).start()
              for i in range(2)]
    for w in agents[1].workers.values():
        w.stall_prepare = True
    rs.wait_until(lambda: len(srv.controller.rollouts.workers("m")) == 4, 10, "workers joined")
    yield srv, channel, agents
    for a in agents:
        a.stop()
    channel.close()
    srv.stop(0.5)


def start_swap(channel, agents) -> None:
    d = pb_grpc.PlanningServiceStub(channel).TriggerRebalance(
        pb.TriggerRebalanceRequest(placement="m", force=True), timeout=120)
    assert d.rebalance and d.new_version == 2, d
    rs.wait_until(lambda: all(w.prepared_version == 2 for w in agents[0].workers.values()), 10,
                  "n0 prepared v2")


def assert_aborted_on_v1(channel, agents, reason_part: str) -> None:
    plans = pb_grpc.PlanServiceStub(channel)
    rec = rs.wait_until(lambda: next((r for r in plans.ListRollouts(
        pb.ListRolloutsRequest(placement="m"), timeout=5).rollouts
        if r.to_version == 2 and r.state == "aborted"), None), 15, "rollout aborted")
    assert reason_part in rec.reason, rec.reason
    assert agents[0].wait_for(lambda a: all(w.plan_version == 1 and w.prepared_version == 0
                                            for w in a.workers.values()))
    [state] = plans.ListPlacements(pb.ListPlacementsRequest(), timeout=5).placements
    assert state.plan_version == 1 and state.rollout_state == ""
    assert len(plans.ListPlans(pb.ListPlansRequest(placement="m"), timeout=5).plans) == 2


def test_agent_dies_mid_swap(cluster):
    srv, channel, agents = cluster
    start_swap(channel, agents)
    agents[1].stop()                               # the agent's stream is gone mid-prepare
    assert_aborted_on_v1(channel, agents, "rank")
    # the node's agent restarts; its workers were restarted too (no plan): they rejoin on v1
    back = SimulatedAgent(channel, "n1", "m", (2, 3), plan_version=0).start()
    agents.append(back)
    assert back.wait_for(lambda a: set(a.versions().values()) == {1}, timeout=15)


def test_worker_lost_mid_swap(cluster):
    srv, channel, agents = cluster
    start_swap(channel, agents)
    agents[1].send(pb.RolloutEvent.WORKER_LOST, [3], "process exited (SIGKILL)")
    assert_aborted_on_v1(channel, agents, "3")
    # the lost worker restarts without a plan and rejoins on the plan in force
    agents[1].workers[3].plan_version = agents[1].workers[3].prepared_version = 0
    agents[1].workers[3].stall_prepare = False
    agents[1].send(pb.RolloutEvent.WORKER_JOINED, [3])
    assert agents[1].wait_for(lambda a: a.workers[3].plan_version == 1, timeout=15)
