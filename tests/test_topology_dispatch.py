"""Routing model and dispatch evaluator: hand-made cases with known answers, determinism."""

import numpy as np
import pytest

from expertplane.benchmarks.dispatch_sim import (RoutingModel, Topology, Trace, drift_popularity,
                                                 generate_trace, simulate_dispatch,
                                                 zipf_popularity)
from expertplane.errors import FieldError
from expertplane.planner import rebalance_experts

TWO_NODES = Topology(num_nodes=2, num_gpus=2)


def _trace(source, ids):
    return Trace(source_gpu=np.array(source, dtype=np.int64),
                 topk_ids=np.array(ids, dtype=np.int64)[None])


def test_single_replicas_known_loads_and_remote_sends():
    # expert 0 on GPU 0 (node 0), expert 1 on GPU 1 (node 1)
    trace = _trace([0, 1, 0, 1], [[0], [0], [1], [0]])
    result = simulate_dispatch(np.array([[0, 1]]), trace, TWO_NODES)
    assert result.gpu_load.tolist() == [[3.0, 1.0]]
    assert result.balance.tolist() == [1.5]
    assert result.remote_nodes.tolist() == [0.75]  # tokens 1, 2, 3 each send to one other node


def test_local_replicas_win():
    # both experts on both nodes: every pair stays on its own node
    trace = _trace([0, 1, 0, 1], [[0], [0], [1], [0]])
    result = simulate_dispatch(np.array([[0, 1, 0, 1]]), trace, TWO_NODES)
    assert result.gpu_load.tolist() == [[2.0, 2.0]]
    assert result.remote_nodes.tolist() == [0.0] and result.balance.tolist() == [1.0]


def test_one_send_per_destination_node():
    # experts 0 and 1 both live only on node 1; a node-0 token choosing both sends one copy
    topo = Topology(num_nodes=2, num_gpus=4)
    trace = _trace([0, 3], [[0, 1], [2, 3]])
    plan = np.array([[2, 3, 2, 3, 0, 1, 0, 1]])  # GPUs 0-1 (node 0): 2, 3; GPUs 2-3: 0, 1
    result = simulate_dispatch(plan, trace, topo)
    assert result.remote_nodes.tolist() == [1.0]
    assert result.gpu_load.sum() == 4


def test_remote_pairs_follow_a_node_already_used():
    # expert 2 has replicas on node 1 and node 2; the token already sends to node 2 for expert 1
    topo = Topology(num_nodes=3, num_gpus=3)
    plan = np.array([[0, 1, 2, 2, 3, 2]])  # GPU0: 0,1  GPU1: 2,2  GPU2: 3,2
    trace = _trace([0], [[3, 2]])
    result = simulate_dispatch(plan, trace, topo)
    assert result.gpu_load.tolist() == [[0.0, 0.0, 2.0]]
    assert result.remote_nodes.tolist() == [1.0]


def test_trace_is_deterministic_and_group_limited():
    model = RoutingModel(num_experts=32, num_groups=8, topk_groups=2, topk=4)
    pop = zipf_popularity(2, 32, 1.2, np.random.default_rng(0))
    a = generate_trace(pop, 200, 4, model, seed=7)
    b = generate_trace(pop, 200, 4, model, seed=7)
    assert np.array_equal(a.topk_ids, b.topk_ids) and np.array_equal(a.source_gpu, b.source_gpu)
    assert not np.array_equal(a.topk_ids, generate_trace(pop, 200, 4, model, seed=8).topk_ids)
    groups = a.topk_ids // 4
    assert all(len(set(row)) <= 2 for row in groups.reshape(-1, 4).tolist())
    assert a.source_gpu.tolist() == [t % 4 for t in range(200)]
    loads = a.expert_loads(32)
    assert loads.shape == (2, 32) and loads.sum() == 2 * 200 * 4


def test_popular_experts_are_chosen_more():
    model = RoutingModel(num_experts=16, num_groups=4, topk_groups=2, topk=2)
    pop = np.tile(1.0 / np.arange(1, 17) ** 2, (1, 1))
    loads = generate_trace(pop, 4000, 2, model, seed=0).expert_loads(16)[0]
    assert loads[0] > 3 * loads[15]
    assert loads[0] == loads.max()


def test_simulation_is_deterministic():
    model = RoutingModel(num_experts=32, num_groups=4, topk_groups=2, topk=4)
    pop = zipf_popularity(2, 32, 1.5, np.random.default_rng(1))
    trace = generate_trace(pop, 256, 8, model, seed=3)
    plan = rebalance_experts(trace.expert_loads(32), 40, 4, 2, 8)
    topo = Topology(2, 8)
    a, b = simulate_dispatch(plan, trace, topo), simulate_dispatch(plan, trace, topo)
    assert np.array_equal(a.gpu_load, b.gpu_load) and np.array_equal(a.remote_nodes, b.remote_nodes)
    assert a.gpu_load.sum() == 2 * 256 * 4


def test_drift_keeps_shape_and_positivity():
    pop = zipf_popularity(3, 16, 1.0, np.random.default_rng(0))
    drifted = drift_popularity(pop, 0.3, np.random.default_rng(1))
    assert drifted.shape == pop.shape and (drifted > 0).all() and not np.allclose(drifted, pop)


def test_bad_inputs_name_the_field():
    with pytest.raises(FieldError, match="^num_gpus:"):
        Topology(num_nodes=3, num_gpus=4)
    with pytest.raises(FieldError, match="^popularity:"):
        generate_trace(np.ones((1, 8)), 10, 2, RoutingModel(num_experts=16, num_groups=4))
    with pytest.raises(FieldError, match="^trace:"):
        simulate_dispatch(np.array([[0, 1]]), _trace([0], [[5]]), TWO_NODES)
    with pytest.raises(FieldError, match="^trace:"):
        simulate_dispatch(np.array([[0, 1]]), _trace([4], [[0]]), TWO_NODES)
