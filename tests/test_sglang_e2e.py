"""End to end with SGLang's own code on both sides of ExpertPlane: load in through SGLang's
recorder, plans out through SGLang's EPLB rebalance and weight mover.

- Load: SGLang's own ExpertDistributionRecorder (``stat``) behind SGLang's endpoint names in a
  separate process (``sglang_recorder_server.py``), polled by a real agent with the SGLang load
  source (the sidecars exactly as ``expertplane agent --sglang-url ...`` builds them).
- Control: a real controller (gRPC on loopback, SQLite) with the auto policy.
- Plans: the agent's plan-file writer; 2 gloo ranks running SGLang's rebalance path with our
  plugin loaded through SGLang's plugin loader (``sglang_ranks.py``), rebalancing every 0.3 s.

A skew (logical expert 2, one slot on rank 0 in SGLang's trivial map, takes 12 shares of 19) goes through SGLang's recorder; the controller
re-plans on it; the plan file carries SGLang's hidden-layer rows; the ranks move their weights to
exactly the controller's plan in force (every slot holds its expert, the dense row untouched);
and the next window the agent reports shows the better balance in the controller.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from expertplane.agent.agent import Agent
from expertplane.cli.agent import config_from_args, sidecars_from_args
from expertplane.cli.main import build_parser
from expertplane.controller.config import ControllerConfig
from expertplane.controller.server import ControllerServer
from expertplane.engines.plan_file import read_plan_file
from expertplane.planner.metrics import balance_of_gpu_loads
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.tensors import to_numpy

sys.path.insert(0, str(Path(__file__).parent))
import sglang_recorder_server  # noqa: E402
from reliability_support import free_port  # noqa: E402

pytestmark = pytest.mark.timeout(600)
H, DENSE, E, RED, WORLD = 4, 1, 8, 2, 2   # hidden layers (first dense), experts, redundant, ranks
R = E + RED
MOE = list(range(DENSE, H))
PLACEMENT = "sgl-loop"
SECONDS = 300            # the ranks give up after this long without reaching a rebalanced plan


def _rank(rank: int, port: int, model_dir: str, plan_path: str, out: str) -> None:
    """Rebalance as SGLang does until a plan of version >= 2 (the controller's re-plan) is in
    place on every rank; write the history to ``out`` + rank."""
    import torch
    import torch.distributed as dist
    from sglang_ranks import SglangRank

    from expertplane.benchmarks.engines import publish_server_args
    from expertplane.engines import sglang as plugin

    override = publish_server_args(model_dir, WORLD, RED, eplb_rebalance_num_iterations=1000,
                                   expert_distribution_recorder_mode="stat")
    served = SglangRank(rank, WORLD, port, model_dir, plan_path)
    history, deadline = [], time.monotonic() + SECONDS
    while True:
        now = served.rebalance()
        history.append({"version": plugin._SOURCE.pinned, "map": now.tolist(),
                        "holds": served.model.holds(now)})
        flag = torch.tensor([int(plugin._SOURCE.pinned >= 2 or time.monotonic() > deadline)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item():
            break
        time.sleep(0.3)
    Path(f"{out}{rank}").write_text(json.dumps({"in_effect": plugin.in_effect(),
                                                "history": history}))
    served.close()
    override.restore()


def _forward(url: str, rng, bursts: int) -> np.ndarray:
    """``bursts`` forward passes of 16 tokens (top-2) through SGLang's recorder hooks, skewed to
    logical expert 2; physical ids follow SGLang's trivial map (slot s holds expert s % E).
    Returns the logical tokens sent, [len(MOE), E]."""
    import urllib.request

    p = np.ones(E)
    p[2] = 12.0
    sent = np.zeros((len(MOE), E))
    for _ in range(bursts):
        ids = {}
        for i, layer in enumerate(MOE):
            logical = np.stack([rng.choice(E, size=2, replace=False, p=p / p.sum())
                                for _ in range(16)])
            np.add.at(sent[i], logical.ravel(), 1)
            replica = rng.integers(0, 2, logical.shape) * E          # slots e and e + E
            ids[layer] = np.where(logical + replica < R, logical + replica, logical)
        body = json.dumps({"topk_ids": {str(k): v.tolist() for k, v in ids.items()}}).encode()
        urllib.request.urlopen(urllib.request.Request(f"{url}/forward", data=body,
                                                      method="POST"), timeout=60).read()
    return sent


def _wait(predicate, timeout=180.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def sglang(tmp_path):
    """The SGLang stand-in (``sglang_recorder_server.py``): (url, recorder dir, dump archive)."""
    with sglang_recorder_server.running(tmp_path / "sglang", H, E, DENSE, RED) as served:
        yield served


def test_skew_through_sglang_leads_to_a_plan_moved_weights_and_better_balance(tmp_path, sglang):
    url, recorder, _ = sglang
    model = str(tmp_path / "sglang" / "model")
    server = ControllerServer(ControllerConfig(
        listen="127.0.0.1:0", db_url=f"sqlite:///{tmp_path / 'c.db'}", tick_seconds=0.02,
        policy_interval_seconds=0.2))
    agent = channel = None
    plan_path, out = tmp_path / "shared" / "plan.json", tmp_path / "rank"
    ranks = []
    try:
        controller = server.start()
        channel = make_channel(f"127.0.0.1:{controller}")
        plans = pb_grpc.PlanServiceStub(channel)
        plans.ApplyPlacement(pb.Placement(
            name=PLACEMENT, model=pb.ModelSpec(num_layers=len(MOE), num_experts=E, num_groups=1,
                                               expert_bytes=1024),
            topology=pb.Topology(num_nodes=1, gpus_per_node=WORLD), num_replicas=R,
            algorithm="deepseek",
            policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.AUTO, window_seconds=300,
                                      threshold=0.05, cooldown_seconds=0)), timeout=300)
        args = build_parser().parse_args([
            "agent", "--controller", f"127.0.0.1:{controller}", "--node", "n0",
            "--interval", "100ms", "--placement", PLACEMENT, "--plan-file", str(plan_path),
            "--plan-poll", "50ms", "--sglang-url", url, "--sglang-recorder-dir", str(recorder),
            "--sglang-interval", "300ms"])
        agent = Agent(config_from_args(args), sidecars_from_args(args))
        agent.start()
        source = agent.sidecars[0]
        _wait(lambda: source.counts.dumped >= 1, what="SGLang's recorder to start")
        ctx = mp.get_context("spawn")
        rank_port = free_port()
        ranks = [ctx.Process(target=_rank, args=(r, rank_port, model, str(plan_path), str(out)))
                 for r in range(WORLD)]
        for p in ranks:
            p.start()
        rng = np.random.default_rng(3)
        deadline = time.monotonic() + SECONDS
        while not ((doc := read_plan_file(plan_path)) is not None and doc.version >= 2):
            assert time.monotonic() < deadline, "the controller never re-planned on the skew"
            _forward(url, rng, 4)
            time.sleep(0.3)
        for p in ranks:
            p.join(timeout=SECONDS)
            assert p.exitcode == 0, f"an SGLang rank failed (exit {p.exitcode})"
        in_force = plans.GetPlan(pb.GetPlanRequest(placement=PLACEMENT, in_force=True),
                                 timeout=10)
        # one more window, served under the moved plan, reported through SGLang's recorder
        reported = source.counts.reported
        _forward(url, rng, 8)
        _wait(lambda: source.counts.reported > reported, what="the next window")
        _wait(lambda: plans.GetLoad(pb.GetLoadRequest(placement=PLACEMENT), timeout=10)
              .reports >= source.counts.reported, what="the controller to take it")
        window = plans.GetLoad(pb.GetLoadRequest(placement=PLACEMENT), timeout=10)
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()
        if agent is not None:
            agent.stop(flush_timeout=2.0)
        if channel is not None:
            channel.close()
        server.stop(0.5)

    results = [json.loads(Path(f"{out}{r}").read_text()) for r in range(WORLD)]
    assert all(r["in_effect"] for r in results), "the plugin's hook is not in effect"
    final = [np.asarray(r["history"][-1]["map"]) for r in results]
    assert np.array_equal(final[0], final[1])
    assert all(entry["holds"] for r in results for entry in r["history"]), \
        "a slot does not hold its expert's weights after a move"
    # the ranks carried out exactly the controller's plan in force, in SGLang's hidden-layer rows
    phy2log = to_numpy(in_force.phy2log, "phy2log", ndim=2)
    assert results[0]["history"][-1]["version"] == in_force.summary.version >= 2
    np.testing.assert_array_equal(final[0][MOE], phy2log)
    np.testing.assert_array_equal(final[0][:DENSE], np.tile(np.arange(R) % E, (DENSE, 1)))
    assert (phy2log == 2).sum(axis=1).min() >= 2, "the hot expert was not replicated"
    # the next window under the moved plan: better GPU balance than the plan before on it
    gpu = to_numpy(window.gpu_load, "gpu_load")
    after = float(np.mean(balance_of_gpu_loads(gpu)))
    before = float(np.mean(in_force.summary.previous_plan_balance))
    print(f"controller's GPU balance (max/mean): previous plan {before:.3f}, moved plan "
          f"{after:.3f}")
    assert after < before - 0.1, (before, after)
