"""Alignment of a plan to the plan in force (step 1 of movement-aware re-planning,
:mod:`planner.movement`): relabel nodes, GPUs and slots of a new plan so that most replicas keep
the slot they had, without changing which experts share a GPU (so the balance is unchanged).

Nodes and GPUs are matched to the old ones by the number of replicas they keep
(``scipy.optimize.linear_sum_assignment`` on the overlap); inside each GPU every replica that
already sat on that GPU keeps its old slot.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from scipy.optimize import linear_sum_assignment

from expertplane.planner.compiled import use_compiled
from expertplane.planner.interpreted import interpreted

__all__ = ["align", "keep_gpu_slots", "match_sets"]


@njit(cache=True)
def _overlap(new_sets, old_sets, num_experts):
    """Replicas kept when unit a of ``new_sets`` replaces unit b of ``old_sets``.

    new_sets, old_sets: int64 [U, s] experts held by each unit (GPU or node).
    Returns int64 [U, U]: sum over experts of min(count in new a, count in old b).
    """
    units = new_sets.shape[0]
    cnt_old = np.zeros((units, num_experts), dtype=np.int64)
    for b in range(units):
        for x in old_sets[b]:
            cnt_old[b, x] += 1
    out = np.zeros((units, units), dtype=np.int64)
    cnt_new = np.zeros(num_experts, dtype=np.int64)
    for a in range(units):
        for x in new_sets[a]:
            cnt_new[x] += 1
        for x in new_sets[a]:
            if cnt_new[x] == 0:  # already counted
                continue
            for b in range(units):
                out[a, b] += min(cnt_new[x], cnt_old[b, x])
            cnt_new[x] = 0
    return out


def _match(new_sets: np.ndarray, old_sets: np.ndarray, num_experts: int) -> np.ndarray:
    """[U] old unit taking each new unit, maximising kept replicas."""
    overlap = _overlap if use_compiled() else interpreted(_overlap)
    rows, cols = linear_sum_assignment(overlap(new_sets, old_sets, num_experts), maximize=True)
    target = np.empty_like(rows)
    target[rows] = cols
    return target


@njit(cache=True)
def _keep_slots(new_gpu, old_gpu):
    """Order the experts of one GPU (``new_gpu`` [s]) so that those already in an old slot
    (``old_gpu`` [s]) stay there; the rest fill the remaining slots in order."""
    s = new_gpu.shape[0]
    out = np.full(s, -1, dtype=np.int64)
    placed = np.zeros(s, dtype=np.bool_)
    for j in range(s):
        for i in range(s):
            if not placed[i] and new_gpu[i] == old_gpu[j]:
                out[j] = new_gpu[i]
                placed[i] = True
                break
    k = 0
    for i in range(s):
        if not placed[i]:
            while out[k] >= 0:
                k += 1
            out[k] = new_gpu[i]
    return out


@njit(cache=True)
def _keep_slots_all(new, old):
    """[G, s] per-GPU slot alignment of ``new`` to ``old`` (both [G, s])."""
    out = np.empty_like(new)
    for g in range(new.shape[0]):
        out[g] = _keep_slots(new[g], old[g])
    return out


def _kept(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """``_keep_slots_all``, compiled or (while the kernels build) interpreted."""
    keep = _keep_slots_all if use_compiled() else interpreted(_keep_slots_all)
    return keep(new, old)


def match_sets(new_sets: np.ndarray, old_sets: np.ndarray, num_experts: int) -> np.ndarray:
    """``new_sets`` [U, s] (experts of U units: GPUs) given to the old units ``old_sets`` [U, s]
    that keep the most replicas, each unit's experts in the slots they had: [U, s]."""
    target = _match(new_sets, old_sets, num_experts)
    placed = np.empty_like(new_sets)
    placed[target] = new_sets
    return _kept(placed, old_sets)


def align(fresh: np.ndarray, previous: np.ndarray, num_gpus: int, num_nodes: int,
          by_node: bool) -> np.ndarray:
    """Relabel nodes, GPUs and slots of ``fresh`` [L, R] to keep most of ``previous`` [L, R].

    by_node: match nodes first and GPUs only inside matched nodes (hierarchical / topology
    plans, where a node's content matters); else match all GPUs freely. Balance is unchanged.
    """
    layers, replicas = fresh.shape
    experts = int(max(fresh.max(), previous.max())) + 1
    per_gpu = replicas // num_gpus
    gpus_per_node = num_gpus // num_nodes
    out = np.empty_like(fresh)
    for layer in range(layers):
        new = fresh[layer].reshape(num_gpus, per_gpu)
        old = previous[layer].reshape(num_gpus, per_gpu)
        if by_node and num_nodes > 1:
            node_of = _match(new.reshape(num_nodes, -1), old.reshape(num_nodes, -1), experts)
            gpu_target = np.empty(num_gpus, dtype=np.int64)
            for node in range(num_nodes):
                mine = slice(node * gpus_per_node, (node + 1) * gpus_per_node)
                theirs = node_of[node] * gpus_per_node
                local = _match(new[mine], old[theirs:theirs + gpus_per_node], experts)
                gpu_target[mine] = theirs + local
        else:
            gpu_target = _match(new, old, experts)
        placed = np.empty_like(new)
        placed[gpu_target] = new
        out[layer] = _kept(placed, old).reshape(-1)
    return out



def keep_gpu_slots(phy2log: np.ndarray, previous: np.ndarray, num_gpus: int) -> np.ndarray:
    """``phy2log`` [L, R] with each GPU's experts reordered so that every expert that already sat
    in a slot of that GPU in ``previous`` [L, R] keeps that slot; the others fill the free slots
    in order. The GPUs' expert sets, hence the balance, are unchanged (vLLM's default EPLB
    policy does the same after DeepSeek's algorithm)."""
    new = np.ascontiguousarray(phy2log, dtype=np.int64)
    old = np.ascontiguousarray(previous, dtype=np.int64)
    layers, replicas = new.shape
    rows = layers * int(num_gpus)
    return _kept(new.reshape(rows, -1), old.reshape(rows, -1)).reshape(layers, replicas)
