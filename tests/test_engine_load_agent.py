"""Engine load windows through a real agent to a real controller (gRPC on loopback): the
forwarder the vLLM plugin uses sends ``[L, E]`` windows to ``AgentService.ReportEngineLoad``, the
agent reports them as load per logical expert, repeats are not counted twice, malformed windows
are refused with INVALID_ARGUMENT naming the field, and an unreachable agent never blocks the
sender: its windows are dropped and counted."""

from __future__ import annotations

import math
import time

import grpc
import numpy as np
import pytest

from expertplane.agent.agent import Agent
from expertplane.agent.config import AgentConfig
from expertplane.controller.config import ControllerConfig
from expertplane.controller.server import ControllerServer
from expertplane.engines.load_forwarder import LoadForwarder
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.tensors import double_tensor, to_numpy

pytestmark = pytest.mark.timeout(300)
L, E = 2, 8


def _wait(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def stack(sqlite_url):
    """A controller with placement "m" (manual policy, 2 x 8 experts, 2 GPUs, 12 slots) and an
    agent reporting to it; yields (plans stub, agent, AgentService stub)."""
    server = ControllerServer(ControllerConfig(listen="127.0.0.1:0", db_url=sqlite_url,
                                               tick_seconds=0.02, policy_interval_seconds=3600))
    port = server.start()
    channel = make_channel(f"127.0.0.1:{port}")
    plans = pb_grpc.PlanServiceStub(channel)
    plans.ApplyPlacement(pb.Placement(
        name="m", model=pb.ModelSpec(num_layers=L, num_experts=E, num_groups=2, expert_bytes=1024),
        topology=pb.Topology(num_nodes=1, gpus_per_node=2), num_replicas=12,
        policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.MANUAL)), timeout=120)
    agent = Agent(AgentConfig(controller=f"127.0.0.1:{port}", node="n0", interval=0.1))
    address = agent.start()
    local = make_channel(address)
    try:
        yield plans, agent, pb_grpc.AgentServiceStub(local)
    finally:
        local.close()
        agent.stop(flush_timeout=1.0)
        channel.close()
        server.stop(0.5)


def test_forwarded_windows_reach_the_controller_as_logical_load(stack):
    plans, agent, _ = stack
    forwarder = LoadForwarder(agent.address, "m")
    windows = [np.full((L, E), 5.0), np.arange(L * E, dtype=float).reshape(L, E)]
    try:
        for w in windows:
            assert forwarder.offer(w)
        _wait(lambda: plans.GetLoad(pb.GetLoadRequest(placement="m"), timeout=10).reports == 2)
    finally:
        forwarder.close()
    window = plans.GetLoad(pb.GetLoadRequest(placement="m"), timeout=10)
    np.testing.assert_allclose(to_numpy(window.load, "load"), sum(windows))
    assert forwarder.counts.sent == 2 and forwarder.counts.dropped_unreachable == 0


def test_repeats_are_not_counted_and_malformed_windows_name_the_field(stack):
    plans, agent, stub = stack
    ok = pb.EngineLoadReport(placement="m", engine="vllm", expert_load=double_tensor(np.ones((L, E))),
                             engine_epoch=7, sequence=1)
    assert stub.ReportEngineLoad(ok, timeout=10).queued
    assert not stub.ReportEngineLoad(ok, timeout=10).queued            # same epoch and sequence
    bad = {
        "placement": pb.EngineLoadReport(expert_load=double_tensor(np.ones((L, E)))),
        "expert_load": pb.EngineLoadReport(placement="m", expert_load=double_tensor(np.ones(E))),
    }
    nan = double_tensor(np.ones((L, E)))
    nan.values[3] = math.nan
    negative = double_tensor(-np.ones((L, E)))
    for field, msg in [*bad.items(), ("expert_load", pb.EngineLoadReport(placement="m", expert_load=nan)),
                       ("expert_load", pb.EngineLoadReport(placement="m", expert_load=negative))]:
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportEngineLoad(msg, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}:")
    _wait(lambda: plans.GetLoad(pb.GetLoadRequest(placement="m"), timeout=10).reports == 1)
    time.sleep(0.3)                                                    # nothing else arrives
    window = plans.GetLoad(pb.GetLoadRequest(placement="m"), timeout=10)
    assert window.reports == 1
    np.testing.assert_allclose(to_numpy(window.load, "load"), np.ones((L, E)))


def test_unreachable_agent_never_blocks_the_sender():
    forwarder = LoadForwarder("127.0.0.1:9", "m")        # nothing listens on the discard port
    try:
        started = time.perf_counter()
        accepted = [forwarder.offer(np.ones((L, E))) for _ in range(50)]
        offer_seconds = time.perf_counter() - started
        assert offer_seconds < 0.5, offer_seconds                      # never waits on the network
        assert accepted.count(False) == forwarder.counts.dropped_full >= 40   # bounded queue
        _wait(lambda: forwarder.counts.dropped_unreachable >= 1, timeout=30)
        assert forwarder.counts.sent == 0
    finally:
        forwarder.close(timeout=1.0)
