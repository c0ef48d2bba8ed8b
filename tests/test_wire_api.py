"""The wire API's clean-ups, over a real controller on loopback: one request field name for a
placement, distinct balance names with stable field numbers, the Bearer scheme in any case, the
latest stored version in ListPlacements, LoadReport header and GPU statistics validated and
exposed (GetLoad, metrics), and the protobuf floor matching the generated code."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
import tomllib
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from expertplane.benchmarks.simagent import load_report
from expertplane.controller.config import ControllerConfig
from expertplane.controller.server import ControllerServer
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.security import SecurityConfig
from expertplane.rpc.tensors import double_tensor

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parent.parent
TOKEN = "wire-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def placement() -> pb.Placement:
    return pb.Placement(name="m", model=pb.ModelSpec(num_layers=2, num_experts=8, num_groups=2),
                        topology=pb.Topology(num_nodes=2, gpus_per_node=2),
                        num_replicas=16,
                        policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.MANUAL))


@pytest.fixture
def stubs(tmp_path):
    metrics_port = free_port()
    server = ControllerServer(ControllerConfig(
        listen="127.0.0.1:0", db_url=f"sqlite:///{tmp_path / 'c.db'}", tick_seconds=0.02,
        policy_interval_seconds=3600, security=SecurityConfig(token=TOKEN),
        metrics=f"127.0.0.1:{metrics_port}"))
    port = server.start()
    server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    channel = make_channel(f"127.0.0.1:{port}")
    yield (pb_grpc.PlanServiceStub(channel), pb_grpc.PlanningServiceStub(channel),
           pb_grpc.LoadServiceStub(channel), server.metrics_url)
    channel.close()
    server.stop(0.5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _code(call, request, metadata=AUTH):
    with pytest.raises(grpc.RpcError) as exc:
        call(request, timeout=30, metadata=metadata)
    return exc.value.code(), exc.value.details()


def test_renamed_fields_keep_their_numbers():
    fields = {(m, f): pb.DESCRIPTOR.message_types_by_name[m].fields_by_name[f].number
              for m, f in [("DeletePlacementRequest", "placement"),
                           ("PlanSummary", "previous_plan_balance"),
                           ("PlacementState", "observed_balance"),
                           ("RebalanceDecision", "in_force_balance_mean"),
                           ("PlacementState", "latest_version")]}
    assert fields == {("DeletePlacementRequest", "placement"): 1,
                      ("PlanSummary", "previous_plan_balance"): 10,
                      ("PlacementState", "observed_balance"): 3,
                      ("RebalanceDecision", "in_force_balance_mean"): 4,
                      ("PlacementState", "latest_version"): 7}
    method = pb.DESCRIPTOR.services_by_name["PlanService"].methods_by_name["GetBiasHistory"]
    assert method.input_type.name == "GetBiasHistoryRequest"
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        assert "current_balance" not in message.fields_by_name, message.name


def test_protobuf_floor_matches_the_generated_code():
    header = (REPO / "proto" / "expertplane_pb2.py").read_text()
    generated = tuple(map(int, re.search(r"Protobuf Python Version: (\d+)\.(\d+)", header).groups()))
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [floor] = [re.fullmatch(r"protobuf>=(\d+)\.(\d+)", d.split("#")[0].strip()).groups()
               for d in deps if d.startswith("protobuf")]
    assert tuple(map(int, floor)) == generated


def test_bearer_scheme_in_any_case(stubs):
    plans, _, _, _ = stubs
    for value in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN}"):
        plans.ListPlacements(pb.ListPlacementsRequest(), timeout=30,
                             metadata=(("authorization", value),))
    for value in (f"Basic {TOKEN}", "Bearer", f"Bearer{TOKEN}"):
        code, _ = _code(plans.ListPlacements, pb.ListPlacementsRequest(),
                        (("authorization", value),))
        assert code == grpc.StatusCode.UNAUTHENTICATED, value


def test_delete_and_latest_version(stubs):
    plans, planning, _, _ = stubs
    plans.ApplyPlacement(placement(), timeout=120, metadata=AUTH)
    load = double_tensor(np.arange(16.0).reshape(2, 8))
    planning.ComputePlan(pb.ComputePlanRequest(placement="m", load=load, store=True), timeout=300,
                         metadata=AUTH)
    [state] = plans.ListPlacements(pb.ListPlacementsRequest(), timeout=30,
                                   metadata=AUTH).placements
    assert (state.plan_version, state.latest_version) == (1, 2)
    summary = plans.GetPlan(pb.GetPlanRequest(placement="m", version=2), timeout=30,
                            metadata=AUTH).summary
    assert len(summary.previous_plan_balance) == 2
    code, details = _code(plans.DeletePlacement, pb.DeletePlacementRequest())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == "placement: is required"
    assert plans.DeletePlacement(pb.DeletePlacementRequest(placement="m"), timeout=30,
                                 metadata=AUTH).deleted


def _future(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() + seconds) * 1e9))
    return ts


@pytest.mark.parametrize("change, field", [
    (dict(node=""), "node: is required"),
    (dict(window_end=_future(3600)), "window_end: "),
    (dict(steps=3, failed_steps=4), "failed_steps: 4 is more than steps (3)"),
    (dict(gpu=pb.GpuStats(utilization=float("nan"))), "gpu.utilization: must be finite"),
    (dict(gpu=pb.GpuStats(utilization=1.5)), "gpu.utilization: must lie in [0, 1]"),
    (dict(gpu=pb.GpuStats(power_watts=-1.0)), "gpu.power_watts: must be >= 0"),
    (dict(gpu=pb.GpuStats(memory_used_bytes=2, memory_total_bytes=1)),
     "gpu.memory_used_bytes: 2 is more than memory_total_bytes (1)"),
])
def test_bad_report_fields_are_rejected(stubs, change, field):
    plans, _, load, _ = stubs
    plans.ApplyPlacement(placement(), timeout=120, metadata=AUTH)
    good = load_report("n0", 0, "m", 1, 1, np.ones((2, 4), dtype=np.int64))
    good.gpu.CopyFrom(pb.GpuStats(utilization=0.5, memory_used_bytes=1, memory_total_bytes=2,
                                  power_watts=300, temperature_c=60))
    bad = pb.LoadReport()
    bad.CopyFrom(good)
    bad.sequence = 2
    for key, value in change.items():
        if isinstance(value, (Timestamp, pb.GpuStats)):
            getattr(bad, key).CopyFrom(value)
        else:
            setattr(bad, key, value)
    acks = list(load.ReportLoad(iter([good, bad]), timeout=30, metadata=AUTH))
    assert acks[0].status == pb.LoadAck.ACCEPTED, acks[0].message
    assert acks[1].status == pb.LoadAck.REJECTED and acks[1].message.startswith(field), acks[1]


def test_gpu_statistics_in_get_load_and_metrics(stubs):
    plans, _, load, metrics_url = stubs
    plans.ApplyPlacement(placement(), timeout=120, metadata=AUTH)
    reports = []
    for rank, util in ((2, 0.75), (0, 0.5)):
        r = load_report(f"n{rank // 2}", rank, "m", 1, 1, np.ones((2, 4), dtype=np.int64))
        r.gpu.CopyFrom(pb.GpuStats(utilization=util, memory_used_bytes=rank + 1,
                                   memory_total_bytes=80 << 30, power_watts=300 + rank,
                                   temperature_c=60))
        reports.append(r)
    acks = list(load.ReportLoad(iter(reports), timeout=30, metadata=AUTH))
    assert [a.status for a in acks] == [pb.LoadAck.ACCEPTED] * 2
    window = plans.GetLoad(pb.GetLoadRequest(placement="m"), timeout=30, metadata=AUTH)
    assert [(g.worker_rank, g.node, g.stats.utilization) for g in window.gpus] == \
        [(0, "n0", 0.5), (2, "n1", 0.75)]
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    assert 'expertplane_controller_gpu_utilization{placement="m",rank="2"} 0.75' in text
    assert 'expertplane_controller_gpu_power_watts{placement="m",rank="0"} 300.0' in text
