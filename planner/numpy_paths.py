"""numpy versions of the planner's compiled kernels, for a process whose kernels are still being
built (``planner.compiled``). Each computes exactly what the kernel named in its docstring
computes, in the same order of floating-point operations: vectorised over rows (layers, or
layers x nodes) where the kernel loops over them, or, for the inner steps of ``balanced``'s
per-row search (run by ``planner.interpreted``), over one row's items. ``tests/test_numpy_paths.py``
checks them against the kernels.
"""

from __future__ import annotations

import heapq

import numpy as np

from expertplane.planner.topology_score import norm_change, power_q, replica_load


def pack_in_order(weight: np.ndarray, order: np.ndarray, num_packs: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``deepseek._pack_kernel``: each row's items, visited in ``order``, each to the non-full
    pack with the least float32 load (lowest pack on ties), n / num_packs items per pack.

    weight float32 [X, n]; order int64 [X, n]. Returns (pack_index, rank_in_pack) int64 [X, n].
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    r = np.arange(rows)
    pack_index = np.empty((rows, n), dtype=np.int64)
    rank_in_pack = np.empty((rows, n), dtype=np.int64)
    load = np.zeros((rows, num_packs), dtype=np.float32)
    count = np.zeros((rows, num_packs), dtype=np.int64)
    for j in range(n):
        item = order[:, j]
        best = np.where(count < per_pack, load, np.float32(np.inf)).argmin(1)
        pack_index[r, item] = best
        rank_in_pack[r, item] = count[r, best]
        load[r, best] = load[r, best] + weight[r, item]
        count[r, best] += 1
    return pack_index, rank_in_pack


def replicate_greedy(weight: np.ndarray, num_phy: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``deepseek._replicate_kernel``: slots beyond one per expert go, one at a time, to the
    expert with the largest float32 load per replica (lowest expert on ties).

    weight float32 [X, E]. Returns (phy2log [X, num_phy], rank [X, num_phy], logcnt [X, E]) int64.
    """
    rows, num_log = weight.shape
    r = np.arange(rows)
    phy2log = np.empty((rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    per_replica = weight.copy()
    for slot in range(num_log, num_phy):
        best = per_replica.argmax(1)
        phy2log[:, slot] = best
        rank[:, slot] = logcnt[r, best]
        logcnt[r, best] += 1
        per_replica[r, best] = weight[r, best] / logcnt[r, best].astype(np.float32)
    return phy2log, rank, logcnt



def _expert_terms(w, f, here, absent, total_count, mu):
    """The part of ``topology._fill_layer``'s dphi that depends on one expert only, and each
    node's load change, for every candidate node of K experts per layer.

    w, absent, total_count: float64 [L, 1, K]; here: int64 [L, M, K] replicas of each expert on
    each node; mu [L, 1, 1]. Returns (dphi [L, N, K], delta [L, M, N, K]) for a new replica on
    candidate node N = M.
    """
    layers, num_nodes, k = here.shape
    candidate = np.arange(num_nodes)[None, :, None]
    new_absent = np.where(here == 0, absent - f, absent)
    new_total = total_count + 1.0
    dphi = np.zeros((layers, num_nodes, k))
    delta = np.zeros((layers, num_nodes, num_nodes, k))
    for m in range(num_nodes):
        old_c = here[:, m:m + 1, :]
        new_c = old_c + (candidate == m)
        live = new_c != 0
        new_x = replica_load(w, f, np.maximum(new_c, 1), new_absent, new_total)
        dphi = np.where(live, dphi + new_c * power_q(new_x / mu), dphi)
        delta[:, m] = np.where(live, new_c * new_x, 0.0)
        had = old_c > 0
        old_x = replica_load(w, f, np.maximum(old_c, 1), absent, total_count)
        dphi = np.where(had, dphi - old_c * power_q(old_x / mu), dphi)
        delta[:, m] = np.where(had, delta[:, m] - old_c * old_x, delta[:, m])
    return dphi, delta


def fill_layers(weight: np.ndarray, home: np.ndarray, num_nodes: int, free_per_node: int,
                gpus_per_node: int, remote_cost: float, topk: float) -> np.ndarray:
    """``topology._fill_layer`` for every layer at once: the greedy fill of the redundant
    slots, each step scoring every (node, expert) pair and taking the first best. The terms of
    one expert are recomputed only when that expert got a replica.

    weight float64 [L, E] loads; home int64 [L, E] node of each expert's group. Returns replica
    counts int64 [L, E, N].
    """
    layers, num_experts = weight.shape
    lr = np.arange(layers)
    f = 1.0 / num_nodes
    total = np.cumsum(weight, axis=1)[:, -1]             # summed in expert order, as the kernel
    mu = total / (num_nodes * gpus_per_node)
    mu = np.where(mu <= 0.0, 1.0, mu)
    safe_total = np.where(total > 0.0, total, 1.0)
    scale_remote = np.where(total > 0.0, remote_cost * topk / safe_total, 0.0)
    count = np.zeros((layers, num_experts, num_nodes), dtype=np.int64)
    total_count = np.ones((layers, num_experts))
    absent = np.full((layers, num_experts), (num_nodes - 1) * f)
    node_load = np.zeros((layers, num_nodes))
    for e in range(num_experts):
        count[lr, e, home[:, e]] = 1
        node_load[lr, home[:, e]] += weight[:, e]
    unit = gpus_per_node * mu
    phi = np.zeros(layers)
    for n in range(num_nodes):
        phi += gpus_per_node * power_q(node_load[:, n] / unit)
    for e in range(num_experts):
        phi += power_q(weight[:, e] / mu)
    free = np.full((layers, num_nodes), free_per_node, dtype=np.int64)
    w = weight[:, None, :]
    mu3, unit3 = mu[:, None, None], unit[:, None, None]
    expert_dphi, delta = _expert_terms(w, f, count.transpose(0, 2, 1), absent[:, None, :],
                                       total_count[:, None, :], mu3)
    for _ in range(num_nodes * free_per_node):
        dphi = expert_dphi
        for m in range(num_nodes):
            load_m = node_load[:, m, None, None]
            change = delta[:, m]
            dphi = np.where(change != 0.0, dphi + gpus_per_node * (
                power_q((load_m + change) / unit3) - power_q(load_m / unit3)), dphi)
        base = np.maximum(phi, 1e-300)[:, None, None]
        score = norm_change(base, np.maximum(dphi / base, -1.0 + 1e-15))
        absent_here = count.transpose(0, 2, 1) == 0
        score = np.where(absent_here, score - scale_remote[:, None, None] * w * f, score)
        score = np.where((free > 0)[:, :, None] & ~np.isnan(score), score, np.inf)
        pick = score.reshape(layers, -1).argmin(1)
        n, e = pick // num_experts, pick % num_experts
        best_dphi = dphi[lr, n, e]
        we, ae, te = weight[lr, e], absent[lr, e], total_count[lr, e]
        new_absent = np.where(count[lr, e, n] == 0, ae - f, ae)
        for m in range(num_nodes):
            old_c = count[lr, e, m]
            node_load[:, m] = np.where(old_c > 0, node_load[:, m] - old_c * replica_load(
                we, f, np.maximum(old_c, 1), ae, te), node_load[:, m])
        count[lr, e, n] += 1
        total_count[lr, e] += 1.0
        absent[lr, e] = new_absent
        te = total_count[lr, e]
        for m in range(num_nodes):
            new_c = count[lr, e, m]
            node_load[:, m] = np.where(new_c > 0, node_load[:, m] + new_c * replica_load(
                we, f, np.maximum(new_c, 1), new_absent, te), node_load[:, m])
        phi = phi + best_dphi
        free[lr, n] -= 1
        one_dphi, one_delta = _expert_terms(we[:, None, None], f, count[lr, e][:, :, None],
                                            new_absent[:, None, None], te[:, None, None], mu3)
        expert_dphi[lr, :, e] = one_dphi[:, :, 0]
        delta[lr, :, :, e] = one_delta[..., 0]
    return count


def divisor_counts_rows(w: np.ndarray, slots: int, shift: float) -> np.ndarray:
    """``bounds.divisor_counts`` for every row: each extra replica to the largest
    w / (counts + shift), the lowest expert on ties. w float64 [X, n]; returns int64 [X, n]."""
    rows, n = w.shape
    r = np.arange(rows)
    counts = np.ones((rows, n), dtype=np.int64)
    key = w / (1.0 + shift)
    for _ in range(slots - n):
        e = key.argmax(1)
        counts[r, e] += 1
        key[r, e] = w[r, e] / (counts[r, e] + shift)
    return counts


def slot_bound(w: np.ndarray, counts: np.ndarray, slots: int, per_gpu: int) -> float:
    """``bounds._slot_bound`` of one row ``w`` float64 [n] whose water-filled replica counts
    are ``counts`` [n]: every candidate largest replica load X at once."""
    m_star = max(0.0, float((w / counts).max()))
    if per_gpu == 1 or m_star == 0.0:
        return m_star
    tops = np.ceil(w / m_star).astype(np.int64)            # divisors 1..top of each load
    divisor = np.arange(tops.sum()) - np.repeat(np.cumsum(tops) - tops, tops) + 1
    x = np.concatenate([[m_star], np.repeat(w, tops) / divisor])
    x = x[x >= m_star]
    needed = np.maximum(1, np.ceil(w[None, :] / x[:, None] - 1e-9).astype(np.int64))   # [C, n]
    spare = slots - needed.sum(1)
    ok = spare >= 0
    if not ok.any():
        return np.inf
    low = (w[None, :] / (needed[ok] + spare[ok, None])).min(1)
    return float((x[ok] + (per_gpu - 1) * low).min())


def node_bounds_rows(rows: np.ndarray, slots: int, gpus: int) -> np.ndarray:
    """``bounds._node_bounds``: [X] max(row load / gpus, slot bound) of rows float64 [X, n]."""
    counts = divisor_counts_rows(rows, slots, 0.0)
    per_gpu = slots // gpus
    mean = np.cumsum(rows, axis=1)[:, -1] / gpus            # summed in order, as the kernel
    return np.array([max(mean[i], slot_bound(rows[i], counts[i], slots, per_gpu))
                     for i in range(rows.shape[0])])


def sort_by_per_replica(w, counts, order):
    """``balanced._sort_by_per_replica``: ``order`` (in place) = experts by w / counts
    descending, the lower expert first on ties."""
    order[:] = np.argsort(-(w / counts), kind="stable")


def replica_items(w, counts, order, item_load, item_expert):
    """``balanced._items``: each expert's replicas in ``order``, with their loads (in place)."""
    item_expert[:] = np.repeat(order, counts[order])
    item_load[:] = (w / counts)[item_expert]


def pack_items(item_load, num_gpus, per_gpu, members, gpu_load):
    """``balanced.pack_items``: items (by load, descending) onto GPUs of ``per_gpu`` slots:
    two per GPU pairs the largest with the smallest; otherwise each item to the least loaded
    GPU with a free slot (the lowest GPU on ties), then ``swap_search``. Fills members int64
    [p, s] and gpu_load float64 [p] in place."""
    k = item_load.shape[0]
    if per_gpu == 2:
        g = np.arange(num_gpus)
        members[:, 0], members[:, 1] = g, k - 1 - g
        gpu_load[:] = item_load[g] + item_load[k - 1 - g]
        return
    heap = [(0.0, g) for g in range(num_gpus)]     # (load, GPU) of the GPUs with a free slot
    loads = [0.0] * num_gpus
    placed = [[] for _ in range(num_gpus)]
    for i, x in enumerate(item_load.tolist()):
        load, g = heap[0]
        load += x
        loads[g] = load
        placed[g].append(i)
        if len(placed[g]) == per_gpu:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (load, g))
    gpu_load[:] = loads
    fill = [len(p) for p in placed]
    for g in range(num_gpus):
        members[g, :fill[g]] = placed[g]
    if per_gpu >= 3:
        swap_search(item_load, members, gpu_load, 8 * num_gpus)


_REL = 1e-12   # balanced._REL


def swap_search(item_load, members, gpu_load, max_rounds):
    """``balanced._swap_search``: while it lowers the pair's max, swap the item of the most
    loaded GPU and an item of another GPU that give the least max (the first such in (item,
    GPU, item) order on ties)."""
    num_gpus, per_gpu = members.shape
    others = np.arange(num_gpus)[None, :, None]
    for _ in range(max_rounds):
        g = int(np.argmax(gpu_load))
        top = gpu_load[g]
        d = item_load[members[g]][:, None, None] - item_load[members][None, :, :]   # [s, p, s]
        v = np.maximum(top - d, gpu_load[None, :, None] + d)
        v = np.where((others != g) & (d > 0.0) & (v < top * (1.0 - _REL)), v, np.inf)
        pick = int(np.argmin(v))
        if v.flat[pick] == np.inf:
            return
        a, h, b = np.unravel_index(pick, v.shape)
        d = item_load[members[g, a]] - item_load[members[h, b]]
        members[g, a], members[h, b] = members[h, b], members[g, a]
        gpu_load[g] -= d
        gpu_load[h] += d


def donor(w, counts, e):
    """``balanced._donor``: the expert (not e, >= 2 replicas) whose load per replica stays
    smallest after losing one (the lowest on ties), or -1."""
    ok = counts >= 2
    ok[e] = False
    after = np.where(ok, w / np.maximum(counts - 1, 1), np.inf)
    best = int(np.argmin(after))
    return best if after[best] < np.inf else -1


def recipient(w, counts, e, largest):
    """``balanced._recipient``: the expert (not e) with the largest current (``largest``) or
    the smallest resulting load per replica (the lowest on ties), or -1."""
    if w.shape[0] < 2:
        return -1
    v = w / counts if largest else -w / (counts + 1)
    v[e] = -np.inf
    return int(np.argmax(v))
