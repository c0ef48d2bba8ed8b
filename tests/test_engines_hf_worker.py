"""Two real `expertplane worker --model DIR` processes (gloo) serving a tiny Qwen3-MoE
checkpoint, driven over gRPC like the node agent does: counters from the model's own routing,
Prepare/Commit of a new plan mid-stream, a bad checkpoint refused in one line."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from expertplane.engines.hf.tiny import TinySpec, save_tiny
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.tensors import int64_tensor, to_numpy

WORLD, SLOTS, TOKENS = 2, 12, 64
SPEC = TinySpec()                       # 3 MoE layers of 8 experts, top-2
PLAN_A = np.tile([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3], (3, 1))
PLAN_B = np.tile([4, 5, 6, 7, 0, 1, 2, 3, 7, 7, 6, 6], (3, 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "expertplane.cli.main", "worker", *args],
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.timeout(240)
def test_workers_serve_a_checkpoint_report_load_and_swap(tmp_path):
    model = save_tiny("tiny-qwen3-moe", tmp_path / "model", SPEC)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"phy2log": PLAN_A.tolist()}))
    port, addresses = _free_port(), [f"unix:{tmp_path}/w{r}.sock" for r in range(WORLD)]
    logs = [open(tmp_path / f"w{r}.log", "w") for r in range(WORLD)]
    procs = [_worker(["--rank", str(r), "--world-size", str(WORLD), "--master",
                      f"127.0.0.1:{port}", "--plan", str(plan_file), "--placement", "demo",
                      "--listen", addresses[r], "--model", str(model), "--tokens-per-step",
                      str(TOKENS), "--step-interval", "0.01", "--drain", "0"], logs[r])
             for r in range(WORLD)]
    stubs = [pb_grpc.WorkerServiceStub(make_channel(a)) for a in addresses]
    text = lambda: "\n".join((tmp_path / f"w{r}.log").read_text() for r in range(WORLD))  # noqa: E731
    try:
        for stub in stubs:
            deadline = time.monotonic() + 150
            while True:
                try:
                    stub.Status(pb.PullCountersRequest(), timeout=5)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline and all(
                        p.poll() is None for p in procs), text()
                    time.sleep(0.5)
        time.sleep(1.0)
        counts = [to_numpy(s.PullCounters(pb.PullCountersRequest(), timeout=20).slot_counts,
                           "slot_counts") for s in stubs]
        assert all(c.shape == (3, SLOTS // WORLD) for c in counts)
        total = sum(int(c.sum()) for c in counts)
        assert total > 0 and total % (TOKENS * SPEC.top_k * 3) == 0     # whole steps, 3 layers

        plan = pb.Plan(phy2log=int64_tensor(PLAN_B))
        plan.summary.version, plan.summary.placement = 2, "demo"
        with ThreadPoolExecutor(WORLD) as pool:
            acks = list(pool.map(lambda s: s.Prepare(
                pb.PrepareRequest(rollout_id="r1", plan=plan), timeout=60), stubs))
            assert all(a.ok for a in acks), [a.message for a in acks]
            acks = list(pool.map(lambda s: s.Commit(
                pb.VersionRequest(rollout_id="r1", placement="demo", version=2), timeout=60),
                stubs))
        assert all(a.ok and a.worker.plan_version == 2 for a in acks), [a.message for a in acks]
        versions = []
        for _ in range(20):       # the window counted under v1 comes first, then v2's
            time.sleep(0.5)
            snap = stubs[0].PullCounters(pb.PullCountersRequest(), timeout=20)
            versions.append(snap.plan_version)
            if snap.plan_version == 2 and to_numpy(snap.slot_counts, "slot_counts").sum():
                break
        assert versions[-1] == 2, versions
        for p in procs:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(60) for p in procs] == [0, 0], text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_worker_refuses_a_dense_checkpoint_in_one_line(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "dense")
    (tmp_path / "plan.json").write_text(json.dumps({"phy2log": [[0, 1]]}))
    proc = subprocess.run(
        [sys.executable, "-m", "expertplane.cli.main", "worker", "--rank", "0", "--world-size",
         "1", "--master", f"127.0.0.1:{_free_port()}", "--plan", str(tmp_path / "plan.json"),
         "--model", str(tmp_path / "dense")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("expertplane worker: error: llama") \
        and "not a Mixture-of-Experts model" in lines[-1], proc.stderr
