"""One layer's slot and GPU loads, and the cost of relabelling a slot: the numba kernels that the
repair and the revert pass of movement-aware re-planning (:mod:`planner.movement`) share.

Conventions of every kernel here: ``w`` [E] float64 load of each expert in one layer, ``row``
[R] int64 expert of each physical slot (a phy2log row), ``per_gpu`` slots per GPU (slot ``i``
sits on GPU ``i // per_gpu``), ``counts`` [E] replicas of each expert, ``slot_load`` [R] its
expert's load split evenly over its replicas, ``gpu_load`` [G] summed slot loads per GPU (the
same unit as ``w``: tokens). ``starts`` [E + 1] / ``slots`` [R] index the slots of each expert
(``index_slots``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def apply_relabel(row, counts, w, slot_load, gpu_load, per_gpu, j, e):
    """Give slot j to expert e (updates counts, slot loads and GPU loads)."""
    f = row[j]
    counts[f] -= 1
    counts[e] += 1
    row[j] = e
    for i in range(row.shape[0]):
        x = row[i]
        if x == e or x == f:
            new = w[x] / counts[x]
            gpu_load[i // per_gpu] += new - slot_load[i]
            slot_load[i] = new


@njit(cache=True)
def index_slots(row, num_experts, starts, slots):
    """CSR index of the slots of each expert: slots[starts[e]:starts[e + 1]]."""
    starts[:] = 0
    for x in row:
        starts[x + 1] += 1
    for e in range(num_experts):
        starts[e + 1] += starts[e]
    fill = starts[:-1].copy()
    for i in range(row.shape[0]):
        slots[fill[row[i]]] = i
        fill[row[i]] += 1


@njit(cache=True)
def relabel_max(row, counts, w, slot_load, gpu_load, per_gpu, j, e, starts, slots, delta,
                touched, mark):
    """Largest new load among GPUs touched by giving slot j to expert e; fills ``touched``
    (``nt`` entries, marked in ``mark``). Only the slots of e and of j's expert change."""
    f = row[j]
    new_f, new_e = w[f] / (counts[f] - 1), w[e] / (counts[e] + 1)
    nt = 0
    for x, new in ((f, new_f), (e, new_e)):
        for k in range(starts[x], starts[x + 1]):
            i = slots[k]
            g = i // per_gpu
            if not mark[g]:
                mark[g] = True
                delta[g] = 0.0
                touched[nt] = g
                nt += 1
            delta[g] += (new_e if i == j else new) - slot_load[i]
    top = -np.inf
    for t in range(nt):
        g = touched[t]
        top = max(top, gpu_load[g] + delta[g])
    return top, nt


@njit(cache=True, inline="always")
def excess(load, level):
    """How far a GPU load lies above ``level`` (0 below it)."""
    return max(load - level, 0.0)


@njit(cache=True)
def expert_parts(w, counts, gpu_load, per_gpu, starts, slots, on_gpu, level, lose_d, gain_d,
                 lose, gain, mark):
    """Per expert x, the change of the summed excess over the GPUs holding x when x loses one
    replica (``lose[x]``, each remaining replica gaining ``lose_d[x]``) or gains one
    (``gain[x]``, each replica changing by ``gain_d[x]``), all else unchanged. on_gpu [P, E]
    replicas of each expert on each GPU."""
    for x in range(w.shape[0]):
        c = counts[x]
        if c == 0:
            continue
        lose_d[x] = w[x] / (c - 1) - w[x] / c if c >= 2 else 0.0
        gain_d[x] = w[x] / (c + 1) - w[x] / c
        a = 0.0
        b = 0.0
        for k in range(starts[x], starts[x + 1]):
            q = slots[k] // per_gpu
            if mark[q]:
                continue
            mark[q] = True
            n = on_gpu[q, x]
            a += excess(gpu_load[q], level) - excess(gpu_load[q] + n * lose_d[x], level)
            b += excess(gpu_load[q], level) - excess(gpu_load[q] + n * gain_d[x], level)
        for k in range(starts[x], starts[x + 1]):
            mark[slots[k] // per_gpu] = False
        lose[x] = a
        gain[x] = b


@njit(cache=True)
def relabel_bound(w, counts, gpu_load, per_gpu, starts, slots, on_gpu, level, lose_d, gain_d,
                  lose, gain, mark, j, f, e, top):
    """(excess removed, upper bound of the score ``gain + 1e-3 * (top - new top)``) of giving
    slot j (expert f) to expert e, from the per-expert parts of ``expert_parts``: only the
    GPUs holding both f and e, and j's GPU, are recomputed; the new top is bounded below by
    theirs."""
    h = j // per_gpu
    new_f, new_e = w[f] / (counts[f] - 1), w[e] / (counts[e] + 1)
    x = f if counts[f] <= counts[e] else e   # walk the smaller expert's slots
    other = e if x == f else f
    corr = 0.0
    low_top = -np.inf
    for k in range(starts[x], starts[x + 1] + 1):  # the last turn is j's GPU
        q = h if k == starts[x + 1] else slots[k] // per_gpu
        if mark[q] or (q != h and on_gpu[q, other] == 0):
            continue
        mark[q] = True
        nf, ne = on_gpu[q, f], on_gpu[q, e]
        load = gpu_load[q]
        d = nf * lose_d[f] + ne * gain_d[e] + (new_e - new_f if q == h else 0.0)
        counted = 0.0
        if nf:
            counted += excess(load, level) - excess(load + nf * lose_d[f], level)
        if ne:
            counted += excess(load, level) - excess(load + ne * gain_d[e], level)
        corr += excess(load, level) - excess(load + d, level) - counted
        low_top = max(low_top, load + d)
    for k in range(starts[x], starts[x + 1] + 1):
        mark[h if k == starts[x + 1] else slots[k] // per_gpu] = False
    removed = lose[f] + gain[e] + corr
    return removed, removed + 1e-3 * (top - low_top)


@njit(cache=True)
def shared_parts(row, g_experts, n_g, per_gpu, gpu_load, on_gpu, level, lose_d, starts, slots,
                 mark, seen, both, scale):
    """For the c-th expert e of ``g_experts[:n_g]`` and each expert x, ``both[c, x]`` = ``scale``
    x the excess that x's part of ``expert_parts`` (x losing a replica) adds on the GPUs holding
    both e and x: relabelling a slot of x to e changes the excess of such a GPU by at most e's
    part, so this much of ``lose[x]`` may come back. ``scale`` 0 resets what ``scale`` 1 set.
    ``seen`` [E] and ``mark`` [G] are all False before and after."""
    for c in range(n_g):
        e = g_experts[c]
        for k in range(starts[e], starts[e + 1]):
            q = slots[k] // per_gpu
            if mark[q]:
                continue
            mark[q] = True
            for i in range(q * per_gpu, (q + 1) * per_gpu):
                x = row[i]
                if x != e and not seen[x]:
                    seen[x] = True
                    both[c, x] = both[c, x] * scale + scale * (
                        excess(gpu_load[q] + on_gpu[q, x] * lose_d[x], level)
                        - excess(gpu_load[q], level))
            for i in range(q * per_gpu, (q + 1) * per_gpu):
                seen[row[i]] = False
        for k in range(starts[e], starts[e + 1]):
            mark[slots[k] // per_gpu] = False


@njit(cache=True)
def row_loads(w, row, num_gpus):
    """One layer's loads under plan ``row`` [R]: (replica counts [E], load of each slot [R] (its
    expert's load split evenly over its replicas), load of each GPU [num_gpus])."""
    replicas = row.shape[0]
    per_gpu = replicas // num_gpus
    counts = np.zeros(w.shape[0], dtype=np.int64)
    for x in row:
        counts[x] += 1
    slot_load = np.empty(replicas)
    gpu_load = np.zeros(num_gpus)
    for i in range(replicas):
        slot_load[i] = w[row[i]] / counts[row[i]]
        gpu_load[i // per_gpu] += slot_load[i]
    return counts, slot_load, gpu_load
