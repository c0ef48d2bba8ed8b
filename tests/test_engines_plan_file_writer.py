"""The agent's plan-file sidecar against the REAL controller: an engine placement (no ExpertPlane
workers) gets its plan in force written to the plan file, and each new plan in force replaces it."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from expertplane.agent.agent import Agent
from expertplane.agent.config import AgentConfig
from expertplane.controller.config import ControllerConfig
from expertplane.controller.server import ControllerServer
from expertplane.engines.plan_file import read_plan_file
from expertplane.engines.plan_file_writer import PlanFileWriter
from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.tensors import double_tensor, int64_tensor


def _placement(load) -> pb.Placement:
    return pb.Placement(
        name="sgl", model=pb.ModelSpec(num_layers=2, num_experts=8, num_groups=1),
        topology=pb.Topology(num_nodes=1, gpus_per_node=2), num_replicas=10, algorithm="deepseek",
        policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.MANUAL, window_seconds=300),
        initial_load=double_tensor(load))


def _wait(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_plan_in_force_reaches_the_file(tmp_path):
    server = ControllerServer(ControllerConfig(
        listen="127.0.0.1:0", db_url=f"sqlite:///{tmp_path / 'c.db'}",
        policy_interval_seconds=3600.0, snapshot_interval_seconds=3600.0))
    server.start()
    path = tmp_path / "shared" / "plan.json"
    agent = Agent(AgentConfig(controller=f"127.0.0.1:{server.port}", node="n0"),
                  sidecars=[lambda ctx: PlanFileWriter("sgl", path, ctx.channel, poll=0.05)])
    try:
        agent.start()
        time.sleep(0.3)
        assert read_plan_file(path) is None            # no placement yet: no file, no crash
        skew = np.ones((2, 8))
        skew[:, 0] = 50.0
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            pb_grpc.PlanServiceStub(ch).ApplyPlacement(_placement(skew), timeout=120)
            _wait(lambda: read_plan_file(path) is not None)
            first = read_plan_file(path)
            in_force = pb_grpc.PlanServiceStub(ch).GetPlan(
                pb.GetPlanRequest(placement="sgl", in_force=True), timeout=10)
            assert (first.placement, first.version) == ("sgl", in_force.summary.version)
            assert np.array_equal(first.phy2log, np.reshape(in_force.phy2log.values, (2, 10)))
            assert (first.phy2log[:, :] == 0).sum(axis=1).min() >= 2   # the hot expert replicated
            # a different load: the controller's next plan goes in force (no workers to wait for)
            other = np.ones((2, 8))
            other[:, 7] = 80.0
            pb_grpc.PlanServiceStub(ch).ApplyPlacement(_placement(other), timeout=120)
            decision = pb_grpc.PlanningServiceStub(ch).TriggerRebalance(
                pb.TriggerRebalanceRequest(placement="sgl", force=True), timeout=120)
            assert decision.rebalance, decision.reason
            _wait(lambda: read_plan_file(path).version > first.version)
            second = read_plan_file(path)
            assert second.version == pb_grpc.PlanServiceStub(ch).GetPlan(
                pb.GetPlanRequest(placement="sgl", in_force=True), timeout=10).summary.version
            writer = agent.sidecars[0]
            _wait(lambda: writer.written == second.version)
            assert not writer.sync()                      # unchanged in force: no write
    finally:
        agent.stop(flush_timeout=0)
        server.stop(grace=0)


def test_writer_needs_a_placement(tmp_path):
    with grpc.insecure_channel("127.0.0.1:1") as ch:
        with pytest.raises(FieldError, match="plan_placement"):
            PlanFileWriter("", tmp_path / "p.json", ch)
        with pytest.raises(FieldError, match="plan_poll"):
            PlanFileWriter("x", tmp_path / "p.json", ch, poll=0)


def test_unusable_file_on_disk_is_rewritten(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with grpc.insecure_channel("127.0.0.1:1") as ch:
        assert PlanFileWriter("x", path, ch).written == 0
