"""Partition and overload: the agent->controller connection drops for seconds (the controller is
stopped) while worker processes keep producing windows; and the controller is flooded with load
reports from many concurrent streams while it must keep answering queries, shed the excess and
keep its memory bounded."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reliability_support as rs  # noqa: E402

from expertplane.benchmarks.simagent import load_report  # noqa: E402
from expertplane.controller.config import ControllerConfig  # noqa: E402
from expertplane.controller.server import ControllerServer  # noqa: E402
from expertplane.proto import expertplane_pb2 as pb  # noqa: E402
from expertplane.proto import expertplane_pb2_grpc as pb_grpc  # noqa: E402

_spec = importlib.util.spec_from_file_location("agent_e2e_support",
                                               Path(__file__).with_name("test_agent_e2e.py"))
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)
make_agent, workers = e2e.make_agent, e2e.workers      # the agent tests' worker-process fixtures
Ack = pb.LoadAck


def controller(db: Path, port: int = 0, **kw) -> ControllerServer:
    kw.setdefault("policy_interval_seconds", 3600.0)
    srv = ControllerServer(ControllerConfig(listen=f"127.0.0.1:{port}", db_url=f"sqlite:///{db}",
                                            snapshot_interval_seconds=3600.0, **kw))
    srv.start()
    return srv


DEMO = pb.Placement(name="demo", model=pb.ModelSpec(num_layers=e2e.LAYERS, num_experts=4,
                                                    num_groups=1),
                    topology=pb.Topology(num_nodes=1, gpus_per_node=2), num_replicas=2 * e2e.SLOTS,
                    policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.MANUAL, window_seconds=300))


@pytest.mark.timeout(120)
def test_partition_keeps_agent_buffer_bounded_and_counts_dropped_windows(tmp_path, make_agent,
                                                                         workers):
    db = tmp_path / "c.db"
    c1 = controller(db)
    port = c1.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        pb_grpc.PlanServiceStub(ch).ApplyPlacement(DEMO, timeout=30)
    capacity = 8
    agent = make_agent(port, buffer=capacity, interval=0.05)
    address = agent.start()
    workers += [e2e.start_worker(tmp_path, address, r) for r in (0, 1)]
    rs.wait_until(lambda: agent.load_stream_connected, 30, "load stream up")
    c1.stop(grace=0)                                   # partition: nothing reaches a controller
    sizes = []
    end = time.monotonic() + 3.0                       # ~60 windows per worker, buffer holds 8
    while time.monotonic() < end:
        sizes.append(len(agent.buffer))
        time.sleep(0.01)
    assert max(sizes) <= capacity and max(sizes) == capacity, max(sizes)
    dropped = agent.buffer.dropped_total
    assert dropped >= 80, dropped
    c2 = controller(db, port)
    try:
        got = []
        real = c2.controller.ingest

        def spy(report):
            res = real(report)
            if res.status == Ack.ACCEPTED:
                got.append(report)
            return res

        c2.controller.ingest = spy
        rs.wait_until(lambda: sum(r.dropped_windows for r in got) >= dropped, 30,
                      "dropped windows reported to the restarted controller")
        # every dropped window is counted exactly once, per worker, in the reports that follow
        assert sum(r.dropped_windows for r in got) == agent.buffer.dropped_total
        assert {r.worker_rank for r in got if r.dropped_windows} == {0, 1}
    finally:
        c2.stop(grace=0)


def flood(port: int, streams: int, reports_per_stream: int):
    """``streams`` concurrent ReportLoad streams, each pushing its reports without waiting for
    ACKs, while the main thread queries PlanService in a loop. Returns (acks or RpcError per
    stream, query outcomes: "ok" or a status code name)."""
    counts = np.ones((2, 3), dtype=np.int64)
    out: list = [None] * streams
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        plans, load = pb_grpc.PlanServiceStub(ch), pb_grpc.LoadServiceStub(ch)

        def push(i):
            reports = [load_report(f"n{i}", i % 4, "m", 1, s + 1, counts, epoch=i + 1)
                       for s in range(reports_per_stream)]
            try:
                out[i] = list(load.ReportLoad(iter(reports), timeout=60))
            except grpc.RpcError as exc:
                out[i] = exc

        threads = [threading.Thread(target=push, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        queries = []
        while any(t.is_alive() for t in threads):
            try:
                plans.GetPlan(pb.GetPlanRequest(placement="m"), timeout=5)
                queries.append("ok")
            except grpc.RpcError as exc:
                queries.append(exc.code().name)
        for t in threads:
            t.join()
        assert rs.serving(ch)
    return out, queries


@pytest.mark.timeout(120)
def test_flood_beyond_the_rpc_limit_is_shed_with_resource_exhausted(tmp_path):
    """24 streams x 300 reports into a controller limited to 8 concurrent RPCs: the excess
    streams are refused RESOURCE_EXHAUSTED at once, admitted streams get every ACK, and queries
    made during the flood are answered (OK, or RESOURCE_EXHAUSTED while all slots are taken)."""
    srv = controller(tmp_path / "c.db", max_concurrent_rpcs=8)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            pb_grpc.PlanServiceStub(ch).ApplyPlacement(rs.small_placement("m"), timeout=30)
        out, queries = flood(srv.port, 24, 300)
        refused = [o for o in out if isinstance(o, grpc.RpcError)]
        admitted = [o for o in out if not isinstance(o, grpc.RpcError)]
        assert refused and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
        assert admitted and all(len(a) == 300 for a in admitted)
        assert {a.status for acks in admitted for a in acks} <= {Ack.ACCEPTED, Ack.OVERLOADED}
        assert "ok" in queries and set(queries) <= {"ok", "RESOURCE_EXHAUSTED"}, set(queries)
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            window = pb_grpc.PlanServiceStub(ch).GetLoad(pb.GetLoadRequest(placement="m"), timeout=5)
        accepted = sum(a.status == Ack.ACCEPTED for acks in admitted for a in acks)
        assert window.reports == accepted                  # shed reports are not counted
    finally:
        srv.stop(0.5)


@pytest.mark.timeout(120)
def test_flood_within_the_rpc_limit_is_shed_with_overloaded_acks(tmp_path):
    """16 streams x 300 reports pushed without waiting for ACKs into a controller that holds at
    most 2 reports at once: every report is answered, some OVERLOADED (shed, not counted), the
    accepted ones are counted exactly, and every query made during the flood succeeds."""
    srv = controller(tmp_path / "c.db", ingest_queue=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            pb_grpc.PlanServiceStub(ch).ApplyPlacement(rs.small_placement("m"), timeout=30)
        out, queries = flood(srv.port, 16, 300)
        statuses = [a.status for acks in out for a in acks]
        assert len(statuses) == 16 * 300 and set(queries) == {"ok"} and len(queries) > 0
        assert set(statuses) == {Ack.ACCEPTED, Ack.OVERLOADED}
        assert srv.controller.gate.held == 0
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            window = pb_grpc.PlanServiceStub(ch).GetLoad(pb.GetLoadRequest(placement="m"), timeout=5)
        assert window.reports == statuses.count(Ack.ACCEPTED)
    finally:
        srv.stop(0.5)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_controller_memory_stays_bounded_under_a_sustained_flood(tmp_path):
    """A controller process flooded for 24 s by 12 streams that never wait for ACKs (the
    transport's flow control and the ingest gate are all that hold them back): its RSS levels
    off (the last third of the samples stays within 32 MiB of the first third's peak), queries
    keep being answered, and only answered reports are counted."""
    ctl = rs.ControllerProcess(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "c.log",
                               extra=("--ingest-queue", "4")).start()
    stop = threading.Event()
    counts = np.ones((2, 3), dtype=np.int64)

    def endless(i):
        seq = 0
        while not stop.is_set():
            seq += 1
            yield load_report(f"n{i}", i % 4, "m", 1, seq, counts, epoch=i + 1)

    acks: list = [0] * 12
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ctl.port}") as ch:
            plans, load = pb_grpc.PlanServiceStub(ch), pb_grpc.LoadServiceStub(ch)
            plans.ApplyPlacement(rs.small_placement("m"), timeout=30)

            def push(i):
                for _ in load.ReportLoad(endless(i), timeout=120):
                    acks[i] += 1

            threads = [threading.Thread(target=push, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            rss, queries, end = [], [], time.monotonic() + 24
            while time.monotonic() < end:
                rss.append(_rss_mib(ctl.proc.pid))
                try:
                    plans.GetPlan(pb.GetPlanRequest(placement="m"), timeout=5)
                    queries.append("ok")
                except grpc.RpcError as exc:
                    queries.append(exc.code().name)
                time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(60)
            window = plans.GetLoad(pb.GetLoadRequest(placement="m"), timeout=5)
    finally:
        stop.set()
        ctl.terminate()
    third = len(rss) // 3
    assert max(rss[-third:]) <= max(rss[:third]) + 32, rss
    assert set(queries) == {"ok"}, queries
    assert sum(acks) > 10_000 and 0 < window.reports <= sum(acks)
