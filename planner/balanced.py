"""``algorithm="balanced"``: EPLB placements closer to the balance lower bound than DeepSeek's greedy.

Same constraints as DeepSeek's EPLB (``planner.deepseek``): hierarchical policy when
``num_groups % num_nodes == 0`` (every expert group on one node, each node ``R / N`` slots on
``P / N`` GPUs), global policy otherwise; GPU ``g`` holds slots ``g*R/P .. (g+1)*R/P - 1``.

Per layer (and node) the problem "n experts, k slots, p GPUs of s = k/p slots" is solved by:

1. replica counts by water-filling (``bounds.water_fill``: least max per-replica load), or for
   s = 2 by a divisor method (priority load / (replicas + shift), shift 0.25 .. 1) where it
   packs better (measured: for s >= 3 it leads the count search to worse optima);
2. packing replicas onto GPUs: longest-processing-time first with s slots per GPU (for s = 2 this
   is the optimal pairing, largest with smallest), then swap local search between the most
   loaded GPU and the others (s >= 3);
3. for s = 2, "two-tier" counts: the h heaviest experts water-filled into one slot of every GPU,
   the rest into the other slot, h searched on a coarse grid then by halving steps;
4. count search against the packing: while it lowers (max GPU load, sum of squared GPU loads),
   move one replica to or from an expert on the most loaded GPU.

Hierarchical policy: the group-to-node assignment minimising the worst node's bound
(``bounds.hierarchical_node_bounds``, exact enumeration for small group counts; ties broken by
the heaviest node's load), else DeepSeek's greedy group packing. Finally every layer keeps the
better of this plan and DeepSeek's, so "balanced" is never worse than "deepseek".
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from expertplane.planner.bounds import (divisor_counts, group_partitions,
                                        hierarchical_node_bounds, water_fill)
from expertplane.planner import numpy_paths
from expertplane.planner.compiled import use_compiled
from expertplane.planner.deepseek import balanced_packing, deepseek_plan, is_hierarchical
from expertplane.planner.interpreted import interpreted
from expertplane.planner.metrics import balance
from expertplane.planner.plan import build_log2phy

_REL = 1e-12  # relative tolerance when comparing loads
_MAX_MOVES = 16  # accepted count changes per row (measured: later ones gain < 1e-4)
# divisor-method starts tried besides water-filling: priority load / (replicas + shift)
_DIVISOR_SHIFTS = (0.25, 0.5, 0.75, 1.0)


@njit(cache=True)
def _sort_by_per_replica(w, counts, order):
    """Insertion-sort ``order`` (expert ids) by w / counts descending, ties by expert id."""
    for i in range(1, order.shape[0]):
        e = order[i]
        v = w[e] / counts[e]
        j = i - 1
        while j >= 0:
            f = order[j]
            u = w[f] / counts[f]
            if u > v or (u == v and f < e):
                break
            order[j + 1] = f
            j -= 1
        order[j + 1] = e


@njit(cache=True)
def _heap_down(key, ids, size, i):
    while True:
        c = 2 * i + 1
        if c >= size:
            return
        if c + 1 < size and (key[c + 1] < key[c] or (key[c + 1] == key[c] and ids[c + 1] < ids[c])):
            c += 1
        if key[c] < key[i] or (key[c] == key[i] and ids[c] < ids[i]):
            key[c], key[i] = key[i], key[c]
            ids[c], ids[i] = ids[i], ids[c]
            i = c
        else:
            return


@njit(cache=True)
def pack_items(item_load, num_gpus, per_gpu, members, gpu_load):
    """Pack items (sorted by load, descending) onto GPUs of ``per_gpu`` slots.

    item_load float64 [k]; fills members int64 [p, s] (item indices) and gpu_load [p].
    """
    k = item_load.shape[0]
    gpu_load[:] = 0.0
    if per_gpu == 2:  # LPT with two slots pairs largest with smallest: optimal
        for g in range(num_gpus):
            members[g, 0] = g
            members[g, 1] = k - 1 - g
            gpu_load[g] = item_load[g] + item_load[k - 1 - g]
        return
    key = np.zeros(num_gpus)
    ids = np.arange(num_gpus)
    fill = np.zeros(num_gpus, dtype=np.int64)
    size = num_gpus
    for i in range(k):
        g = ids[0]
        members[g, fill[g]] = i
        fill[g] += 1
        key[0] += item_load[i]
        gpu_load[g] = key[0]
        if fill[g] == per_gpu:
            size -= 1
            key[0] = key[size]
            ids[0] = ids[size]
        _heap_down(key, ids, size, 0)
    if per_gpu >= 3:
        _swap_search(item_load, members, gpu_load, 8 * num_gpus)


@njit(cache=True)
def _swap_search(item_load, members, gpu_load, max_rounds):
    """Swap items between the most loaded GPU and another while that lowers the pair's max."""
    num_gpus, per_gpu = members.shape
    for _ in range(max_rounds):
        g = np.argmax(gpu_load)
        top = gpu_load[g]
        best, ba, bh, bb = top * (1.0 - _REL), -1, -1, -1
        for a in range(per_gpu):
            la = item_load[members[g, a]]
            for h in range(num_gpus):
                if h == g or gpu_load[h] >= best:
                    continue
                for b in range(per_gpu):
                    d = la - item_load[members[h, b]]
                    if d <= 0.0:
                        continue
                    v = max(top - d, gpu_load[h] + d)
                    if v < best:
                        best, ba, bh, bb = v, a, h, b
        if ba < 0:
            return
        d = item_load[members[g, ba]] - item_load[members[bh, bb]]
        members[g, ba], members[bh, bb] = members[bh, bb], members[g, ba]
        gpu_load[g] -= d
        gpu_load[bh] += d


@njit(cache=True)
def _items(w, counts, order, item_load, item_expert):
    i = 0
    for e in order:
        v = w[e] / counts[e]
        for _ in range(counts[e]):
            item_load[i] = v
            item_expert[i] = e
            i += 1


@njit(cache=True)
def _evaluate(w, counts, order, num_gpus, item_load, item_expert, members, gpu_load,
              resort=False):
    """Items of ``counts`` packed onto the GPUs; returns (max GPU load, sum of squares).

    ``order`` (experts by per-replica load) is updated: fully re-sorted with ``resort`` (many
    counts changed), else by insertion (a few changed)."""
    if resort:
        order[:] = np.argsort(-(w / counts), kind="mergesort")
    else:
        _sort_by_per_replica(w, counts, order)
    _items(w, counts, order, item_load, item_expert)
    pack_items(item_load, num_gpus, members.shape[1], members, gpu_load)
    return gpu_load.max(), (gpu_load * gpu_load).sum()


@njit(cache=True)
def _donor(w, counts, e):
    """Expert (not e, >= 2 replicas) whose per-replica load stays smallest after losing one."""
    best, best_load = -1, np.inf
    for f in range(w.shape[0]):
        if f != e and counts[f] >= 2 and w[f] / (counts[f] - 1) < best_load:
            best, best_load = f, w[f] / (counts[f] - 1)
    return best


@njit(cache=True)
def _recipient(w, counts, e, largest):
    """Expert (not e) with the largest current, or the smallest resulting, per-replica load."""
    best, best_load = -1, 0.0
    for f in range(w.shape[0]):
        if f == e:
            continue
        v = w[f] / counts[f] if largest else -w[f] / (counts[f] + 1)
        if best < 0 or v > best_load:
            best, best_load = f, v
    return best


@njit(cache=True)
def _tier_counts(w, by_load, split, num_gpus, counts):
    """Counts with the ``split`` heaviest experts water-filled into one replica per GPU and
    the others into a second replica per GPU (two slots per GPU)."""
    hot = by_load[:split]
    cold = by_load[split:]
    counts[hot] = water_fill(w[hot], num_gpus)
    counts[cold] = water_fill(w[cold], num_gpus)


@njit(cache=True)
def _two_tier_counts(w, num_gpus, counts, top, sq, order, item_load, item_expert, members,
                     gpu_load):
    """Two slots per GPU: try splitting experts (by load) into a hot tier filling one slot of
    every GPU and a cold tier filling the other; keep the best (max, sum of squares) of these
    and of ``counts`` (updated in place). Coarse grid over the split, then halving steps."""
    n = w.shape[0]
    lo, hi = max(1, n - num_gpus), min(num_gpus, n - 1)
    if lo > hi:
        return top, sq
    by_load = np.argsort(-w, kind="mergesort")
    trial = counts.copy()
    best_split = -1
    step = max(1, (hi - lo) // 8)
    split = lo
    while True:
        _tier_counts(w, by_load, split, num_gpus, trial)
        t, q = _evaluate(w, trial, order, num_gpus, item_load, item_expert, members, gpu_load,
                         True)
        if t < top * (1.0 - _REL) or (t <= top * (1.0 + _REL) and q < sq * (1.0 - _REL)):
            top, sq, best_split = t, q, split
            counts[:] = trial
        if split == hi:
            break
        split = min(hi, split + step)
    centre = best_split
    while step > 1 and centre >= 0:
        step //= 2
        for split in (centre - step, centre + step):
            if split < lo or split > hi:
                continue
            _tier_counts(w, by_load, split, num_gpus, trial)
            t, q = _evaluate(w, trial, order, num_gpus, item_load, item_expert, members, gpu_load,
                         True)
            if t < top * (1.0 - _REL) or (t <= top * (1.0 + _REL) and q < sq * (1.0 - _REL)):
                top, sq, best_split = t, q, split
                counts[:] = trial
        centre = best_split
    return top, sq


@njit(cache=True)
def _solve_row(w, slots, num_gpus, max_moves, out):
    """Place one row: ``w`` float64 [n] loads, ``slots`` replicas on ``num_gpus`` GPUs.

    Writes out int64 [slots]: the expert of each slot, GPU by GPU.
    """
    n = w.shape[0]
    per_gpu = slots // num_gpus
    counts = water_fill(w, slots)
    order = np.arange(n)
    item_load = np.empty(slots)
    item_expert = np.empty(slots, dtype=np.int64)
    members = np.empty((num_gpus, per_gpu), dtype=np.int64)
    gpu_load = np.empty(num_gpus)
    top, sq = _evaluate(w, counts, order, num_gpus, item_load, item_expert, members, gpu_load, True)
    trial = np.empty(n, dtype=np.int64)
    for shift in _DIVISOR_SHIFTS:
        if per_gpu != 2:
            break
        trial[:] = divisor_counts(w, slots, shift)
        t, q = _evaluate(w, trial, order, num_gpus, item_load, item_expert, members, gpu_load,
                         True)
        if t < top * (1.0 - _REL) or (t <= top * (1.0 + _REL) and q < sq * (1.0 - _REL)):
            top, sq = t, q
            counts[:] = trial
    _evaluate(w, counts, order, num_gpus, item_load, item_expert, members, gpu_load, True)
    if per_gpu == 2 and 2 <= n:
        top, sq = _two_tier_counts(w, num_gpus, counts, top, sq, order, item_load, item_expert,
                                   members, gpu_load)
        _evaluate(w, counts, order, num_gpus, item_load, item_expert, members, gpu_load, True)
    for _ in range(max_moves):
        g = np.argmax(gpu_load)
        tried = np.zeros(n, dtype=np.bool_)
        moved = False
        for j in range(per_gpu):
            e = item_expert[members[g, j]]
            if tried[e]:
                continue
            tried[e] = True
            for kind in range(3):
                if kind == 0:  # e gets a replica from the expert that suffers least
                    other = _donor(w, counts, e)
                    give, take = e, other
                else:  # e gives a replica to the smallest (kind 1) or largest (kind 2) splitter
                    if counts[e] < 2:
                        continue
                    other = _recipient(w, counts, e, kind == 2)
                    give, take = other, e
                if other < 0:
                    continue
                counts[give] += 1
                counts[take] -= 1
                new_top, new_sq = _evaluate(w, counts, order, num_gpus, item_load, item_expert,
                                            members, gpu_load)
                if new_top < top * (1.0 - _REL) or (new_top <= top * (1.0 + _REL)
                                                     and new_sq < sq * (1.0 - _REL)):
                    top, sq, moved = new_top, new_sq, True
                    break
                counts[give] -= 1
                counts[take] += 1
            if moved:
                break
        if not moved:  # (after an accepted move the buffers hold its packing)
            break
    # re-evaluate the accepted counts (the last rejected trial overwrote the buffers)
    _evaluate(w, counts, order, num_gpus, item_load, item_expert, members, gpu_load, True)
    for g in range(num_gpus):
        for j in range(per_gpu):
            out[g * per_gpu + j] = item_expert[members[g, j]]


@njit(cache=True, parallel=True)
def _solve_rows(weight, slots, num_gpus, max_moves):
    """weight float64 [X, n] -> int64 [X, slots] row-local expert of each slot, GPU by GPU."""
    rows = weight.shape[0]
    out = np.empty((rows, slots), dtype=np.int64)
    for r in prange(rows):
        _solve_row(weight[r], slots, num_gpus, max_moves, out[r])
    return out


def pack_rows(weight: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
    """Balanced placement of each row's experts on ``num_gpus`` GPUs with ``num_slots`` slots.

    weight: float64 [X, n] loads (n <= num_slots, num_slots divisible by num_gpus).
    Returns int64 [X, num_slots]: the (row-local) expert held by each slot, GPU g owning slots
    g*s .. (g+1)*s - 1 with s = num_slots / num_gpus.
    """
    w = np.ascontiguousarray(weight, dtype=np.float64)
    if use_compiled():
        return _solve_rows(w, int(num_slots), int(num_gpus), _MAX_MOVES)
    solve = interpreted(_solve_rows, pack_items=numpy_paths.pack_items,
                        _sort_by_per_replica=numpy_paths.sort_by_per_replica,
                        _items=numpy_paths.replica_items, _donor=numpy_paths.donor,
                        _recipient=numpy_paths.recipient)
    return solve(w, int(num_slots), int(num_gpus), _MAX_MOVES)


def _group_to_node(weight, num_replicas, num_groups, num_nodes, num_gpus) -> np.ndarray:
    """[L, G] node of each group: best bound assignment (heaviest node breaks ties), or
    DeepSeek's greedy group packing when the assignments are too many to enumerate."""
    layers = weight.shape[0]
    group_loads = weight.reshape(layers, num_groups, -1).sum(-1)
    found = hierarchical_node_bounds(weight, num_replicas, num_groups, num_nodes, num_gpus)
    if found is None:
        return balanced_packing(group_loads.astype(np.float32), num_nodes)[0]
    _, _, per_block = found
    blocks, partitions = group_partitions(num_groups, num_nodes)
    worst = per_block[:, partitions].max(-1)  # [L, K]
    block_load = group_loads[:, blocks].sum(-1)  # [L, B]
    heaviest = block_load[:, partitions].max(-1)  # [L, K]
    best_worst = worst.min(-1, keepdims=True)
    candidates = np.where(worst <= best_worst * (1 + 1e-9), heaviest, np.inf)
    choice = candidates.argmin(-1)
    node_of = np.empty((layers, num_groups), dtype=np.int64)
    chosen_blocks = blocks[partitions[choice]]  # [L, N, G/N]
    node_ids = np.broadcast_to(np.arange(num_nodes)[None, :, None], chosen_blocks.shape)
    np.put_along_axis(node_of, chosen_blocks.reshape(layers, -1), node_ids.reshape(layers, -1), 1)
    return node_of


def _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus) -> np.ndarray:
    layers, experts = weight.shape
    group_size = experts // num_groups
    node_of = _group_to_node(weight, num_replicas, num_groups, num_nodes, num_gpus)
    # node experts in order: groups sorted by node (stable), experts inside a group in order
    group_order = np.argsort(node_of, axis=1, kind="stable")  # [L, G]
    node_experts = (group_order[:, :, None] * group_size + np.arange(group_size)).reshape(
        layers, num_nodes, experts // num_nodes)
    rows = np.take_along_axis(weight, node_experts.reshape(layers, -1), 1)
    local = pack_rows(rows.reshape(layers * num_nodes, -1), num_replicas // num_nodes,
                      num_gpus // num_nodes).reshape(layers, num_nodes, -1)
    return np.take_along_axis(node_experts, local, 2).reshape(layers, num_replicas)


def rebalance_balanced(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                       num_gpus: int) -> np.ndarray:
    """Balanced placement phy2log int64 [L, R] for validated loads ``weight`` [L, E].

    Arguments as for ``rebalance_experts`` (validated by the caller). Per layer the result's
    balance (max / mean GPU load) is never worse than DeepSeek's EPLB on the same input.
    """
    w = np.ascontiguousarray(weight, dtype=np.float64)
    r, g, n, p = int(num_replicas), int(num_groups), int(num_nodes), int(num_gpus)
    if is_hierarchical(g, n):
        ours = _hierarchical(w, r, g, n, p)
    else:
        ours = pack_rows(w, r, p)
    theirs = deepseek_plan(w, r, g, n, p)[0]
    experts = w.shape[1]
    ours_balance = balance(w, ours, build_log2phy(ours, experts)[1], p)
    theirs_balance = balance(w, theirs, build_log2phy(theirs, experts)[1], p)
    keep_theirs = theirs_balance < ours_balance
    return np.where(keep_theirs[:, None], theirs, ours)
