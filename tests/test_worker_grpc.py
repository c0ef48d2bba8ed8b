"""Two real `expertplane worker` processes (gloo) driven over gRPC like the node agent does:
registration (and again after an agent restart), PullCounters, Prepare/Commit of a new plan
mid-stream, Abort, bad input, graceful SIGTERM with a final counter pull."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from expertplane.kernels.moe import LayerPlacement
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import bind, make_channel, make_server
from expertplane.rpc.tensors import double_tensor, int64_tensor, to_numpy

LAYERS, EXPERTS, SLOTS, WORLD, TOKENS, TOP_K = 2, 8, 12, 2, 32, 2
PLAN_A = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3], [7, 6, 5, 4, 3, 2, 1, 0, 7, 7, 7, 7]])
PLAN_B = np.array([[4, 5, 6, 7, 0, 1, 2, 3, 4, 4, 5, 5], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
PLAN_C = np.array([[0, 0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4]])


class FakeAgent(pb_grpc.AgentServiceServicer):
    """A real AgentService that records registrations."""

    def __init__(self) -> None:
        self.registered: list[pb.WorkerInfo] = []
        self.changed = threading.Condition()

    def Register(self, request, context):
        with self.changed:
            self.registered.append(request.worker)
            self.changed.notify_all()
        return pb.RegisterResponse(node=request.worker.node, pull_interval_seconds=0.5)

    def wait_for(self, predicate, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.registered), timeout)


def _start_agent(address: str) -> tuple[grpc.Server, FakeAgent]:
    agent = FakeAgent()
    server = make_server(max_workers=4)
    pb_grpc.add_AgentServiceServicer_to_server(agent, server)
    bind(server, address)
    server.start()
    return server, agent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan_message(phy2log: np.ndarray, version: int, with_log2phy: bool) -> pb.Plan:
    plan = pb.Plan(phy2log=int64_tensor(phy2log))
    plan.summary.version = version
    plan.summary.placement = "demo"
    if with_log2phy:
        layers = [LayerPlacement.from_phy2log(p, EXPERTS) for p in phy2log]
        width = max(p.log2phy.shape[1] for p in layers)
        log2phy = np.full((LAYERS, EXPERTS, width), -1)
        for l, p in enumerate(layers):
            log2phy[l, :, :p.log2phy.shape[1]] = p.log2phy.numpy()
        plan.log2phy.CopyFrom(int64_tensor(log2phy))
        plan.logcnt.CopyFrom(int64_tensor(np.stack([p.logcnt.numpy() for p in layers])))
    return plan


class Cluster:
    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.agent_address = f"unix:{tmp}/agent.sock"
        self.agent_server, self.agent = _start_agent(self.agent_address)
        plan_file = tmp / "plan.json"
        plan_file.write_text(json.dumps({"phy2log": PLAN_A.tolist()}))
        port = _free_port()
        self.addresses = [f"unix:{tmp}/worker{r}.sock" for r in range(WORLD)]
        self.logs = [open(tmp / f"worker{r}.log", "w") for r in range(WORLD)]
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "expertplane.cli.main", "worker", "--rank", str(r),
             "--world-size", str(WORLD), "--master", f"127.0.0.1:{port}", "--plan", str(plan_file),
             "--node", "n0", "--placement", "demo", "--agent", self.agent_address,
             "--listen", self.addresses[r], "--layers", str(LAYERS), "--experts", str(EXPERTS),
             "--hidden", "32", "--intermediate", "16", "--top-k", str(TOP_K),
             "--tokens-per-step", str(TOKENS), "--step-interval", "0.01", "--verify-every", "1",
             "--drift-period", "10"],
            stdout=self.logs[r], stderr=subprocess.STDOUT) for r in range(WORLD)]
        self.channels = [make_channel(a) for a in self.addresses]
        self.stubs = [pb_grpc.WorkerServiceStub(c) for c in self.channels]
        self.snapshots: list[pb.CounterSnapshot] = []

    def pull(self, rank: int) -> pb.CounterSnapshot:
        snap = self.stubs[rank].PullCounters(pb.PullCountersRequest(), timeout=20)
        self.snapshots.append(snap)
        return snap

    def both(self, call, delays=(0.0, 0.3)):
        """Call ``call(rank)`` on both ranks in parallel, rank 1 later."""
        def run(rank):
            time.sleep(delays[rank])
            return call(rank)
        with ThreadPoolExecutor(WORLD) as pool:
            return list(pool.map(run, range(WORLD)))

    def log_text(self) -> str:
        return "\n".join((self.tmp / f"worker{r}.log").read_text() for r in range(WORLD))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for c in self.channels:
            c.close()
        self.agent_server.stop(0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("workers"))
    try:
        ok = c.agent.wait_for(lambda regs: {w.rank for w in regs} == {0, 1}, 90)
        assert ok, c.log_text()
        yield c
    finally:
        c.close()


@pytest.mark.timeout(120)
def test_workers_register_with_the_agent(cluster):
    info = {w.rank: w for w in cluster.agent.registered}
    for rank in range(WORLD):
        w = info[rank]
        assert (w.node, w.placement, w.world_size, w.plan_version) == ("n0", "demo", WORLD, 1)
        assert w.address == cluster.addresses[rank]
        status = cluster.stubs[rank].Status(pb.PullCountersRequest(), timeout=5)
        assert status.plan_version == 1 and status.rank == rank


@pytest.mark.timeout(60)
def test_workers_register_again_after_an_agent_restart(cluster):
    cluster.agent_server.stop(0).wait()
    cluster.agent_server, cluster.agent = _start_agent(cluster.agent_address)
    assert cluster.agent.wait_for(lambda regs: {w.rank for w in regs} == {0, 1}, 30)


@pytest.mark.timeout(120)
def test_prepare_and_commit_swap_the_plan_mid_stream(cluster):
    snap = cluster.pull(0)
    assert to_numpy(snap.slot_counts, "slot_counts").shape == (LAYERS, SLOTS // WORLD)
    plan_b = _plan_message(PLAN_B, 2, with_log2phy=True)
    acks = cluster.both(lambda r: cluster.stubs[r].Prepare(
        pb.PrepareRequest(rollout_id="r1", plan=plan_b), timeout=60))
    assert all(a.ok for a in acks), [a.message for a in acks]
    assert all(a.worker.prepared_version == 2 and a.worker.plan_version == 1 for a in acks)
    cluster.pull(1)
    acks = cluster.both(lambda r: cluster.stubs[r].Commit(
        pb.VersionRequest(rollout_id="r1", placement="demo", version=2), timeout=60))
    assert all(a.ok for a in acks), [a.message for a in acks]
    assert all(a.worker.plan_version == 2 for a in acks)
    # retries are idempotent
    again = cluster.stubs[0].Commit(pb.VersionRequest(placement="demo", version=2), timeout=10)
    assert again.ok


@pytest.mark.timeout(120)
def test_abort_keeps_the_plan_in_force(cluster):
    plan_c = _plan_message(PLAN_C, 3, with_log2phy=False)
    acks = cluster.both(lambda r: cluster.stubs[r].Prepare(
        pb.PrepareRequest(rollout_id="r2", plan=plan_c), timeout=60))
    assert all(a.ok for a in acks), [a.message for a in acks]
    acks = cluster.both(lambda r: cluster.stubs[r].Abort(
        pb.VersionRequest(rollout_id="r2", placement="demo", version=3), timeout=60))
    assert all(a.ok and a.worker.plan_version == 2 and a.worker.prepared_version == 0
               for a in acks)
    ack = cluster.stubs[0].Commit(pb.VersionRequest(placement="demo", version=3), timeout=10)
    assert not ack.ok and "not prepared" in ack.message


@pytest.mark.timeout(60)
def test_bad_requests_name_the_field(cluster):
    stub = cluster.stubs[0]
    bad = _plan_message(PLAN_B[:, :8], 5, with_log2phy=False)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Prepare(pb.PrepareRequest(plan=bad), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plan.phy2log" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        stub.Commit(pb.VersionRequest(placement="other", version=2), timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "placement" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        stub.SetBias(pb.RouterBias(placement="demo", sequence=1,
                                   bias=pb.DoubleTensor(shape=[3], values=[0, 0, 0])), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bias" in exc.value.details()
    ack = stub.Prepare(pb.PrepareRequest(plan=_plan_message(PLAN_A, 1, False)), timeout=10)
    assert not ack.ok and "older" in ack.message


@pytest.mark.timeout(60)
def test_inconsistent_plans_and_requests_are_invalid_arguments_naming_the_field(cluster):
    stub = cluster.stubs[0]

    def refused(call, request) -> str:
        with pytest.raises(grpc.RpcError) as exc:
            call(request, timeout=10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
        return exc.value.details()

    out_of_range = PLAN_B.copy()
    out_of_range[1, 4] = EXPERTS
    assert refused(stub.Prepare, pb.PrepareRequest(plan=_plan_message(out_of_range, 5, False))) \
        == f"plan.phy2log[1]: values must be in [0, {EXPERTS})"
    disagreeing = _plan_message(PLAN_B, 5, with_log2phy=True)
    log2phy = to_numpy(disagreeing.log2phy, "log2phy")
    log2phy[1, 3, 0] = 4                       # slot 4 of layer 1 holds expert 4, not 3
    disagreeing.log2phy.CopyFrom(int64_tensor(log2phy))
    assert refused(stub.Prepare, pb.PrepareRequest(plan=disagreeing)) \
        == "plan.log2phy[1][3]: disagrees with phy2log"
    miscounted = _plan_message(PLAN_B, 5, with_log2phy=True)
    logcnt = to_numpy(miscounted.logcnt, "logcnt")
    logcnt[0, 4] -= 1                           # expert 4 of layer 0 has 3 slots, not 2
    miscounted.logcnt.CopyFrom(int64_tensor(logcnt))
    assert refused(stub.Prepare, pb.PrepareRequest(plan=miscounted)) \
        == f"plan.logcnt[0]: must sum to R={SLOTS}, got {SLOTS - 1}"
    assert refused(stub.Commit, pb.VersionRequest(placement="demo", version=0)) \
        == "version: must be >= 1"
    nan = np.zeros((LAYERS, EXPERTS))
    nan[0, 1] = np.nan
    assert refused(stub.SetBias, pb.RouterBias(placement="demo", sequence=9,
                                               bias=double_tensor(nan))) == "bias: must be finite"
    assert stub.Status(pb.PullCountersRequest(), timeout=5).prepared_version == 0


@pytest.mark.timeout(60)
def test_router_bias_is_applied_and_idempotent(cluster):
    bias = pb.RouterBias(placement="demo", sequence=4, bias=double_tensor(
        np.linspace(-0.5, 0.5, LAYERS * EXPERTS).reshape(LAYERS, EXPERTS)))
    acks = cluster.both(lambda r: cluster.stubs[r].SetBias(bias, timeout=10))
    assert all(a.ok and "applied at the next step" in a.message for a in acks)
    again = cluster.stubs[0].SetBias(bias, timeout=10)
    assert again.ok and "already applied" in again.message


@pytest.mark.timeout(120)
def test_sigterm_stops_both_ranks_and_every_token_is_counted_once(cluster):
    for p in cluster.procs:
        p.send_signal(signal.SIGTERM)
    # the first pulls come after both serving loops ended: each rank still holds two windows
    # (v1, closed by the commit, and v2), which the drain must keep serving
    time.sleep(1.0)
    done = [False] * WORLD
    deadline = time.monotonic() + 60
    while not all(done) and time.monotonic() < deadline:
        for rank in range(WORLD):
            if done[rank]:
                continue
            try:
                cluster.pull(rank)
            except grpc.RpcError:
                done[rank] = cluster.procs[rank].poll() is not None
        time.sleep(0.05)
    codes = [p.wait(30) for p in cluster.procs]
    assert codes == [0, 0], cluster.log_text()
    steps = [sum(s.steps for s in cluster.snapshots if s.rank == r) for r in range(WORLD)]
    assert steps[0] == steps[1] > 0
    assert sum(s.failed_steps for s in cluster.snapshots) == 0
    total = sum(to_numpy(s.slot_counts, "slot_counts").sum(axis=1) for s in cluster.snapshots)
    assert total.tolist() == [steps[0] * WORLD * TOKENS * TOP_K] * LAYERS
    versions = [s.plan_version for s in cluster.snapshots if s.steps]
    assert 1 in versions and 2 in versions and 3 not in versions
    assert "0 failed, plan v2, 1 swaps" in cluster.log_text()
