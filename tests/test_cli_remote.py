"""``expertplane get|describe|apply|delete|rebalance|watch`` against a real controller on loopback
(gRPC, SQLite store, simulated agents on RolloutService.Connect playing the workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from expertplane.benchmarks.simagent import SimulatedAgent, load_report
from expertplane.cli.main import main
from expertplane.controller.config import ControllerConfig
from expertplane.controller.server import ControllerServer
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.security import SecurityConfig

pytestmark = pytest.mark.timeout(300)

SMALL = """
name: small
model: {num_layers: 2, num_experts: 8, num_groups: 2, expert_bytes: 1073741824}
topology: {num_nodes: 2, gpus_per_node: 2}
num_replicas: 12
policy: {mode: manual, threshold: 0.01}
"""
RESOURCE = """
apiVersion: expertplane.io/v1alpha1
kind: ExpertPlacement
metadata: {name: cr}
spec:
  model: {layers: 2, experts: 8, groups: 2}
  topology: {nodes: 1, gpusPerNode: 4}
  redundantExperts: 4
  rebalancePolicy: {mode: Manual}
---
apiVersion: expertplane.io/v1alpha1
kind: PipelinePlan
metadata: {name: not-a-placement}
spec: {}
"""
TOKEN = "s3cret-token"


@pytest.fixture
def controller(tmp_path):
    """A controller requiring a bearer token, its address and the token file."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    server = ControllerServer(ControllerConfig(
        listen="127.0.0.1:0", db_url=f"sqlite:///{tmp_path / 'c.db'}", tick_seconds=0.02,
        policy_interval_seconds=3600, security=SecurityConfig(token=TOKEN)))
    port = server.start()
    yield server, f"127.0.0.1:{port}", str(token_file)
    server.stop(0.5)


def run(capsys, address, token_file, *argv) -> tuple[int, str, str]:
    code = main(["--log-level", "WARNING", *argv, "--controller", address,
                 "--token-file", token_file, "--timeout", "300"])   # a cold planner compiles
    out, err = capsys.readouterr()
    return code, out, err


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.strip().splitlines()]


def _report_skewed_load(channel, plan_version: int) -> None:
    """Every rank reports a load where rank 0's slots are hot (accepted by the controller)."""
    load = pb_grpc.LoadServiceStub(channel)
    counts = [np.array([[900, 50, 50], [800, 60, 40]]), np.full((2, 3), 30),
              np.full((2, 3), 20), np.full((2, 3), 10)]
    reports = [load_report(f"n{r // 2}", r, "small", plan_version, 1, counts[r]) for r in range(4)]
    acks = list(load.ReportLoad(iter(reports), timeout=10,
                                metadata=(("authorization", f"Bearer {TOKEN}"),)))
    assert [a.status for a in acks] == [1, 1, 1, 1], acks


def test_apply_get_describe_rebalance_watch_delete(controller, tmp_path, capsys):
    server, address, token = controller
    folder = tmp_path / "placements"
    folder.mkdir()
    (folder / "small.yaml").write_text(SMALL)
    (folder / "cr.yaml").write_text(RESOURCE)

    code, out, err = run(capsys, address, token, "apply", "-f", str(folder))
    assert code == 0, err
    assert "placement/cr created (plan version 1 in force)" in out
    assert "placement/small created (plan version 1 in force)" in out
    assert "kind 'PipelinePlan' is not a placement, skipped" in err
    code, out, _ = run(capsys, address, token, "apply", "-f", str(folder / "small.yaml"))
    assert code == 0 and "placement/small configured" in out

    code, out, _ = run(capsys, address, token, "get", "placements")
    header, *rows = _rows(out)
    assert header[:5] == ["NAME", "VERSION", "ALGORITHM", "GPUS", "SLOTS"]
    assert [r[:6] for r in rows] == [["cr", "1", "deepseek", "1x4", "12", "manual"],
                                     ["small", "1", "deepseek", "2x2", "12", "manual"]]

    channel = make_channel(address, SecurityConfig(token=TOKEN))
    agents = [SimulatedAgent(channel, f"n{i}", "small", (2 * i, 2 * i + 1), plan_version=1,
                             metadata=(("authorization", f"Bearer {TOKEN}"),)).start()
              for i in range(2)]
    try:
        deadline = time.monotonic() + 30
        while len(server.controller.rollouts.workers("small")) < 4:
            assert time.monotonic() < deadline, "agents never connected"
            time.sleep(0.05)
        _report_skewed_load(channel, 1)

        code, out, _ = run(capsys, address, token, "get", "load", "small")
        assert code == 0 and "4 reports" in out
        [header, *rows, summary] = out.strip().splitlines()[1:]
        assert header.split()[:2] == ["LAYER", "TOKENS"] and len(rows) == 2
        assert summary.startswith("GPU balance: mean ")

        code, out, err = run(capsys, address, token, "rebalance", "small", "--dry-run")
        assert code == 0, err
        assert "placement small:" in out and "balance now" in out and "GiB" in out

        # the watch runs as its own process (its own stdout: capsys is one per test) from
        # version 1 on, so it prints v1 and then v2 whenever it subscribes
        watcher = subprocess.Popen(
            [sys.executable, "-m", "expertplane.cli.main", "--log-level", "WARNING", "watch",
             "plans", "small", "--count", "2", "-o", "json", "--after-version", "0",
             "--controller", address, "--token-file", token, "--timeout", "300"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        code, out, _ = run(capsys, address, token, "rebalance", "small", "--force")
        assert code == 0 and "new plan           version 2" in out
        out, err = watcher.communicate(timeout=120)
        assert watcher.returncode == 0, err
        assert [json.loads(line)["version"] for line in out.splitlines()] == ["1", "2"]

        code, out, _ = run(capsys, address, token, "get", "plans", "small")
        header, *rows = _rows(out)
        assert [r[0] for r in rows] == ["1", "2"] and rows[1][2] == "manual"

        deadline = time.monotonic() + 30
        while True:
            code, out, _ = run(capsys, address, token, "get", "rollouts", "small", "-o", "yaml")
            [rollout] = yaml.safe_load(out) or [{"state": "none"}]
            if rollout["state"] == "committed":
                break
            assert time.monotonic() < deadline, rollout
            time.sleep(0.1)
        assert rollout["to_version"] == "2"

        code, out, _ = run(capsys, address, token, "describe", "placement", "small")
        assert code == 0
        assert "Plan:        version 2 in force (manual" in out
        assert "mode manual" in out and "committed" in out
        assert "1.0 GiB per expert" in out
        code, out, _ = run(capsys, address, token, "describe", "placement", "small", "-o", "json")
        doc = json.loads(out)
        assert doc["plan_in_force"]["version"] == "2" and doc["rollouts"][0]["state"] == "committed"
    finally:
        for a in agents:
            a.stop()
        channel.close()

    code, out, _ = run(capsys, address, token, "delete", "placement", "cr")
    assert code == 0 and out.strip() == "placement/cr deleted"
    code, _, err = run(capsys, address, token, "delete", "placement", "cr")
    assert code == 2 and "placement 'cr' not found" in err
    code, out, _ = run(capsys, address, token, "delete", "placement", "cr", "--ignore-not-found")
    assert code == 0


@pytest.mark.parametrize("argv, message", [
    (["get", "plans", "nope"], "ListPlans: NOT_FOUND: placement: unknown placement 'nope'"),
    (["get", "load"], "NAME: 'get load' needs a placement name"),
    (["describe", "placement", "nope"], "placement 'nope' not found on"),
    (["rebalance", "nope"], "placement 'nope' not found on"),
    (["watch", "plans", "nope"], "placement 'nope' not found on"),
])
def test_errors_are_one_line(controller, capsys, argv, message):
    _, address, token = controller
    code, out, err = run(capsys, address, token, *argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_apply_refuses_bad_and_empty_input(controller, tmp_path, capsys):
    _, address, token = controller
    bad = tmp_path / "bad.yaml"
    bad.write_text(RESOURCE.replace("layers: 2", "layers: 0"))
    code, _, err = run(capsys, address, token, "apply", "-f", str(bad))
    assert code == 2 and f"{bad}#0 spec.model.layers: 0 is less than the minimum of 1" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, address, token, "apply", "-f", str(empty))
    assert code == 2 and "no placement found" in err


def test_process_reads_controller_and_token_from_env(controller, tmp_path):
    """The installed entry point, with the address and token from the environment only; a
    wrong token is one UNAUTHENTICATED line."""
    _, address, _ = controller
    env = dict(os.environ, EXPERTPLANE_CONTROLLER=address, EXPERTPLANE_TOKEN=TOKEN)
    cmd = [sys.executable, "-m", "expertplane.cli.main", "--log-level", "WARNING"]
    ok = subprocess.run([*cmd, "get", "placements", "-o", "json"], env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout) == [], ok.stderr
    env["EXPERTPLANE_TOKEN"] = "wrong"
    bad = subprocess.run([*cmd, "get", "placements"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "ListPlacements: UNAUTHENTICATED" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
