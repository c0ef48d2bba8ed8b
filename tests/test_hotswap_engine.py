"""The hot-swap engine and step-boundary protocol over 3 real gloo ranks: requests reach the
ranks at different steps, yet every rank stages and switches at the same step; outputs match
the dense reference on every step before, during and after the swap; abort leaves the old
plan serving; a prepare that not every rank got never starts."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expertplane.kernels.experts import make_expert_weights
from expertplane.kernels.hotswap import HotSwapEngine, SwapCoordinator, plan_transfers
from expertplane.kernels.moe import LayerPlacement
from expertplane.worker.synthetic import ModelConfig, StreamConfig, SyntheticMoEModel, TokenStream

WORLD, GPN = 3, 1
MODEL = ModelConfig(num_layers=2, num_experts=8, hidden=32, intermediate=16, top_k=3,
                    num_groups=2, topk_groups=2, seed=3)
STREAM = StreamConfig(tokens_per_step=48, drift_period=5, drift_swaps=3, seed=1)
SLOTS = 12


def _plan(seed: int) -> list[LayerPlacement]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(MODEL.num_layers):
        base = np.concatenate([np.arange(MODEL.num_experts),
                               rng.integers(0, MODEL.num_experts, SLOTS - MODEL.num_experts)])
        out.append(LayerPlacement.from_phy2log(rng.permutation(base), MODEL.num_experts))
    return out


def _assert_weights_match(model: SyntheticMoEModel, placements, rank: int) -> None:
    spr = SLOTS // WORLD
    for l, layer in enumerate(model.layers):
        assert torch.equal(layer.placement.phy2log, placements[l].phy2log)
        for s in range(spr):
            e = int(placements[l].phy2log[rank * spr + s])
            w13, w2 = make_expert_weights(MODEL.seed, l, e, MODEL.hidden, MODEL.intermediate)
            got13, got2 = layer.experts.weights(s)
            assert torch.equal(got13, w13) and torch.equal(got2, w2)


def _rank_main(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        _scenario(rank)
    finally:
        dist.destroy_process_group()


def _swap_on_rank(p: LayerPlacement, rank: int) -> LayerPlacement:
    """``p`` with two slots of ``rank`` exchanged: only that rank's weights change."""
    phy = p.phy2log.clone()
    s0 = rank * (SLOTS // WORLD)
    j = next(j for j in range(s0 + 1, s0 + SLOTS // WORLD) if phy[j] != phy[s0])
    phy[[s0, j]] = phy[[j, s0]]
    return LayerPlacement.from_phy2log(phy, MODEL.num_experts)


def _scenario(rank: int) -> None:
    a, c = _plan(1), _plan(3)
    # layer 0 changes everywhere; layer 1 only on rank 2 (ranks 0, 1: routing tables only)
    b = [_plan(2)[0], _swap_on_rank(a[1], WORLD - 1)]
    model = SyntheticMoEModel(MODEL, STREAM, a, gpus_per_node=GPN)
    engine = HotSwapEngine(list(model.layers), group=dist.new_group(), gpus_per_node=GPN)
    coord = SwapCoordinator(engine, version=1)
    stream = TokenStream(MODEL, STREAM, rank)
    step = [0]
    events: dict[str, object] = {}

    def at_step(n: int) -> None:
        while step[0] < n:
            threading.Event().wait(0.001)

    def control() -> None:
        # The "gRPC" side: each rank gets every request at a different step.
        at_step(2 + 3 * rank)
        events["prepared"] = coord.prepare(2, b, timeout=30)
        at_step(step[0] + 2 * rank)
        coord.commit(2, timeout=30)
        events["committed_step"] = step[0]
        at_step(step[0] + 1 + rank)
        coord.prepare(3, c, timeout=30)
        assert coord.abort(3, timeout=30) is True
        assert coord.abort(3, timeout=30) is False  # idempotent
        if rank == 0:  # only this rank is asked: must time out and never start
            with pytest.raises(TimeoutError):
                coord.prepare(4, c, timeout=0.5)
        events["done"] = True

    thread = threading.Thread(target=control, daemon=True)
    thread.start()
    versions, switch_step = [], None
    while True:
        flag = torch.tensor([int("done" in events)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() or step[0] > 2000:
            break
        before = coord.version
        assert coord.step_boundary()
        if coord.version != before:
            switch_step = step[0]
        result = model(stream.batch(step[0]), verify=True)
        assert result.max_error < 1e-4, (step[0], coord.version, result.max_error)
        versions.append(coord.version)
        counts = model.read_counters()
        assert counts.shape == (MODEL.num_layers, SLOTS // WORLD)
        step[0] += 1
    thread.join(5)
    assert events.get("done"), "control thread did not finish"
    assert events["prepared"] is not None and events["prepared"].version == 2
    # every rank switched at the same step, and only once
    steps = [None] * WORLD
    dist.all_gather_object(steps, switch_step)
    assert len(set(steps)) == 1 and steps[0] is not None
    assert versions == [1] * switch_step + [2] * (len(versions) - switch_step)
    # the plan in force is b, with each slot's weights those of its logical expert
    assert coord.version == 2 and engine.staged_version == 0
    _assert_weights_match(model, b, rank)


@pytest.mark.timeout(120)
def test_swap_at_the_same_step_matches_reference_and_abort_keeps_old_plan(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)


def test_single_rank_engine_stages_only_moved_experts_and_reuses_released_rows():
    a, b = _plan(4), _plan(5)
    model = SyntheticMoEModel(MODEL, STREAM, a)
    engine = HotSwapEngine(list(model.layers))
    slots = model.layers[0].experts.num_slots
    moved = [len(plan_transfers(torch.stack([p.phy2log for p in old]),
                                torch.stack([p.phy2log for p in new]), 1).for_rank(0))
             for old, new in ((a, b), (b, a))]
    assert moved[0] > 0
    stats = engine.prepare(7, b)
    assert stats.remote_fills == 0 and stats.bytes_sent == 0
    assert engine.wait(10) and engine.staged_version == 7
    x = TokenStream(MODEL, STREAM, 0).batch(0)
    assert model(x, verify=True).max_error < 1e-4  # still serving while staged
    _assert_weights_match(model, a, 0)
    engine.commit()
    _assert_weights_match(model, b, 0)
    assert model(x, verify=True).max_error < 1e-4
    def held() -> int:
        return sum(w13.shape[0] for layer in model.layers for w13, _ in layer.experts.segments)

    # nothing was free: the staging was exactly the moved experts (fewer once a layer's old
    # buffer lost its last slot and was dropped)
    assert len(model.layers) * slots < held() <= len(model.layers) * slots + moved[0]
    engine.prepare(8, a)   # back: the released rows take the staged experts, nothing new
    engine.wait(10)
    engine.commit()
    _assert_weights_match(model, a, 0)
    assert model(x, verify=True).max_error < 1e-4
    assert held() <= len(model.layers) * slots + max(moved)
