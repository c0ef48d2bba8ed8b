"""Load reports per logical expert (``LoadReport.expert_load``) against a real controller over
gRPC on loopback: accepted without a plan version, added to the window as is, mixed with slot
reports, spread over the replicas of the plan in force for the per-GPU load, and refused with the
field named when malformed."""

import math

import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from expertplane.benchmarks.simagent import load_report
from expertplane.controller.config import ControllerConfig
from expertplane.controller.server import ControllerServer
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.tensors import double_tensor, to_numpy

pytestmark = pytest.mark.timeout(300)
Ack = pb.LoadAck
L, E, GPUS, R = 2, 8, 4, 12


@pytest.fixture
def controller(sqlite_url):
    """A controller on loopback with placement "m" (manual policy; 2 layers, 8 experts, 4 GPUs,
    12 slots), and its stubs."""
    cfg = ControllerConfig(listen="127.0.0.1:0", db_url=sqlite_url, tick_seconds=0.02,
                           policy_interval_seconds=3600)
    server = ControllerServer(cfg)
    port = server.start()
    channel = make_channel(f"127.0.0.1:{port}")
    plans = pb_grpc.PlanServiceStub(channel)
    plans.ApplyPlacement(pb.Placement(
        name="m", model=pb.ModelSpec(num_layers=L, num_experts=E, num_groups=2, expert_bytes=1 << 20),
        topology=pb.Topology(num_nodes=2, gpus_per_node=2), num_replicas=R,
        policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.MANUAL)), timeout=120)
    try:
        yield plans, pb_grpc.LoadServiceStub(channel)
    finally:
        channel.close()
        server.stop(0.5)


def logical(load, *, sequence, rank=0, values=None, shape=None) -> pb.LoadReport:
    """A LoadReport carrying ``load`` [L, E] per logical expert (``values``/``shape`` override the
    tensor as sent, to send malformed ones)."""
    end = Timestamp()
    end.GetCurrentTime()
    tensor = double_tensor(load)
    if values is not None:
        del tensor.values[:]
        tensor.values.extend(values)
    if shape is not None:
        del tensor.shape[:]
        tensor.shape.extend(shape)
    return pb.LoadReport(node="n0", worker_rank=rank, placement="m", sequence=sequence,
                         window_end=end, expert_load=tensor)


def test_logical_report_is_added_as_is_and_spread_over_replicas(controller):
    plans, loads = controller
    load = np.arange(L * E, dtype=float).reshape(L, E) + 1.0
    load[:, 0] += 100.0                                             # a hot expert 0
    acks = list(loads.ReportLoad(iter([logical(load, sequence=1)]), timeout=10))
    assert [(a.status, a.message) for a in acks] == [(Ack.ACCEPTED, "")]
    assert logical(load, sequence=1).WhichOneof("counts") == "expert_load"

    window = plans.GetLoad(pb.GetLoadRequest(placement="m"), timeout=10)
    np.testing.assert_allclose(to_numpy(window.load, "load"), load)
    assert window.reports == 1
    # per-GPU load: each expert's load split evenly over its replicas in the plan in force
    phy2log = to_numpy(plans.GetPlan(pb.GetPlanRequest(placement="m", in_force=True),
                                     timeout=10).phy2log, "phy2log")
    expected = np.zeros((L, GPUS))
    for layer in range(L):
        replicas = np.bincount(phy2log[layer], minlength=E)
        for slot, expert in enumerate(phy2log[layer]):
            expected[layer, slot // (R // GPUS)] += load[layer, expert] / replicas[expert]
    gpu = to_numpy(window.gpu_load, "gpu_load")
    np.testing.assert_allclose(gpu, expected)
    np.testing.assert_allclose(gpu.sum(axis=1), load.sum(axis=1))


def test_logical_and_slot_reports_add_up(controller):
    plans, loads = controller
    phy2log = to_numpy(plans.GetPlan(pb.GetPlanRequest(placement="m"), timeout=10).phy2log, "p")
    counts = np.full((L, R // GPUS), 10)
    load = np.ones((L, E))
    acks = list(loads.ReportLoad(iter([load_report("n1", 2, "m", 1, 1, counts),
                                       logical(load, sequence=1)]), timeout=10))
    assert [a.status for a in acks] == [Ack.ACCEPTED, Ack.ACCEPTED]
    expected = load.copy()
    for layer in range(L):
        for j, slot in enumerate(range(6, 9)):                     # rank 2 holds slots 6..8
            expected[layer, phy2log[layer, slot]] += counts[layer, j]
    window = plans.GetLoad(pb.GetLoadRequest(placement="m"), timeout=10)
    np.testing.assert_allclose(to_numpy(window.load, "load"), expected)
    assert window.reports == 2


def test_malformed_logical_reports_are_rejected_naming_the_field(controller):
    plans, loads = controller
    good = np.ones((L, E))
    negative = good.copy()
    negative[1, 3] = -1.0
    reports = [
        logical(good.T, sequence=1),                                   # [E, L]: another shape
        logical(np.ones((L, E + 1)), sequence=2),                      # one expert too many
        logical(good, sequence=3, values=[1.0] * (L * E - 1)),         # values short of the shape
        logical(negative, sequence=4),
        logical(good, sequence=5, values=[math.nan] + [1.0] * (L * E - 1)),
        logical(good, sequence=6, values=[math.inf] + [1.0] * (L * E - 1)),
        logical(good, sequence=7, rank=GPUS),                          # no such rank
        logical(good, sequence=8),                                     # accepted
        logical(good, sequence=8),                                     # counted already
    ]
    acks = list(loads.ReportLoad(iter(reports), timeout=10))
    assert [a.status for a in acks] == [Ack.REJECTED] * 7 + [Ack.ACCEPTED, Ack.DUPLICATE]
    fields = [a.message.split(":")[0] for a in acks[:7]]
    assert fields == ["expert_load"] * 6 + ["worker_rank"]
    assert "shape [2, 8]" in acks[0].message and "NaN" in acks[4].message
    assert "non-negative" in acks[3].message
    window = plans.GetLoad(pb.GetLoadRequest(placement="m"), timeout=10)
    np.testing.assert_allclose(to_numpy(window.load, "load"), good)   # only the accepted one
    assert window.reports == 1
