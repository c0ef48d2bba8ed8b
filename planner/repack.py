"""Re-packing the most loaded GPUs of one layer's plan together with the least loaded ones, keeping
slots where it can (a finishing step of movement-aware re-planning, :mod:`planner.movement`).
"""

from __future__ import annotations

import numpy as np

from expertplane.planner.alignment import match_sets
from expertplane.planner.balanced import pack_items


def repack_worst(w_row, plan_row, prev_row, num_gpus, target, best_moves):
    """Re-pack the GPUs above ``target`` together with as many of the least loaded GPUs, then
    25% more of them each time, until the re-packed set fits under ``target``.

    The set's replicas are packed by ``balanced.pack_items`` (optimal for two slots per GPU)
    and its new GPU contents matched to the old ones to keep slots (``align``'s matching).
    Returns the plan [R] with fewer changed slots than ``best_moves``, or None.
    """
    per_gpu = plan_row.size // num_gpus
    counts = np.bincount(plan_row, minlength=w_row.size)
    gpus = plan_row.reshape(num_gpus, per_gpu)
    slot_load = (w_row / np.maximum(counts, 1))[gpus]
    load = slot_load.sum(-1)
    by_load = np.argsort(load, kind="stable")
    over = by_load[load[by_load] > target]
    light = over.size
    while over.size and over.size + light <= num_gpus:
        chosen = np.concatenate([over, by_load[:light]])
        order = np.argsort(-slot_load[chosen].ravel(), kind="stable")
        item_load = slot_load[chosen].ravel()[order]
        members = np.empty((chosen.size, per_gpu), dtype=np.int64)
        packed = np.empty(chosen.size)
        pack_items(item_load, chosen.size, per_gpu, members, packed)
        if packed.max() <= target:
            new_sets = gpus[chosen].ravel()[order][members]
            old_sets = prev_row.reshape(num_gpus, per_gpu)[chosen]
            out = gpus.copy()
            out[chosen] = match_sets(new_sets, old_sets, w_row.size)
            out = out.ravel()
            return out if (out != prev_row).sum() < best_moves else None
        light = max(light + 1, light * 5 // 4)
    return None
