"""The agent with REAL `expertplane worker` processes (synthetic MoE model, 2 gloo ranks) and the
REAL controller: registration, counters streamed as load, a two-phase rollout (hot-swap to a new
plan) relayed by the agent, a crash reported as WORKER_LOST, and the restarted job reporting again
through the same agent."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc

_spec = importlib.util.spec_from_file_location("agent_controller_support",
                                               Path(__file__).with_name("test_agent_controller.py"))
support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(support)
e2e = support.e2e
make_agent, workers = e2e.make_agent, e2e.workers      # fixtures shared with the e2e tests

LAYERS, EXPERTS, REPLICAS, WORLD = 2, 4, 6, 2
PLACEMENT = pb.Placement(
    name="demo", model=pb.ModelSpec(num_layers=LAYERS, num_experts=EXPERTS, num_groups=1),
    topology=pb.Topology(num_nodes=1, gpus_per_node=WORLD), num_replicas=REPLICAS,
    algorithm="deepseek",
    policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.MANUAL, window_seconds=300))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_real_workers(tmp_path, agent_address: str, controller_port: int, extra: tuple = (),
                       log_level: str = "INFO") -> list[subprocess.Popen]:
    """``expertplane worker`` ranks of PLACEMENT logging to ``tmp_path/worker{rank}.log``;
    ``extra``: more worker options."""
    master = f"127.0.0.1:{_free_port()}"
    procs = []
    for rank in range(WORLD):
        log = open(tmp_path / f"worker{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "expertplane.cli.main", "--log-level", log_level, "worker",
             "--rank", str(rank),
             "--world-size", str(WORLD), "--master", master, "--node", "node-a",
             "--placement", "demo", "--agent", agent_address,
             "--controller", f"127.0.0.1:{controller_port}",
             "--listen", f"unix:{tmp_path / f'worker{rank}.sock'}",
             "--layers", str(LAYERS), "--experts", str(EXPERTS), "--top-k", "2",
             "--hidden", "16", "--intermediate", "32", "--tokens-per-step", "32",
             "--step-interval", "0.02", *extra],
            stdout=log, stderr=subprocess.STDOUT))
    return procs


@pytest.mark.timeout(180)
def test_real_workers_report_swap_plans_and_crash_through_the_agent(tmp_path, make_agent, workers):
    c, spy = support.start_controller(tmp_path / "controller.db")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{c.port}") as ch:
            pb_grpc.PlanServiceStub(ch).ApplyPlacement(PLACEMENT, timeout=30)
        agent = make_agent(c.port, interval=0.2, lost_after=3)
        workers += start_real_workers(tmp_path, agent.start(), c.port)
        e2e.wait_for(lambda: set(c.controller.rollouts.workers("demo")) == {0, 1}, timeout=90,
                     what="both real workers registered and announced (see worker*.log)")
        e2e.wait_for(lambda: all(sum(sum(r.slot_counts.values) for r in spy.accepted(rank)) > 0
                                 for rank in (0, 1)), timeout=60, what="tokens counted per rank")
        for rank in (0, 1):
            reports = spy.accepted(rank)
            assert [r.sequence for r in reports] == list(range(1, len(reports) + 1))
            for r in reports:
                assert list(r.slot_counts.shape) == [LAYERS, REPLICAS // WORLD]
                assert r.plan_version == 1 and r.node == "node-a" and r.placement == "demo"
                assert r.window_end.ToNanoseconds() >= r.window_start.ToNanoseconds()
        # a two-phase rollout relayed by the agent: the workers hot-swap to plan 2 and count under it
        with grpc.insecure_channel(f"127.0.0.1:{c.port}") as ch:
            decision = pb_grpc.PlanningServiceStub(ch).TriggerRebalance(
                pb.TriggerRebalanceRequest(placement="demo", force=True), timeout=30)
            assert decision.new_version == 2, decision
            e2e.wait_for(lambda: [r.state for r in pb_grpc.PlanServiceStub(ch).ListRollouts(
                pb.ListRolloutsRequest(placement="demo"), timeout=10).rollouts] == ["committed"],
                timeout=60, what="rollout of plan 2 committed")
        e2e.wait_for(lambda: all(spy.accepted(rank)[-1].plan_version == 2 for rank in (0, 1)),
                     what="reports counted under plan 2")
        assert sorted((h.info.rank, h.info.plan_version) for h in agent.registry.handles()) == \
            [(0, 2), (1, 2)]
        assert agent.metrics.rollout_calls.labels(command="commit", outcome="ok")._value.get() == 2
        workers[1].kill()                                 # rank 1 crashes; rank 0's collectives
        e2e.wait_for(lambda: not c.controller.rollouts.workers("demo"), timeout=30,   # then fail too
                     what="both ranks reported WORKER_LOST to the controller")
        assert not agent.registry.handles() and agent.metrics.workers_lost._value.get() == 2
        # the agent keeps going: the job is restarted and its new processes report again
        last = {rank: spy.accepted(rank)[-1].sequence for rank in (0, 1)}
        for p in workers:
            p.wait(30)
        workers[:] = start_real_workers(tmp_path, agent.address, c.port)
        e2e.wait_for(lambda: all(spy.accepted(rank)[-1].sequence > last[rank] + 2 for rank in (0, 1)),
                     timeout=90, what="reports from the restarted workers")
        assert set(c.controller.rollouts.workers("demo")) == {0, 1}
        for rank in (0, 1):                               # same agent: sequences go on, no reset
            seqs = [r.sequence for r in spy.accepted(rank)]
            assert seqs == sorted(set(seqs))
    finally:
        c.stop(grace=0)
        for p in workers:
            if p.poll() is None:
                p.kill()
