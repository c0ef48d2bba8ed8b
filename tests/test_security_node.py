"""Security of the node-local endpoints (the agent's AgentService, the worker's WorkerService)
with certificates made in the test: TLS, mTLS (no client cert / a cert of another CA refused),
plaintext clients refused by TLS servers, bearer tokens (missing or wrong -> UNAUTHENTICATED,
health stays open), the agent <-> worker loop with mTLS and tokens on, and no token in any log."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reliability_support as rs  # noqa: E402

from expertplane.agent.agent import Agent  # noqa: E402
from expertplane.agent.config import AgentConfig  # noqa: E402
from expertplane.cli.main import build_parser  # noqa: E402
from expertplane.worker.service import (  # noqa: E402
    CounterLedger,
    WorkerIdentity,
    WorkerServicer,
    serve_worker_service,
)
from expertplane.proto import expertplane_pb2 as pb  # noqa: E402
from expertplane.proto import expertplane_pb2_grpc as pb_grpc  # noqa: E402
from expertplane.rpc.channels import make_channel  # noqa: E402
from expertplane.rpc.security import SecurityConfig  # noqa: E402

pytestmark = pytest.mark.timeout(120)
TOKEN = "node-tok-5b0e2f9c41d7a3"
ENDPOINTS = ("agent", "worker")
# the status of a call that got through TLS and the token check: Register without a worker is
# INVALID_ARGUMENT (it reached the servicer), PullCounters answers
REACHED = {"agent": grpc.StatusCode.INVALID_ARGUMENT, "worker": grpc.StatusCode.OK}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return {k: str(v) for k, v in rs.make_certs(tmp_path_factory.mktemp("certs")).items()}


@contextlib.contextmanager
def endpoint(kind: str, security: SecurityConfig):
    """An agent's AgentService or a worker's WorkerService on loopback; yields its address."""
    if kind == "agent":
        agent = Agent(AgentConfig(controller=f"127.0.0.1:{rs.free_port()}", node="node-a",
                                  flush_timeout=0, local_security=security))
        try:
            yield agent.start()
        finally:
            agent.stop(0)
        return
    ident = WorkerIdentity("node-a", 0, 1, "demo", 2, 4, 3)
    servicer = WorkerServicer(ident, SimpleNamespace(version=1, prepared_version=0),
                              CounterLedger(2, 3, version=1), address=lambda: "",
                              on_bias=lambda bias: None)
    server, address = serve_worker_service(servicer, "127.0.0.1:0", security)
    try:
        yield address
    finally:
        server.stop(0)


def call(kind: str, address: str, security: SecurityConfig, metadata=()) -> grpc.StatusCode:
    """OK or the status code of one call to the ``kind`` endpoint made with ``security``."""
    with make_channel(address, security) as ch:
        try:
            if kind == "agent":
                pb_grpc.AgentServiceStub(ch).Register(pb.RegisterRequest(), timeout=3,
                                                      metadata=metadata)
            else:
                pb_grpc.WorkerServiceStub(ch).PullCounters(pb.PullCountersRequest(), timeout=3,
                                                           metadata=metadata)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            assert TOKEN not in (exc.details() or "")
            return exc.code()


def serving(address: str, security: SecurityConfig) -> bool:
    with make_channel(address, security) as ch:
        return rs.serving(ch)


@pytest.mark.parametrize("kind", ENDPOINTS)
def test_tls_endpoint_is_verified_by_clients(kind, certs):
    with endpoint(kind, SecurityConfig(tls_cert=certs["server"], tls_key=certs["server_key"])) as at:
        assert call(kind, at, SecurityConfig(tls_ca=certs["ca"])) == REACHED[kind]
        assert serving(at, SecurityConfig(tls_ca=certs["ca"]))
        # a plaintext client, and a client trusting another CA: no channel
        assert call(kind, at, SecurityConfig()) == grpc.StatusCode.UNAVAILABLE
        assert call(kind, at, SecurityConfig(tls_ca=certs["rogue-ca"])) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("kind", ENDPOINTS)
def test_mtls_endpoint_refuses_clients_without_a_cert_of_the_ca(kind, certs):
    with endpoint(kind, SecurityConfig(tls_cert=certs["server"], tls_key=certs["server_key"],
                                       tls_ca=certs["ca"])) as at:
        good = SecurityConfig(tls_ca=certs["ca"], tls_cert=certs["client"], tls_key=certs["client_key"])
        assert call(kind, at, good) == REACHED[kind]
        assert serving(at, good)
        rogue = SecurityConfig(tls_ca=certs["ca"], tls_cert=certs["rogue"], tls_key=certs["rogue_key"])
        for bad in (SecurityConfig(tls_ca=certs["ca"]), rogue, SecurityConfig()):
            assert call(kind, at, bad) == grpc.StatusCode.UNAVAILABLE, bad


@pytest.mark.parametrize("kind", ENDPOINTS)
def test_endpoint_token_required_and_health_open(kind):
    with endpoint(kind, SecurityConfig(token=TOKEN)) as at:
        plain = SecurityConfig()
        for bad in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                    (("authorization", f"Bearer {TOKEN}x"),)):
            assert call(kind, at, plain, bad) == grpc.StatusCode.UNAUTHENTICATED, bad
        assert call(kind, at, SecurityConfig(token="wrong")) == grpc.StatusCode.UNAUTHENTICATED
        assert call(kind, at, SecurityConfig(token=TOKEN)) == REACHED[kind]
        # a call's own authorization entry wins over the channel's token (never sent twice)
        assert call(kind, at, SecurityConfig(token=TOKEN), (("authorization", "Bearer wrong"),)) \
            == grpc.StatusCode.UNAUTHENTICATED
        assert serving(at, plain)                                    # no token needed


def test_cli_node_local_options_are_apart_from_the_controller_ones(tmp_path, monkeypatch):
    from expertplane.cli.agent import config_from_args as agent_config
    from expertplane.cli.worker import config_from_args as worker_config

    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("EXPERTPLANE_TOKEN", "controller-token")
    monkeypatch.delenv("EXPERTPLANE_LOCAL_TOKEN", raising=False)
    local = ["--local-tls-cert", "c.pem", "--local-tls-key", "k.pem", "--local-tls-ca", "ca.pem"]
    agent = agent_config(build_parser().parse_args(
        ["agent", "--controller", "c:1", "--node", "n", "--tls-ca", "up.pem", *local,
         "--local-token-file", str(tmp_path / "token")]))
    assert agent.security == SecurityConfig(tls_ca="up.pem", token="controller-token")
    assert agent.local_security == SecurityConfig(tls_cert="c.pem", tls_key="k.pem",
                                                  tls_ca="ca.pem", token=TOKEN)
    monkeypatch.setenv("EXPERTPLANE_LOCAL_TOKEN", TOKEN)
    worker = worker_config(build_parser().parse_args(
        ["worker", "--rank", "0", "--world-size", "1", "--master", "h:1", "--plan", "p.json",
         *local]))
    assert worker.local_security.token == TOKEN and worker.security.token == "controller-token"
    assert worker.local_security.tls_ca == "ca.pem" and worker.security.tls_ca is None


# ------------------------------------------------------------ the loop, with real worker processes
_spec = importlib.util.spec_from_file_location("agent_workers_support",
                                               Path(__file__).with_name("test_agent_workers.py"))
real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real)


@pytest.mark.timeout(240)
def test_agent_and_workers_loop_with_mtls_and_tokens(tmp_path, certs, caplog):
    """Register, pull counters and a prepare/commit relayed by the agent, node-local mTLS and
    tokens on (the controller link stays plaintext here: its security is tested elsewhere)."""
    from expertplane.controller.config import ControllerConfig
    from expertplane.controller.server import ControllerServer

    caplog.set_level(logging.DEBUG)
    (tmp_path / "token").write_text(TOKEN + "\n")
    local = SecurityConfig(tls_cert=certs["server"], tls_key=certs["server_key"], tls_ca=certs["ca"],
                           token=TOKEN)
    local_args = ["--local-tls-cert", certs["client"], "--local-tls-key", certs["client_key"],
                  "--local-tls-ca", certs["ca"], "--local-token-file", str(tmp_path / "token")]
    controller = ControllerServer(ControllerConfig(
        listen="127.0.0.1:0", db_url=f"sqlite:///{tmp_path / 'c.db'}", policy_interval_seconds=3600,
        snapshot_interval_seconds=3600, rollout_timeout_seconds=20))
    port = controller.start()
    agent = Agent(AgentConfig(controller=f"127.0.0.1:{port}", node="node-a", interval=0.2,
                              flush_timeout=0, local_security=local))
    workers: list[subprocess.Popen] = []
    try:
        with make_channel(f"127.0.0.1:{port}") as ch:
            plans = pb_grpc.PlanServiceStub(ch)
            plans.ApplyPlacement(real.PLACEMENT, timeout=30)
            address = agent.start()
            # workers with the client cert but without the node-local token are refused
            (tmp_path / "untrusted").mkdir()
            workers += real.start_real_workers(tmp_path / "untrusted", address, port,
                                               tuple(local_args[:-2]), log_level="DEBUG")
            workers += real.start_real_workers(tmp_path, address, port, tuple(local_args),
                                               log_level="DEBUG")
            rs.wait_until(lambda: sorted(h.info.rank for h in agent.registry.handles()) == [0, 1]
                          and all(h.last_pull for h in agent.registry.handles()), 40,
                          "both workers registered over mTLS + token and pulled (see worker*.log)")
            decision = pb_grpc.PlanningServiceStub(ch).TriggerRebalance(
                pb.TriggerRebalanceRequest(placement="demo", force=True), timeout=90)
            assert decision.new_version == 2, decision
            rs.wait_until(lambda: [r.state for r in plans.ListRollouts(
                pb.ListRolloutsRequest(placement="demo"), timeout=10).rollouts] == ["committed"],
                60, "rollout of plan 2 committed through the agent")
            rs.wait_until(lambda: sorted((h.info.rank, h.info.plan_version)
                                         for h in agent.registry.handles()) == [(0, 2), (1, 2)],
                          10, "both workers on plan 2")
            rs.wait_until(lambda: agent.metrics.reports_acked.labels(status="ACCEPTED")._value.get(),
                          10, "pulled counters accepted by the controller")
            untrusted = tmp_path / "untrusted" / "worker0.log"
            rs.wait_until(lambda: "UNAUTHENTICATED" in untrusted.read_text(), 40,
                          "the worker without the token refused by the agent")
            assert len(agent.registry) == 2                  # the untrusted ranks never joined
    finally:
        rs.stop_loop(workers, agent, controller)
    assert "registered with agent" not in untrusted.read_text()
    assert "registered with agent" in (tmp_path / "worker0.log").read_text()
    logs = [caplog.text] + [p.read_text() for p in tmp_path.rglob("worker*.log")]
    assert len(logs) == 1 + 2 * real.WORLD and all(TOKEN not in text for text in logs)
