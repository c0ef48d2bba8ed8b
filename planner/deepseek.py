"""DeepSeek's EPLB (github deepseek-ai/EPLB), re-implemented to give identical outputs, fast.

Semantics reproduced (written from the published description and behaviour, not copied):

* loads are cast to float32 and every sum / division / comparison happens in float32;
* ``balanced_packing`` visits items by descending load in the order that PyTorch's CPU
  ``sort(descending=True)`` gives, which is libstdc++'s unstable introsort (``std::sort``) on
  (load, index) pairs: equal loads are NOT kept in index order once a row has more than 16
  items. ``_torch_sort_desc`` replays that algorithm step by step so ties break the same way;
  each item goes to the non-full pack with the smallest accumulated float32 load (lowest pack
  index on ties);
* ``replicate_experts`` adds one replica at a time to the expert with the largest
  load / replica count (lowest expert index on ties);
* hierarchical policy (``num_groups % num_nodes == 0``): pack groups to nodes, replicate within
  each node, pack each node's replicas onto its GPUs; otherwise the global policy, i.e. the same
  with one group and one node.

The hot loops are numba kernels over all rows (layers, or layers x nodes) at once; while they
are being built (``planner.compiled``), numpy versions of the packing and the replication
(``planner.numpy_paths``) and the interpreted sort give the same results.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from expertplane.planner.compiled import use_compiled
from expertplane.planner.interpreted import interpreted
from expertplane.planner.numpy_paths import pack_in_order, replicate_greedy

_INSERTION_THRESHOLD = 16  # libstdc++ _S_threshold


@njit(cache=True, inline="always")
def _swap(keys, idx, a, b):
    keys[a], keys[b] = keys[b], keys[a]
    idx[a], idx[b] = idx[b], idx[a]


@njit(cache=True)
def _adjust_heap(keys, idx, first, hole, length, vkey, vidx):
    """libstdc++ std::__adjust_heap (comparator: a before b iff key a > key b)."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if keys[first + child] > keys[first + child - 1]:
            child -= 1
        keys[first + hole] = keys[first + child]
        idx[first + hole] = idx[first + child]
        hole = child
    if (length & 1) == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        keys[first + hole] = keys[first + child - 1]
        idx[first + hole] = idx[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and keys[first + parent] > vkey:
        keys[first + hole] = keys[first + parent]
        idx[first + hole] = idx[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    keys[first + hole] = vkey
    idx[first + hole] = vidx


@njit(cache=True)
def _heap_sort(keys, idx, first, last):
    """libstdc++ std::__partial_sort(first, last, last): make_heap then sort_heap."""
    length = last - first
    if length < 2:
        return
    parent = (length - 2) // 2
    while True:
        _adjust_heap(keys, idx, first, parent, length, keys[first + parent], idx[first + parent])
        if parent == 0:
            break
        parent -= 1
    end = last
    while end - first > 1:
        end -= 1
        vkey, vidx = keys[end], idx[end]
        keys[end], idx[end] = keys[first], idx[first]
        _adjust_heap(keys, idx, first, 0, end - first, vkey, vidx)


@njit(cache=True)
def _torch_sort_desc(keys, idx):
    """Sort ``keys`` descending in place, carrying ``idx``, exactly as libstdc++ std::sort does.

    keys: float32 [n]; idx: int64 [n] (initially 0..n-1). Comparator ``a > b`` (no NaNs).
    """
    n = keys.shape[0]
    if n < 2:
        return
    log2n = 0
    m = n
    while m > 1:
        m >>= 1
        log2n += 1
    # Introsort loop: an explicit stack of (first, last, depth) replaces the tail recursion.
    stack = np.empty((2 * 64 + 8, 3), dtype=np.int64)
    stack[0, 0], stack[0, 1], stack[0, 2] = 0, n, 2 * log2n  # depth limit 2 * floor(log2 n)
    top = 1
    while top > 0:
        top -= 1
        first, last, limit = stack[top, 0], stack[top, 1], stack[top, 2]
        while last - first > _INSERTION_THRESHOLD:
            if limit == 0:
                _heap_sort(keys, idx, first, last)
                break
            limit -= 1
            # median of (first+1, mid, last-1) moved to first
            a, b, c = first + 1, first + (last - first) // 2, last - 1
            if keys[a] > keys[b]:
                if keys[b] > keys[c]:
                    _swap(keys, idx, first, b)
                elif keys[a] > keys[c]:
                    _swap(keys, idx, first, c)
                else:
                    _swap(keys, idx, first, a)
            elif keys[a] > keys[c]:
                _swap(keys, idx, first, a)
            elif keys[b] > keys[c]:
                _swap(keys, idx, first, c)
            else:
                _swap(keys, idx, first, b)
            # unguarded partition of [first+1, last) around keys[first]
            lo, hi = first + 1, last
            pivot = keys[first]
            while True:
                while keys[lo] > pivot:
                    lo += 1
                hi -= 1
                while pivot > keys[hi]:
                    hi -= 1
                if not lo < hi:
                    break
                _swap(keys, idx, lo, hi)
                lo += 1
            stack[top, 0], stack[top, 1], stack[top, 2] = lo, last, limit
            top += 1
            last = lo
    # final insertion sort: guarded on the first 16, unguarded after
    guarded_end = min(n, _INSERTION_THRESHOLD)
    for i in range(1, n):
        vkey, vidx = keys[i], idx[i]
        if i < guarded_end and vkey > keys[0]:
            for j in range(i, 0, -1):
                keys[j], idx[j] = keys[j - 1], idx[j - 1]
            keys[0], idx[0] = vkey, vidx
        else:
            j = i
            while vkey > keys[j - 1]:
                keys[j], idx[j] = keys[j - 1], idx[j - 1]
                j -= 1
            keys[j], idx[j] = vkey, vidx


@njit(cache=True)
def _descending_order(weight):
    """Row-wise torch-equivalent ``sort(descending=True).indices`` of float32 ``[X, n]``."""
    rows, n = weight.shape
    order = np.empty((rows, n), dtype=np.int64)
    keys = np.empty(n, dtype=np.float32)
    for r in range(rows):
        for j in range(n):
            keys[j] = weight[r, j]
            order[r, j] = j
        _torch_sort_desc(keys, order[r])
    return order


@njit(cache=True)
def _pack_kernel(weight, order, num_packs):
    """Greedy packing of each row's items (visited in ``order``) into equal-count packs."""
    rows, n = weight.shape
    per_pack = n // num_packs
    pack_index = np.empty((rows, n), dtype=np.int64)
    rank_in_pack = np.empty((rows, n), dtype=np.int64)
    load = np.empty(num_packs, dtype=np.float32)
    count = np.empty(num_packs, dtype=np.int64)
    for r in range(rows):
        load[:] = 0
        count[:] = 0
        for j in range(n):
            item = order[r, j]
            best = -1
            for p in range(num_packs):
                if count[p] < per_pack and (best < 0 or load[p] < load[best]):
                    best = p
            pack_index[r, item] = best
            rank_in_pack[r, item] = count[best]
            load[best] = np.float32(load[best] + weight[r, item])
            count[best] += 1
    return pack_index, rank_in_pack


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the n items of each row into ``num_packs`` packs of n / num_packs items each.

    weight: float32 [X, n] item loads (n divisible by num_packs).
    Returns (pack_index [X, n] int64, rank_in_pack [X, n] int64): the pack of each item and its
    position inside the pack (0 = first placed).
    """
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    rows, n = weight.shape
    if n // num_packs == 1:
        return (np.broadcast_to(np.arange(n, dtype=np.int64), (rows, n)).copy(),
                np.zeros((rows, n), dtype=np.int64))
    if use_compiled():
        return _pack_kernel(weight, _descending_order(weight), num_packs)
    return pack_in_order(weight, interpreted(_descending_order)(weight), num_packs)


@njit(cache=True)
def _replicate_kernel(weight, num_phy):
    rows, num_log = weight.shape
    phy2log = np.empty((rows, num_phy), dtype=np.int64)
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    per_replica = np.empty(num_log, dtype=np.float32)
    for r in range(rows):
        for e in range(num_log):
            phy2log[r, e] = e
            per_replica[e] = weight[r, e]
        for slot in range(num_log, num_phy):
            best = 0
            for e in range(1, num_log):
                if per_replica[e] > per_replica[best]:
                    best = e
            phy2log[r, slot] = best
            rank[r, slot] = logcnt[r, best]
            logcnt[r, best] += 1
            per_replica[best] = np.float32(weight[r, best] / np.float32(logcnt[r, best]))
    return phy2log, rank, logcnt


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate each row's ``num_log`` experts into ``num_phy`` replicas, greedily.

    weight: float32 [X, num_log]. Slots 0..num_log-1 hold experts 0..num_log-1; each further
    slot goes to the expert with the largest load per replica.
    Returns (phy2log [X, num_phy], rank [X, num_phy] replica index of each slot within its
    expert, logcnt [X, num_log] replicas per expert), all int64.
    """
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if use_compiled():
        return _replicate_kernel(weight, int(num_phy))
    return replicate_greedy(weight, int(num_phy))


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of permutations ``[X, n]``."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1], dtype=perm.dtype)[None, :], axis=1)
    return inv


def group_sums(weight32: np.ndarray, num_groups: int) -> np.ndarray:
    """float32 [L, G] sum of each group's loads, summed by torch so the float32 bits match."""
    layers, experts = weight32.shape
    t = torch.from_numpy(weight32).view(layers, num_groups, experts // num_groups)
    return t.sum(-1).numpy()


def _hierarchical(weight32: np.ndarray, num_phy: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layers, num_log = weight32.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    slots_per_gpu = num_phy // num_gpus

    # 1. groups -> nodes; "mlog" numbers experts node by node in packed order
    group_pack, group_rank = balanced_packing(group_sums(weight32, num_groups), num_nodes)
    group_start = (group_pack * groups_per_node + group_rank) * group_size  # [L, G]
    log2mlog = (group_start[:, :, None] + np.arange(group_size)).reshape(layers, num_log)
    mlog2log = _inverse(log2mlog)

    # 2. replicate inside each node: rows are (layer, node)
    mlog_load = np.take_along_axis(weight32, mlog2log, 1).reshape(-1, log_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, num_phy // num_nodes)

    # 3. each node's replicas -> its GPUs
    replica_load = np.take_along_axis(
        (mlog_load / mlogcnt.astype(np.float32)).astype(np.float32), phy2mlog, 1)
    gpu, rank_in_gpu = balanced_packing(replica_load, num_gpus // num_nodes)
    pphy2phy = _inverse(gpu * slots_per_gpu + rank_in_gpu)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, 1).reshape(layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * log_per_node)[None, :, None]).reshape(layers, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, 1)
    rank = np.take_along_axis(phyrank, pphy2phy, 1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, 1)
    return phy2log, rank, logcnt


def is_hierarchical(num_groups: int, num_nodes: int) -> bool:
    """DeepSeek's policy choice: hierarchical iff groups split evenly over nodes."""
    return num_groups % num_nodes == 0


def deepseek_plan(weight, num_replicas: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB on validated inputs.

    weight: [L, E] loads (cast to float32). Returns (phy2log [L, R], phyrank [L, R], logcnt
    [L, E]) int64, where phyrank is each slot's replica index within its expert.
    """
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if is_hierarchical(num_groups, num_nodes):
        return _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    return _hierarchical(w, num_replicas, 1, 1, num_gpus)


def deepseek_phy2log(weight, num_replicas: int, num_groups: int, num_nodes: int,
                     num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """(phy2log [L, R], phyrank [L, R]) int64 of DeepSeek's EPLB on validated inputs."""
    phy2log, phyrank, _ = deepseek_plan(weight, num_replicas, num_groups, num_nodes, num_gpus)
    return phy2log, phyrank
