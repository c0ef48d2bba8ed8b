"""The reference worker on CUDA with NCCL (opt-in: pytest -m gpu): one rank serving gRPC,
a Prepare/Commit mid-run, every verified step within bf16 tolerance."""

from __future__ import annotations

import json
import socket
import threading

import numpy as np
import pytest
import torch

from expertplane.worker.synthetic import ModelConfig, StreamConfig
from expertplane.worker.process import WorkerConfig, run_worker
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.tensors import int64_tensor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.timeout(300)
def test_cuda_worker_swaps_over_grpc(tmp_path):
    plan_a = np.stack([np.arange(16), np.arange(16)[::-1]])
    plan_b = np.stack([np.roll(np.arange(16), 5), np.arange(16)])
    (tmp_path / "plan.json").write_text(json.dumps({"phy2log": plan_a.tolist()}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"unix:{tmp_path}/w.sock"
    config = WorkerConfig(rank=0, world_size=1, master=f"127.0.0.1:{port}",
                          plan_file=str(tmp_path / "plan.json"), listen=address,
                          model=ModelConfig(num_layers=2, num_experts=16, hidden=256,
                                            intermediate=128, top_k=4, dtype="bfloat16"),
                          stream=StreamConfig(tokens_per_step=1024),
                          device="cuda", backend="nccl", verify_every=3, drain_seconds=0)
    stop, ready = threading.Event(), threading.Event()
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", run_worker(config, stop, ready)))
    thread.start()
    try:
        assert ready.wait(120)
        stub = pb_grpc.WorkerServiceStub(make_channel(address))
        plan = pb.Plan(phy2log=int64_tensor(plan_b))
        plan.summary.version = 2
        assert stub.Prepare(pb.PrepareRequest(plan=plan), timeout=60).ok
        ack = stub.Commit(pb.VersionRequest(version=2), timeout=60)
        assert ack.ok and ack.worker.plan_version == 2
        snap = stub.PullCounters(pb.PullCountersRequest(), timeout=10)
        assert snap.steps > 0
    finally:
        stop.set()
        thread.join(120)
    result = out["r"]
    assert result.failed_steps == 0 and result.plan_version == 2 and result.swaps == 1
