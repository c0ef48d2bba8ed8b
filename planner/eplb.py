"""``rebalance_experts``: the drop-in EPLB entry point, dispatching to one placement algorithm.

Algorithms (each returns a placement ``phy2log [L, R]`` under the same constraints):

``"deepseek"`` (default), ``"balanced"``, ``"topology"`` (:mod:`planner.algorithms`).

``previous=<phy2log in force>`` makes any of them movement-aware (``planner.movement``).
"""

from __future__ import annotations

import numpy as np
import torch

from expertplane.errors import FieldError
from expertplane.planner.algorithms import ALGORITHMS, check_options, fresh_placement
from expertplane.planner.movement import rebalance_with_previous
from expertplane.planner.plan import build_log2phy
from expertplane.planner.validation import as_int, check_phy2log, check_rebalance_args

__all__ = ["ALGORITHMS", "plan_placement", "rebalance_experts"]


def plan_placement(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                   num_gpus: int, *, algorithm: str = "deepseek", previous=None, fresh=None,
                   **options) -> tuple[np.ndarray, np.ndarray | None]:
    """Placement on validated numpy inputs: (phy2log [L, R] int64, phyrank [L, R] or None).

    phyrank (replica index of each slot within its expert) is given where the algorithm
    defines one (deepseek without ``previous``); otherwise replicas are ranked by slot index.
    ``fresh``: with ``previous``, the algorithm's fresh plan [L, R] of ``weight`` when the
    caller already computed it (the movement-aware re-plan starts from it instead of planning
    again).
    """
    check_options(algorithm, options)
    if previous is None:
        if fresh is not None:
            raise FieldError("fresh", "is only used with previous (movement-aware re-planning)")
        return fresh_placement(weight, num_replicas, num_groups, num_nodes, num_gpus, algorithm,
                               **options)
    shape = (weight.shape[0], num_replicas)
    prev = _checked_plan(previous, weight.shape[1], shape, "previous")
    given = None if fresh is None else _checked_plan(fresh, weight.shape[1], shape, "fresh")
    phy2log = rebalance_with_previous(weight, num_replicas, num_groups, num_nodes, num_gpus,
                                      prev, algorithm, fresh=given, **options)
    return np.asarray(phy2log, dtype=np.int64), None


def _checked_plan(plan, num_logical: int, shape: tuple[int, int], field: str) -> np.ndarray:
    """``plan`` as int64 [L, R] of ids in [0, num_logical), of ``shape`` (FieldError on
    ``field`` otherwise)."""
    out = check_phy2log(plan, num_logical, field=field)
    if out.shape != shape:
        raise FieldError(field, f"must have shape [{shape[0]}, {shape[1]}] (layers, replicas), "
                                f"got {list(out.shape)}")
    return out


def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, *,
                      algorithm="deepseek", previous=None, fresh=None, **options):
    """Place ``num_replicas`` expert replicas on ``num_gpus`` GPUs in ``num_nodes`` nodes.

    weight: [L, E] load per logical expert (torch tensor, numpy array or nested list);
    num_groups: expert groups (hierarchical policy when num_groups % num_nodes == 0);
    previous: optional phy2log [L, R] of the plan in force (movement-aware re-planning);
    fresh: optional, with ``previous``: the algorithm's fresh phy2log [L, R] of ``weight``
    (saves planning it again);
    options: algorithm options ("topology": ``remote_cost``, ``topk``).
    Returns (phy2log [L, R], log2phy [L, E, X] -1 padded, logcnt [L, E]) as torch int64, with
    GPU g holding slots g*R/P .. (g+1)*R/P - 1. Raises ``FieldError`` on bad input.
    """
    w = check_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus)
    r, g, n, p = (as_int(v, f) for v, f in ((num_replicas, "num_replicas"),
                                           (num_groups, "num_groups"), (num_nodes, "num_nodes"),
                                           (num_gpus, "num_gpus")))
    phy2log, phyrank = plan_placement(w, r, g, n, p, algorithm=algorithm, previous=previous,
                                      fresh=fresh, **options)
    log2phy, logcnt = build_log2phy(phy2log, w.shape[1], phyrank)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)
