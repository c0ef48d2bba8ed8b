"""planner.numpy_paths and planner.interpreted give what the compiled kernels give: kernel by
kernel on loads full of ties (where the order of operations decides), and whole plans of every
algorithm at DeepSeek-V3 scale (topology also movement-aware)."""

from __future__ import annotations

import numpy as np
import pytest

from expertplane.planner import balanced, bounds, deepseek, numpy_paths, topology
from expertplane.planner.compiled import forced_mode
from expertplane.planner.deepseek import balanced_packing, group_sums
from expertplane.planner.eplb import rebalance_experts
from expertplane.planner.interpreted import interpreted
from expertplane.planner.numpy_paths import (divisor_counts_rows, fill_layers, node_bounds_rows,
                                             pack_in_order, replicate_greedy)


def _tied(rng, shape, dtype):
    """Zipf loads (many equal small values) with some zeros."""
    w = rng.zipf(1.3, shape).astype(dtype)
    w[rng.random(shape) < 0.05] = 0
    return w


@pytest.mark.parametrize("n, packs", [(8, 4), (72, 8), (256, 4), (40, 8)])
def test_sort_and_packing_match_the_kernels(n, packs):
    rng = np.random.default_rng(n)
    w = _tied(rng, (12, n), np.float32)
    order = interpreted(deepseek._descending_order)(w)
    np.testing.assert_array_equal(order, deepseek._descending_order(w))
    for got, want in zip(pack_in_order(w, order, packs), deepseek._pack_kernel(w, order, packs)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("experts, slots", [(64, 72), (256, 288), (16, 16), (10, 33)])
def test_replication_matches_the_kernel(experts, slots):
    w = _tied(np.random.default_rng(slots), (9, experts), np.float32)
    for got, want in zip(replicate_greedy(w, slots), deepseek._replicate_kernel(w, slots)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("nodes, free, remote_cost", [(4, 8, 0.1), (2, 5, 0.0), (3, 2, 2.0)])
def test_topology_fill_matches_the_kernel(nodes, free, remote_cost):
    rng = np.random.default_rng(nodes * 10 + free)
    groups, experts = 2 * nodes, 16 * nodes
    w = _tied(rng, (7, experts), np.float64)
    w[0] = 0.0                                            # an all-zero layer
    group_node, _ = balanced_packing(group_sums(w.astype(np.float32), groups), nodes)
    home = np.repeat(group_node, experts // groups, axis=1)
    got = fill_layers(w, home, nodes, free, 4, remote_cost, 8.0)
    want = np.stack([topology._fill_layer(w[i], home[i], nodes, free, 4, remote_cost, 8.0)
                     for i in range(w.shape[0])])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shift", [0.0, 0.25, 1.0])
def test_divisor_counts_and_node_bounds_match_the_kernels(shift):
    rng = np.random.default_rng(int(shift * 4))
    for rows, slots, gpus in (((40, 64), 72, 8), ((6, 10), 20, 10), ((9, 12), 40, 4)):
        w = _tied(rng, rows, np.float64)
        w[0] = 0.0
        want = np.stack([bounds.divisor_counts(row, slots, shift) for row in w])
        np.testing.assert_array_equal(divisor_counts_rows(w, slots, shift), want)
        np.testing.assert_array_equal(node_bounds_rows(w, slots, gpus),
                                      bounds._node_bounds(w, slots, gpus))


@pytest.mark.parametrize("gpus, per_gpu", [(8, 9), (16, 2), (4, 3), (6, 1)])
def test_balanced_leaves_match_the_kernels(gpus, per_gpu):
    rng = np.random.default_rng(gpus * per_gpu)
    for trial in range(20):
        experts = max(2, gpus * per_gpu - int(rng.integers(0, gpus)))
        w = _tied(rng, (experts,), np.float64)
        counts = bounds.water_fill(w, gpus * per_gpu)
        if trial % 2:                                    # counts a search may try
            counts = bounds.divisor_counts(w, gpus * per_gpu, 0.5)
        outs = []
        for sort, items, pack in ((balanced._sort_by_per_replica, balanced._items,
                                   balanced.pack_items),
                                  (numpy_paths.sort_by_per_replica, numpy_paths.replica_items,
                                   numpy_paths.pack_items)):
            order = rng.permutation(experts) if not outs else outs[0][0].copy()[::-1].copy()
            sort(w, counts, order)
            item_load, item_expert = np.empty(gpus * per_gpu), np.empty(gpus * per_gpu, np.int64)
            items(w, counts, order, item_load, item_expert)
            members, gpu_load = np.empty((gpus, per_gpu), np.int64), np.empty(gpus)
            pack(item_load, gpus, per_gpu, members, gpu_load)
            outs.append((order, item_load, item_expert, members, gpu_load))
        for got, want in zip(outs[1], outs[0]):
            np.testing.assert_array_equal(got, want)
        e = int(rng.integers(0, experts))
        assert numpy_paths.donor(w, counts, e) == balanced._donor(w, counts, e)
        for largest in (True, False):
            assert numpy_paths.recipient(w, counts, e, largest) == \
                balanced._recipient(w, counts, e, largest)


# 8 groups on 4 nodes: hierarchical policy; on 3 nodes: global (topology is hierarchical only)
@pytest.mark.parametrize("algorithm, nodes", [("deepseek", 4), ("deepseek", 3), ("balanced", 4),
                                              ("balanced", 3), ("topology", 4)])
def test_whole_plans_match_at_deepseek_v3_scale(algorithm, nodes):
    w = np.random.default_rng(0).zipf(1.2, (58, 256)).astype(np.float64)
    gpus = 8 * nodes
    replicas = 288 if nodes == 4 else 264
    plans = {}
    for mode in ("numpy", "numba"):
        with forced_mode(mode):
            plans[mode] = [t.numpy() for t in rebalance_experts(w, replicas, 8, nodes, gpus,
                                                                algorithm=algorithm)]
    for got, want in zip(plans["numpy"], plans["numba"]):
        np.testing.assert_array_equal(got, want)


def test_movement_aware_topology_matches_the_kernels():
    # topology re-plans are aligned fresh plans: alignment's kernels run interpreted
    w = np.random.default_rng(2).zipf(1.2, (12, 256)).astype(np.float64)
    drifted = w * np.exp(np.random.default_rng(3).normal(0.0, 0.3, w.shape))
    plans = {}
    for mode in ("numpy", "numba"):
        with forced_mode(mode):
            first = rebalance_experts(w, 288, 8, 4, 32, algorithm="topology")[0].numpy()
            plans[mode] = rebalance_experts(drifted, 288, 8, 4, 32, algorithm="topology",
                                            previous=first)[0].numpy()
    np.testing.assert_array_equal(plans["numpy"], plans["numba"])
    assert (plans["numba"] != first).any()
