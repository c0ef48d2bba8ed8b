"""Fixtures for the operator tests against a real kube-apiserver (``../shared/k8s/test-apiserver``).

``apiserver``: etcd + kube-apiserver v1.20 on loopback for the test module, with ``manifests/``
applied server-side. ``operator_kubeconfig``: a kubeconfig holding a TokenRequest token of the
``expertplane-operator`` ServiceAccount, so the operator runs with exactly the RBAC the manifests
grant. ``controller``: a real ``ControllerServer`` on loopback (SQLite in tmp). ``OperatorProcess``:
``expertplane operator`` as a child process. ``restartable_controller``: a controller the tests
stop and start again (same store or an empty one).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from shared_data import K8S_APISERVER as SCRIPT  # noqa: E402

CACHE = pathlib.Path(os.environ.get("EXPERTPLANE_K8S_CACHE", pathlib.Path.home() / ".cache/expertplane-k8s"))
NAMESPACE = "expertplane-system"
OPERATOR_SA = "expertplane-operator"


@dataclass
class Cluster:
    """A running API server: ``kubeconfig`` (admin), ``dir`` (its state and logs)."""

    kubeconfig: str
    dir: pathlib.Path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run kubectl as the admin; ``check`` raises with stderr on failure."""
        proc = subprocess.run(["kubectl", "--kubeconfig", self.kubeconfig, *args], input=input,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def apply(self, doc: dict | str, check: bool = True) -> subprocess.CompletedProcess:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        return self.kubectl("apply", "--server-side", "-f", "-", input=text, check=check)

    def get(self, kind: str, name: str, namespace: str = "default") -> dict | None:
        proc = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if proc.returncode:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        return json.loads(proc.stdout)


def _skip_reason() -> str | None:
    if not SCRIPT.is_file():
        return f"{SCRIPT} is absent: no real kube-apiserver to test against"
    if not (CACHE / "bin" / "kube-apiserver").is_file():
        return (f"kube-apiserver is not built ({CACHE}/bin/kube-apiserver missing); "
                f"run `make k8s-apiserver` (or {SCRIPT} build)")
    for tool in ("kubectl", "etcd"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            return f"{tool} is not installed"
    return None


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory):
    """A fresh API server with manifests/ applied (server-side, as `kubectl apply -k`)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("apiserver")
    proc = subprocess.run([str(SCRIPT), "start", str(state)], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode:
        subprocess.run([str(SCRIPT), "stop", str(state)], capture_output=True, timeout=60)
        raise AssertionError(f"test-apiserver start failed: {proc.stderr[-2000:]}")
    cluster = Cluster(kubeconfig=str(state / "kubeconfig"), dir=state)
    try:
        cluster.kubectl("apply", "--server-side", "-k", str(REPO / "manifests"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        "crd/expertplacements.expertplane.io", "crd/pipelineplans.expertplane.io")
        yield cluster
    finally:
        subprocess.run([str(SCRIPT), "stop", str(state)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def operator_kubeconfig(apiserver) -> str:
    """A kubeconfig authenticating as the operator's ServiceAccount (TokenRequest API)."""
    token = apiserver.kubectl("create", "token", OPERATOR_SA, "-n", NAMESPACE,
                              "--duration=2h").stdout.strip()
    server = apiserver.kubectl("config", "view", "--minify", "-o",
                               "jsonpath={.clusters[0].cluster.server}").stdout
    path = apiserver.dir / "operator.kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "operator",
        "clusters": [{"name": "test", "cluster": {
            "server": server, "certificate-authority": str(apiserver.dir / "tls.crt")}}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": "operator"}}],
    }))
    return str(path)


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    """A real controller on loopback; yields the ``ControllerServer`` (``.port``)."""
    from expertplane.controller.config import ControllerConfig
    from expertplane.controller.server import ControllerServer

    db = tmp_path_factory.mktemp("controller") / "plans.db"
    server = ControllerServer(ControllerConfig(listen="127.0.0.1:0", db_url=f"sqlite:///{db}",
                                               policy_interval_seconds=1.0))
    server.start()
    try:
        yield server
    finally:
        server.stop(0.5)


class RestartableController:
    """A real controller on a fixed loopback port that can be stopped and started again, on the
    same store or an empty one."""

    def __init__(self, tmp):
        self.tmp = tmp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.stores = 0
        self.server = None
        self.start(empty=True)

    def start(self, empty: bool = False) -> None:
        from expertplane.controller.config import ControllerConfig
        from expertplane.controller.server import ControllerServer

        self.stores += int(empty)
        db = self.tmp / f"plans-{self.stores}.db"
        self.load_dir = self.tmp / "loads"
        self.load_dir.mkdir(exist_ok=True)
        self.server = ControllerServer(ControllerConfig(
            listen=f"127.0.0.1:{self.port}", db_url=f"sqlite:///{db}", policy_interval_seconds=1.0,
            load_dir=str(self.load_dir)))
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0.5)
        self.server = None


@pytest.fixture(scope="module")
def restartable_controller(tmp_path_factory):
    """A ``RestartableController`` for the test module, stopped at its end."""
    c = RestartableController(tmp_path_factory.mktemp("controller"))
    yield c
    if c.server is not None:
        c.stop()


class OperatorProcess:
    """``expertplane operator`` in a child process, logging to a file."""

    def __init__(self, log_path: pathlib.Path, *args: str):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expertplane.cli.main", "operator", *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(log_path.parent))

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def start_operator(tmp: pathlib.Path, controller_port: int, kubeconfig: str, identity: str,
                   *extra: str) -> OperatorProcess:
    """``expertplane operator`` (log in ``tmp``) for the controller on ``controller_port``, with
    ``kubeconfig``, watching namespace default (and what ``extra`` adds), refreshing every second;
    returns once it leads."""
    op = OperatorProcess(tmp / "operator.log", "--controller", f"127.0.0.1:{controller_port}",
                         "--kubeconfig", kubeconfig, "--namespace", "default",
                         "--refresh-seconds", "1", "--lease-namespace", NAMESPACE,
                         "--identity", identity, *extra)
    wait_for(lambda: f"{identity} leads" in op.log(), timeout=60, what="operator start")
    return op


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.25, what: str = "condition"):
    """Poll ``predicate()`` until it returns a truthy value (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def condition(obj: dict | None, type_: str) -> dict | None:
    """Condition ``type_`` of ``obj``'s status, or None."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None
