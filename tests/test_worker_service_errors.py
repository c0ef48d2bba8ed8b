"""WorkerService answers errors like every servicer (``rpc.status.status_of``), over a real
loopback gRPC server: bad input INVALID_ARGUMENT and an unknown placement NOT_FOUND, each
naming the field; an unexpected exception INTERNAL, logged with its traceback."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.security import SecurityConfig
from expertplane.rpc.tensors import int64_tensor
from expertplane.worker.service import (
    CounterLedger,
    WorkerIdentity,
    WorkerServicer,
    serve_worker_service,
)

LAYERS, EXPERTS, SLOTS = 2, 4, 6


class BrokenCoordinator(SimpleNamespace):
    """A hot-swap coordinator whose commit fails with a bug (not a refusal)."""

    def commit(self, version: int, timeout: float) -> None:
        raise RuntimeError("bug in the coordinator")


@pytest.fixture
def stub():
    ident = WorkerIdentity("node-a", 0, 1, "demo", LAYERS, EXPERTS, SLOTS)
    address = ["127.0.0.1:0"]
    servicer = WorkerServicer(ident, BrokenCoordinator(version=1, prepared_version=0),
                              CounterLedger(LAYERS, SLOTS, version=1),
                              address=lambda: address[0], on_bias=lambda bias: None)
    server, address[0] = serve_worker_service(servicer, address[0], SecurityConfig())
    channel = make_channel(address[0])
    try:
        yield pb_grpc.WorkerServiceStub(channel)
    finally:
        channel.close()
        server.stop(0)


def _status(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call(request, timeout=10)
    return exc.value.code(), exc.value.details()


def test_bad_input_and_unknown_placement_name_the_field(stub):
    plan = pb.Plan(phy2log=int64_tensor(np.tile(np.arange(SLOTS) % EXPERTS, (LAYERS, 1))))
    plan.summary.version = 2
    plan.phy2log.values[SLOTS + 1] = EXPERTS                  # layer 1, slot 1: no such expert
    assert _status(stub.Prepare, pb.PrepareRequest(plan=plan)) == (
        grpc.StatusCode.INVALID_ARGUMENT, f"plan.phy2log[1]: values must be in [0, {EXPERTS})")
    plan.summary.version = 0
    assert _status(stub.Prepare, pb.PrepareRequest(plan=plan)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "plan.summary.version: must be >= 1")
    assert _status(stub.Abort, pb.VersionRequest(placement="other", version=2)) == (
        grpc.StatusCode.NOT_FOUND, "placement: this worker serves 'demo', not 'other'")
    code, details = _status(stub.SetBias, pb.RouterBias(placement="demo", bias=pb.DoubleTensor(
        shape=[LAYERS], values=[0.0] * LAYERS)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("bias: must have shape")


def test_an_unexpected_exception_is_internal_and_logged(stub, caplog):
    with caplog.at_level(logging.ERROR, logger="expertplane.rpc.status"):
        code, details = _status(stub.Commit, pb.VersionRequest(placement="demo", version=2))
    assert code == grpc.StatusCode.INTERNAL
    assert details == "internal error (RuntimeError); see the server log"
    logged = [r for r in caplog.records if r.getMessage() == "Commit failed"]
    assert logged and "bug in the coordinator" in str(logged[0].exc_info[1])
    assert stub.Status(pb.PullCountersRequest(), timeout=10).plan_version == 1
