"""bench goodput's simulator: step time against a hand computation, stalls per mover, the peer
engines' rebalance cadence, and the oracle as a ceiling (property over seeds)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertplane.benchmarks.goodput.cost import (COMBINE_BYTES_PER_ROW, DISPATCH_BYTES_PER_ROW,
                                                 A2ACurve, CostModel, GemmFit,
                                                 H100_GEMM_POINTS)
from expertplane.benchmarks.goodput.movers import Move, Mover, MoverConstants, plan_move
from expertplane.benchmarks.goodput.oracle import simulate_oracle
from expertplane.benchmarks.goodput.policies import (ExpertPlanePolicy, SGLangEPLB, Static,
                                                     VLLMEPLB, plan)
from expertplane.benchmarks.goodput.sim import Cluster, LoadHistory, simulate
from expertplane.benchmarks.goodput.traces import KINDS, Trace, TraceSpec, generate
from expertplane.controller.spec import PolicySpec

SMALL = Cluster(name="small", num_nodes=2, gpus_per_node=2, num_replicas=20, num_layers=3,
                num_experts=16, num_groups=4, top_k=2, expert_bytes=1_000_000)
CONSTANTS = MoverConstants.measured()


def _flat(bps: float) -> A2ACurve:
    return A2ACurve(1.0, bps, 2.0, bps)


def _trace(kind: str = "drift", steps: int = 3000, seed: int = 0, cluster=SMALL) -> Trace:
    spec = replace(TraceSpec(), kind=kind, num_steps=steps, steps_per_tick=50,
                   phase_steps=1000, prefill_steps=100, burst_steps=200, seed=seed)
    return generate(cluster.num_layers, cluster.num_experts, cluster.top_k, cluster.num_gpus,
                    spec)


def _run(policy, trace: Trace, cluster=SMALL, cost=None, constants=CONSTANTS):
    cost = cost or CostModel.measured(cluster.num_gpus, cluster.slots_per_gpu, cluster.top_k)
    history = LoadHistory(trace)
    initial = plan(cluster, history.between(0, 1000), "deepseek")
    return simulate(cluster, trace, history, cost, policy, Mover(policy.mover, constants),
                    initial)


def test_step_time_equals_hand_computation():
    # 1 layer, 4 experts on 2 GPUs of 2 slots; per-step rows [300, 100, 50, 50]; placement
    # [0 1 | 2 3]: GPU 0 gets 400 rows, GPU 1 100. Layer = 2 slots x 1 ms + 400 x 1 us
    # + 400 x 7392 B / 1 GB/s + 400 x 14336 B / 1 GB/s + 2 ms fixed = 13.0912 ms.
    cluster = Cluster(name="hand", num_nodes=1, gpus_per_node=2, num_replicas=4, num_layers=1,
                      num_experts=4, num_groups=1, top_k=1)
    cost = CostModel(GemmFit(per_slot_s=1e-3, per_row_s=1e-6), _flat(1e9), _flat(1e9),
                     layer_fixed_s=2e-3, slots_per_gpu=2)
    trace = Trace("hand", np.array([[[300, 100, 50, 50]]], dtype=np.float32),
                  np.array([250.0]), steps_per_tick=4)
    history = LoadHistory(trace)
    result = simulate(cluster, trace, history, cost, Static(), Mover("free", CONSTANTS),
                      np.array([[0, 1, 2, 3]]))
    assert (DISPATCH_BYTES_PER_ROW, COMBINE_BYTES_PER_ROW) == (7392, 14336)
    np.testing.assert_allclose(result.step_s, [13.0912e-3] * 4, rtol=1e-12)
    assert result.tokens == 250 * 4 * 2
    assert result.tokens_per_s == pytest.approx(2000 / (4 * 13.0912e-3))


def test_gemm_fit_reproduces_the_measurements_and_a2a_curve_is_log_linear():
    fit = GemmFit.from_points()
    for rows, ms in H100_GEMM_POINTS:
        assert fit.seconds(32, rows) == pytest.approx(ms * 1e-3, rel=1e-12)
    curve = A2ACurve(1e6, 40e9, 1e8, 60e9)
    assert curve.bandwidth(1e7) == pytest.approx(50e9)        # halfway in log(bytes)
    assert curve.bandwidth(1.0) == 40e9 and curve.bandwidth(1e12) == 60e9


def _move() -> Move:
    # 2 layers, 2 ranks: rank 1 receives 3 GB over NVLink + 1 GB over RDMA in layer 0, 0.5 GB
    # RDMA in layer 1; rank 0 receives 1 GB NVLink in layer 1.
    near = np.array([[0.0, 3e9], [1e9, 0.0]])
    far = np.array([[0.0, 1e9], [0.0, 0.5e9]])
    return Move(slots=6, bytes=int(5.5e9), near=near, far=far)


def _drive(kind: str, step_s: float = 0.2, limit: int = 10_000):
    transition = Mover(kind, CONSTANTS).begin(_move())
    effects = []
    while not effects or not effects[-1].done:
        effects.append(transition.advance(step_s))
        assert len(effects) < limit
    return effects


def test_blocking_mover_stalls_for_the_slowest_rank():
    c = CONSTANTS
    (effect,) = _drive("blocking")
    rank1 = 3e9 / c.nvlink_bps + 1e9 / c.rdma_bps + 0.5e9 / c.rdma_bps
    assert effect.stall_s == pytest.approx(rank1) and effect.extra_s == 0
    assert effect.switch.all()


def test_async_mover_commits_one_layer_per_step_and_never_blocks_on_transfers():
    c = CONSTANTS
    effects = _drive("async")
    switched = [np.flatnonzero(e.switch).tolist() for e in effects if e.switch is not None]
    assert switched == [[0], [1]]                                  # in order, one per step
    layer_bytes = np.array([4e9, 1e9])                             # busiest rank per layer
    stalls = sum(e.stall_s for e in effects)
    assert stalls == pytest.approx(layer_bytes.sum() / c.device_copy_bps)   # buffer -> weights
    assert sum(e.extra_s for e in effects) == pytest.approx(layer_bytes.sum()
                                                            * c.unpaced_s_per_byte)
    # layer 0 takes 3 GB / NVLink + 1 GB / RDMA = ~39.6 ms < one 200 ms step: it commits at the
    # next boundary, layer 1 one step later
    assert len(effects) == 3


def test_paced_mover_never_stalls_and_charges_staging_commit_and_compaction():
    c = CONSTANTS
    effects = _drive("paced", step_s=1.0)
    rank_bytes = 4.5e9                                             # rank 1, both layers
    staging = int(np.ceil(rank_bytes / c.step_budget_bytes))
    assert all(e.stall_s == 0 for e in effects)
    commits = [i for i, e in enumerate(effects) if e.switch is not None]
    assert commits == [staging] and effects[staging].switch.all()
    assert len(effects) == 2 * staging + 1                         # staging, commit, compaction
    assert sum(e.extra_s for e in effects) == pytest.approx(
        rank_bytes * (c.paced_s_per_byte + c.compact_s_per_byte) + 2 * c.commit_s_per_layer)


def test_paced_mover_stages_no_faster_than_the_links():
    c = CONSTANTS
    effects = _drive("paced", step_s=1e-3)      # 1 ms steps: the links, not the budget, pace it
    link_s = 3e9 / c.nvlink_bps + 1.5e9 / c.rdma_bps
    commit = next(i for i, e in enumerate(effects) if e.switch is not None)
    assert commit == pytest.approx(link_s / 1e-3, abs=1)


def test_simulate_accounts_each_movers_stall_and_slowdown():
    class Once:
        name = "once"

        def __init__(self, mover, target):
            self.mover, self.target = mover, target

        def at_step(self, view, phy2log):
            return self.target if view.step == 100 else None

    trace = _trace(steps=1000)
    initial = plan(SMALL, LoadHistory(trace).between(0, 1000), "deepseek")
    target = np.roll(initial, 1, axis=1)
    move = plan_move(initial, target, SMALL.num_gpus, SMALL.gpus_per_node, SMALL.expert_bytes)
    static = _run(Static(), trace)
    for kind in ("blocking", "async", "paced", "free"):
        r = _run(Once(kind, target), trace)
        assert r.rebalances == [100] and r.bytes_moved == move.bytes > 0
        assert r.step_s[:100].tolist() == static.step_s[:100].tolist()
        if kind == "blocking":
            assert r.stall_s == pytest.approx(
                move.layer_rank_seconds(CONSTANTS).sum(axis=0).max())
            assert r.extra_s == 0
        elif kind == "async":
            assert r.stall_s == pytest.approx((move.near + move.far).max(axis=1).sum()
                                              / CONSTANTS.device_copy_bps)
        else:
            assert r.stall_s == 0
        assert (r.extra_s > 0) == (kind in ("async", "paced"))


def test_sglang_rebalances_every_num_iterations_on_its_buffer():
    trace = _trace(steps=3500)
    r = _run(SGLangEPLB(SMALL), trace)
    assert r.rebalances == [1001, 2001, 3001]
    history = LoadHistory(trace)
    for step, p in zip(r.rebalances, r.plans[1:]):
        np.testing.assert_array_equal(p, plan(SMALL, history.between(step - 1000, step),
                                              "deepseek"))


@pytest.mark.parametrize("use_async", [False, True])
def test_vllm_rearranges_after_750_steps_then_every_step_interval(use_async):
    r = _run(VLLMEPLB(SMALL, use_async=use_async), _trace(steps=7000))
    assert r.rebalances == [750, 3750, 6750]


def test_expertplane_evaluates_on_its_interval_with_the_controller_policy():
    policy = ExpertPlanePolicy(SMALL, PolicySpec(window_seconds=60.0, threshold=0.0),
                               interval_s=5.0)
    r = _run(policy, _trace(steps=1500))
    clock = np.concatenate([[0.0], np.cumsum(r.step_s)])
    steps = [s for s, _ in policy.decisions]
    assert steps and all(clock[s] >= 5.0 for s in steps)
    assert all(b - a > 0 for a, b in zip(steps, steps[1:]))
    assert set(r.rebalances) <= set(steps)
    assert all(d.rebalance for s, d in policy.decisions if s in r.rebalances)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(KINDS))
def test_oracle_is_never_beaten(seed, kind):
    trace = _trace(kind, steps=2500, seed=seed)
    cost = CostModel.measured(SMALL.num_gpus, SMALL.slots_per_gpu, SMALL.top_k)
    history = LoadHistory(trace)
    results = [_run(p, trace, cost=cost) for p in (
        Static(), SGLangEPLB(SMALL), VLLMEPLB(SMALL), VLLMEPLB(SMALL, use_async=True),
        ExpertPlanePolicy(SMALL, PolicySpec(window_seconds=60.0), interval_s=5.0))]
    oracle = simulate_oracle(SMALL, trace, history, cost, [p for r in results for p in r.plans])
    for r in results:
        assert np.all(oracle.step_s <= r.step_s * (1 + 1e-9)), r.policy
        assert oracle.tokens_per_s >= r.tokens_per_s


def test_vllm_plan_keeps_slots_of_experts_staying_on_their_gpu():
    trace = _trace(steps=4000)
    history = LoadHistory(trace)
    r = _run(VLLMEPLB(SMALL), trace)
    old, new = r.plans[0], r.plans[1]
    fresh = plan(SMALL, history.between(750 - 1000, 750), "deepseek")
    per_gpu = (SMALL.num_layers, SMALL.num_gpus, SMALL.slots_per_gpu)
    np.testing.assert_array_equal(np.sort(new.reshape(per_gpu), -1),
                                  np.sort(fresh.reshape(per_gpu), -1))   # same GPU contents
    o, n = old.reshape(per_gpu), new.reshape(per_gpu)
    for layer in range(SMALL.num_layers):
        for gpu in range(SMALL.num_gpus):
            left = Counter(n[layer, gpu].tolist())   # each expert kept as often as it stays
            for slot, expert in enumerate(o[layer, gpu].tolist()):
                if left[expert]:
                    assert n[layer, gpu, slot] == expert
                    left[expert] -= 1


def test_replays_of_an_sglang_per_pass_dump_and_a_demo_run():
    import yaml

    from expertplane.benchmarks.goodput.traces import from_demo, from_sglang_dump

    passes = np.arange(2 * 4 * 3 * 8, dtype=np.float64).reshape(8, 3, 8)   # [passes, L, E]
    trace = from_sglang_dump(passes, num_gpus=2, top_k=2, steps_per_tick=4)
    assert trace.load.shape == (2, 3, 8) and trace.steps_per_tick == 4
    np.testing.assert_allclose(trace.load[1], passes[4:].mean(axis=0))
    np.testing.assert_allclose(trace.tokens, trace.load[:, 0].sum(-1) / 4)
    with pytest.raises(ValueError, match="logical_count"):
        from_sglang_dump(passes[0], num_gpus=2, top_k=2, steps_per_tick=4)
    with pytest.raises(ValueError, match="fewer than one tick"):
        from_sglang_dump(passes, num_gpus=2, top_k=2, steps_per_tick=9)

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples/demo.yaml")
                            .read_text())
    demo = from_demo(config, num_gpus=4, num_steps=400, steps_per_tick=50)
    model, work = config["placement"]["model"], config["workload"]
    assert demo.load.shape == (8, model["num_layers"], model["num_experts"])
    np.testing.assert_allclose(demo.load.sum(-1), work["tokens_per_step"] * 4 * work["top_k"],
                               rtol=1e-5)
    assert not np.allclose(demo.load[0], demo.load[-1])   # the demo's popularity drifts


def test_bench_replays_the_load_of_a_demo_run_from_what_the_demo_writes(tmp_path, capsys):
    import json

    from expertplane.benchmarks.goodput.run import demo_replay
    from expertplane.benchmarks.goodput.traces import from_demo
    from expertplane.cli.main import main
    from expertplane.demo.run import DemoOptions, load_config, write_run_config
    from expertplane.errors import FieldError

    opts = DemoOptions(seed=3)
    placement, workload = load_config(opts)
    out = tmp_path / "demo-out"
    out.mkdir()
    config = json.loads(write_run_config(out, placement, workload, opts).read_text())
    topo = placement["topology"]
    world = topo["num_nodes"] * topo["gpus_per_node"]
    (out / "timeline.json").write_text(json.dumps({"steps": 400 * world + 3}))
    cluster, trace = demo_replay(out, steps_per_tick=50)
    assert (cluster.num_layers, cluster.num_experts, cluster.num_gpus, cluster.num_replicas,
            cluster.num_groups, cluster.top_k) == (
        placement["model"]["num_layers"], placement["model"]["num_experts"], world,
        placement["num_replicas"], placement["model"]["num_groups"], workload["top_k"])
    assert trace.num_steps == 400
    np.testing.assert_array_equal(trace.load, from_demo(config, world, 400, 50, seed=3).load)
    assert not np.array_equal(trace.load, from_demo(config, world, 400, 50, seed=0).load)

    code = main(["bench", "goodput", "--traces", "--demo-run", str(out), "--policies", "static",
                 "expertplane", "oracle", "--out", str(tmp_path / "png")])
    text = capsys.readouterr().out
    assert code == 0 and "### demo/demo-out (400 steps" in text
    assert text.count("| static |") == text.count("| expertplane |") == 1
    assert (tmp_path / "png" / "goodput-demo-demo-out.png").read_bytes()[:4] == b"\x89PNG"

    (out / "timeline.json").write_text(json.dumps({"steps": 49 * world}))
    with pytest.raises(FieldError, match="^steps: .*fewer than one tick"):
        demo_replay(out, steps_per_tick=50)
    write_run_config(out, placement, workload, replace(opts, model="tiny-qwen"))
    with pytest.raises(FieldError, match="^demo-run: .*HuggingFace model 'tiny-qwen'"):
        demo_replay(out, steps_per_tick=50)


def test_scenarios_in_parallel_processes_give_the_same_rows_in_the_same_order(tmp_path, capsys):
    import json

    from expertplane.cli.main import main

    common = ["bench", "goodput", "--clusters", "hier-32", "--steps", "300", "--steps-per-tick",
              "50", "--profile-steps", "100", "--policies", "static", "sglang", "oracle",
              "--oracle-window", "100", "--out", str(tmp_path / "png")]
    rows = {}
    for jobs in (1, 2):
        assert main([*common, "--jobs", str(jobs), "--json", str(tmp_path / f"{jobs}.json")]) == 0
        rows[jobs] = json.loads((tmp_path / f"{jobs}.json").read_text())
        text = capsys.readouterr().out
        assert text.index("### hier-32/drift") < text.index("### hier-32/shift")
    drop = ("seconds",)          # wall-clock fields differ between runs
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows[1]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows[2]]
    assert [r["scenario"] for r in rows[2]] == ["hier-32/drift"] * 3 + ["hier-32/shift"] * 3
    assert main([*common, "--jobs", "0"]) == 2
    assert "jobs: must be >= 1, got 0" in capsys.readouterr().err
