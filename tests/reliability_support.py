"""Helpers shared by the reliability, security and fuzz tests: a controller in a subprocess that
can be killed with SIGKILL, child processes in their own process group (agents, workers), test
certificates made with the ``openssl`` CLI, polling, and the "error names a field" check."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc

EXPERTPLANE = str(Path(sys.executable).with_name("expertplane"))

# answers a malformed request may legitimately get
REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                      grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                      grpc.StatusCode.RESOURCE_EXHAUSTED})
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:[.\[][^:]*)?: \S")


def names_a_field(message: str, descriptor) -> bool:
    """True when ``message`` starts with ``"<field>[.sub|[i]]...: "`` and <field> is a field of
    the protobuf message ``descriptor`` (e.g. ``"spec.model.num_layers: must be >= 1"``)."""
    m = _FIELD.match(message or "")
    return bool(m) and m.group(1) in descriptor.fields_by_name


def wait_until(predicate, timeout: float = 10.0, what: str = "condition", step: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value (returned) or fail after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(channel: grpc.Channel, service: str = "", timeout: float = 3.0) -> bool:
    """True when the gRPC health service on ``channel`` answers SERVING for ``service``."""
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
    except grpc.RpcError:
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    """Start ``argv`` in a new session (its own process group, so :func:`signal_group` reaches
    every process it starts), stdout+stderr appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_loop(workers: list[subprocess.Popen], agent, controller) -> None:
    """Tear down a controller + agent + real worker processes test: kill and reap the workers,
    stop the agent at once and the controller with a short grace."""
    for p in workers:
        p.kill()
        p.wait(10)
    agent.stop(0)
    controller.stop(0.2)


def signal_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``proc``'s whole process group (nothing if it is gone); after SIGKILL,
    reap it (waits at most 10 s)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    if sig == signal.SIGKILL:
        proc.wait(10)


@dataclass
class ControllerProcess:
    """``expertplane controller`` as a child process on ``port`` with store ``db_url``.

    ``extra`` are more CLI options; stdout+stderr go to ``log``. ``kill()`` sends SIGKILL (no
    graceful shutdown), ``restart()`` starts a new process on the same port and store.
    """

    db_url: str
    log: Path
    port: int = 0
    extra: tuple[str, ...] = ()
    env: dict | None = None
    log_level: str = "INFO"
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "ControllerProcess":
        self.port = self.port or free_port()
        argv = [EXPERTPLANE, "--log-level", self.log_level, "controller", "--listen", f"127.0.0.1:{self.port}", "--db", self.db_url,
                "--policy-interval", "3600", "--snapshot-interval", "3600", *self.extra]
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})})
        out.close()
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            wait_until(lambda: serving(ch) or self.proc.poll() is not None, timeout,
                       "controller SERVING")
        if self.proc.poll() is not None:
            raise AssertionError(f"controller exited {self.proc.returncode}: {self.log.read_text()}")
        return self

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> "ControllerProcess":
        return self.start()


def make_certs(directory: Path) -> dict[str, Path]:
    """A CA, a server cert for localhost/127.0.0.1 and a client cert signed by it, plus a second,
    unrelated CA with its own client cert ("rogue"). Returns paths by name."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*argv):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=d)

    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("rogue", "rogue-ca")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
            f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.pem")
    return {p.stem + ("_key" if p.suffix == ".key" else ""): p for p in d.iterdir()
            if p.suffix in (".pem", ".key")}


def small_placement(name: str = "m", **policy) -> pb.Placement:
    """2 layers x 8 experts on 2 nodes x 2 GPUs, 12 slots (3 per GPU)."""
    return pb.Placement(name=name, model=pb.ModelSpec(num_layers=2, num_experts=8, num_groups=2,
                                                      expert_bytes=1 << 20),
                        topology=pb.Topology(num_nodes=2, gpus_per_node=2), num_replicas=12,
                        policy=pb.RebalancePolicy(**policy))


def stored_plans(channel: grpc.Channel, placement: str) -> list[bytes]:
    """Every stored plan of ``placement``, serialized, in version order."""
    stub = pb_grpc.PlanServiceStub(channel)
    versions = [p.version for p in stub.ListPlans(pb.ListPlansRequest(placement=placement,
                                                                      page_size=1000),
                                                  timeout=10).plans]
    return [stub.GetPlan(pb.GetPlanRequest(placement=placement, version=v),
                         timeout=10).SerializeToString(deterministic=True) for v in versions]
