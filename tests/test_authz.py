"""Per-caller authorization (rpc/authz.py) on real gRPC servers on loopback: the controller's
grpc.aio server and the node-local agent and worker endpoints (synchronous servers), with callers
files read through the CLI options; roles by bearer token and by mTLS client-certificate identity;
bad callers files refused naming the field; no token in any message or log line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reliability_support as rs  # noqa: E402

from expertplane.agent.agent import Agent  # noqa: E402
from expertplane.agent.config import AgentConfig  # noqa: E402
from expertplane.benchmarks.simagent import load_report  # noqa: E402
from expertplane.cli.main import build_parser, main  # noqa: E402
from expertplane.controller.config import ControllerConfig  # noqa: E402
from expertplane.controller.server import ControllerServer  # noqa: E402
from expertplane.proto import expertplane_pb2 as pb  # noqa: E402
from expertplane.proto import expertplane_pb2_grpc as pb_grpc  # noqa: E402
from expertplane.rpc import authz  # noqa: E402
from expertplane.rpc.authz import ROLE_METHODS, CallersFileError, read_token_file  # noqa: E402
from expertplane.rpc.channels import aio_server_thread, make_channel, make_server  # noqa: E402
from expertplane.rpc.security import SecurityConfig, security_from_args  # noqa: E402
from expertplane.worker.service import (  # noqa: E402
    CounterLedger,
    WorkerIdentity,
    WorkerServicer,
    serve_worker_service,
)

pytestmark = pytest.mark.timeout(120)
TOKENS = {"agent": "agent-tok-3c1f9a0b7e", "worker": "worker-tok-8d2e4b6a11",
          "reader": "reader-tok-f00d5eed42", "operator": "operator-tok-77aa0c3e9b",
          "admin": "admin-tok-1b9c8d7e6f", "stranger": "stranger-tok-0e0e0e0e0e"}
V1 = "/expertplane.v1."


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def callers_file(directory: Path, roles: dict[str, str], identities: dict[str, str] = (),
                 own: str | None = None) -> str:
    """A YAML callers file in ``directory``: caller ``<role>-caller`` per entry of ``roles``
    (role -> token name; the admin's token by ``token_file``, the others by ``token_sha256``),
    plus ``identities`` (certificate CN -> role). Returns its path."""
    callers = []
    for role, token_name in roles.items():
        entry = {"name": f"{role}-caller", "roles": [role]}
        if role == "admin":
            (directory / "admin.token").write_text(TOKENS[token_name] + "\n")
            entry["token_file"] = "admin.token"          # relative to the callers file
        else:
            entry["token_sha256"] = sha256(TOKENS[token_name])
        callers.append(entry)
    callers += [{"name": f"cert-{cn}", "identity": cn, "roles": [role]}
                for cn, role in dict(identities).items()]
    doc = {"callers": callers}
    if own:
        (directory / "own.token").write_text(TOKENS[own] + "\n")
        doc["own_token_file"] = "own.token"
    path = directory / "callers.yaml"
    path.write_text(json.dumps(doc))                       # JSON is YAML
    return str(path)


def cli_security(command: list[str], prefix: str = "") -> SecurityConfig:
    """The SecurityConfig the CLI builds for ``command`` (options of ``prefix``)."""
    return security_from_args(build_parser().parse_args(command), prefix,
                              "EXPERTPLANE_LOCAL_TOKEN" if prefix else "EXPERTPLANE_TOKEN")


def code_of(call, token: str | None = None) -> tuple[grpc.StatusCode, str]:
    """(status code, details) of ``call(metadata)`` made with ``token`` ('OK' details on success)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        call(metadata)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        details = exc.details() or ""
        assert not any(t in details for t in TOKENS.values()), details
        return exc.code(), details


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return {k: str(v) for k, v in rs.make_certs(tmp_path_factory.mktemp("certs")).items()}


@contextlib.contextmanager
def controller(tmp_path, security: SecurityConfig):
    srv = ControllerServer(ControllerConfig(listen="127.0.0.1:0", db_url=f"sqlite:///{tmp_path / 's.db'}",
                                            security=security, policy_interval_seconds=3600))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(0.2)


def controller_calls(channel) -> dict:
    """One call per kind of handler on the controller, each ``metadata -> result``."""
    plans, load = pb_grpc.PlanServiceStub(channel), pb_grpc.LoadServiceStub(channel)
    rollout = pb_grpc.RolloutServiceStub(channel)
    return {
        "ListPlacements": lambda md: plans.ListPlacements(pb.ListPlacementsRequest(), timeout=5,
                                                          metadata=md),
        "ApplyPlacement": lambda md: plans.ApplyPlacement(rs.small_placement("x"), timeout=30,
                                                          metadata=md),
        "ReportLoad": lambda md: list(load.ReportLoad(iter([load_report(
            "n0", 0, "x", 1, 1, np.ones((2, 3), int))]), timeout=5, metadata=md)),
        "WatchPlans": lambda md: next(iter(plans.WatchPlans(pb.WatchPlansRequest(placement="x"),
                                                            timeout=5, metadata=md))),
        "Connect": lambda md: list(rollout.Connect(iter([
            pb.RolloutEvent(kind=pb.RolloutEvent.HELLO, node="n0")]), timeout=1, metadata=md)),
    }


def test_roles_on_the_controller(tmp_path, caplog):
    """reader: reads, never ApplyPlacement; operator applies; agent reports but does not read
    plans; unknown or missing tokens UNAUTHENTICATED; health open; no token logged."""
    caplog.set_level(logging.DEBUG)
    path = callers_file(tmp_path, {r: r for r in ("agent", "reader", "operator", "admin")})
    security = cli_security(["controller", "--token-file", path])
    assert security.token is None and len(security.callers.callers) == 4
    with controller(tmp_path, security) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        calls = controller_calls(ch)
        denied = grpc.StatusCode.PERMISSION_DENIED
        code, details = code_of(calls["ApplyPlacement"], TOKENS["reader"])
        assert code == denied
        assert "'reader-caller'" in details and f"{V1}PlanService/ApplyPlacement" in details
        assert code_of(calls["ApplyPlacement"], TOKENS["operator"])[0] == grpc.StatusCode.OK
        assert code_of(calls["ListPlacements"], TOKENS["reader"])[0] == grpc.StatusCode.OK
        assert code_of(calls["WatchPlans"], TOKENS["reader"])[0] == grpc.StatusCode.OK
        acks = calls["ReportLoad"]((("authorization", f"Bearer {TOKENS['agent']}"),))
        assert [a.status for a in acks] == [pb.LoadAck.ACCEPTED]
        for name in ("ApplyPlacement", "ListPlacements", "WatchPlans"):
            code, details = code_of(calls[name], TOKENS["agent"])
            assert code == denied and f"PlanService/{name}" in details and "'agent-caller'" in details
        for name in ("ReportLoad", "Connect"):
            code, details = code_of(calls[name], TOKENS["reader"])
            assert code == denied and name in details
        # past authorization: the stream ends with the client's (OK), or at the deadline
        assert code_of(calls["Connect"], TOKENS["admin"])[0] in (
            grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED)
        for token in (TOKENS["stranger"], TOKENS["worker"], None):
            for name, call in calls.items():
                assert code_of(call, token)[0] == grpc.StatusCode.UNAUTHENTICATED, (token, name)
        assert rs.serving(ch)                                        # no token needed
    assert "reader-caller" in caplog.text and f"{V1}PlanService/ApplyPlacement" in caplog.text
    assert not any(t in caplog.text for t in TOKENS.values())


class SyncHandlers(pb_grpc.LoadServiceServicer, pb_grpc.PlanServiceServicer):
    """A plain function (ListPlans) and a generator (ReportLoad)."""

    def ListPlans(self, request, context):
        return pb.ListPlansResponse()

    def ReportLoad(self, request_iterator, context):
        for r in request_iterator:
            yield pb.LoadAck(sequence=r.sequence, status=pb.LoadAck.ACCEPTED)


class AsyncHandlers(pb_grpc.LoadServiceServicer, pb_grpc.PlanServiceServicer):
    """A coroutine (ListPlans) and an async generator (ReportLoad)."""

    async def ListPlans(self, request, context):
        return pb.ListPlansResponse()

    async def ReportLoad(self, request_iterator, context):
        async for r in request_iterator:
            yield pb.LoadAck(sequence=r.sequence, status=pb.LoadAck.ACCEPTED)


def add_handlers(handlers):
    def add(server):
        pb_grpc.add_LoadServiceServicer_to_server(handlers, server)
        pb_grpc.add_PlanServiceServicer_to_server(handlers, server)
    return add


@contextlib.contextmanager
def sync_server(add, address: str, security: SecurityConfig):
    server = make_server(security)
    add(server)
    port = server.add_insecure_port(address)
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


EVERY_SERVER = pytest.mark.parametrize(
    "serve,handlers", [(sync_server, SyncHandlers), (aio_server_thread, SyncHandlers),
                       (aio_server_thread, AsyncHandlers)],
    ids=["sync-server", "aio-server-sync-handlers", "aio-server-async-handlers"])


@contextlib.contextmanager
def _reader_and_agent_calls(tmp_path, serve, handlers):
    """``serve`` the ``handlers`` behind a callers file of an agent and a reader; yields
    ``(get, report)``: a ListPlans call and a one-report ReportLoad call, each ``(metadata) ->
    response``, on one channel."""
    security = cli_security(["controller", "--token-file",
                             callers_file(tmp_path, {"agent": "agent", "reader": "reader"})])
    with serve(add_handlers(handlers()), "127.0.0.1:0", security) as port, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        def get(md):
            return pb_grpc.PlanServiceStub(ch).ListPlans(pb.ListPlansRequest(placement="p"),
                                                         timeout=5, metadata=md)

        def report(md):
            return list(pb_grpc.LoadServiceStub(ch).ReportLoad(
                iter([pb.LoadReport(sequence=7)]), timeout=5, metadata=md))

        yield get, report


@EVERY_SERVER
def test_every_kind_of_handler_is_guarded(tmp_path, serve, handlers):
    """Unary and bidirectional-streaming handlers written as functions, generators, coroutines
    and async generators, on the synchronous and the aio server: allowed, denied, unknown."""
    with _reader_and_agent_calls(tmp_path, serve, handlers) as (get, report):
        assert code_of(get, TOKENS["reader"])[0] == grpc.StatusCode.OK
        assert code_of(report, TOKENS["agent"])[0] == grpc.StatusCode.OK
        assert report((("authorization", f"Bearer {TOKENS['agent']}"),))[0].sequence == 7
        assert code_of(get, TOKENS["agent"])[0] == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(report, TOKENS["reader"])[0] == grpc.StatusCode.PERMISSION_DENIED
        for call in (get, report):
            assert code_of(call)[0] == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(call, TOKENS["stranger"])[0] == grpc.StatusCode.UNAUTHENTICATED


@EVERY_SERVER
def test_guarded_handler_is_built_once_per_method_and_checks_every_call(tmp_path, serve, handlers,
                                                                        monkeypatch):
    """Calls of one method alternate between an allowed, a refused and an unknown caller: each
    call gets its own verdict, and the guarded handler is built once per method (not per call)."""
    built, guard = [], authz._guard

    def counting_guard(handler, check):
        built.append(handler)
        return guard(handler, check)

    monkeypatch.setattr(authz, "_guard", counting_guard)
    with _reader_and_agent_calls(tmp_path, serve, handlers) as (get, report):
        for _ in range(3):
            for call, allowed, refused in ((get, "reader", "agent"), (report, "agent", "reader")):
                assert code_of(call, TOKENS[allowed])[0] == grpc.StatusCode.OK
                assert code_of(call, TOKENS[refused])[0] == grpc.StatusCode.PERMISSION_DENIED
                assert code_of(call, TOKENS["stranger"])[0] == grpc.StatusCode.UNAUTHENTICATED
                assert code_of(call)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert len(built) == 2, built                  # ListPlans' and ReportLoad's, once each


def worker_endpoint(security: SecurityConfig):
    """A worker's WorkerService on loopback (synchronous server): (server, address)."""
    ident = WorkerIdentity("node-a", 0, 1, "demo", 2, 4, 3)
    servicer = WorkerServicer(ident, SimpleNamespace(version=1, prepared_version=0),
                              CounterLedger(2, 3, version=1), address=lambda: "",
                              on_bias=lambda bias: None)
    return serve_worker_service(servicer, "127.0.0.1:0", security)


def worker_calls(channel) -> dict:
    stub = pb_grpc.WorkerServiceStub(channel)
    return {"PullCounters": lambda md: stub.PullCounters(pb.PullCountersRequest(), timeout=3,
                                                         metadata=md),
            # past authorization, the servicer refuses version 0: INVALID_ARGUMENT
            "Commit": lambda md: stub.Commit(pb.VersionRequest(placement="demo", version=0),
                                             timeout=3, metadata=md)}


def test_node_local_roles(tmp_path):
    """A worker token registers with the agent (and cannot pull another worker's counters); the
    agent's token pulls from a worker (and cannot Register with an agent)."""
    (tmp_path / "agent").mkdir()
    (tmp_path / "worker").mkdir()
    agent_side = cli_security(["agent", "--controller", "c:1", "--node", "n", "--local-token-file",
                               callers_file(tmp_path / "agent", {"worker": "worker"}, own="agent")],
                              "local-")
    worker_side = cli_security(["worker", "--rank", "0", "--world-size", "1", "--master", "h:1",
                                "--plan", "p.json", "--local-token-file",
                                callers_file(tmp_path / "worker", {"agent": "agent"}, own="worker")],
                               "local-")
    assert agent_side.token == TOKENS["agent"] and worker_side.token == TOKENS["worker"]
    agent = Agent(AgentConfig(controller=f"127.0.0.1:{rs.free_port()}", node="node-a",
                              flush_timeout=0, local_security=agent_side))
    server, worker_address = worker_endpoint(worker_side)
    try:
        with make_channel(agent.start()) as ch:
            register = lambda md: pb_grpc.AgentServiceStub(ch).Register(  # noqa: E731
                pb.RegisterRequest(), timeout=3, metadata=md)
            # past authorization, into the servicer: an empty request is INVALID_ARGUMENT
            assert code_of(register, TOKENS["worker"])[0] == grpc.StatusCode.INVALID_ARGUMENT
            code, details = code_of(register, TOKENS["agent"])
            assert code == grpc.StatusCode.UNAUTHENTICATED, details   # not a caller of the agent
        with make_channel(worker_address) as ch:
            calls = worker_calls(ch)
            assert code_of(calls["PullCounters"], TOKENS["agent"])[0] == grpc.StatusCode.OK
            assert code_of(calls["Commit"], TOKENS["agent"])[0] == grpc.StatusCode.INVALID_ARGUMENT
            assert code_of(calls["PullCounters"], TOKENS["worker"])[0] == \
                grpc.StatusCode.UNAUTHENTICATED
        # the same worker endpoint, with a worker caller known to it: a role, not a token, refuses
        both = SecurityConfig(callers=cli_security(["worker", "--rank", "0", "--world-size", "1",
                                                    "--master", "h:1", "--plan", "p.json",
                                                    "--local-token-file", callers_file(
                                                        tmp_path, {"agent": "agent",
                                                                   "worker": "worker"})],
                                                   "local-").callers)
        server2, address2 = worker_endpoint(both)
        try:
            with make_channel(address2) as ch:
                code, details = code_of(worker_calls(ch)["PullCounters"], TOKENS["worker"])
                assert code == grpc.StatusCode.PERMISSION_DENIED
                assert "'worker-caller'" in details and f"{V1}WorkerService/PullCounters" in details
        finally:
            server2.stop(0)
    finally:
        server.stop(0)
        agent.stop(0)


def test_mtls_identity_authorises_by_certificate(tmp_path, certs):
    """Client certificate CN 'client' = a reader on the controller (aio) and the agent role on a
    worker endpoint (sync); a certificate of the same CA naming no caller is UNAUTHENTICATED; a
    token, when sent, decides the caller."""
    tls = ["--tls-cert", certs["server"], "--tls-key", certs["server_key"], "--tls-ca", certs["ca"]]
    client = SecurityConfig(tls_ca=certs["ca"], tls_cert=certs["client"], tls_key=certs["client_key"])
    other = SecurityConfig(tls_ca=certs["ca"], tls_cert=certs["server"], tls_key=certs["server_key"])
    security = cli_security(["controller", *tls, "--token-file",
                             callers_file(tmp_path, {"admin": "admin"}, {"client": "reader"})])
    with controller(tmp_path, security) as srv:
        with make_channel(f"127.0.0.1:{srv.port}", client) as ch:
            calls = controller_calls(ch)
            assert code_of(calls["ListPlacements"])[0] == grpc.StatusCode.OK
            code, details = code_of(calls["ApplyPlacement"])
            assert code == grpc.StatusCode.PERMISSION_DENIED and "'cert-client'" in details
            assert code_of(calls["ApplyPlacement"], TOKENS["admin"])[0] == grpc.StatusCode.OK
            assert code_of(calls["ListPlacements"], TOKENS["stranger"])[0] == \
                grpc.StatusCode.UNAUTHENTICATED
        with make_channel(f"127.0.0.1:{srv.port}", other) as ch:
            code, details = code_of(controller_calls(ch)["ListPlacements"])
            assert code == grpc.StatusCode.UNAUTHENTICATED and "server" in details
    (tmp_path / "w").mkdir()
    worker_side = cli_security(["worker", "--rank", "0", "--world-size", "1", "--master", "h:1",
                                "--plan", "p.json", *["--local-" + a[2:] if a.startswith("--") else a
                                                      for a in tls],
                                "--local-token-file", callers_file(tmp_path / "w", {},
                                                                   {"client": "agent"})], "local-")
    server, address = worker_endpoint(worker_side)
    try:
        with make_channel(address, client) as ch:
            assert code_of(worker_calls(ch)["PullCounters"])[0] == grpc.StatusCode.OK
        with make_channel(address, other) as ch:
            assert code_of(worker_calls(ch)["PullCounters"])[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


def test_identity_callers_need_mtls(tmp_path):
    table = cli_security(["controller", "--token-file",
                          callers_file(tmp_path, {}, {"client": "reader"})]).callers
    with pytest.raises(ValueError, match="identity"):
        make_server(SecurityConfig(callers=table))


BAD_FILES = [
    ({"callers": [{"name": "a", "token_sha256": "ab" * 32, "roles": ["root"]}]}, "callers[0].roles[0]"),
    ({"callers": [{"name": "a", "token_sha256": "xyz", "roles": ["agent"]}]}, "callers[0].token_sha256"),
    ({"callers": [{"name": "a", "roles": ["agent"]}]}, "callers[0]"),
    ({"callers": [{"token_sha256": "ab" * 32, "roles": ["agent"]}]}, "callers[0].name"),
    ({"callers": [{"name": "a", "token_sha256": "ab" * 32, "roles": []}]}, "callers[0].roles"),
    ({"callers": [{"name": "a", "token_sha256": "ab" * 32, "roles": ["agent"], "role": "x"}]},
     "callers[0].role"),
    ({"callers": [{"name": "a", "token_sha256": "ab" * 32, "token_file": "t", "roles": ["agent"]}]},
     "callers[0]"),
    ({"callers": [{"name": "a", "token_file": "missing.token", "roles": ["agent"]}]},
     "callers[0].token_file"),
    ({"callers": [{"name": "a", "token_sha256": "ab" * 32, "roles": ["agent"]},
                  {"name": "b", "token_sha256": "AB" * 32, "roles": ["reader"]}]}, "callers[1]"),
    ({"callers": [{"name": "a", "identity": "x", "roles": ["agent"]},
                  {"name": "a", "identity": "y", "roles": ["reader"]}]}, "callers[1]"),
    ({"callers": []}, "callers"),
    ({"caller": []}, "caller"),
    ("just a sentence\nover two lines", "(document)"),
    ({"callers": [{"name": "a", "identity": "x", "roles": ["agent"]}], "own_token_file": "nope"},
     "own_token_file"),
]


@pytest.mark.parametrize("doc,field", BAD_FILES, ids=[f for _, f in BAD_FILES])
def test_bad_callers_file_names_the_field(tmp_path, doc, field):
    path = tmp_path / "callers.yaml"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(CallersFileError) as exc:
        read_token_file(str(path))
    assert exc.value.field == field, exc.value
    assert str(exc.value).startswith(f"{path}: {field}: ")


def test_controller_cli_refuses_a_bad_callers_file_naming_the_field(tmp_path, capsys):
    path = tmp_path / "callers.yaml"
    path.write_text("callers:\n  - name: ops\n    token_sha256: '" + "0a" * 32 + "'\n    roles: [admn]\n")
    assert main(["controller", "--listen", "127.0.0.1:0", "--db", f"sqlite:///{tmp_path / 'c.db'}",
                 "--token-file", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "callers[0].roles[0]" in err[0] and "'admn'" in err[0]


def test_single_token_files_unchanged(tmp_path):
    """A one-line token file stays one token (full access, also what the process sends), whatever
    punctuation it holds; a multi-line file that is not a mapping is refused."""
    for token in ("tok-123", "p@ss:w0rd", "a: b: c"):
        (tmp_path / "t").write_text(token + "\n")
        assert read_token_file(str(tmp_path / "t")).token == token
        assert read_token_file(str(tmp_path / "t")).callers is None
    (tmp_path / "t").write_text("one\ntwo\n")
    with pytest.raises(CallersFileError, match="one token on one line"):
        read_token_file(str(tmp_path / "t"))


def test_role_tables():
    """Reader only reads (Get/List/Watch); admin has every method; the component roles hold
    exactly what the components call."""
    assert all(m.rsplit("/", 1)[1].startswith(("Get", "List", "Watch")) for m in ROLE_METHODS["reader"])
    assert f"{V1}PlanService/ApplyPlacement" not in ROLE_METHODS["reader"]
    assert all(ROLE_METHODS[r] <= ROLE_METHODS["admin"] for r in ROLE_METHODS)
    assert ROLE_METHODS["worker"] == {f"{V1}PlanService/GetPlan", f"{V1}AgentService/Register",
                                      f"{V1}AgentService/ReportEngineLoad"}
    assert f"{V1}LoadService/ReportLoad" in ROLE_METHODS["agent"]
    # the agent reads only the plan in force (for an engine's plan file), never changes plans
    assert {m for m in ROLE_METHODS["agent"] if "PlanService/" in m or "PlanningService/" in m} == {
        f"{V1}PlanService/GetPlan"}
