"""Aux-loss-free selection bias: it never changes gating weights, and on a skewed synthetic
router it brings max/mean expert load below a target within bounded steps, and keeps it there."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertplane.kernels.balancing import BalancingError, BiasUpdate, expert_load, logical_load
from expertplane.kernels.moe import EPMoELayer, LayerPlacement
from expertplane.kernels.routing import RouterConfig, gating_weights, route, router_scores


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scoring=st.sampled_from(["softmax", "sigmoid"]),
       normalize=st.booleans(), groups=st.sampled_from([(1, 1), (4, 2)]))
def test_bias_never_changes_gating_weights(seed, scoring, normalize, groups):
    gen = torch.Generator().manual_seed(seed)
    cfg = RouterConfig(num_experts=16, top_k=3, num_groups=groups[0], topk_groups=groups[1],
                       scoring=scoring, normalize=normalize, scaling=1.7)
    logits = torch.randn(32, 16, generator=gen)
    bias = torch.randn(16, generator=gen)
    ids, weights = route(logits, cfg, bias)
    # the weights are those of the unbiased scores of the chosen experts
    assert torch.equal(weights, gating_weights(router_scores(logits, scoring), ids, cfg))
    # a bias that does not change the selection does not change the weights either
    ids0, weights0 = route(logits, cfg)
    ids_c, weights_c = route(logits, cfg, torch.full((16,), 0.3))
    assert torch.equal(ids0, ids_c) and torch.equal(weights0, weights_c)


def test_layer_output_unchanged_by_selection_neutral_bias():
    placement = LayerPlacement.from_phy2log(list(range(8)) + [2, 5], 8)
    layer = EPMoELayer(16, 8, 8, placement, top_k=2, scoring="sigmoid")
    x = torch.randn(20, 16)
    before = layer(x)
    layer.set_selection_bias(torch.full((8,), -0.25))
    assert torch.equal(layer(x), before)


def test_update_rules():
    bias = torch.zeros(4)
    load = torch.tensor([10, 30, 20, 20])
    assert BiasUpdate(0.1, "sign").step(bias, load).tolist() == pytest.approx([0.1, -0.1, 0, 0])
    assert BiasUpdate(0.1, "proportional").step(bias, load).tolist() == \
        pytest.approx([0.05, -0.05, 0, 0])
    with pytest.raises(BalancingError, match="speed"):
        BiasUpdate(0.0)
    with pytest.raises(BalancingError, match="rule"):
        BiasUpdate(0.1, "pid")
    with pytest.raises(BalancingError, match="load"):
        BiasUpdate(0.1).step(bias, torch.ones(5))


def test_loads_from_selections_and_slots():
    ids = torch.tensor([[0, 2], [2, 3]])
    assert expert_load(ids, 5).tolist() == [1, 0, 2, 1, 0]
    phy2log = torch.tensor([0, 1, 0, 2])
    assert logical_load(torch.tensor([3, 4, 5, 6]), phy2log, 3).tolist() == [8, 4, 6]
    with pytest.raises(BalancingError, match="slot_counts"):
        logical_load(torch.ones(3, dtype=torch.int64), phy2log, 3)


@pytest.mark.parametrize("rule, speed, reach_by", [("sign", 0.005, 60), ("proportional", 0.02, 30)])
def test_bias_balances_skewed_router_without_oscillating(rule, speed, reach_by):
    experts, tokens, steps, target, ceiling = 16, 4096, 90, 1.25, 1.35
    cfg = RouterConfig(num_experts=experts, top_k=2, scoring="sigmoid")
    skew = torch.linspace(1.5, -1.5, experts)          # expert 0 far more popular than 15
    update = BiasUpdate(speed=speed, rule=rule)
    bias = torch.zeros(experts)
    gen = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(steps):
        ids, _ = route(skew + torch.randn(tokens, experts, generator=gen), cfg, bias)
        load = expert_load(ids, experts)
        ratios.append(float(load.max() / load.float().mean()))
        bias = update.step(bias, load)
    assert ratios[0] > 2.5                             # the skew is real
    reached = next(i for i, r in enumerate(ratios) if r < target)
    assert reached <= reach_by, f"max/mean reached {target} only at step {reached}"
    assert max(ratios[reached:]) <= ceiling, f"oscillated back up: {max(ratios[reached:])}"


def test_layer_updates_bias_from_its_own_selections():
    placement = LayerPlacement.from_phy2log(list(range(8)), 8)
    layer = EPMoELayer(16, 8, 8, placement, top_k=2, scoring="sigmoid",
                       bias_update=BiasUpdate(0.5, "sign"))
    layer.router_weight.data[0] += 5.0                  # expert 0 over-selected
    x = torch.randn(64, 16).abs()
    layer(x)
    bias = layer.update_selection_bias()
    assert float(bias[0]) == pytest.approx(-0.5)
    assert layer.update_selection_bias(torch.ones(8)).tolist() == bias.tolist()
