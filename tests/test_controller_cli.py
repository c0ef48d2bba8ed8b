"""``expertplane controller`` as a process: YAML placements, metrics, graceful SIGTERM, errors."""

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel

pytestmark = pytest.mark.timeout(180)

PLACEMENT = """
name: demo
model: {num_layers: 2, num_experts: 8, num_groups: 2}
topology: {num_nodes: 1, gpus_per_node: 4}
num_replicas: 12
policy: {mode: manual}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "expertplane.cli.main", "--log-level", "WARNING",
                             "controller", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_serves_yaml_placements_and_metrics_then_stops_on_sigterm(tmp_path):
    (tmp_path / "pl").mkdir()
    (tmp_path / "pl" / "demo.yaml").write_text(PLACEMENT)
    port, mport = free_port(), free_port()
    proc = cli("--listen", f"127.0.0.1:{port}", "--db", f"sqlite:///{tmp_path / 'c.db'}",
               "--placements", str(tmp_path / "pl"), "--metrics", f"127.0.0.1:{mport}",
               cwd=tmp_path)
    try:
        channel = make_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=120)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "controller never became healthy"
            time.sleep(0.2)
        plans = pb_grpc.PlanServiceStub(channel)
        [st] = plans.ListPlacements(pb.ListPlacementsRequest(), timeout=10).placements
        assert st.spec.name == "demo" and st.plan_version == 1
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        assert 'expertplane_controller_plan_version{kind="in_force",placement="demo"} 1.0' in metrics
        assert "expertplane_controller_store_seconds_bucket" in metrics
        channel.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"serving on port {port}" in out
        assert "alembic" not in err          # no INFO lines of the schema migration
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_bad_placement_file_is_one_readable_line(tmp_path):
    (tmp_path / "bad.yaml").write_text(PLACEMENT.replace("num_replicas: 12", "num_replicas: 10"))
    proc = cli("--listen", "127.0.0.1:0", "--db", f"sqlite:///{tmp_path / 'c.db'}",
               "--placements", str(tmp_path), cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("expertplane controller: error: ")
    assert "bad.yaml#0 num_replicas: must be a multiple of the GPU count (4), got 10" in err
