"""End to end with vLLM's own EPLB code: a real controller and a real agent on loopback, and a
2-rank gloo "server" that loads vLLM's plugins (ours through the entry point), all-reduces its
load window as vLLM does, calls vLLM's policy lookup and moves weights with vLLM's
``rearrange_expert_weights_inplace``.

A skew (expert 0 of every layer takes most tokens) is reported through the plugin -> agent ->
controller as load per logical expert; the controller's auto policy makes a new plan; the agent
writes it to the plan file; the ranks' next rebalance moves to it and every slot then holds its
expert's weights; the next windows show the better balance, on the ranks (per-GPU tokens) and
in the controller's window.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expertplane.agent.agent import Agent
from expertplane.agent.config import AgentConfig
from expertplane.controller.config import ControllerConfig
from expertplane.controller.server import ControllerServer
from expertplane.engines import vllm as plugin
from expertplane.engines.plan_file import PLAN_FILE_ENV
from expertplane.engines.plan_file_writer import PlanFileWriter
from expertplane.planner.metrics import balance_of_gpu_loads
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.tensors import to_numpy

sys.path.insert(0, str(Path(__file__).parent))
from vllm_ranks import RankExperts, init_rank, same_on_every_rank  # noqa: E402

L, E, R, WORLD = 2, 8, 12, 2
PLACEMENT = "vllm-moe"
SECONDS = 240            # the ranks give up after this long without reaching the rebalanced plan


def tokens_per_expert() -> np.ndarray:
    """The traffic [L, E] (tokens per window) each rank serves: expert 0 takes 40% of it."""
    t = np.full((L, E), 30.0)
    t[:, 0] = 140.0
    return t


def gpu_balance(phy2log: np.ndarray, tokens: np.ndarray) -> float:
    """Mean over layers of max / mean tokens per GPU when each expert's tokens are split evenly
    over its slots in ``phy2log`` [L, R] (how vLLM spreads an expert's tokens over replicas)."""
    replicas = np.stack([np.bincount(row, minlength=E) for row in phy2log])
    per_slot = np.take_along_axis(tokens / replicas, phy2log, axis=1)
    gpu = per_slot.reshape(L, WORLD, R // WORLD).sum(axis=2)
    return float(np.mean(gpu.max(axis=1) / gpu.mean(axis=1)))


def _serving_rank(rank: int, store: str, plan_path: str, agent: str, out: str) -> None:
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    eplb = init_rank(rank, WORLD, store, {PLAN_FILE_ENV: plan_path, plugin.AGENT_ENV: agent,
                                          plugin.PLACEMENT_ENV: PLACEMENT})
    policy = EPLB_POLICIES["default"]
    start = np.tile(np.asarray(EplbState.build_initial_global_physical_to_logical_map(E, R - E)),
                    (L, 1)).astype(np.int64)
    current = torch.from_numpy(start)
    experts = RankExperts(eplb, start)
    mine = torch.from_numpy(tokens_per_expert()).to(torch.int64)
    log = []                          # one entry per rebalance: version in force, balance
    deadline = time.monotonic() + SECONDS
    while True:
        window = mine.clone()
        dist.all_reduce(window)       # vLLM all-reduces the logical window over the EP ranks
        new = policy.rebalance_experts(window, R, 2, 1, WORLD, current)
        assert same_on_every_rank(new.tolist())
        if not torch.equal(new, current):
            experts.move(current, new)
            current = new
        assert experts.mismatches(current) == []
        log.append({"version": policy.source.pinned,
                    "balance": gpu_balance(current.numpy(), window.numpy().astype(float))})
        # done once a rebalanced plan (v2+) is in place and one more window went out under it
        done = len(log) >= 2 and log[-2]["version"] >= 2
        flag = torch.tensor([int(done or time.monotonic() > deadline)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item():
            break
        time.sleep(0.3)
    if rank == 0:
        forwarder = policy.source.forwarder
        forwarder.close()
        Path(out).write_text(json.dumps({"log": log, "map": current.tolist(),
                                         "sent": forwarder.counts.sent}))
    dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_skew_through_vllm_leads_to_a_plan_moved_weights_and_better_balance(tmp_path):
    server = ControllerServer(ControllerConfig(
        listen="127.0.0.1:0", db_url=f"sqlite:///{tmp_path / 'c.db'}", tick_seconds=0.02,
        policy_interval_seconds=0.2))
    port = server.start()
    channel = make_channel(f"127.0.0.1:{port}")
    plans = pb_grpc.PlanServiceStub(channel)
    plans.ApplyPlacement(pb.Placement(
        name=PLACEMENT, model=pb.ModelSpec(num_layers=L, num_experts=E, num_groups=2,
                                           expert_bytes=1024),
        topology=pb.Topology(num_nodes=1, gpus_per_node=WORLD), num_replicas=R,
        algorithm="deepseek",
        policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.AUTO, window_seconds=300,
                                  threshold=0.05, cooldown_seconds=0)), timeout=300)
    plan_path = tmp_path / "shared" / "plan.json"
    agent = Agent(AgentConfig(controller=f"127.0.0.1:{port}", node="n0", interval=0.2),
                  sidecars=[lambda ctx: PlanFileWriter(PLACEMENT, plan_path, ctx.channel, poll=0.1)])
    address = agent.start()
    out = tmp_path / "rank0.json"
    try:
        mp.spawn(_serving_rank, args=(str(tmp_path / "store"), str(plan_path), address, str(out)),
                 nprocs=WORLD, join=True)
        result = json.loads(out.read_text())
        deadline = time.monotonic() + 60          # the agent delivers the last windows
        while plans.GetLoad(pb.GetLoadRequest(placement=PLACEMENT), timeout=10).reports \
                < result["sent"] and time.monotonic() < deadline:
            time.sleep(0.05)
        in_force = plans.GetPlan(pb.GetPlanRequest(placement=PLACEMENT, in_force=True), timeout=10)
        window = plans.GetLoad(pb.GetLoadRequest(placement=PLACEMENT), timeout=10)
    finally:
        agent.stop(flush_timeout=2.0)
        channel.close()
        server.stop(0.5)

    log = result["log"]
    versions = [entry["version"] for entry in log]
    assert versions[-1] >= 2, f"the ranks never moved to a rebalanced plan: {versions}"
    # the ranks carried out exactly the controller's plan in force, through the plan file
    assert in_force.summary.version == versions[-1] and in_force.summary.reason == "auto"
    assert result["map"] == to_numpy(in_force.phy2log, "phy2log").tolist()
    # the skew the ranks reported is what the controller planned from
    tokens = WORLD * tokens_per_expert()
    load = to_numpy(window.load, "load")
    np.testing.assert_allclose(load / load.sum(axis=1, keepdims=True),
                               tokens / tokens.sum(axis=1, keepdims=True))
    assert window.reports == result["sent"] >= len(log) - 1
    # better balance: on the ranks, the windows under the rebalanced plan against those before
    # (vLLM's own initial map, version 0, and the initial plan)
    before = [e["balance"] for e in log if e["version"] < in_force.summary.version]
    after = [e["balance"] for e in log if e["version"] == in_force.summary.version]
    print(f"per-GPU balance (max/mean) on the ranks: before {before}, after {after}; "
          f"versions {versions}")
    assert before and after and max(after) < min(before) - 0.2, (before, after)
    # ... and in the controller's window: GPU load under the plan in force against the plan before
    gpu = to_numpy(window.gpu_load, "gpu_load")
    assert np.mean(balance_of_gpu_loads(gpu)) < np.mean(in_force.summary.previous_plan_balance) - 0.2
    np.testing.assert_allclose(np.mean(balance_of_gpu_loads(gpu)), after[-1], rtol=1e-6)
