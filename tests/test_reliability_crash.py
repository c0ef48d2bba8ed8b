"""kill -9 of the ``expertplane controller`` process at each phase of a rollout, then a restart
on the same store (SQLite and PostgreSQL), with simulated agents (real RolloutService clients)
that reconnect with the state their workers had. Checked: no stored plan lost or changed, the
rollout is recorded as aborted (killed before the commit decision) or committed (after it), and
every worker ends on ONE plan version with nothing left staged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reliability_support as rs  # noqa: E402

from expertplane.benchmarks.simagent import SimulatedAgent  # noqa: E402
from expertplane.proto import expertplane_pb2 as pb  # noqa: E402
from expertplane.proto import expertplane_pb2_grpc as pb_grpc  # noqa: E402
from expertplane.rpc.channels import make_channel  # noqa: E402

pytestmark = pytest.mark.timeout(180)


class CrashAgent(SimulatedAgent):
    """A simulated agent whose workers can also withhold their COMMITTED answer."""

    stall_commit = False

    def _handle(self, cmd: pb.RolloutCommand) -> None:
        if self.stall_commit and cmd.WhichOneof("command") == "commit":
            with self._lock:
                self.commands.append(cmd)
                self._changed.notify_all()
            return
        super()._handle(cmd)


def connect_agents(channel, old: list[CrashAgent] | None = None) -> list[CrashAgent]:
    """Two agents (ranks 0-1 on n0, 2-3 on n1); with ``old``, they keep the old workers' state."""
    agents = []
    for i in range(2):
        a = CrashAgent(channel, f"n{i}", "m", (2 * i, 2 * i + 1), plan_version=0)
        if old is not None:
            a.workers = old[i].workers
            for w in a.workers.values():
                w.stall_prepare = False
        agents.append(a.start())
    return agents


def all_on(agents, version: int) -> bool:
    return all(w.plan_version == version and w.prepared_version == 0
               for a in agents for w in a.workers.values())


def crash_and_restart(db_url: str, tmp_path: Path, phase: str) -> None:
    ctl = rs.ControllerProcess(db_url, tmp_path / "controller.log",
                               extra=("--rollout-timeout", "60")).start()
    channel = make_channel(f"127.0.0.1:{ctl.port}")
    plans = pb_grpc.PlanServiceStub(channel)
    planning = pb_grpc.PlanningServiceStub(channel)
    agents = []
    try:
        plans.ApplyPlacement(rs.small_placement("m", mode=pb.RebalancePolicy.MANUAL), timeout=60)
        agents = connect_agents(channel)
        # workers start on no plan: the controller syncs them to v1, which proves they joined
        rs.wait_until(lambda: all_on(agents, 1), 30, "workers synced to v1")
        if phase == "some_prepared":
            for w in agents[1].workers.values():
                w.stall_prepare = True
        if phase == "commit_decided":
            agents[1].stall_commit = True
        if phase != "before_prepare":
            d = planning.TriggerRebalance(pb.TriggerRebalanceRequest(placement="m", force=True),
                                          timeout=120)
            assert d.rebalance and d.new_version == 2, d
        if phase == "some_prepared":
            rs.wait_until(lambda: all(w.prepared_version == 2 for w in agents[0].workers.values())
                          and all("prepare 2" in w.history for w in agents[1].workers.values()),
                          30, "n0 prepared, n1 stalled")
        if phase == "commit_decided":
            rs.wait_until(lambda: all_on(agents[:1], 2) and any(
                c.WhichOneof("command") == "commit" for c in agents[1].commands), 30,
                "n0 committed, n1 got the commit")
        stored = rs.stored_plans(channel, "m")
        ctl.kill()                                       # SIGKILL: no cleanup at all
    finally:
        for a in agents:
            a.stop()
        channel.close()
    assert len(stored) == (1 if phase == "before_prepare" else 2)
    old = agents

    ctl.start()
    channel = make_channel(f"127.0.0.1:{ctl.port}")
    plans = pb_grpc.PlanServiceStub(channel)
    agents = []
    try:
        assert rs.stored_plans(channel, "m") == stored                 # nothing lost or changed
        expected = 2 if phase == "commit_decided" else 1
        records = plans.ListRollouts(pb.ListRolloutsRequest(placement="m"), timeout=10).rollouts
        if phase in ("some_prepared", "commit_decided"):
            [rec] = [r for r in records if r.to_version == 2]
            want = "aborted" if phase == "some_prepared" else "committed"
            assert rec.state == want and "restarted" in rec.reason, rec
        agents = connect_agents(channel, old)            # workers reconnect as they were
        rs.wait_until(lambda: all_on(agents, expected), 30, f"every worker on v{expected}")
        [state] = plans.ListPlacements(pb.ListPlacementsRequest(), timeout=10).placements
        assert state.plan_version == expected and state.rollout_state == ""
    finally:
        for a in agents:
            a.stop()
        channel.close()
        ctl.terminate()


@pytest.mark.parametrize("phase", [
    pytest.param("before_prepare", marks=pytest.mark.slow), "some_prepared", "commit_decided"])
def test_controller_sigkill_sqlite(sqlite_url, tmp_path, phase):
    crash_and_restart(sqlite_url, tmp_path, phase)


@pytest.mark.parametrize("phase", [
    pytest.param("before_prepare", marks=pytest.mark.slow), "some_prepared",
    pytest.param("commit_decided", marks=pytest.mark.slow)])
def test_controller_sigkill_postgresql(pg_url, tmp_path, phase):
    crash_and_restart(pg_url, tmp_path, phase)
