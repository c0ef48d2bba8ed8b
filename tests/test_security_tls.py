"""Security of the controller's and the agent's gRPC endpoints with certificates made in the test
(openssl CLI): TLS, mTLS (no client cert / a cert from another CA refused), bearer tokens
(missing or wrong -> UNAUTHENTICATED on every service, health stays open), and the token never
appearing in the controller's or the agent's logs."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reliability_support as rs  # noqa: E402

from expertplane.agent.agent import Agent  # noqa: E402
from expertplane.agent.config import AgentConfig  # noqa: E402
from expertplane.benchmarks.simagent import load_report  # noqa: E402
from expertplane.controller.config import ControllerConfig  # noqa: E402
from expertplane.controller.server import ControllerServer  # noqa: E402
from expertplane.proto import expertplane_pb2 as pb  # noqa: E402
from expertplane.proto import expertplane_pb2_grpc as pb_grpc  # noqa: E402
from expertplane.rpc.channels import make_channel  # noqa: E402
from expertplane.rpc.security import SecurityConfig  # noqa: E402

pytestmark = pytest.mark.timeout(120)
TOKEN = "tok-9f3a1c77e2b54d0a"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return {k: str(v) for k, v in rs.make_certs(tmp_path_factory.mktemp("certs")).items()}


def controller(tmp_path, security: SecurityConfig) -> ControllerServer:
    srv = ControllerServer(ControllerConfig(listen="127.0.0.1:0", db_url=f"sqlite:///{tmp_path / 's.db'}",
                                            security=security, policy_interval_seconds=3600))
    srv.start()
    return srv


def list_placements(port: int, security: SecurityConfig, metadata=()) -> grpc.StatusCode:
    """OK or the status code of one ListPlacements call made with ``security``."""
    with make_channel(f"127.0.0.1:{port}", security) as ch:
        try:
            pb_grpc.PlanServiceStub(ch).ListPlacements(pb.ListPlacementsRequest(), timeout=3,
                                                       metadata=metadata)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def test_tls_server_verified_by_clients(tmp_path, certs):
    srv = controller(tmp_path, SecurityConfig(tls_cert=certs["server"], tls_key=certs["server_key"]))
    try:
        assert list_placements(srv.port, SecurityConfig(tls_ca=certs["ca"])) == grpc.StatusCode.OK
        # plaintext client against a TLS server, and a client trusting another CA: no channel
        assert list_placements(srv.port, SecurityConfig()) == grpc.StatusCode.UNAVAILABLE
        assert list_placements(srv.port, SecurityConfig(tls_ca=certs["rogue-ca"])) == \
            grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(0.2)


def test_mtls_refuses_clients_without_a_cert_of_the_ca(tmp_path, certs):
    srv = controller(tmp_path, SecurityConfig(tls_cert=certs["server"], tls_key=certs["server_key"],
                                              tls_ca=certs["ca"]))
    try:
        good = SecurityConfig(tls_ca=certs["ca"], tls_cert=certs["client"], tls_key=certs["client_key"])
        assert list_placements(srv.port, good) == grpc.StatusCode.OK
        no_cert = SecurityConfig(tls_ca=certs["ca"])
        rogue = SecurityConfig(tls_ca=certs["ca"], tls_cert=certs["rogue"], tls_key=certs["rogue_key"])
        for bad in (no_cert, rogue, SecurityConfig()):
            assert list_placements(srv.port, bad) == grpc.StatusCode.UNAVAILABLE, bad
        # the health check is reachable over mTLS with a good cert (probes use one)
        with make_channel(f"127.0.0.1:{srv.port}", good) as ch:
            assert rs.serving(ch)
    finally:
        srv.stop(0.2)


def test_bearer_token_on_every_service(tmp_path):
    srv = controller(tmp_path, SecurityConfig(token=TOKEN))
    ok_md = (("authorization", f"Bearer {TOKEN}"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            plans, planning = pb_grpc.PlanServiceStub(ch), pb_grpc.PlanningServiceStub(ch)
            load, rollout = pb_grpc.LoadServiceStub(ch), pb_grpc.RolloutServiceStub(ch)
            calls = [
                lambda md: plans.ListPlacements(pb.ListPlacementsRequest(), timeout=5, metadata=md),
                lambda md: plans.ApplyPlacement(rs.small_placement("x"), timeout=30, metadata=md),
                lambda md: planning.TriggerRebalance(pb.TriggerRebalanceRequest(placement="x",
                                                                                dry_run=True),
                                                     timeout=30, metadata=md),
                lambda md: list(load.ReportLoad(iter([load_report("n0", 0, "x", 1, 1,
                                                                  np.ones((2, 3), int))]),
                                                timeout=5, metadata=md)),
                lambda md: next(iter(rollout.Connect(iter([pb.RolloutEvent(
                    kind=pb.RolloutEvent.HELLO, node="n0")]), timeout=1, metadata=md))),
                lambda md: list(plans.WatchPlans(pb.WatchPlansRequest(), timeout=1, metadata=md)),
            ]
            for bad in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                        (("authorization", f"bearer {TOKEN}x"),)):
                for call in calls:
                    with pytest.raises(grpc.RpcError) as exc:
                        call(bad)
                    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED, (bad, exc.value)
                    assert TOKEN not in (exc.value.details() or "")
            assert rs.serving(ch)                                   # no token needed
            assert calls[1](ok_md).plan_version == 1
            assert calls[3](ok_md)[0].status == pb.LoadAck.ACCEPTED
    finally:
        srv.stop(0.2)


def test_token_never_logged_by_controller_process(tmp_path):
    """A controller process at DEBUG level, called with right and wrong tokens, then stopped."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    log = tmp_path / "controller.log"
    proc = rs.ControllerProcess(f"sqlite:///{tmp_path / 's.db'}", log, log_level="DEBUG",
                                extra=("--token-file", str(tmp_path / "token")))
    proc.start()
    try:
        for md in ((("authorization", f"Bearer {TOKEN}"),), (("authorization", f"Bearer {TOKEN}0"),),
                   ()):
            list_placements(proc.port, SecurityConfig(), md)
    finally:
        proc.terminate()
    text = log.read_text()
    assert "serving on port" in text
    assert TOKEN not in text


def test_agent_with_token_and_mtls_connects_and_never_logs_the_token(tmp_path, certs, caplog):
    server_sec = SecurityConfig(tls_cert=certs["server"], tls_key=certs["server_key"],
                                tls_ca=certs["ca"], token=TOKEN)
    srv = controller(tmp_path, server_sec)
    caplog.set_level(logging.DEBUG)
    good = SecurityConfig(tls_ca=certs["ca"], tls_cert=certs["client"], tls_key=certs["client_key"],
                          token=TOKEN)
    agents = []
    try:
        for name, sec in (("good", good),
                          ("rogue", SecurityConfig(tls_ca=certs["ca"], tls_cert=certs["rogue"],
                                                   tls_key=certs["rogue_key"], token=TOKEN)),
                          ("notoken", SecurityConfig(tls_ca=certs["ca"], tls_cert=certs["client"],
                                                     tls_key=certs["client_key"]))):
            agent = Agent(AgentConfig(controller=f"127.0.0.1:{srv.port}", node=name, interval=0.1,
                                      backoff_initial=0.05, backoff_max=0.2, flush_timeout=0,
                                      security=sec))
            agent.start()
            agents.append(agent)
        def nodes():
            # the coordinator's open Connect sessions (no public accessor; read-only use)
            return {s.node for s in list(srv.controller.rollouts._sessions.values())}
        rs.wait_until(lambda: "good" in nodes(), 15, "agent with mTLS + token connected")
        time.sleep(1.0)                          # the refused agents retry meanwhile
        assert nodes() == {"good"}
    finally:
        for a in agents:
            a.stop(0)
        srv.stop(0.2)
    assert caplog.text and TOKEN not in caplog.text
