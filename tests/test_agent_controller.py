"""The agent against the REAL controller (ControllerServer, SQLite store) and worker processes:
a controller restart while the agent streams, and a two-phase rollout relayed to the workers."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import grpc
import pytest

from expertplane.controller.config import ControllerConfig
from expertplane.controller.server import ControllerServer
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.security import SecurityConfig, call_metadata

_spec = importlib.util.spec_from_file_location("agent_e2e_support",
                                               Path(__file__).with_name("test_agent_e2e.py"))
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)
make_agent, workers = e2e.make_agent, e2e.workers      # fixtures shared with the e2e tests

PLACEMENT = pb.Placement(
    name="demo", model=pb.ModelSpec(num_layers=e2e.LAYERS, num_experts=4, num_groups=1),
    topology=pb.Topology(num_nodes=1, gpus_per_node=2), num_replicas=2 * e2e.SLOTS,
    algorithm="deepseek",
    policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.MANUAL, window_seconds=300))


class Spy:
    """Records what a real controller answered for every report (wraps ``Controller.ingest``)."""

    def __init__(self, server: ControllerServer):
        self.answers: list[tuple[pb.LoadReport, int]] = []
        self.lock = threading.Lock()
        real = server.controller.ingest

        def ingest(report):
            res = real(report)
            with self.lock:
                self.answers.append((report, res.status))
            return res

        server.controller.ingest = ingest

    def accepted(self, rank: int) -> list[pb.LoadReport]:
        with self.lock:
            return [r for r, s in self.answers if s == pb.LoadAck.ACCEPTED and r.worker_rank == rank]


def start_controller(db: Path, port: int = 0, security=None) -> tuple[ControllerServer, Spy]:
    server = ControllerServer(ControllerConfig(listen=f"127.0.0.1:{port}", db_url=f"sqlite:///{db}",
                                               security=security or SecurityConfig(),
                                               policy_interval_seconds=3600.0,
                                               snapshot_interval_seconds=3600.0,
                                               rollout_timeout_seconds=20.0))
    spy = Spy(server)
    server.start()
    return server, spy


@pytest.mark.timeout(120)
def test_real_controller_restart_while_streaming(tmp_path, make_agent, workers):
    db = tmp_path / "controller.db"
    c1, spy1 = start_controller(db)
    port = c1.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        pb_grpc.PlanServiceStub(ch).ApplyPlacement(PLACEMENT, timeout=30)
    agent = make_agent(port, buffer=6)
    address = agent.start()
    workers += [e2e.start_worker(tmp_path, address, r) for r in (0, 1)]
    e2e.wait_for(lambda: all(len(spy1.accepted(r)) >= 5 for r in (0, 1)), what="reports to c1")
    c1.stop(grace=0)                                  # the controller dies mid-stream
    time.sleep(1.5)                                   # ~15 windows per worker; the buffer holds 6
    c2, spy2 = start_controller(db, port)             # restarted: same store, same address
    try:
        e2e.wait_for(lambda: all(len(spy2.accepted(r)) >= 10 for r in (0, 1)), timeout=30,
                     what="reports to the restarted controller")
        e2e.wait_for(lambda: set(c2.controller.rollouts.workers("demo")) == {0, 1},
                     what="workers re-announced by HELLO")
        for w in workers:
            w.terminate()
            w.wait(5)
        assert agent.stop(flush_timeout=10.0)         # final pull flushed and ACKed
        for rank in (0, 1):
            first = [r.sequence for r in spy1.accepted(rank)]
            second = [r.sequence for r in spy2.accepted(rank)]
            # each controller counted every sequence at most once, in order
            assert first == sorted(set(first)) and second == sorted(set(second))
            # only the report in flight when c1 died can reach both (c1 counted it, its ACK was lost)
            assert len(set(first) & set(second)) <= 1
            seen = set(first) | set(second)
            last = max(seen)
            assert last == e2e.served_pulls(tmp_path, rank)   # every pull became one report
            missing = set(range(1, last + 1)) - seen
            assert missing, "the outage should have overflowed the 6-report buffer"
            # the gap reached the controller, counted once: dropped windows == missing sequences
            assert sum(r.dropped_windows for r in spy2.accepted(rank)) == len(missing)
            assert sum(r.dropped_windows for r in spy1.accepted(rank)) == 0
            assert all(r.agent_epoch == agent.epoch and r.plan_version == 1
                       for r in spy1.accepted(rank) + spy2.accepted(rank))
        # the restarted controller's window holds each accepted report exactly once
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            window = pb_grpc.PlanServiceStub(ch).GetLoad(pb.GetLoadRequest(placement="demo"), timeout=10)
        n0, n1 = len(spy2.accepted(0)), len(spy2.accepted(1))
        assert window.reports == n0 + n1
        assert sum(window.load.values) == pytest.approx(n0 * sum(e2e.slot_counts(0))
                                                        + n1 * sum(e2e.slot_counts(1)))
    finally:
        c2.stop(grace=0)


@pytest.mark.timeout(120)
def test_real_controller_rollout_is_relayed_to_worker_processes(tmp_path, make_agent, workers):
    c, spy = start_controller(tmp_path / "controller.db")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{c.port}") as ch:
            plans = pb_grpc.PlanServiceStub(ch)
            plans.ApplyPlacement(PLACEMENT, timeout=30)
            agent = make_agent(c.port)
            address = agent.start()
            workers += [e2e.start_worker(tmp_path, address, r, "--prepare-delay", "0.3") for r in (0, 1)]
            e2e.wait_for(lambda: set(c.controller.rollouts.workers("demo")) == {0, 1},
                         what="workers known to the controller")
            e2e.wait_for(lambda: all(len(spy.accepted(r)) >= 3 for r in (0, 1)), what="load")
            decision = pb_grpc.PlanningServiceStub(ch).TriggerRebalance(
                pb.TriggerRebalanceRequest(placement="demo", force=True), timeout=30)
            assert decision.rebalance and decision.new_version == 2, decision
            e2e.wait_for(lambda: any(r.state == "committed" for r in plans.ListRollouts(
                pb.ListRolloutsRequest(placement="demo"), timeout=10).rollouts), timeout=30,
                what="rollout committed")
            record = next(r for r in plans.ListRollouts(pb.ListRolloutsRequest(placement="demo"),
                                                        timeout=10).rollouts if r.state == "committed")
            assert record.to_version == 2 and sorted(w.rank for w in record.prepared) == [0, 1]
            # the workers switched: their next reports are counted under plan 2
            e2e.wait_for(lambda: all(spy.accepted(r)[-1].plan_version == 2 for r in (0, 1)),
                         what="reports under plan 2")
            assert sorted((h.info.rank, h.info.plan_version) for h in agent.registry.handles()) == \
                [(0, 2), (1, 2)]
    finally:
        c.stop(grace=0)


@pytest.mark.timeout(60)
def test_bearer_token_is_sent_and_a_wrong_one_delivers_nothing(tmp_path, make_agent, workers):
    c, spy = start_controller(tmp_path / "controller.db", security=SecurityConfig(token="s3cret"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{c.port}") as ch:
            pb_grpc.PlanServiceStub(ch).ApplyPlacement(
                PLACEMENT, timeout=30, metadata=call_metadata(SecurityConfig(token="s3cret")))
        wrong = make_agent(c.port, security=SecurityConfig(token="guess"))
        workers.append(e2e.start_worker(tmp_path, wrong.start(), 0))
        good = make_agent(c.port, security=SecurityConfig(token="s3cret"))
        workers.append(e2e.start_worker(tmp_path, good.start(), 1))
        e2e.wait_for(lambda: len(spy.accepted(1)) >= 3, what="reports with the right token")
        e2e.wait_for(lambda: len(wrong.buffer) >= 3, what="reports held by the refused agent")
        # the controller counted them; their ACKs reach the agent a moment later
        e2e.wait_for(lambda: good.metrics.reports_acked.labels(status="ACCEPTED")._value.get() >= 3,
                     what="ACKs of the reports with the right token")
        assert spy.accepted(0) == []                               # refused: kept, not counted
        assert wrong.metrics.reconnects.labels(stream="load")._value.get() >= 1
        assert wrong.stop(flush_timeout=0.2) is False
    finally:
        c.stop(grace=0)
