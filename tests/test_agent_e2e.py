"""The node agent end to end: real gRPC on loopback, worker doubles in their own processes, and a
controller-side test server (LoadService + RolloutService) that dedupes like the real one.

Run as a script (``python test_agent_e2e.py worker ...``) this file is the worker double: a real
WorkerService in its own process that registers with the agent and serves deterministic counts.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc

LAYERS, SLOTS = 2, 3


def slot_counts(rank: int) -> list[int]:
    """The [LAYERS, SLOTS] counts (row-major) the worker double reports for every pull."""
    return [(rank + 1) * (i + 1) for i in range(LAYERS * SLOTS)]


# =============================================================== worker double (own process)
class _WorkerDouble(pb_grpc.WorkerServiceServicer):
    def __init__(self, args):
        self.args = args
        self.plan_version = 1
        self.prepared = 0
        self.pulls = 0
        self.lock = threading.Lock()

    def info(self) -> pb.WorkerInfo:
        a = self.args
        return pb.WorkerInfo(node=a.node, rank=a.rank, placement=a.placement, world_size=a.world_size,
                             plan_version=self.plan_version, prepared_version=self.prepared,
                             address=f"unix:{a.socket}")

    def PullCounters(self, request, context):
        time.sleep(self.args.pull_delay)
        with self.lock:
            self.pulls += 1
            Path(self.args.totals).write_text(json.dumps({"pulls": self.pulls}))
            if self.args.malformed_every and self.pulls % self.args.malformed_every == 0:
                return pb.CounterSnapshot(rank=self.args.rank, plan_version=self.plan_version,
                                          slot_counts=pb.Int64Tensor(shape=[LAYERS, SLOTS], values=[1]))
            return pb.CounterSnapshot(
                rank=self.args.rank, placement=self.args.placement, plan_version=self.plan_version,
                slot_counts=pb.Int64Tensor(shape=[LAYERS, SLOTS], values=slot_counts(self.args.rank)),
                steps=1)

    def Prepare(self, request, context):
        time.sleep(self.args.prepare_delay)
        if self.args.fail_prepare:
            return pb.WorkerAck(ok=False, message="staging buffer too small", worker=self.info())
        self.prepared = request.plan.summary.version
        return pb.WorkerAck(ok=True, worker=self.info())

    def Commit(self, request, context):
        if request.version != self.prepared:
            return pb.WorkerAck(ok=False, message=f"version {request.version} not prepared",
                                worker=self.info())
        self.plan_version, self.prepared = request.version, 0
        return pb.WorkerAck(ok=True, worker=self.info())

    def Abort(self, request, context):
        self.prepared = 0
        return pb.WorkerAck(ok=True, worker=self.info())

    def SetBias(self, request, context):
        return pb.WorkerAck(ok=True, worker=self.info())

    def Status(self, request, context):
        return self.info()


def _serve_worker(argv) -> None:
    p = argparse.ArgumentParser()
    for name in ("--agent", "--node", "--placement", "--socket", "--totals"):
        p.add_argument(name, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--pull-delay", type=float, default=0.0)
    p.add_argument("--prepare-delay", type=float, default=0.0)
    p.add_argument("--fail-prepare", action="store_true")
    p.add_argument("--malformed-every", type=int, default=0, help="every N-th pull is malformed")
    args = p.parse_args(argv)
    servicer = _WorkerDouble(args)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{args.socket}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with grpc.insecure_channel(args.agent) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        while not stop.is_set():   # (re-)register every 0.5 s: survives agent restarts
            try:
                stub.Register(pb.RegisterRequest(worker=servicer.info()), timeout=1.0)
            except grpc.RpcError:
                pass
            stop.wait(0.5)
    server.stop(0.5).wait()


# =============================================================== controller-side test server
class TestController:
    """LoadService + RolloutService on a real loopback server; state survives ``restart``.

    Dedupes like the controller: (node, rank, agent_epoch, sequence) is counted once.
    ``overload_first``: answer the first N reports OVERLOADED. ``swallow_first``: never answer
    the first N reports (a controller that hangs).
    """

    __test__ = False

    def __init__(self, overload_first: int = 0, swallow_first: int = 0):
        self.accepted: dict[tuple, pb.LoadReport] = {}
        self.swallow_left = swallow_first
        self.received: list[tuple[int, int]] = []
        self.duplicates = 0
        self.overload_left = overload_first
        self.events: list[pb.RolloutEvent] = []
        self.claimed: set[int] = set()
        self.events_cond = threading.Condition()
        self.commands: queue.Queue[pb.RolloutCommand] = queue.Queue()
        self.lock = threading.Lock()
        self.port = 0
        self.server = None

    # LoadService
    def ReportLoad(self, request_iterator, context):
        for r in request_iterator:
            key = (r.node, r.worker_rank, r.agent_epoch, r.sequence)
            with self.lock:
                self.received.append((r.worker_rank, r.sequence))
                if self.swallow_left > 0:
                    self.swallow_left -= 1
                    continue
                if self.overload_left > 0:
                    self.overload_left -= 1
                    status = pb.LoadAck.OVERLOADED
                elif key in self.accepted:
                    self.duplicates += 1
                    status = pb.LoadAck.DUPLICATE
                else:
                    self.accepted[key] = r
                    status = pb.LoadAck.ACCEPTED
            yield pb.LoadAck(node=r.node, worker_rank=r.worker_rank, sequence=r.sequence, status=status)

    # RolloutService
    def Connect(self, request_iterator, context):
        def pump():
            try:
                for event in request_iterator:
                    with self.events_cond:
                        self.events.append(event)
                        self.events_cond.notify_all()
            except grpc.RpcError:
                pass
        threading.Thread(target=pump, daemon=True).start()
        while context.is_active():
            try:
                yield self.commands.get(timeout=0.1)
            except queue.Empty:
                continue

    def start(self) -> int:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        load = grpc.method_handlers_generic_handler("expertplane.v1.LoadService", {
            "ReportLoad": grpc.stream_stream_rpc_method_handler(
                self.ReportLoad, pb.LoadReport.FromString, pb.LoadAck.SerializeToString)})
        rollout = grpc.method_handlers_generic_handler("expertplane.v1.RolloutService", {
            "Connect": grpc.stream_stream_rpc_method_handler(
                self.Connect, pb.RolloutEvent.FromString, pb.RolloutCommand.SerializeToString)})
        self.server.add_generic_rpc_handlers((load, rollout))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()
        return self.port

    def stop(self) -> None:
        self.server.stop(0).wait()

    def sequences(self, rank: int) -> list[int]:
        with self.lock:
            return sorted(k[3] for k in self.accepted if k[1] == rank)

    def reports(self, rank: int) -> list[pb.LoadReport]:
        with self.lock:
            return [r for k, r in sorted(self.accepted.items()) if k[1] == rank]

    def forget_events(self) -> None:
        """Events received so far are never returned by ``wait_event``."""
        with self.events_cond:
            self.claimed.update(range(len(self.events)))

    def wait_event(self, kind, rank=None, timeout=15.0) -> pb.RolloutEvent:
        """The first event of ``kind`` (for ``rank``) not returned before; waits for it."""
        def find():
            for i, e in enumerate(self.events):
                if i not in self.claimed and e.kind == kind and (
                        rank is None or any(w.rank == rank for w in e.workers)):
                    self.claimed.add(i)
                    return e
            return None
        with self.events_cond:
            found = self.events_cond.wait_for(find, timeout=timeout)
        if found is not None:
            return found
        raise AssertionError(f"no {pb.RolloutEvent.Kind.Name(kind)} event for rank {rank}")


def wait_for(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# =============================================================== fixtures
@pytest.fixture
def controller():
    c = TestController()
    c.start()
    yield c
    c.stop()


def start_worker(tmp_path, agent_address, rank, *extra) -> subprocess.Popen:
    sock = tmp_path / f"w{rank}.sock"
    return subprocess.Popen(
        [sys.executable, __file__, "worker", "--agent", agent_address, "--node", "node-a",
         "--placement", "demo", "--rank", str(rank), "--socket", str(sock),
         "--totals", str(tmp_path / f"w{rank}.json"), *extra])


def served_pulls(tmp_path, rank) -> int:
    return json.loads((tmp_path / f"w{rank}.json").read_text())["pulls"]


@pytest.fixture
def make_agent():
    from expertplane.agent.agent import Agent
    from expertplane.agent.config import AgentConfig

    agents = []

    def make(port, **kw):
        kw.setdefault("interval", 0.1)
        kw.setdefault("backoff_initial", 0.05)
        kw.setdefault("backoff_max", 0.5)
        agent = Agent(AgentConfig(controller=f"127.0.0.1:{port}", node="node-a", **kw))
        agents.append(agent)
        return agent

    yield make
    for a in agents:
        a.stop(flush_timeout=0.5)


@pytest.fixture
def workers():
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()


# =============================================================== tests
@pytest.mark.timeout(60)
def test_reports_flow_with_contiguous_sequences_and_no_gpu_stats(controller, make_agent, workers, tmp_path):
    agent = make_agent(controller.port)
    address = agent.start()
    workers += [start_worker(tmp_path, address, r) for r in (0, 1)]
    hello_or_joined = {controller.wait_event(pb.RolloutEvent.HELLO).kind}
    for rank in (0, 1):
        e = controller.wait_event(pb.RolloutEvent.WORKER_JOINED, rank)
        assert e.workers[0].placement == "demo" and e.workers[0].node == "node-a"
    wait_for(lambda: all(len(controller.sequences(r)) >= 5 for r in (0, 1)), what="5 reports per rank")
    assert agent.load_stream_connected
    assert hello_or_joined == {pb.RolloutEvent.HELLO}
    for rank in (0, 1):
        reports = controller.reports(rank)
        seqs = [r.sequence for r in reports]
        assert seqs == list(range(1, len(seqs) + 1))          # strictly increasing, no gaps
        for r in reports:
            assert r.agent_epoch == agent.epoch and r.placement == "demo" and r.plan_version == 1
            assert list(r.slot_counts.shape) == [LAYERS, SLOTS]
            assert list(r.slot_counts.values) == slot_counts(rank)
            assert r.dropped_windows == 0
            assert not r.HasField("gpu")                       # no NVML here: no GPU stats
            assert r.window_end.ToNanoseconds() >= r.window_start.ToNanoseconds() > 0
    assert controller.duplicates == 0


@pytest.mark.timeout(90)
def test_controller_restart_while_streaming_counts_nothing_twice(controller, make_agent, workers, tmp_path):
    agent = make_agent(controller.port)
    address = agent.start()
    workers.append(start_worker(tmp_path, address, 0))
    wait_for(lambda: len(controller.sequences(0)) >= 5, what="reports before the restart")
    controller.stop()                                # the controller goes away mid-stream
    time.sleep(1.0)                                  # ~10 windows buffered meanwhile
    controller.start()                               # same port, same dedupe state
    wait_for(lambda: len(controller.sequences(0)) >= 25, what="reports after the restart")
    workers[0].terminate()
    workers[0].wait(5)
    assert agent.stop(flush_timeout=5.0)             # final pull + flush: everything ACKed
    seqs = controller.sequences(0)
    assert seqs == list(range(1, len(seqs) + 1))     # every window arrived, exactly once
    # every pull the worker served was counted once: tokens in == tokens counted
    assert len(seqs) == served_pulls(tmp_path, 0)
    assert sum(r.dropped_windows for r in controller.reports(0)) == 0
    assert agent.metrics.reconnects.labels(stream="load")._value.get() >= 1


@pytest.mark.timeout(60)
def test_bounded_buffer_drops_oldest_and_reports_the_gap_once(controller, make_agent, workers, tmp_path):
    agent = make_agent(controller.port, buffer=4)
    address = agent.start()
    workers.append(start_worker(tmp_path, address, 0))
    wait_for(lambda: len(controller.sequences(0)) >= 3, what="first reports")
    controller.stop()
    wait_for(lambda: agent.metrics.reports_dropped._value.get() >= 5, what="drops while disconnected")
    controller.start()
    wait_for(lambda: len(controller.sequences(0)) >= 20, what="reports after reconnect")
    reports = controller.reports(0)
    seqs = [r.sequence for r in reports]
    gaps = [(a.sequence, b.sequence) for a, b in zip(reports, reports[1:]) if b.sequence != a.sequence + 1]
    # the outage leaves a gap; on a loaded machine the stream may break once more while the
    # controller comes back, leaving a second one: each is reported, exactly, by the report after it
    assert 1 <= len(gaps) <= 2, gaps
    for before, after in gaps:
        first_after = next(r for r in reports if r.sequence == after)
        assert first_after.dropped_windows == after - before - 1
    assert sum(r.dropped_windows for r in reports) == seqs[-1] - len(seqs)
    assert agent.metrics.reports_dropped._value.get() == seqs[-1] - len(seqs)
    # the survivors of the outage are the NEWEST windows: the oldest were dropped
    assert gaps[0][1] - 1 - gaps[0][0] >= 5


@pytest.mark.timeout(60)
def test_overloaded_reports_are_resent_not_lost(make_agent, workers, tmp_path):
    c = TestController(overload_first=6)
    c.start()
    try:
        agent = make_agent(c.port)
        workers.append(start_worker(tmp_path, agent.start(), 0))
        wait_for(lambda: len(c.sequences(0)) >= 10, what="reports after shedding")
        seqs = c.sequences(0)
        assert seqs == list(range(1, len(seqs) + 1)) and c.duplicates == 0
        assert agent.metrics.reports_acked.labels(status="OVERLOADED")._value.get() == 6
    finally:
        c.stop()


@pytest.mark.timeout(60)
def test_missing_ack_reopens_the_stream_and_resends_the_same_sequence(make_agent, workers, tmp_path):
    c = TestController(swallow_first=1)
    c.start()
    try:
        agent = make_agent(c.port, ack_timeout=0.5)
        workers.append(start_worker(tmp_path, agent.start(), 0))
        wait_for(lambda: len(c.sequences(0)) >= 5, what="reports after the stream was re-opened")
        assert c.received[:2] == [(0, 1), (0, 1)]       # unanswered, then resent unchanged
        assert c.sequences(0) == list(range(1, len(c.sequences(0)) + 1))
        assert agent.metrics.reconnects.labels(stream="load")._value.get() >= 1
    finally:
        c.stop()


@pytest.mark.timeout(60)
def test_malformed_snapshots_are_skipped_without_losing_the_worker(controller, make_agent, workers,
                                                                   tmp_path, caplog):
    agent = make_agent(controller.port)
    workers.append(start_worker(tmp_path, agent.start(), 0, "--malformed-every", "2"))
    wait_for(lambda: len(controller.sequences(0)) >= 6, what="good reports")
    seqs = controller.sequences(0)
    assert seqs == list(range(1, len(seqs) + 1))     # skipped snapshots use no sequence number
    assert all(list(r.slot_counts.values) == slot_counts(0) for r in controller.reports(0))
    assert [h.info.rank for h in agent.registry.handles()] == [0]     # not counted as missed
    assert any("malformed counter snapshot" in r.getMessage() and "slot_counts" in r.getMessage()
               for r in caplog.records)


@pytest.mark.timeout(60)
def test_worker_crash_is_reported_lost_and_the_agent_keeps_going(controller, make_agent, workers, tmp_path):
    agent = make_agent(controller.port)
    address = agent.start()
    workers += [start_worker(tmp_path, address, r) for r in (0, 1)]
    for rank in (0, 1):
        controller.wait_event(pb.RolloutEvent.WORKER_JOINED, rank)
    wait_for(lambda: len(controller.sequences(1)) >= 3, what="reports of rank 1")
    workers[1].kill()                                # crash: no goodbye
    lost = controller.wait_event(pb.RolloutEvent.WORKER_LOST, 1)
    assert lost.node == "node-a" and lost.message
    before = len(controller.sequences(0))
    wait_for(lambda: len(controller.sequences(0)) >= before + 5, what="rank 0 still reported")
    assert [h.info.rank for h in agent.registry.handles()] == [0]
    n1 = len(controller.sequences(1))
    time.sleep(0.3)
    assert len(controller.sequences(1)) == n1        # nothing more from the dead worker


@pytest.mark.timeout(60)
def test_rollout_commands_are_relayed_and_answered_per_worker(controller, make_agent, workers, tmp_path):
    agent = make_agent(controller.port)
    address = agent.start()
    workers += [start_worker(tmp_path, address, 0, "--prepare-delay", "0.5"),
                start_worker(tmp_path, address, 1, "--prepare-delay", "0.5")]
    for rank in (0, 1):
        controller.wait_event(pb.RolloutEvent.WORKER_JOINED, rank)
    plan = pb.Plan(summary=pb.PlanSummary(placement="demo", version=2))
    controller.commands.put(pb.RolloutCommand(rollout_id="r1", placement="demo", prepare=plan))
    for rank in (0, 1):
        e = controller.wait_event(pb.RolloutEvent.PREPARED, rank)
        assert (e.rollout_id, e.version, e.node) == ("r1", 2, "node-a")
        assert len(e.workers) == 1 and e.workers[0].prepared_version == 2
    controller.commands.put(pb.RolloutCommand(rollout_id="r1", placement="demo", commit=2))
    for rank in (0, 1):
        e = controller.wait_event(pb.RolloutEvent.COMMITTED, rank)
        assert e.version == 2 and e.workers[0].plan_version == 2
    wait_for(lambda: controller.reports(0)[-1].plan_version == 2, what="reports under plan 2")
    controller.commands.put(pb.RolloutCommand(rollout_id="r2", placement="demo", abort=3))
    for rank in (0, 1):
        assert controller.wait_event(pb.RolloutEvent.ABORTED, rank).rollout_id == "r2"
    bias = pb.RouterBias(placement="demo", sequence=9,
                         bias=pb.DoubleTensor(shape=[LAYERS, 4], values=[0.0] * (LAYERS * 4)))
    controller.commands.put(pb.RolloutCommand(bias=bias))          # placement from the bias
    for rank in (0, 1):
        e = controller.wait_event(pb.RolloutEvent.BIAS_APPLIED, rank)
        assert (e.version, e.placement, e.rollout_id) == (9, "demo", "")
    # a command for a placement no local worker serves reaches nobody (commands run in order,
    # so once r4 is answered, r3 has been handled)
    controller.commands.put(pb.RolloutCommand(rollout_id="r3", placement="other", commit=2))
    controller.commands.put(pb.RolloutCommand(rollout_id="r4", placement="demo", abort=7))
    for rank in (0, 1):
        assert controller.wait_event(pb.RolloutEvent.ABORTED, rank).rollout_id == "r4"
    assert agent.metrics.rollout_calls.labels(command="commit", outcome="ok")._value.get() == 2
    assert not [e for e in controller.events if e.rollout_id == "r3"]
    # a reconnect sends HELLO with the workers' current versions
    controller.stop()
    controller.forget_events()
    controller.start()
    hello = controller.wait_event(pb.RolloutEvent.HELLO)
    assert sorted((w.rank, w.plan_version) for w in hello.workers) == [(0, 2), (1, 2)]


@pytest.mark.timeout(60)
def test_failed_prepare_and_unreachable_worker_are_answered_failed(controller, make_agent, workers, tmp_path):
    agent = make_agent(controller.port)
    address = agent.start()
    workers += [start_worker(tmp_path, address, 0, "--fail-prepare"),
                start_worker(tmp_path, address, 1, "--prepare-delay", "5")]
    for rank in (0, 1):
        controller.wait_event(pb.RolloutEvent.WORKER_JOINED, rank)
    plan = pb.Plan(summary=pb.PlanSummary(placement="demo", version=5))
    controller.commands.put(pb.RolloutCommand(rollout_id="r5", prepare=plan))   # placement from plan
    failed = controller.wait_event(pb.RolloutEvent.FAILED, 0)
    assert failed.rollout_id == "r5" and "staging buffer too small" in failed.message
    workers[1].kill()                                # dies while preparing
    e = controller.wait_event(pb.RolloutEvent.FAILED, 1)
    assert "rank 1" in e.message
    controller.wait_event(pb.RolloutEvent.WORKER_LOST, 1)


@pytest.mark.timeout(30)
def test_register_rejects_bad_worker_info_naming_the_field(controller, make_agent):
    agent = make_agent(controller.port)
    address = agent.start()
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.AgentServiceStub(ch)
        bad = [(pb.WorkerInfo(node="other", placement="p", address="unix:/x", world_size=1), "worker.node"),
               (pb.WorkerInfo(placement="p", world_size=1), "worker.address"),
               (pb.WorkerInfo(address="unix:/x", world_size=1), "worker.placement"),
               (pb.WorkerInfo(placement="p", address="unix:/x", rank=2, world_size=2), "worker.rank")]
        for info, field in bad:
            with pytest.raises(grpc.RpcError) as exc:
                stub.Register(pb.RegisterRequest(worker=info), timeout=5)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in exc.value.details()
        ok = stub.Register(pb.RegisterRequest(worker=pb.WorkerInfo(
            placement="p", address="unix:/nonexistent", world_size=1)), timeout=5)
        assert ok.node == "node-a" and ok.pull_interval_seconds == pytest.approx(0.1)


@pytest.mark.timeout(60)
def test_cli_agent_serves_metrics_and_stops_on_sigterm(controller, workers, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "expertplane.cli.main", "agent", "--controller",
         f"127.0.0.1:{controller.port}", "--node", "node-a", "--socket", str(sock),
         "--interval", "100ms", "--metrics", f"127.0.0.1:{metrics_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving workers at unix:" in proc.stdout.readline()
        workers.append(start_worker(tmp_path, f"unix:{sock}", 0))
        wait_for(lambda: len(controller.sequences(0)) >= 3, what="reports via the CLI agent")
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "expertplane_agent_reports_sent_total" in body and "expertplane_agent_workers 1.0" in body
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "all reports acknowledged" in out
        # no GPU/NVML on this machine: one notice, and the agent ran anyway
        assert err.count("GPU statistics disabled") == 1
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(30)
def test_metrics_port_in_use_is_a_clean_error(controller, make_agent):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        agent = make_agent(controller.port, metrics=f"127.0.0.1:{busy.getsockname()[1]}")
        with pytest.raises(OSError):
            agent.start()
    assert agent.stop() is True                      # nothing was started: nothing to flush


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _serve_worker(sys.argv[2:])
