"""``algorithm="topology"``: hierarchical placement plus cross-node replicas of hot experts.

Start from DeepSeek's hierarchical layout: expert groups are packed onto nodes and every expert
keeps one replica on its group's ("home") node, so node-limited routing keeps its locality.
The remaining ``R - E`` redundant slots are then filled one at a time, each with the (expert,
node) pair that most lowers

    J = softmax_q(predicted GPU loads) / mean GPU load + remote_cost * remote sends per token

where the prediction follows the workers' replica-choice rule (``kernels.replica_choice``):
tokens start evenly on all nodes; a token whose node holds replicas of its expert uses those
(split evenly), and the tokens of nodes without one are spread evenly over all the expert's
replicas. A replica of a hot expert on a foreign node thus takes that node's share of the
expert's tokens off the home node and turns those remote sends into local ones.
``softmax_q`` is the q-norm (q = 16) over the node loads per GPU (weighted by GPUs per node)
and the per-replica loads: a smooth stand-in for the maximum, so every step sees a gradient.
Finally each node's replicas are packed onto its GPUs (DeepSeek's balanced packing with the
predicted replica loads); phy2log lists node 0's slots first, as everywhere.

``remote_cost`` (>= 0) is the price of one predicted remote send per token in units of
max/mean GPU load: 0 buys balance only; large values put redundant replicas where they save
the most remote sends (the hottest experts, on every node).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from expertplane.errors import FieldError
from expertplane.planner.compiled import use_compiled
from expertplane.planner.deepseek import group_sums, balanced_packing, is_hierarchical
from expertplane.planner.numpy_paths import fill_layers
from expertplane.planner.topology_score import norm_change, power_q, replica_load

DEFAULT_REMOTE_COST = 0.1

_replica_load = njit(cache=True)(replica_load)
_power_q = njit(cache=True)(power_q)
_norm_change = njit(cache=True)(norm_change)


@njit(cache=True)
def _fill_layer(w, home, num_nodes, free_per_node, gpus_per_node, remote_cost, topk):
    """Greedy fill of one layer's redundant slots. Returns replica counts int64 [E, N]."""
    num_experts = w.shape[0]
    f = 1.0 / num_nodes
    total = w.sum()
    mu = total / (num_nodes * gpus_per_node)
    if mu <= 0.0:
        mu = 1.0
    scale_remote = remote_cost * topk / total if total > 0.0 else 0.0
    count = np.zeros((num_experts, num_nodes), dtype=np.int64)
    total_count = np.ones(num_experts)
    absent = np.full(num_experts, (num_nodes - 1) * f)
    node_load = np.zeros(num_nodes)
    for e in range(num_experts):
        count[e, home[e]] = 1
        node_load[home[e]] += w[e]
    phi = 0.0
    for n in range(num_nodes):
        phi += gpus_per_node * _power_q(node_load[n] / (gpus_per_node * mu))
    for e in range(num_experts):
        phi += _power_q(w[e] / mu)
    free = np.full(num_nodes, free_per_node, dtype=np.int64)
    delta_node = np.zeros(num_nodes)
    for _ in range(num_nodes * free_per_node):
        best_score = np.inf
        best_e, best_n = -1, -1
        best_dphi = 0.0
        for n in range(num_nodes):
            if free[n] == 0:
                continue
            for e in range(num_experts):
                new_absent = absent[e] - f if count[e, n] == 0 else absent[e]
                new_total = total_count[e] + 1.0
                dphi = 0.0
                for m in range(num_nodes):
                    old_c = count[e, m]
                    new_c = old_c + 1 if m == n else old_c
                    delta_node[m] = 0.0
                    if new_c == 0:
                        continue
                    new_x = _replica_load(w[e], f, new_c, new_absent, new_total)
                    dphi += new_c * _power_q(new_x / mu)
                    delta_node[m] = new_c * new_x
                    if old_c > 0:
                        old_x = _replica_load(w[e], f, old_c, absent[e], total_count[e])
                        dphi -= old_c * _power_q(old_x / mu)
                        delta_node[m] -= old_c * old_x
                for m in range(num_nodes):
                    if delta_node[m] != 0.0:
                        dphi += gpus_per_node * (
                            _power_q((node_load[m] + delta_node[m]) / (gpus_per_node * mu))
                            - _power_q(node_load[m] / (gpus_per_node * mu)))
                base = max(phi, 1e-300)
                ratio = max(dphi / base, -1.0 + 1e-15)
                score = _norm_change(base, ratio)
                if count[e, n] == 0:
                    score -= scale_remote * w[e] * f
                if score < best_score:
                    best_score, best_e, best_n, best_dphi = score, e, n, dphi
        e, n = best_e, best_n
        new_absent = absent[e] - f if count[e, n] == 0 else absent[e]
        for m in range(num_nodes):
            old_c = count[e, m]
            if old_c > 0:
                node_load[m] -= old_c * _replica_load(w[e], f, old_c, absent[e], total_count[e])
        count[e, n] += 1
        total_count[e] += 1.0
        absent[e] = new_absent
        for m in range(num_nodes):
            new_c = count[e, m]
            if new_c > 0:
                node_load[m] += new_c * _replica_load(w[e], f, new_c, absent[e], total_count[e])
        phi += best_dphi
        free[n] -= 1
    return count


def predicted_replica_loads(weight: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float64 [L, E, N]: predicted load of ONE replica of expert e on node n (0 where absent).

    weight [L, E]; counts [L, E, N] replicas of each expert per node (model: module docstring).
    """
    num_nodes = counts.shape[2]
    f = 1.0 / num_nodes
    total = counts.sum(-1, keepdims=True)
    absent = (counts == 0).sum(-1, keepdims=True) * f
    w = weight[:, :, None]
    per = w * f / np.maximum(counts, 1) + w * absent / total
    return np.where(counts > 0, per, 0.0)


def rebalance_topology(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                       num_gpus: int, *, remote_cost: float = DEFAULT_REMOTE_COST,
                       topk: int = 8) -> np.ndarray:
    """Topology-aware placement on validated inputs: phy2log int64 [L, R].

    weight: float64 [L, E] loads. Needs the hierarchical policy (num_groups % num_nodes == 0).
    remote_cost: price of one predicted remote send per token, in units of max/mean GPU load.
    topk: experts per token, to convert remote token-expert pairs into sends per token.
    """
    if not is_hierarchical(num_groups, num_nodes):
        raise FieldError("num_groups", f"topology placement starts from the hierarchical "
                                           f"policy: needs a multiple of num_nodes "
                                           f"({num_nodes}), got {num_groups}")
    remote_cost = float(remote_cost)
    if not np.isfinite(remote_cost) or remote_cost < 0:
        raise FieldError("remote_cost", f"must be finite and >= 0, got {remote_cost}")
    if int(topk) < 1:
        raise FieldError("topk", f"must be >= 1, got {topk}")
    weight = np.asarray(weight, dtype=np.float64)
    layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    gpus_per_node = num_gpus // num_nodes
    slots_per_node = num_replicas // num_nodes
    free_per_node = slots_per_node - num_experts // num_nodes

    group_node, _ = balanced_packing(group_sums(weight.astype(np.float32), num_groups), num_nodes)
    home = np.repeat(group_node, group_size, axis=1)                      # [L, E]
    if use_compiled():
        counts = np.stack([
            _fill_layer(weight[layer], home[layer], num_nodes, free_per_node, gpus_per_node,
                        remote_cost, float(topk))
            for layer in range(layers)])                                  # [L, E, N]
    else:
        counts = fill_layers(weight, home, num_nodes, free_per_node, gpus_per_node,
                             remote_cost, float(topk))

    # each node's slots: its replicas in expert order, then packed onto the node's GPUs
    per_node = counts.transpose(0, 2, 1).reshape(layers * num_nodes, num_experts)
    experts = np.repeat(np.tile(np.arange(num_experts), layers * num_nodes),
                        per_node.ravel()).reshape(layers * num_nodes, slots_per_node)
    loads = predicted_replica_loads(weight, counts).transpose(0, 2, 1).reshape(
        layers * num_nodes, num_experts)
    item_load = np.take_along_axis(loads, experts, 1)
    gpu, rank = balanced_packing(item_load, gpus_per_node)
    position = gpu * (slots_per_node // gpus_per_node) + rank
    placed = np.empty_like(experts)
    np.put_along_axis(placed, position, experts, 1)
    return placed.reshape(layers, num_replicas)
