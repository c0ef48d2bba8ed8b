"""The second repair start of movement-aware re-planning (:mod:`planner.movement`, global
policy): the plan in force changed to the fresh plan's replica counts with few slot changes.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def recount_row(w, row, new_counts, per_gpu):
    """Change ``row`` [R] in place to the replica counts ``new_counts`` [E], re-using slots:
    surplus replicas are freed on the most loaded GPUs first, and the missing replicas, heaviest
    first, fill the freed slot on the least loaded GPU (loads under the new counts)."""
    replicas = row.shape[0]
    num_gpus = replicas // per_gpu
    counts = np.zeros(w.shape[0], dtype=np.int64)
    for x in row:
        counts[x] += 1
    gpu_load = np.zeros(num_gpus)
    for i in range(replicas):
        gpu_load[i // per_gpu] += w[row[i]] / new_counts[row[i]]
    freed = np.zeros(replicas, dtype=np.bool_)
    for i in np.argsort(-gpu_load[np.arange(replicas) // per_gpu], kind="mergesort"):
        x = row[i]
        if counts[x] > new_counts[x]:
            counts[x] -= 1
            freed[i] = True
            gpu_load[i // per_gpu] -= w[x] / new_counts[x]
    missing = np.empty(replicas, dtype=np.int64)
    n = 0
    for e in np.argsort(-(w / new_counts), kind="mergesort"):
        for _ in range(new_counts[e] - counts[e]):
            missing[n] = e
            n += 1
    for k in range(n):
        best = -1
        for i in range(replicas):
            if freed[i] and (best < 0 or gpu_load[i // per_gpu] < gpu_load[best // per_gpu]):
                best = i
        freed[best] = False
        row[best] = missing[k]
        gpu_load[best // per_gpu] += w[missing[k]] / new_counts[missing[k]]
