"""Plan versions only grow, over real gRPC with simulated agents: a reshape is the next version
of the same history; a placement restored on an empty store keeps its version and map; proposals
are stored without a rollout and rolled out when approved; a rollback rolls an earlier map out as
a new version; the commit time shows in ListPlacements at once; an initial load read from a file
of the controller's load directory."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from expertplane.controller.config import ControllerConfig
from expertplane.controller.server import ControllerServer
from expertplane.benchmarks.simagent import SimulatedAgent, load_report
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.tensors import int64_tensor, to_numpy

from tests.k8s_fixture import wait_for


def spec(replicas=12, nodes=2) -> pb.Placement:
    return pb.Placement(
        name="m", model=pb.ModelSpec(num_layers=2, num_experts=8, num_groups=2, expert_bytes=1 << 20),
        topology=pb.Topology(num_nodes=nodes, gpus_per_node=2), num_replicas=replicas,
        algorithm="deepseek", policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.MANUAL))


class Running:
    def __init__(self, db):
        self.server = ControllerServer(ControllerConfig(listen="127.0.0.1:0", db_url=f"sqlite:///{db}"))
        self.port = self.server.start()
        self.channel = make_channel(f"127.0.0.1:{self.port}")
        self.plans = pb_grpc.PlanServiceStub(self.channel)
        self.planning = pb_grpc.PlanningServiceStub(self.channel)

    def state(self) -> pb.PlacementState:
        return next(p for p in self.plans.ListPlacements(pb.ListPlacementsRequest(), timeout=30).placements
                    if p.spec.name == "m")

    def history(self) -> list[tuple[int, str]]:
        resp = self.plans.ListPlans(pb.ListPlansRequest(placement="m"), timeout=30)
        return [(p.version, p.reason) for p in resp.plans]

    def phy2log(self, version=0) -> np.ndarray:
        plan = self.plans.GetPlan(pb.GetPlanRequest(placement="m", version=version), timeout=30)
        return to_numpy(plan.phy2log, "phy2log")

    def close(self):
        self.channel.close()
        self.server.stop(0.2)


@pytest.fixture
def controller(tmp_path):
    c = Running(tmp_path / "a.db")
    yield c
    c.close()


def _skewed_load(c: Running, version: int) -> None:
    """Report a load with expert 0 hot, counted per slot under plan ``version``."""
    phy2log = c.phy2log(version)
    skew = np.ones((2, 8))
    skew[:, 0] = 200.0
    counts = np.array([[skew[layer, e] / np.count_nonzero(phy2log[layer] == e) for e in phy2log[layer]]
                       for layer in range(2)])
    reports = [load_report(f"n{r // 2}", r, "m", version, 1, counts[:, 3 * r:3 * r + 3].astype(int))
               for r in range(4)]
    acks = list(pb_grpc.LoadServiceStub(c.channel).ReportLoad(iter(reports), timeout=30))
    assert {a.status for a in acks} == {pb.LoadAck.ACCEPTED}


def test_reshape_is_the_next_version_of_the_same_history(controller):
    assert controller.plans.ApplyPlacement(spec(), timeout=60).plan_version == 1
    state = controller.plans.ApplyPlacement(spec(replicas=16), timeout=60)
    assert state.plan_version == 2 and state.spec.num_replicas == 16
    assert controller.history() == [(1, "initial"), (2, "reshape")]
    assert controller.phy2log(1).shape == (2, 12) and controller.phy2log(2).shape == (2, 16)
    state = controller.plans.ApplyPlacement(spec(replicas=8, nodes=1), timeout=60)
    assert state.plan_version == 3 and controller.phy2log().shape == (2, 8)


def test_restore_on_an_empty_store_keeps_version_and_map(controller, tmp_path):
    controller.plans.ApplyPlacement(spec(), timeout=60)
    controller.plans.ApplyPlacement(spec(replicas=16), timeout=60)
    kept = controller.phy2log(2)[:, ::-1].copy()           # any valid map: reversed slots
    fresh = Running(tmp_path / "empty.db")
    try:
        msg = spec(replicas=16)
        msg.restore_phy2log.CopyFrom(int64_tensor(kept))
        msg.restore_version = 7
        state = fresh.plans.ApplyPlacement(msg, timeout=60)
        assert state.plan_version == 7 and fresh.history() == [(7, "restored")]
        assert np.array_equal(fresh.phy2log(7), kept)
        # Restoring applies only to a placement without plans; then versions go on from 7.
        assert fresh.plans.ApplyPlacement(msg, timeout=60).plan_version == 7
        assert fresh.plans.ApplyPlacement(spec(replicas=12), timeout=60).plan_version == 8
        bad = spec(replicas=12)
        bad.name = "other"
        bad.restore_phy2log.CopyFrom(int64_tensor(np.zeros((2, 12), np.int64)))
        bad.restore_version = 3
        with pytest.raises(grpc.RpcError) as err:
            fresh.plans.ApplyPlacement(bad, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "restore_phy2log: every expert of every layer needs a slot"
    finally:
        fresh.close()


def test_propose_approve_and_rollback(controller):
    c = controller
    c.plans.ApplyPlacement(spec(), timeout=60)
    agents = [SimulatedAgent(c.channel, f"n{i}", "m", (2 * i, 2 * i + 1), plan_version=1).start()
              for i in range(2)]
    try:
        _skewed_load(c, 1)
        wait_for(lambda: sum(len(a.workers) for a in agents) == 4, what="agents")
        d = c.planning.TriggerRebalance(pb.TriggerRebalanceRequest(placement="m", propose=True),
                                        timeout=60)
        assert (d.rebalance, d.new_version) == (False, 2) and d.reason.startswith("proposed as v2")
        assert d.predicted_balance < d.in_force_balance_mean and d.slots_moved > 0
        assert c.state().plan_version == 1 and c.history()[-1] == (2, "proposal")
        assert not c.state().HasField("last_rebalance")
        d = c.planning.TriggerRebalance(pb.TriggerRebalanceRequest(placement="m", version=2), timeout=60)
        assert d.rebalance and d.new_version == 2 and d.reason == "proposal"
        for a in agents:
            assert a.wait_for(lambda a: set(a.versions().values()) == {2}), a.versions()
        state = wait_for(lambda: (s := c.state()).plan_version == 2 and not s.rollout_state and s,
                         what="v2 committed")
        assert state.HasField("last_rebalance")                 # at once, in memory
        # Roll back to v1: its map as v3.
        d = c.planning.TriggerRebalance(pb.TriggerRebalanceRequest(placement="m", version=1), timeout=60)
        assert d.new_version == 3 and d.reason == "rollback to v1"
        for a in agents:
            assert a.wait_for(lambda a: set(a.versions().values()) == {3}), a.versions()
        wait_for(lambda: (s := c.state()).plan_version == 3 and not s.rollout_state, what="v3")
        assert np.array_equal(c.phy2log(3), c.phy2log(1))
        with pytest.raises(grpc.RpcError) as err:
            c.planning.TriggerRebalance(pb.TriggerRebalanceRequest(placement="m", version=3), timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == "version: v3 is the plan in force"
        with pytest.raises(grpc.RpcError) as err:
            c.planning.TriggerRebalance(pb.TriggerRebalanceRequest(placement="m", version=9), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        for a in agents:
            a.stop()
    assert [v for v, _ in c.history()] == [1, 2, 3]


def test_initial_load_from_a_file_in_the_load_directory(tmp_path):
    loads = tmp_path / "loads"
    loads.mkdir()
    load = np.ones((2, 8))
    load[:, 3] = 50.0
    (loads / "hot3.json").write_text(json.dumps({"loads": load.tolist()}))
    (tmp_path / "outside.json").write_text(json.dumps(load.tolist()))
    server = ControllerServer(ControllerConfig(listen="127.0.0.1:0", db_url=f"sqlite:///{tmp_path}/p.db",
                                               load_dir=str(loads)))
    port = server.start()
    channel = make_channel(f"127.0.0.1:{port}")
    try:
        plans = pb_grpc.PlanServiceStub(channel)
        msg = spec()
        msg.initial_load_file = "hot3.json"
        plans.ApplyPlacement(msg, timeout=60)
        plan = plans.GetPlan(pb.GetPlanRequest(placement="m"), timeout=30)
        assert np.array_equal(to_numpy(plan.load_snapshot, "load_snapshot"), load)
        assert np.count_nonzero(to_numpy(plan.phy2log, "phy2log")[0] == 3) > 1
        for name, details in [("../outside.json", "initial_load_file: must name a file inside the "
                                                   "load directory, got '../outside.json'"),
                              ("nope.json", "initial_load_file: no file 'nope.json' in the load "
                                            "directory")]:
            bad = spec()
            bad.name, bad.initial_load_file = "other", name
            with pytest.raises(grpc.RpcError) as err:
                plans.ApplyPlacement(bad, timeout=60)
            assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
    finally:
        channel.close()
        server.stop(0.2)
