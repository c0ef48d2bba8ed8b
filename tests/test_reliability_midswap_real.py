"""Issue 10 with REAL processes: a worker or an agent is killed with SIGKILL in the middle of a
swap (the prepare was sent, not every worker has it), against an in-process controller
(``ControllerServer``, SQLite store), two ``expertplane agent`` processes and one job of four
``expertplane worker`` processes (torch.distributed gloo on CPU, synthetic MoE model checked
against its dense reference every 5th step).

The swap is held in PREPARE deterministically by pausing node n1's agent with SIGSTOP before the
rebalance: the prepare cannot reach ranks 2 and 3, and no rank starts staging until every rank
asked for it, while every worker keeps serving steps.

The simulated twin (``test_reliability_midswap.py``) reaches the exact phases faster; this one
shows what real components do. One thing the simulated test assumes does not hold for real
workers: the four ranks are ONE torch.distributed job, so when a rank dies the other ranks'
collectives fail (gloo: "Connection closed by peer") and they stop serving; the job is restarted
as a whole, as a launcher (torchrun, a Kubernetes Job) does.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reliability_support as rs  # noqa: E402

from expertplane.controller.config import ControllerConfig  # noqa: E402
from expertplane.controller.server import ControllerServer  # noqa: E402
from expertplane.proto import expertplane_pb2 as pb  # noqa: E402
from expertplane.proto import expertplane_pb2_grpc as pb_grpc  # noqa: E402
from expertplane.rpc.channels import make_channel  # noqa: E402

_spec = importlib.util.spec_from_file_location("agent_controller_support",
                                               Path(__file__).with_name("test_agent_controller.py"))
_support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_support)
Spy = _support.Spy                  # records the controller's answer to every LoadReport

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]   # ~40 s quiet, ~90 s at load 7-10

NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE
PLACEMENT = "m"                     # rs.small_placement: 2 layers x 8 experts (2 groups), 12 slots
MODEL_ARGS = ("--layers", "2", "--experts", "8", "--groups", "2", "--top-k", "2",
              "--hidden", "16", "--intermediate", "32", "--tokens-per-step", "32",
              "--step-interval", "0.02", "--verify-every", "5")
START_TIMEOUT = 150.0   # s: four torch imports and a gloo rendezvous on a loaded 2-core machine
EVENT_TIMEOUT = 60.0    # s: any other state change (rollout answers, agent pulls, re-registration)


EXIT_TIMEOUT = 15.0     # s: a rank whose peer died must exit within this (supervisors restart
                        # the job on exit); its 1 s gRPC grace and the gloo teardown fit


class RealCluster:
    """The controller in this process; agents and workers as process groups under ``root``.

    Node ``n`` has agent ``agent-n`` (socket ``root/agent-n.sock``) and ranks
    ``n*PER_NODE .. n*PER_NODE+PER_NODE-1`` (``worker-r``, WorkerService on ``root/worker-r.sock``).
    """

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.server = ControllerServer(ControllerConfig(
            listen="127.0.0.1:0", db_url=f"sqlite:///{root / 'controller.db'}",
            policy_interval_seconds=3600, snapshot_interval_seconds=3600,
            rollout_timeout_seconds=300))   # only the faults under test may end a rollout
        self.spy = Spy(self.server)
        self.address = f"127.0.0.1:{self.server.start()}"
        self.channel = make_channel(self.address)
        self.plans = pb_grpc.PlanServiceStub(self.channel)
        self.plans.ApplyPlacement(rs.small_placement(PLACEMENT, mode=pb.RebalancePolicy.MANUAL),
                                  timeout=60)

    # -- processes

    def start_agent(self, node: int) -> None:
        self.procs[f"agent-{node}"] = rs.spawn(
            [rs.EXPERTPLANE, "agent", "--controller", self.address, "--node", f"n{node}",
             "--socket", str(self.root / f"agent-{node}.sock"), "--interval", "200ms"],
            self.root / f"agent-{node}.log")

    def start_job(self) -> None:
        """All ranks of the worker job, with a fresh rendezvous; the initial plan comes from the
        controller (``--controller``)."""
        master = f"127.0.0.1:{rs.free_port()}"
        for rank in range(WORLD):
            node = rank // PER_NODE
            self.procs[f"worker-{rank}"] = rs.spawn(
                [rs.EXPERTPLANE, "worker", "--rank", str(rank), "--world-size", str(WORLD),
                 "--master", master, "--gpus-per-node", str(PER_NODE), "--node", f"n{node}",
                 "--placement", PLACEMENT, "--agent", f"unix:{self.root / f'agent-{node}.sock'}",
                 "--controller", self.address, "--listen", f"unix:{self.root / f'worker-{rank}.sock'}",
                 *MODEL_ARGS],
                self.root / f"worker-{rank}.log")

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def signal(self, name: str, sig: int) -> None:
        rs.signal_group(self.procs[name], sig)

    def close(self) -> None:
        for proc in self.procs.values():
            rs.signal_group(proc, signal.SIGKILL)
        self.channel.close()
        self.server.stop(0.5)

    # -- what the controller and the workers say

    def connected_ranks(self) -> set[int]:
        return set(self.server.controller.rollouts.workers(PLACEMENT))

    def wait_connected(self, ranks: set[int], timeout: float = START_TIMEOUT) -> None:
        rs.wait_until(lambda: self.connected_ranks() == ranks, timeout,
                      f"ranks {sorted(ranks)} connected to the controller (logs: {self.root})", 0.2)

    def status(self, rank: int) -> tuple[int, int] | None:
        """(plan_version, prepared_version) from the worker's own WorkerService.Status; None when
        it does not answer."""
        with grpc.insecure_channel(f"unix:{self.root / f'worker-{rank}.sock'}") as ch:
            try:
                info = pb_grpc.WorkerServiceStub(ch).Status(pb.PullCountersRequest(), timeout=5)
            except grpc.RpcError:
                return None
        return info.plan_version, info.prepared_version

    def statuses(self, ranks) -> dict[int, tuple[int, int] | None]:
        return {r: self.status(r) for r in ranks}

    def rollout(self, to_version: int) -> pb.RolloutRecord | None:
        """The placement-wide rollout to ``to_version`` (not a one-worker sync: from_version 0)."""
        return next((r for r in self.plans.ListRollouts(
            pb.ListRolloutsRequest(placement=PLACEMENT), timeout=10).rollouts
            if r.to_version == to_version and r.from_version), None)

    def placement_state(self) -> pb.PlacementState:
        [state] = self.plans.ListPlacements(pb.ListPlacementsRequest(), timeout=10).placements
        return state

    def reports_seen(self) -> dict[int, int]:
        """Accepted reports so far per rank (a mark for :meth:`wait_serving`)."""
        return {r: len(self.spy.accepted(r)) for r in range(WORLD)}

    def wait_serving(self, ranks, version: int, since: dict[int, int]) -> None:
        """Each rank in ``ranks`` reports, after the mark ``since``, steps served under
        ``version``, and from its first such report on only ``version``; not one failed step
        in any report after the mark."""
        def fresh(rank):
            return self.spy.accepted(rank)[since.get(rank, 0):]

        rs.wait_until(lambda: all(any(r.plan_version == version and r.steps > 0 for r in fresh(k))
                                  for k in ranks), EVENT_TIMEOUT,
                      f"ranks {sorted(ranks)} reporting steps under v{version} (logs: {self.root})",
                      0.2)
        for rank in ranks:
            reports = fresh(rank)
            first = next(i for i, r in enumerate(reports) if r.plan_version == version)
            assert {r.plan_version for r in reports[first:]} == {version}, (rank, reports)
            assert sum(r.failed_steps for r in reports) == 0, (rank, reports)

    def never_served(self, version: int) -> bool:
        """True when no report ever reached the controller counted under ``version``."""
        return all(report.plan_version != version for report, _ in self.spy.answers)

    # -- rollouts

    def rebalance(self) -> int:
        decision = pb_grpc.PlanningServiceStub(self.channel).TriggerRebalance(
            pb.TriggerRebalanceRequest(placement=PLACEMENT, force=True), timeout=120)
        assert decision.rebalance, decision
        return decision.new_version

    def start_stalled_swap(self) -> None:
        """Pause n1's agent (SIGSTOP), rebalance to v2 and check the rollout is in PREPARE."""
        self.signal("agent-1", signal.SIGSTOP)
        assert self.rebalance() == 2
        rec = self.rollout(2)
        assert rec is not None and rec.state == "preparing", rec
        assert self.placement_state().rollout_state == "preparing"

    def wait_aborted(self, to_version: int) -> pb.RolloutRecord:
        """The rollout to ``to_version`` recorded aborted; the plan in force and stored plans as
        before it (v1; v1 and the aborted v2)."""
        rec = rs.wait_until(lambda: (r := self.rollout(to_version)) is not None
                            and r.state == "aborted" and r, EVENT_TIMEOUT,
                            f"rollout to v{to_version} aborted", 0.2)
        state = self.placement_state()
        assert state.plan_version == 1 and state.rollout_state == "", state
        assert [p.version for p in self.plans.ListPlans(
            pb.ListPlansRequest(placement=PLACEMENT), timeout=10).plans] == [1, 2]
        return rec

    def commit_everywhere(self) -> None:
        """A later rollout commits: every rank in force on the new version, nothing staged, and
        reports steps under it with no failed step."""
        mark = self.reports_seen()
        version = self.rebalance()
        rs.wait_until(lambda: (r := self.rollout(version)) is not None and r.state == "committed",
                      EVENT_TIMEOUT, f"rollout to v{version} committed", 0.2)
        assert self.placement_state().plan_version == version
        rs.wait_until(lambda: set(self.statuses(range(WORLD)).values()) == {(version, 0)},
                      EVENT_TIMEOUT, f"every worker on v{version}, nothing staged", 0.2)
        self.wait_serving(range(WORLD), version, mark)


@pytest.fixture
def cluster(tmp_path):
    """Controller with placement "m" at v1, agents n0 and n1, the 4-rank job serving v1."""
    c = RealCluster(tmp_path)
    try:
        for node in range(NODES):
            c.start_agent(node)
        c.start_job()
        c.wait_connected(set(range(WORLD)))
        assert c.statuses(range(WORLD)) == {r: (1, 0) for r in range(WORLD)}
        c.wait_serving(range(WORLD), 1, {})
        yield c
    finally:
        c.close()


def kill_worker_mid_swap(c: RealCluster) -> None:
    """SIGKILL rank 1 (node n0, holding a pending prepare) while n1's agent is paused; check the
    rollout aborted with nothing served under v2 and no failed step, then resume the agent."""
    c.start_stalled_swap()
    c.signal("worker-1", signal.SIGKILL)
    rec = c.wait_aborted(2)
    assert any(f"rank {r}" in rec.reason for r in range(WORLD)), rec.reason
    c.signal("agent-1", signal.SIGCONT)
    assert c.never_served(2)
    assert all(report.failed_steps == 0 for report, _ in c.spy.answers)


def test_worker_sigkilled_mid_swap(cluster):
    c = cluster
    kill_worker_mid_swap(c)
    # the other ranks' collectives fail with it; the launcher (torchrun, a Kubernetes Job) ends
    # the job when a rank fails, the agents report its ranks lost, and it restarts the job, whose
    # ranks fetch their initial plan from the controller
    for rank in range(WORLD):
        c.signal(f"worker-{rank}", signal.SIGKILL)
    c.wait_connected(set(), EVENT_TIMEOUT)
    mark = c.reports_seen()
    c.start_job()
    c.wait_connected(set(range(WORLD)))
    rejoined = rs.wait_until(lambda: (s := c.statuses(range(WORLD))) and None not in s.values()
                             and s, EVENT_TIMEOUT, "restarted workers answering Status", 0.2)
    assert set(rejoined.values()) == {(1, 0)}, (
        f"restarted workers (plan_version, prepared_version) by rank: {rejoined}; the plan in "
        f"force was v1")
    c.wait_serving(range(WORLD), 1, mark)
    c.commit_everywhere()                  # a later rollout commits on every worker


def test_ranks_of_the_broken_job_exit_promptly(cluster):
    c = cluster
    kill_worker_mid_swap(c)
    survivors = [f"worker-{r}" for r in range(WORLD) if r != 1]
    rs.wait_until(lambda: not any(c.alive(name) for name in survivors), EXIT_TIMEOUT,
                  "every surviving rank exited after the rollout aborted")
    assert all(c.procs[name].returncode != 0 for name in survivors)   # a failure, for supervisors
    c.wait_connected(set(), EVENT_TIMEOUT)                             # reported lost


def test_agent_sigkilled_mid_swap(cluster):
    c = cluster
    c.start_stalled_swap()
    c.signal("agent-1", signal.SIGKILL)    # n1's agent dies while its prepare is undelivered
    rec = c.wait_aborted(2)
    assert "rank 2" in rec.reason or "rank 3" in rec.reason, rec.reason
    # every worker keeps serving v1 with nothing staged; n0's report steps under v1, no failure
    mark = c.reports_seen()
    rs.wait_until(lambda: c.statuses(range(WORLD)) == {r: (1, 0) for r in range(WORLD)},
                  EVENT_TIMEOUT, "every worker on v1, nothing staged", 0.2)
    c.wait_serving(range(PER_NODE), 1, mark)
    # n1's agent restarts on the same socket: its workers register again, on v1, and report the
    # steps they served meanwhile
    c.start_agent(1)
    c.wait_connected(set(range(WORLD)), EVENT_TIMEOUT)
    c.wait_serving(range(PER_NODE, WORLD), 1, mark)
    assert c.never_served(2)
    assert c.statuses(range(WORLD)) == {r: (1, 0) for r in range(WORLD)}
    c.commit_everywhere()
