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
from expertplane.planner.alignment import align, match_sets
from expertplane.planner.balanced import pack_items
from expertplane.planner.compiled import wait_compiled
from expertplane.planner.deepseek import is_hierarchical
from expertplane.planner.metrics import gpu_loads
from expertplane.planner.plan import build_log2phy

TOLERANCE = 0.02  # allowed relative balance loss against a fresh plan
# the repair counts GPU loads above (1 - slack) x target as excess; it runs once per slack
SLACKS = (0.01, 0.04)
_REL = 1e-12
_REPAIRABLE = ("deepseek", "balanced")


@njit(cache=True)
def _apply_relabel(row, counts, w, slot_load, gpu_load, per_gpu, j, e):
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
def _index_slots(row, num_experts, starts, slots):
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
def _relabel_max(row, counts, w, slot_load, gpu_load, per_gpu, j, e, starts, slots, delta,
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
def _excess(load, level):
    """How far a GPU load lies above ``level`` (0 below it)."""
    return max(load - level, 0.0)


@njit(cache=True)
def _expert_parts(w, counts, gpu_load, per_gpu, starts, slots, on_gpu, level, lose_d, gain_d,
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
            a += _excess(gpu_load[q], level) - _excess(gpu_load[q] + n * lose_d[x], level)
            b += _excess(gpu_load[q], level) - _excess(gpu_load[q] + n * gain_d[x], level)
        for k in range(starts[x], starts[x + 1]):
            mark[slots[k] // per_gpu] = False
        lose[x] = a
        gain[x] = b


@njit(cache=True)
def _relabel_bound(w, counts, gpu_load, per_gpu, starts, slots, on_gpu, level, lose_d, gain_d,
                   lose, gain, mark, j, f, e, top):
    """(excess removed, upper bound of the score ``gain + 1e-3 * (top - new top)``) of giving
    slot j (expert f) to expert e, from the per-expert parts of ``_expert_parts``: only the
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
            counted += _excess(load, level) - _excess(load + nf * lose_d[f], level)
        if ne:
            counted += _excess(load, level) - _excess(load + ne * gain_d[e], level)
        corr += _excess(load, level) - _excess(load + d, level) - counted
        low_top = max(low_top, load + d)
    for k in range(starts[x], starts[x + 1] + 1):
        mark[h if k == starts[x + 1] else slots[k] // per_gpu] = False
    removed = lose[f] + gain[e] + corr
    return removed, removed + 1e-3 * (top - low_top)


@njit(cache=True)
def _row_loads(w, row, num_gpus):
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


@njit(cache=True)
def _repair_row(w, row, num_gpus, slot_node, expert_node, target, budget, slack):
    """Repair one layer's plan ``row`` [R] (in place) towards max GPU load <= ``target``.

    Each step changes the most loaded GPU's slots or counts by the move that removes the most
    excess (GPU load above ``(1 - slack) * target``, summed over the touched GPUs) per changed
    slot; it stops when no move removes any. slot_node [R] node of each slot; expert_node [E]
    node an expert must stay on (-1: any). At most ``budget`` slot changes are spent. Returns
    True if the target was reached.
    """
    replicas = row.shape[0]
    per_gpu = replicas // num_gpus
    counts, slot_load, gpu_load = _row_loads(w, row, num_gpus)
    level = target * (1.0 - slack)
    delta = np.zeros(num_gpus)
    touched = np.empty(num_gpus, dtype=np.int64)
    mark = np.zeros(num_gpus, dtype=np.bool_)
    on_g = np.zeros(w.shape[0], dtype=np.bool_)
    g_experts = np.empty(per_gpu, dtype=np.int64)
    starts = np.zeros(w.shape[0] + 1, dtype=np.int64)
    slots = np.empty(replicas, dtype=np.int64)
    on_gpu = np.zeros((num_gpus, w.shape[0]), dtype=np.int64)
    for i in range(replicas):
        on_gpu[i // per_gpu, row[i]] += 1
    lose_d, gain_d = np.zeros(w.shape[0]), np.zeros(w.shape[0])
    lose, gain_of = np.zeros(w.shape[0]), np.zeros(w.shape[0])
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
        _index_slots(row, w.shape[0], starts, slots)
        _expert_parts(w, counts, gpu_load, per_gpu, starts, slots, on_gpu, level, lose_d, gain_d,
                      lose, gain_of, mark)
        slack = 1e-9 * top  # the bound sums in another order: room for rounding
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
                removed, bound = _relabel_bound(w, counts, gpu_load, per_gpu, starts, slots,
                                                on_gpu, level, lose_d, gain_d, lose, gain_of,
                                                mark, j, f, e, top)
                if removed + slack <= top * _REL or bound + slack < best_score:
                    continue  # cannot be taken below: skip the exact evaluation
                new_top, nt = _relabel_max(row, counts, w, slot_load, gpu_load, per_gpu, j, e,
                                           starts, slots, delta, touched, mark)
                gain = 0.0
                for t in range(nt):
                    h = touched[t]
                    gain += _excess(gpu_load[h], level) - _excess(gpu_load[h] + delta[h], level)
                if gain > top * _REL:
                    score = gain + 1e-3 * (top - new_top)
                    if score > best_score:
                        best_score, best_kind, best_a, best_b = score, 1, j, e
                for t in range(nt):
                    mark[touched[t]] = False
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
                gain = (_excess(top, level) + _excess(gpu_load[h], level)
                        - _excess(top - d, level) - _excess(gpu_load[h] + d, level))
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
            _apply_relabel(row, counts, w, slot_load, gpu_load, per_gpu, best_a, best_b)
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


@njit(cache=True)
def _revert_row(w, row, prev, num_gpus, slot_node, expert_node, target):
    """Put slots of ``row`` [R] (in place) back to their expert in ``prev`` [R] while the max
    GPU load stays <= ``target``: single slots (changes replica counts) and pairs of slots that
    exchanged experts (counts unchanged). Three passes over the changed slots at most."""
    replicas = row.shape[0]
    per_gpu = replicas // num_gpus
    counts, slot_load, gpu_load = _row_loads(w, row, num_gpus)
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
            _index_slots(row, w.shape[0], starts, slots)
            new_top, nt = _relabel_max(row, counts, w, slot_load, gpu_load, per_gpu, j, y,
                                       starts, slots, delta, touched, mark)
            rest = -np.inf
            for g in range(num_gpus):
                if not mark[g]:
                    rest = max(rest, gpu_load[g])
            for t in range(nt):
                mark[touched[t]] = False
            if max(new_top, rest) <= target:
                _apply_relabel(row, counts, w, slot_load, gpu_load, per_gpu, j, y)
                changed = True
        if not changed:
            break


@njit(cache=True, parallel=True)
def _revert(weight, plans, previous, num_gpus, slot_node, expert_node, target):
    """``_revert_row`` on every layer of a copy of ``plans`` [L, R]."""
    out = plans.copy()
    for layer in prange(plans.shape[0]):
        _revert_row(weight[layer], out[layer], previous[layer], num_gpus, slot_node,
                    expert_node[layer], target[layer])
    return out


@njit(cache=True, parallel=True)
def _repair(weight, start, num_gpus, slot_node, expert_node, target, budget, slack):
    """Repair every layer of ``start`` [L, R] (copied); returns (plans, target reached [L])."""
    layers = weight.shape[0]
    out = start.copy()
    reached = np.zeros(layers, dtype=np.bool_)
    for layer in prange(layers):
        reached[layer] = _repair_row(weight[layer], out[layer], num_gpus, slot_node,
                                     expert_node[layer], target[layer], budget[layer], slack)
    return out, reached


@njit(cache=True)
def _recount_row(w, row, new_counts, per_gpu):
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


@njit(cache=True, parallel=True)
def _recount(weight, previous, new_counts, per_gpu):
    """[L, R] ``previous`` changed to the replica counts ``new_counts`` [L, E] (see
    ``_recount_row``)."""
    out = previous.copy()
    for layer in prange(previous.shape[0]):
        _recount_row(weight[layer], out[layer], new_counts[layer], per_gpu)
    return out


def _repack_worst(w_row, plan_row, prev_row, num_gpus, target, best_moves):
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
    ``_repair_row`` sums it (the same rounding, so its stopping test and ours agree)."""
    out = np.empty(weight.shape[0])
    for layer in range(weight.shape[0]):
        out[layer] = _row_loads(weight[layer], previous[layer], num_gpus)[2].max()
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
    wait_compiled("movement-aware re-planning")
    w = np.ascontiguousarray(weight, dtype=np.float64)
    prev = np.ascontiguousarray(previous, dtype=np.int64)
    r, g, n, p = int(num_replicas), int(num_groups), int(num_nodes), int(num_gpus)
    if fresh is None:
        fresh = fresh_placement(w, r, g, n, p, algorithm, **options)[0]
    fresh = np.ascontiguousarray(fresh, dtype=np.int64)
    if algorithm not in _REPAIRABLE:
        return align(fresh, prev, p, n, by_node=is_hierarchical(g, n) or algorithm == "topology")
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
                    fixed = _repack_worst(w[layer], plan, prev[layer], p, target[layer],
                                          min(limit, best_moves[layer]))
                    if fixed is not None:
                        repaired[layer], reached[layer] = fixed, True
        moves = (repaired != prev).sum(-1)
        use = reached & (moves < best_moves)
        best = np.where(use[:, None], repaired, best)
        best_moves = np.where(use, moves, best_moves)
    return best
