"""algorithm="topology": valid plans, home-node locality kept, hot experts spread to other nodes."""

import numpy as np
import pytest

from expertplane.benchmarks.dispatch_sim import (RoutingModel, Topology, generate_trace,
                                                 simulate_dispatch, zipf_popularity)
from expertplane.errors import FieldError
from expertplane.planner import rebalance_experts
from expertplane.planner.validation import check_plan


def _nodes_of(phy2log, expert, num_nodes):
    slots = np.flatnonzero(phy2log == expert)
    return set((slots // (phy2log.shape[0] // num_nodes)).tolist())


def test_hot_expert_gets_a_replica_on_the_other_node():
    w = np.array([[100.0, 1.0, 1.0, 1.0]])
    phy2log, log2phy, logcnt = rebalance_experts(w, 6, 2, 2, 2, algorithm="topology")
    check_plan(phy2log, logcnt, log2phy, 4, 2)
    assert _nodes_of(phy2log.numpy()[0], 0, 2) == {0, 1}


@pytest.mark.parametrize("remote_cost", [0.0, 0.1, 10.0])
def test_every_expert_keeps_a_replica_with_its_group(remote_cost):
    rng = np.random.default_rng(0)
    w = rng.zipf(1.4, size=(3, 64)).astype(np.float64)
    phy2log, log2phy, logcnt = (t.numpy() for t in rebalance_experts(
        w, 80, 8, 4, 16, algorithm="topology", remote_cost=remote_cost))
    check_plan(phy2log, logcnt, log2phy, 64, 16)
    for layer in range(3):
        for group in range(8):
            # some node holds every expert of the group (its home node)
            holders = [_nodes_of(phy2log[layer], e, 4) for e in range(group * 8, group * 8 + 8)]
            assert set.intersection(*holders)


def test_deterministic():
    w = np.random.default_rng(1).zipf(1.5, size=(2, 32)).astype(np.float64)
    a = rebalance_experts(w, 48, 4, 2, 8, algorithm="topology", remote_cost=0.2)
    b = rebalance_experts(w, 48, 4, 2, 8, algorithm="topology", remote_cost=0.2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_beats_hierarchical_on_skewed_trace():
    model = RoutingModel(num_experts=64, num_groups=8, topk_groups=4, topk=6)
    pop = zipf_popularity(2, 64, 1.5, np.random.default_rng(2))
    trace = generate_trace(pop, 2048, 8, model, seed=0)
    w = trace.expert_loads(64)
    topo = Topology(4, 8)
    hier = simulate_dispatch(rebalance_experts(w, 80, 8, 4, 8), trace, topo)
    topo_plan = simulate_dispatch(rebalance_experts(w, 80, 8, 4, 8, algorithm="topology",
                                                    remote_cost=0.5), trace, topo)
    assert topo_plan.mean_balance < hier.mean_balance
    assert topo_plan.mean_remote_nodes <= hier.mean_remote_nodes


def test_options_checked():
    w = np.ones((1, 16))
    with pytest.raises(FieldError, match="^remote_cost:"):
        rebalance_experts(w, 16, 4, 2, 4, algorithm="topology", remote_cost=-1)
    with pytest.raises(FieldError, match="^topk:"):
        rebalance_experts(w, 16, 4, 2, 4, algorithm="topology", topk=0)
    with pytest.raises(FieldError, match="^num_groups:"):
        rebalance_experts(w, 24, 4, 3, 6, algorithm="topology")


def test_movement_aware_topology_keeps_slots():
    rng = np.random.default_rng(3)
    w = rng.zipf(1.5, size=(2, 32)).astype(np.float64)
    first = rebalance_experts(w, 48, 4, 2, 8, algorithm="topology")[0]
    again = rebalance_experts(w, 48, 4, 2, 8, algorithm="topology", previous=first)
    assert np.array_equal(again[0], first)
