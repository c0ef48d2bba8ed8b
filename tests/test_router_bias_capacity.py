"""Capacity: drops exactly each slot's excess (drop mode), re-routes to the next-best expert
(next_best mode), counts drops per slot; one process and 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expertplane.kernels.balancing import (BalancingError, CapacityConfig, enforce_capacity,
                                           grant_capacity, slot_capacity)
from expertplane.kernels.experts import swiglu_ffn
from expertplane.kernels.moe import EPMoELayer, LayerPlacement
from expertplane.kernels.routing import ranked_experts, router_scores

HIDDEN, INTER, EXPERTS, K = 16, 8, 8, 2


def _manual_output(layer, x, phys, weights):
    """sum_j weights[t, j] * FFN_{phy2log[phys[t, j]]}(x_t) over placed rows, float64."""
    out = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(K):
            if int(phys[t, j]) >= 0:
                e = int(layer.placement.phy2log[phys[t, j]])
                w13, w2 = (w.double() for w in layer.expert_weights(e))
                out[t] += float(weights[t, j]) * swiglu_ffn(x[t:t + 1].double(), w13, w2)[0]
    return out


def _skewed_layer(mode, factor=1.0, group=None, seed=0):
    placement = LayerPlacement.from_phy2log([0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 1, 2], EXPERTS)
    layer = EPMoELayer(HIDDEN, INTER, EXPERTS, placement, group=group, top_k=K,
                       scoring="sigmoid", seed=seed,
                       capacity=CapacityConfig(factor=factor, mode=mode, max_reroutes=2))
    layer.router_weight.data[:3] *= 4.0                  # experts 0-2 hot
    return layer


def test_slot_capacity_and_grant_order():
    assert slot_capacity(12, 4, 1.0) == 3 and slot_capacity(12, 4, 1.1) == 4
    requests = torch.tensor([[5, 1], [4, 0], [2, 2]])
    granted = grant_capacity(requests, torch.tensor([7, 2]))
    assert granted.tolist() == [[5, 1], [2, 0], [0, 1]]


def test_drop_mode_drops_exactly_the_excess_in_column_order():
    phys = torch.tensor([[0, 1], [0, 2], [0, 0], [3, 0], [1, 0], [0, 1]])  # 12 rows, 4 slots
    weights = torch.rand(6, 2)
    res = enforce_capacity(phys, weights, CapacityConfig(1.0), 4, 0, None)     # C = 3
    requested = torch.bincount(phys.flatten(), minlength=4)
    assert res.dropped_per_slot.tolist() == (requested - 3).clamp_min(0).tolist()
    kept_slot0 = [(t, j) for j in range(2) for t in range(6) if int(res.phys[t, j]) == 0]
    assert kept_slot0 == [(0, 0), (1, 0), (2, 0)]      # first choices first, in token order
    assert torch.equal(res.weights, torch.where(res.phys >= 0, weights, 0.0))
    assert torch.equal(torch.where(res.phys >= 0, phys, -1), res.phys)


def test_capacity_config_names_field():
    with pytest.raises(BalancingError, match="factor"):
        CapacityConfig(0)
    with pytest.raises(BalancingError, match="mode"):
        CapacityConfig(1.0, mode="spill")
    with pytest.raises(BalancingError, match="max_reroutes"):
        CapacityConfig(1.0, mode="next_best", max_reroutes=0)


def test_layer_drop_mode_output_and_counters():
    layer = _skewed_layer("drop")
    twin = _skewed_layer("drop")
    x = torch.randn(40, HIDDEN)
    out = layer(x)
    phys, weights = twin.assign(x)
    assert torch.allclose(out.double(), _manual_output(twin, x, phys, weights), atol=1e-5)
    capacity = slot_capacity(40 * K, 12, 1.0)
    counts, dropped = layer.read_counters(), layer.read_dropped()
    plain = _skewed_layer("drop", factor=100.0)          # capacity never binds
    plain(x)
    requested = plain.read_counters()
    assert int(dropped.sum()) > 0
    assert dropped.tolist() == (requested - capacity).clamp_min(0).tolist()
    assert counts.tolist() == requested.clamp_max(capacity).tolist()


def test_layer_next_best_reroutes_to_next_experts():
    layer = _skewed_layer("next_best")
    drop = _skewed_layer("drop")
    x = torch.randn(40, HIDDEN)
    phys, weights = layer.assign(x)
    drop.assign(x)
    capacity = slot_capacity(40 * K, 12, 1.0)
    placed = torch.bincount(phys[phys >= 0], minlength=12)
    assert int(placed.max()) <= capacity
    assert int(placed.sum()) + int(layer.read_dropped().sum()) == 40 * K
    assert int(layer.read_dropped().sum()) < int(drop.read_dropped().sum())
    # every placed row serves one of the token's ranked experts; substitutes keep the score
    ranked, _, _ = ranked_experts(x.float() @ layer.router_weight.t(), layer.router, None, 6)
    scores = router_scores(x.float() @ layer.router_weight.t(), "sigmoid")
    for t in range(40):
        chosen = [int(layer.placement.phy2log[p]) for p in phys[t].tolist() if p >= 0]
        assert set(chosen) <= set(ranked[t].tolist()) and len(set(chosen)) == len(chosen)
        norm = scores[t, ranked[t, :K]].sum()
        for p, w in zip(phys[t].tolist(), weights[t].tolist()):
            if p >= 0:
                e = int(layer.placement.phy2log[p])
                assert w == pytest.approx(float(scores[t, e] / norm), rel=1e-5)
    out = _skewed_layer("next_best")(x)
    assert torch.allclose(out.double(), _manual_output(layer, x, phys, weights), atol=1e-5)


def _ranks_main(rank, world, store, mode):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        layer = _skewed_layer(mode, factor=1.0, group=dist.group.WORLD)
        free = _skewed_layer("drop", factor=100.0, group=dist.group.WORLD)
        x = torch.randn(10 + 7 * rank, HIDDEN)
        out = layer(x)
        assert torch.isfinite(out).all()
        free(x)
        phys = free.route_tokens(x)[0]
        requested = torch.bincount(phys.flatten(), minlength=12)
        dist.all_reduce(requested)                                   # global requests [R]
        capacity = slot_capacity(int(requested.sum()), 12, 1.0)
        start = rank * 6
        dropped, counts = layer.read_dropped(), layer.read_counters()
        assert int(counts.max()) <= capacity
        if mode == "drop":
            assert dropped.tolist() == (requested[start:start + 6] - capacity).clamp_min(0).tolist()
        totals = torch.stack([dropped.sum() + counts.sum(), requested.sum()])
        dist.all_reduce(totals[:1])
        assert int(totals[0]) == int(totals[1])
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["drop", "next_best"])
def test_gloo_two_ranks_capacity(tmp_path, mode):
    mp.spawn(_ranks_main, args=(2, str(tmp_path / "store"), mode), nprocs=2, join=True)
