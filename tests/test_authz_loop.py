"""The whole loop under per-caller authorization, with the role tables of rpc/authz.py: the real
controller (callers file: agent, worker, admin), an agent (its own controller token; a node-local
callers file admitting the workers) and two REAL `expertplane worker` processes (their own
controller token; a node-local callers file admitting the agent). Every call the components make
must be allowed by their roles: the workers fetch the initial plan and register, the agent pulls
counters and reports them, a rollout is prepared and committed through the agent. Nothing is
refused and no token is logged."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reliability_support as rs  # noqa: E402

from expertplane.agent.agent import Agent  # noqa: E402
from expertplane.agent.config import AgentConfig  # noqa: E402
from expertplane.controller.config import ControllerConfig  # noqa: E402
from expertplane.controller.server import ControllerServer  # noqa: E402
from expertplane.proto import expertplane_pb2 as pb  # noqa: E402
from expertplane.proto import expertplane_pb2_grpc as pb_grpc  # noqa: E402
from expertplane.rpc.authz import read_token_file  # noqa: E402
from expertplane.rpc.channels import make_channel  # noqa: E402
from expertplane.rpc.security import SecurityConfig  # noqa: E402

_spec = importlib.util.spec_from_file_location("agent_workers_support",
                                               Path(__file__).with_name("test_agent_workers.py"))
real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real)

TOKENS = {name: f"{name}-tok-{i}f3c9a1d" for i, name in enumerate(
    ("agent-up", "worker-up", "admin", "agent-local", "worker-local"))}


def write_callers(path: Path, callers: dict[str, str], own: str | None = None) -> str:
    """A callers file at ``path``: token name -> role, each caller recognised by a token file
    next to it; ``own``: the token name this process sends. Returns the path."""
    for name in [*callers, *([own] if own else [])]:
        (path.parent / f"{name}.token").write_text(TOKENS[name] + "\n")
    doc = {"callers": [{"name": name, "token_file": f"{name}.token", "roles": [role]}
                       for name, role in callers.items()]}
    if own:
        doc["own_token_file"] = f"{own}.token"
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.timeout(240)
def test_loop_runs_on_the_roles_alone(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    controller_file = read_token_file(write_callers(
        tmp_path / "controller.yaml", {"agent-up": "agent", "worker-up": "worker", "admin": "admin"}))
    agent_local = read_token_file(write_callers(tmp_path / "agent-local.yaml",
                                                {"worker-local": "worker"}, own="agent-local"))
    worker_local = write_callers(tmp_path / "worker-local.yaml", {"agent-local": "agent"},
                                 own="worker-local")
    controller = ControllerServer(ControllerConfig(
        listen="127.0.0.1:0", db_url=f"sqlite:///{tmp_path / 'c.db'}", policy_interval_seconds=3600,
        snapshot_interval_seconds=3600, rollout_timeout_seconds=20,
        security=SecurityConfig(callers=controller_file.callers)))
    port = controller.start()
    agent = Agent(AgentConfig(controller=f"127.0.0.1:{port}", node="node-a", interval=0.2,
                              flush_timeout=0, security=SecurityConfig(token=TOKENS["agent-up"]),
                              local_security=SecurityConfig(token=agent_local.token,
                                                            callers=agent_local.callers)))
    workers: list[subprocess.Popen] = []
    try:
        with make_channel(f"127.0.0.1:{port}", SecurityConfig(token=TOKENS["admin"])) as ch:
            plans = pb_grpc.PlanServiceStub(ch)
            plans.ApplyPlacement(real.PLACEMENT, timeout=30)
            workers += real.start_real_workers(
                tmp_path, agent.start(), port,
                ("--token-file", str(tmp_path / "worker-up.token"), "--local-token-file", worker_local),
                log_level="DEBUG")
            rs.wait_until(lambda: sorted(h.info.rank for h in agent.registry.handles()) == [0, 1]
                          and all(h.last_pull for h in agent.registry.handles()), 60,
                          "both workers fetched the plan, registered and were pulled (worker*.log)")
            rs.wait_until(lambda: agent.metrics.reports_acked.labels(status="ACCEPTED")._value.get(),
                          10, "pulled counters accepted by the controller")
            planning = pb_grpc.PlanningServiceStub(ch)
            new = planning.TriggerRebalance(pb.TriggerRebalanceRequest(placement="demo", force=True),
                                            timeout=90).new_version
            assert new == 2
            # the workers run plan 2: the agent's Prepare and Commit were allowed
            rs.wait_until(lambda: {h.info.plan_version for h in agent.registry.handles()} == {2},
                          60, "both workers on plan 2 (prepared and committed through the agent)")
            rollouts = plans.ListRollouts(pb.ListRolloutsRequest(placement="demo"), timeout=10)
            assert [r.state for r in rollouts.rollouts] == ["committed"]
    finally:
        rs.stop_loop(workers, agent, controller)
    logs = [caplog.text] + [p.read_text() for p in tmp_path.glob("worker*.log")]
    assert len(logs) == 1 + real.WORLD
    assert not any(t in text for text in logs for t in TOKENS.values())
    assert not any(word in text for text in logs
                   for word in ("PERMISSION_DENIED", "UNAUTHENTICATED", "refused /"))
