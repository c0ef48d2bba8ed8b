"""Greedy repair of one layer's plan towards a balance target, changing few slots (step 2 of
movement-aware re-planning, :mod:`planner.movement`). Array conventions: :mod:`planner.slot_moves`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from expertplane.planner.slot_moves import (
    apply_relabel,
    excess,
    expert_parts,
    index_slots,
    relabel_bound,
    relabel_max,
    row_loads,
    shared_parts,
)

_REL = 1e-12


@njit(cache=True)
def repair_row(w, row, num_gpus, slot_node, expert_node, target, budget, slack):
    """Repair one layer's plan ``row`` [R] (in place) towards max GPU load <= ``target``.

    Each step changes the most loaded GPU's slots or counts by the move that removes the most
    excess (GPU load above ``(1 - slack) * target``, summed over the touched GPUs) per changed
    slot; it stops when no move removes any. slot_node [R] node of each slot; expert_node [E]
    node an expert must stay on (-1: any). At most ``budget`` slot changes are spent. Returns
    True if the target was reached.
    """
    replicas = row.shape[0]
    per_gpu = replicas // num_gpus
    counts, slot_load, gpu_load = row_loads(w, row, num_gpus)
    level = target * (1.0 - slack)
    delta = np.zeros(num_gpus)
    touched = np.empty(num_gpus, dtype=np.int64)
    mark = np.zeros(num_gpus, dtype=np.bool_)
    on_g = np.zeros(w.shape[0], dtype=np.bool_)
    g_experts = np.empty(per_gpu, dtype=np.int64)
    starts = np.zeros(w.shape[0] + 1, dtype=np.int64)
    slots = np.empty(replicas, dtype=np.int64)
    on_gpu = np.zeros((num_gpus, w.shape[0]), dtype=np.int32)   # int32: fits the caches
    for i in range(replicas):
        on_gpu[i // per_gpu, row[i]] += 1
    lose_d, gain_d = np.zeros(w.shape[0]), np.zeros(w.shape[0])
    lose, gain_of = np.zeros(w.shape[0]), np.zeros(w.shape[0])
    both = np.zeros((per_gpu, w.shape[0]))   # see shared_parts
    seen = np.zeros(w.shape[0], dtype=np.bool_)
    spent = 0
    while spent < budget:
        g = np.argmax(gpu_load)
        top = gpu_load[g]
        if top <= target:
            return True
        best_score, best_kind, best_a, best_b = 0.0, -1, -1, -1
        n_g = 0  # the experts on g, ascending (the candidates of a slot elsewhere)
        for i in range(g * per_gpu, (g + 1) * per_gpu):
            if not on_g[row[i]]:
                on_g[row[i]] = True
                g_experts[n_g] = row[i]
                n_g += 1
        g_experts[:n_g].sort()
        index_slots(row, w.shape[0], starts, slots)
        expert_parts(w, counts, gpu_load, per_gpu, starts, slots, on_gpu, level, lose_d, gain_d,
                     lose, gain_of, mark)
        slack = 1e-9 * top  # the bound sums in another order: room for rounding
        shared_parts(row, g_experts, n_g, per_gpu, gpu_load, on_gpu, level, lose_d, starts,
                     slots, mark, seen, both, 1.0)
        # relabels: a slot on g to any expert, or any slot to an expert on g
        for j in range(replicas):
            f = row[j]
            if counts[f] < 2:
                continue
            j_on_g = j // per_gpu == g
            for c in range(w.shape[0] if j_on_g else n_g):
                e = c if j_on_g else g_experts[c]
                if e == f:
                    continue
                if expert_node[e] >= 0 and expert_node[e] != slot_node[j]:
                    continue
                # O(1) bound first: the excess removed is at most e's own part (gain_of[e])
                # plus what slot j's old load leaves on its GPU h, plus (e on g) f's part off
                # the GPUs holding e; the new top is at least h's
                h = j // per_gpu
                quick = gain_of[e] + min(slot_load[j], excess(gpu_load[h], level))
                if not j_on_g:
                    quick += lose[f] + both[c, f]
                    if on_gpu[h, e] == 0:
                        quick += (excess(gpu_load[h] + on_gpu[h, f] * lose_d[f], level)
                                  - excess(gpu_load[h], level))
                if quick + slack <= top * _REL or quick + 1e-3 * (
                        top - gpu_load[h] - on_gpu[h, e] * gain_d[e] + slot_load[j]) \
                        + slack < best_score:
                    continue
                removed, bound = relabel_bound(w, counts, gpu_load, per_gpu, starts, slots,
                                               on_gpu, level, lose_d, gain_d, lose, gain_of,
                                               mark, j, f, e, top)
                if removed + slack <= top * _REL or bound + slack < best_score:
                    continue  # cannot be taken below: skip the exact evaluation
                new_top, nt = relabel_max(row, counts, w, slot_load, gpu_load, per_gpu, j, e,
                                          starts, slots, delta, touched, mark)
                gain = 0.0
                for t in range(nt):
                    h = touched[t]
                    gain += excess(gpu_load[h], level) - excess(gpu_load[h] + delta[h], level)
                if gain > top * _REL:
                    score = gain + 1e-3 * (top - new_top)
                    if score > best_score:
                        best_score, best_kind, best_a, best_b = score, 1, j, e
                for t in range(nt):
                    mark[touched[t]] = False
        shared_parts(row, g_experts, n_g, per_gpu, gpu_load, on_gpu, level, lose_d, starts,
                     slots, mark, seen, both, 0.0)
        # swaps: a slot on g with a slot on another GPU of the same node (cost 2)
        for a in range(g * per_gpu, (g + 1) * per_gpu):
            for b in range(replicas):
                h = b // per_gpu
                if h == g or row[a] == row[b] or slot_node[a] != slot_node[b]:
                    continue
                d = slot_load[a] - slot_load[b]
                if d <= 0.0:
                    continue
                new_top = max(top - d, gpu_load[h] + d)
                gain = (excess(top, level) + excess(gpu_load[h], level)
                        - excess(top - d, level) - excess(gpu_load[h] + d, level))
                if gain > top * _REL:
                    score = (gain + 1e-3 * (top - new_top)) / 2.0
                    if score > best_score:
                        best_score, best_kind, best_a, best_b = score, 2, a, b
        for i in range(g * per_gpu, (g + 1) * per_gpu):
            on_g[row[i]] = False
        if best_kind < 0:
            return False
        if best_kind == 1:
            on_gpu[best_a // per_gpu, row[best_a]] -= 1
            on_gpu[best_a // per_gpu, best_b] += 1
            apply_relabel(row, counts, w, slot_load, gpu_load, per_gpu, best_a, best_b)
            spent += 1
        else:
            a, b = best_a, best_b
            on_gpu[a // per_gpu, row[a]] -= 1
            on_gpu[a // per_gpu, row[b]] += 1
            on_gpu[b // per_gpu, row[b]] -= 1
            on_gpu[b // per_gpu, row[a]] += 1
            d = slot_load[a] - slot_load[b]
            row[a], row[b] = row[b], row[a]
            slot_load[a], slot_load[b] = slot_load[b], slot_load[a]
            gpu_load[a // per_gpu] -= d
            gpu_load[b // per_gpu] += d
            spent += 2
    return gpu_load.max() <= target
