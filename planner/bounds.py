"""Lower bounds on the balance (max GPU load / mean GPU load) any valid placement can reach.

Definitions (loads in the caller's units; "slots" are physical expert replicas):

* ``m*(w, k)``: the smallest achievable largest per-replica load when the ``n`` experts with
  loads ``w`` share ``k >= n`` replicas (each expert >= 1 replica, load split evenly). Greedy
  water-filling (each extra replica to the expert with the largest load per replica) is exact.
* the slot bound: a plan whose largest replica load is ``X`` (necessarily ``X >= m*``) gives
  every expert at least ``ceil(w_e / X)`` replicas, so at most ``spare(X) = k - sum_e
  max(1, ceil(w_e / X))`` replicas are left to split any expert further, and its smallest
  replica load is at least ``h(X) = min_e w_e / (max(1, ceil(w_e / X)) + spare(X))``. The GPU
  holding the largest replica holds ``s - 1`` more (``s`` slots per GPU), so its load is at least
  ``X + (s - 1) h(X)``. ``h`` only changes where some ``ceil(w_e / X)`` does, i.e. at
  ``X = w_e / c``, so the minimum over ``X`` is taken over ``m*`` and those values (exact, O(k n)).
  With one slot per GPU it is ``m*``: the "smallest achievable max per-replica load".
* global policy: the mean is a lower bound on the max, so ``max GPU load >= max(W / P,
  slot bound(w, R, s))``.
* hierarchical policy (``num_groups % num_nodes == 0``): every expert group lives on one node, and
  a node owns ``R / N`` slots on ``P / N`` GPUs. For one group-to-node assignment the worst node
  forces ``max over nodes of max(node load / (P / N), slot bound(node's experts, R / N, s))``; the bound is the
  best (smallest) value over all assignments, enumerated exactly while there are at most
  ``MAX_PARTITIONS`` of them. Beyond that the bound relaxes to the assignment-free
  ``max(W / P, slot bound(w, R, s), (heaviest group + lightest G/N - 1 other groups) / (P / N))``, which
  every assignment satisfies, so it stays a valid (weaker) bound.

``lower_bound`` divides by the mean GPU load ``W / P`` (1.0 for an all-zero layer).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from math import comb, factorial

import numpy as np
from numba import njit, prange

from expertplane.planner.compiled import use_compiled
from expertplane.planner.numpy_paths import node_bounds_rows

MAX_PARTITIONS = 20000


@njit(cache=True)
def _before(key, ids, a, b):
    """Heap order: larger key first, then lower id."""
    return key[a] > key[b] or (key[a] == key[b] and ids[a] < ids[b])


@njit(cache=True)
def _sift_down(key, ids, size, i):
    """Restore the max-heap below position i (arrays key float64, ids int64, first ``size``)."""
    while True:
        c = 2 * i + 1
        if c >= size:
            return
        if c + 1 < size and _before(key, ids, c + 1, c):
            c += 1
        if not _before(key, ids, c, i):
            return
        key[c], key[i] = key[i], key[c]
        ids[c], ids[i] = ids[i], ids[c]
        i = c


@njit(cache=True)
def water_fill(w, slots):
    """Replica counts int64 [n] minimising max(w / counts) for float64 loads ``w`` [n] and
    ``slots >= n`` replicas (greedy: each extra replica to the largest load per replica, the
    lowest index on ties; a binary max-heap, O(slots log n))."""
    return divisor_counts(w, slots, 0.0)


@njit(cache=True)
def divisor_counts(w, slots, shift):
    """Replica counts int64 [n] by the divisor method: each extra replica to the largest
    w / (counts + shift) (lowest index on ties). ``shift`` 0 is ``water_fill``; 0.5 is Webster's
    rounding: counts closer to proportional, no longer minimising the max."""
    n = w.shape[0]
    counts = np.ones(n, dtype=np.int64)
    key = w / (1.0 + shift)
    ids = np.arange(n)
    for start in range(n // 2 - 1, -1, -1):  # heapify
        _sift_down(key, ids, n, start)
    for _ in range(slots - n):
        e = ids[0]
        counts[e] += 1
        key[0] = w[e] / (counts[e] + shift)
        _sift_down(key, ids, n, 0)
    return counts


@njit(cache=True, inline="always")
def _replicas_needed(load, x):
    """max(1, ceil(load / x)), rounding ratios within 1e-9 of an integer down: x = w / c must
    need c replicas, not c + 1 (a smaller count only weakens the bound, never breaks it)."""
    return max(1, int(np.ceil(load / x - 1e-9)))


@njit(cache=True)
def _slot_bound(w, slots, per_gpu):
    """min over X >= m* of X + (per_gpu - 1) * h(X) for one row (see module docstring)."""
    n = w.shape[0]
    counts = water_fill(w, slots)
    m_star = 0.0
    for e in range(n):
        m_star = max(m_star, w[e] / counts[e])
    if per_gpu == 1 or m_star == 0.0:
        return m_star
    best = np.inf
    for f in range(-1, n):
        top_c = 1 if f < 0 else int(np.ceil(w[f] / m_star))
        for c in range(1, top_c + 1):
            x = m_star if f < 0 else w[f] / c
            if x < m_star or x >= best:
                continue
            needed = 0
            for e in range(n):
                needed += _replicas_needed(w[e], x)
            spare = slots - needed
            if spare < 0:
                continue
            low = np.inf
            for e in range(n):
                low = min(low, w[e] / (_replicas_needed(w[e], x) + spare))
            best = min(best, x + (per_gpu - 1) * low)
    return best


@njit(cache=True, parallel=True)
def _node_bounds(rows, slots, gpus):
    """rows float64 [X, n] -> [X] max(row load / gpus, slot bound)."""
    out = np.empty(rows.shape[0])
    for r in prange(rows.shape[0]):
        out[r] = max(rows[r].sum() / gpus, _slot_bound(rows[r], slots, slots // gpus))
    return out


def node_bounds(rows: np.ndarray, slots: int, gpus: int) -> np.ndarray:
    """Least achievable max GPU load of each row's experts on ``gpus`` GPUs with ``slots`` slots.

    rows: float64 [X, n] expert loads (n <= slots). Returns float64 [X] (load units).
    """
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    if use_compiled():
        return _node_bounds(rows, int(slots), int(gpus))
    return node_bounds_rows(rows, int(slots), int(gpus))


def partition_count(num_groups: int, num_nodes: int) -> int:
    """Number of ways to split ``num_groups`` groups into ``num_nodes`` unlabeled equal blocks."""
    size = num_groups // num_nodes
    return factorial(num_groups) // (factorial(size) ** num_nodes * factorial(num_nodes))


@lru_cache(maxsize=32)
def group_partitions(num_groups: int, num_nodes: int) -> tuple[np.ndarray, np.ndarray] | None:
    """All splits of the groups into equal node blocks, or None if more than MAX_PARTITIONS.

    Returns (blocks int64 [B, G/N]: every G/N-subset of groups, sorted; partitions int64
    [K, N]: the block ids of each split, the block holding group 0 first).
    """
    size = num_groups // num_nodes
    if partition_count(num_groups, num_nodes) > MAX_PARTITIONS:
        return None
    blocks = list(combinations(range(num_groups), size))
    block_id = {b: i for i, b in enumerate(blocks)}
    parts: list[list[int]] = []

    def extend(remaining: tuple[int, ...], chosen: list[int]) -> None:
        if not remaining:
            parts.append(list(chosen))
            return
        head, rest = remaining[0], remaining[1:]
        for others in combinations(rest, size - 1):
            block = (head, *others)
            extend(tuple(g for g in rest if g not in others), chosen + [block_id[block]])

    extend(tuple(range(num_groups)), [])
    assert len(blocks) == comb(num_groups, size)
    return np.array(blocks, dtype=np.int64), np.array(parts, dtype=np.int64).reshape(-1, num_nodes)


def block_rows(weight: np.ndarray, blocks: np.ndarray, num_groups: int) -> np.ndarray:
    """weight [L, E] -> [L, B, E/N] the loads of each block's experts (its groups in order)."""
    layers, experts = weight.shape
    grouped = weight.reshape(layers, num_groups, experts // num_groups)
    return grouped[:, blocks, :].reshape(layers, blocks.shape[0], -1)


def hierarchical_node_bounds(weight, num_replicas, num_groups, num_nodes, num_gpus):
    """Per-layer best assignment's worst-node bound.

    Returns (bound float64 [L] in load units, partition index int64 [L] of the best assignment,
    per-block bounds float64 [L, B]), or None when the assignments are too many to enumerate.
    """
    parts = group_partitions(int(num_groups), int(num_nodes))
    if parts is None:
        return None
    blocks, partitions = parts
    rows = block_rows(weight, blocks, num_groups)
    layers, num_blocks, _ = rows.shape
    per_block = node_bounds(rows.reshape(layers * num_blocks, -1), num_replicas // num_nodes,
                            num_gpus // num_nodes).reshape(layers, num_blocks)
    worst = per_block[:, partitions].max(-1)  # [L, K]
    best = worst.argmin(-1)
    return worst[np.arange(layers), best], best, per_block


def _relaxed_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus) -> np.ndarray:
    layers, experts = weight.shape
    group_loads = np.sort(weight.reshape(layers, num_groups, -1).sum(-1), axis=1)
    per_node = num_groups // num_nodes
    heaviest_node = group_loads[:, -1] + group_loads[:, : per_node - 1].sum(-1)
    return np.maximum(node_bounds(weight, num_replicas, num_gpus),
                      heaviest_node / (num_gpus // num_nodes))


def lower_bound(weight, num_replicas, num_groups, num_nodes, num_gpus,
                hierarchical: bool) -> np.ndarray:
    """Lower bound [L] on max GPU load / mean GPU load of any valid plan (see module docstring).

    weight: float [L, E] non-negative loads (validated); the other arguments as for
    ``rebalance_experts``; ``hierarchical`` selects the policy's constraints.
    """
    w = np.ascontiguousarray(weight, dtype=np.float64)
    r, g, n, p = int(num_replicas), int(num_groups), int(num_nodes), int(num_gpus)
    if hierarchical:
        exact = hierarchical_node_bounds(w, r, g, n, p)
        load = exact[0] if exact is not None else _relaxed_hierarchical(w, r, g, n, p)
    else:
        load = node_bounds(w, r, p)
    mean = w.sum(-1) / p
    out = np.ones(w.shape[0])
    nz = mean > 0
    out[nz] = load[nz] / mean[nz]
    return out
