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
                   num_gpus: int, *, algorithm: str = "deepseek", previous=None,
                   **options) -> tuple[np.ndarray, np.ndarray | None]:
    """Placement on validated numpy inputs: (phy2log [L, R] int64, phyrank [L, R] or None).

    phyrank (replica index of each slot within its expert) is given where the algorithm
    defines one (deepseek without ``previous``); otherwise replicas are ranked by slot index.
    """
    check_options(algorithm, options)
    if previous is None:
        return fresh_placement(weight, num_replicas, num_groups, num_nodes, num_gpus, algorithm,
                               **options)
    prev = check_phy2log(previous, weight.shape[1], field="previous")
    if prev.shape != (weight.shape[0], num_replicas):
        raise FieldError("previous", f"must have shape [{weight.shape[0]}, {num_replicas}]"
                                         f" (layers, replicas), got {list(prev.shape)}")
    phy2log = rebalance_with_previous(weight, num_replicas, num_groups, num_nodes, num_gpus,
                                      prev, algorithm, **options)
    return np.asarray(phy2log, dtype=np.int64), None


def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, *,
                      algorithm="deepseek", previous=None, **options):
    """Place ``num_replicas`` expert replicas on ``num_gpus`` GPUs in ``num_nodes`` nodes.

    weight: [L, E] load per logical expert (torch tensor, numpy array or nested list);
    num_groups: expert groups (hierarchical policy when num_groups % num_nodes == 0);
    previous: optional phy2log [L, R] of the plan in force (movement-aware re-planning);
    options: algorithm options ("topology": ``remote_cost``, ``topk``).
    Returns (phy2log [L, R], log2phy [L, E, X] -1 padded, logcnt [L, E]) as torch int64, with
    GPU g holding slots g*R/P .. (g+1)*R/P - 1. Raises ``FieldError`` on bad input.
    """
    w = check_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus)
    r, g, n, p = (as_int(v, f) for v, f in ((num_replicas, "num_replicas"),
                                           (num_groups, "num_groups"), (num_nodes, "num_nodes"),
                                           (num_gpus, "num_gpus")))
    phy2log, phyrank = plan_placement(w, r, g, n, p, algorithm=algorithm, previous=previous,
                                      **options)
    log2phy, logcnt = build_log2phy(phy2log, w.shape[1], phyrank)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)
