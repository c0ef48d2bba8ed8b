"""Movement-aware re-planning: a plan about as balanced as a fresh one that moves few slots.

Given the plan in force (``previous`` phy2log [L, R]) and new loads, a layer whose ``previous``
rows are already within ``tolerance`` (2%) of the fresh plan's balance keeps them
(``drifted_layers``); every other layer is re-planned (``replan_layers``):

1. **Aligned fresh plan.** Compute the fresh plan of the requested algorithm, then relabel it to
   look like ``previous``: nodes (hierarchical or topology plans) and GPUs are matched to the old
   ones by the number of replicas they keep (``scipy.optimize.linear_sum_assignment`` on the
   overlap), and inside each GPU every replica that already sat on that GPU keeps its old slot.
   Relabelling never changes the balance (:mod:`planner.alignment`).
2. **Repair of the old plan** (algorithms "deepseek" and "balanced"). Starting from
   ``previous`` itself, apply the best move per changed slot until the layer's balance is within
   ``tolerance`` (2%) of the fresh plan's: re-assign one slot to another expert (1 slot changed,
   replica counts change) or swap two slots between GPUs (2 slots changed), each touching the
   most loaded GPU and chosen to remove the most excess per changed slot, excess being the
   load of every touched GPU above ``1 - slack`` of the target (so moves leave headroom on the
   GPUs they fill rather than packing them to the brim for later moves; run once per slack in
   ``SLACKS``, since which headroom pays varies by layer). In hierarchical
   mode moves stay inside a node and experts only go to their group's node.
   Global policy also repairs a second start: ``previous`` changed to the fresh plan's replica
   counts with as few slot changes as counts allow (surplus replicas freed on the most loaded
   GPUs, missing ones put in the freed slots of the least loaded GPUs).
3. Per layer, the repaired plan with the fewest changed slots that reached the balance target
   is used if it changes fewer slots than the aligned fresh plan; otherwise the aligned fresh
   plan (same balance as fresh).
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import njit, prange

from expertplane.planner.algorithms import fresh_placement
from expertplane.planner.alignment import align
from expertplane.planner.compiled import wait_compiled
from expertplane.planner.deepseek import is_hierarchical
from expertplane.planner.metrics import gpu_loads
from expertplane.planner.plan import build_log2phy
from expertplane.planner.recount import recount_row
from expertplane.planner.repack import repack_worst
from expertplane.planner.repair import repair_row
from expertplane.planner.revert import revert_row
from expertplane.planner.slot_moves import row_loads
from expertplane.planner.warm import step_label

TOLERANCE = 0.02  # allowed relative balance loss against a fresh plan
# the repair counts GPU loads above (1 - slack) x target as excess; it runs once per slack
SLACKS = (0.01, 0.04)
_REPAIRABLE = ("deepseek", "balanced")


@njit(cache=True, parallel=True)
def _revert(weight, plans, previous, num_gpus, slot_node, expert_node, target):
    """``revert_row`` on every layer of a copy of ``plans`` [L, R]."""
    out = plans.copy()
    for layer in prange(plans.shape[0]):
        revert_row(weight[layer], out[layer], previous[layer], num_gpus, slot_node,
                   expert_node[layer], target[layer])
    return out


@njit(cache=True, parallel=True)
def _repair(weight, start, num_gpus, slot_node, expert_node, target, budget, slack):
    """Repair every layer of ``start`` [L, R] (copied); returns (plans, target reached [L])."""
    layers = weight.shape[0]
    out = start.copy()
    reached = np.zeros(layers, dtype=np.bool_)
    for layer in prange(layers):
        reached[layer] = repair_row(weight[layer], out[layer], num_gpus, slot_node,
                                    expert_node[layer], target[layer], budget[layer], slack)
    return out, reached


@njit(cache=True, parallel=True)
def _recount(weight, previous, new_counts, per_gpu):
    """[L, R] ``previous`` changed to the replica counts ``new_counts`` [L, E] (see
    ``recount_row``)."""
    out = previous.copy()
    for layer in prange(previous.shape[0]):
        recount_row(weight[layer], out[layer], new_counts[layer], per_gpu)
    return out


def _expert_nodes(previous: np.ndarray, num_experts: int, num_groups: int, num_nodes: int):
    """[L, E] node of each expert's group in ``previous`` (-1 if its group spans nodes)."""
    layers, replicas = previous.shape
    group_size = num_experts // num_groups
    slot_node = np.arange(replicas) // (replicas // num_nodes)
    seen = np.zeros((layers, num_groups, num_nodes), dtype=bool)
    seen[np.arange(layers)[:, None], previous // group_size, slot_node[None, :]] = True
    single = seen.sum(-1) == 1
    group_node = np.where(single, seen.argmax(-1), -1)
    return np.repeat(group_node, group_size, axis=1)


def drifted_layers(weight: np.ndarray, previous: np.ndarray, fresh: np.ndarray,
                   num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """(drifted bool [L], target float64 [L]): the balance target of each layer, ``TOLERANCE``
    above the max GPU load of ``fresh`` [L, R] on ``weight`` [L, E], and whether ``previous``
    [L, R] misses it. A layer that meets it is what the repair returns unchanged, so a
    movement-aware re-plan keeps its rows and only the drifted layers need planning."""
    experts = weight.shape[1]
    fresh_loads = gpu_loads(weight, fresh, build_log2phy(fresh, experts)[1], num_gpus)
    target = fresh_loads.max(-1) * (1.0 + TOLERANCE)
    return _previous_max(weight, previous, num_gpus) > target, target


@njit(cache=True)
def _previous_max(weight, previous, num_gpus):
    """[L] max GPU load of each layer of ``previous`` [L, R] on ``weight`` [L, E], summed as
    ``repair_row`` sums it (the same rounding, so its stopping test and ours agree)."""
    out = np.empty(weight.shape[0])
    for layer in range(weight.shape[0]):
        out[layer] = row_loads(weight[layer], previous[layer], num_gpus)[2].max()
    return out


def rebalance_with_previous(weight, num_replicas, num_groups, num_nodes, num_gpus,
                            previous: np.ndarray, algorithm: str, *, fresh: np.ndarray | None = None,
                            **options) -> np.ndarray:
    """Movement-aware phy2log int64 [L, R]: balance within ``TOLERANCE`` of a fresh plan of
    ``algorithm`` (per layer), changing as few slots of ``previous`` [L, R] as found.

    ``fresh``: the fresh plan [L, R] of ``algorithm`` on ``weight``, when the caller has it
    (else computed here). Layers of ``previous`` already within ``TOLERANCE`` of it are kept as
    they are (``drifted_layers``); only the others are re-planned (``replan_layers``, whose
    result on such a layer is ``previous`` too, so this is the same plan at a fraction of the
    cost when few layers drifted). Arguments are validated by the caller
    (``rebalance_experts``); ``options`` go to the algorithm.
    """
    w = np.ascontiguousarray(weight, dtype=np.float64)
    prev = np.ascontiguousarray(previous, dtype=np.int64)
    r, g, n, p = int(num_replicas), int(num_groups), int(num_nodes), int(num_gpus)
    if fresh is None:
        fresh = fresh_placement(w, r, g, n, p, algorithm, **options)[0]
    fresh = np.ascontiguousarray(fresh, dtype=np.int64)
    if algorithm not in _REPAIRABLE:
        return align(fresh, prev, p, n, by_node=is_hierarchical(g, n) or algorithm == "topology")
    wait_compiled("movement-aware re-planning", step_label(algorithm, is_hierarchical(g, n)))
    drifted, _ = drifted_layers(w, prev, fresh, p)
    out = prev.copy()
    if drifted.any():
        out[drifted] = replan_layers(w[drifted], r, g, n, p, prev[drifted], fresh[drifted],
                                     algorithm)
    return out


def replan_layers(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                  num_gpus: int, previous: np.ndarray, fresh: np.ndarray,
                  algorithm: str) -> np.ndarray:
    """The movement-aware re-plan (steps 1-3 above) of every layer of ``previous`` [L, R]
    against ``fresh`` [L, R], the fresh plan of ``algorithm`` ("deepseek" or "balanced") on
    ``weight`` [L, E] float64: int64 [L, R]."""
    w, prev, r, g, n, p = weight, previous, num_replicas, num_groups, num_nodes, num_gpus
    layers, experts = w.shape
    hier = is_hierarchical(g, n)
    aligned = align(fresh, prev, p, n, by_node=hier)
    _, target = drifted_layers(w, prev, fresh, p)
    if hier:
        slot_node = np.arange(r) // (r // n)
        aligned = _revert(w, aligned, prev, p, slot_node, _expert_nodes(aligned, experts, g, n),
                          target)
        expert_node = _expert_nodes(prev, experts, g, n)
        if (expert_node < 0).any():  # previous breaks groups-on-node: no repair from it
            return aligned
        starts = [prev]
    else:
        slot_node = np.zeros(r, dtype=np.int64)
        expert_node = np.full((layers, experts), -1, dtype=np.int64)
        aligned = _revert(w, aligned, prev, p, slot_node, expert_node, target)
        starts = [prev, _recount(w, prev, build_log2phy(fresh, experts)[1], r // p)]
    budget = (aligned != prev).sum(-1)
    best, best_moves = aligned, budget
    for start, slack in itertools.product(starts, SLACKS):
        spent = (start != prev).sum(-1)
        repaired, reached = _repair(w, start, p, slot_node, expert_node, target,
                                    np.maximum(best_moves - spent, 0), slack)
        if not hier:  # also re-pack the worst GPUs of the repaired plan or of the start
            for layer in range(layers):
                for plan in (repaired[layer], start[layer]):
                    limit = (repaired[layer] != prev[layer]).sum() if reached[layer] \
                        else best_moves[layer]
                    fixed = repack_worst(w[layer], plan, prev[layer], p, target[layer],
                                         min(limit, best_moves[layer]))
                    if fixed is not None:
                        repaired[layer], reached[layer] = fixed, True
        moves = (repaired != prev).sum(-1)
        use = reached & (moves < best_moves)
        best = np.where(use[:, None], repaired, best)
        best_moves = np.where(use, moves, best_moves)
    return best
