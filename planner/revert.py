"""The revert pass of movement-aware re-planning (:mod:`planner.movement`): put changed slots of
an aligned fresh plan back to the plan in force while the balance target holds. Array
conventions: :mod:`planner.slot_moves`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from expertplane.planner.slot_moves import apply_relabel, index_slots, relabel_max, row_loads


@njit(cache=True)
def revert_row(w, row, prev, num_gpus, slot_node, expert_node, target):
    """Put slots of ``row`` [R] (in place) back to their expert in ``prev`` [R] while the max
    GPU load stays <= ``target``: single slots (changes replica counts) and pairs of slots that
    exchanged experts (counts unchanged). Three passes over the changed slots at most."""
    replicas = row.shape[0]
    per_gpu = replicas // num_gpus
    counts, slot_load, gpu_load = row_loads(w, row, num_gpus)
    delta = np.zeros(num_gpus)
    touched = np.empty(num_gpus, dtype=np.int64)
    mark = np.zeros(num_gpus, dtype=np.bool_)
    starts = np.zeros(w.shape[0] + 1, dtype=np.int64)
    slots = np.empty(replicas, dtype=np.int64)
    for _ in range(3):
        changed = False
        for j in range(replicas):
            x, y = row[j], prev[j]
            if x == y or (expert_node[y] >= 0 and expert_node[y] != slot_node[j]):
                continue
            partner = -1  # a slot that took y's place while j took x: swap them back
            for k in range(replicas):
                if row[k] == y and prev[k] == x and slot_node[k] == slot_node[j]:
                    partner = k
                    break
            if partner >= 0:
                gj, gk = j // per_gpu, partner // per_gpu
                d = slot_load[partner] - slot_load[j]
                if max(gpu_load[gj] + d, gpu_load[gk] - d) <= target:
                    row[j], row[partner] = y, x
                    slot_load[j], slot_load[partner] = slot_load[partner], slot_load[j]
                    gpu_load[gj] += d
                    gpu_load[gk] -= d
                    changed = True
                    continue
            if counts[x] < 2:
                continue
            index_slots(row, w.shape[0], starts, slots)
            new_top, nt = relabel_max(row, counts, w, slot_load, gpu_load, per_gpu, j, y,
                                      starts, slots, delta, touched, mark)
            rest = -np.inf
            for g in range(num_gpus):
                if not mark[g]:
                    rest = max(rest, gpu_load[g])
            for t in range(nt):
                mark[touched[t]] = False
            if max(new_top, rest) <= target:
                apply_relabel(row, counts, w, slot_load, gpu_load, per_gpu, j, y)
                changed = True
        if not changed:
            break
