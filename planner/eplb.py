"""``rebalance_experts``: the drop-in EPLB entry point, dispatching to one placement algorithm.

Algorithms (each returns a placement ``phy2log [L, R]`` under the same constraints):

* ``"deepseek"`` (default): exactly DeepSeek's open-source EPLB (``planner.deepseek``);
* ``"balanced"``: better-balanced packing, same policy constraints (``planner.balanced``);
* ``"topology"``: hierarchical layout plus cross-node replicas of hot experts
  (``planner.topology``; option ``remote_cost``).

``previous=<phy2log in force>`` makes any of them movement-aware (``planner.movement``).
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from expertplane.errors import FieldError
from expertplane.planner.deepseek import deepseek_plan
from expertplane.planner.plan import build_log2phy
from expertplane.planner.validation import as_int, check_phy2log, check_rebalance_args

ALGORITHMS = ("deepseek", "balanced", "topology")

# algorithm -> (module, function, accepted keyword options)
_ENTRY_POINTS = {
    "balanced": ("expertplane.planner.balanced", "rebalance_balanced", ()),
    "topology": ("expertplane.planner.topology", "rebalance_topology", ("remote_cost", "topk")),
}


def _check_options(algorithm: str, options: dict) -> None:
    allowed = _ENTRY_POINTS[algorithm][2] if algorithm in _ENTRY_POINTS else ()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FieldError(unknown[0], f"is not an option of algorithm {algorithm!r} "
                                         f"(options: {list(allowed) or 'none'})")


def _import(module: str, name: str, field: str):
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise FieldError(field, f"needs {module}.{name}, which is not available: {exc}") \
            from None


def _entry_point(algorithm: str):
    module, name, _ = _ENTRY_POINTS[algorithm]
    return _import(module, name, "algorithm")


def plan_placement(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                   num_gpus: int, *, algorithm: str = "deepseek", previous=None,
                   **options) -> tuple[np.ndarray, np.ndarray | None]:
    """Placement on validated numpy inputs: (phy2log [L, R] int64, phyrank [L, R] or None).

    phyrank (replica index of each slot within its expert) is given where the algorithm
    defines one (deepseek without ``previous``); otherwise replicas are ranked by slot index.
    """
    if algorithm not in ALGORITHMS:
        raise FieldError("algorithm", f"must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    _check_options(algorithm, options)
    if previous is not None:
        prev = check_phy2log(previous, weight.shape[1], field="previous")
        if prev.shape != (weight.shape[0], num_replicas):
            raise FieldError("previous", f"must have shape [{weight.shape[0]}, {num_replicas}]"
                                             f" (layers, replicas), got {list(prev.shape)}")
        rebalance_with_previous = _import("expertplane.planner.movement",
                                          "rebalance_with_previous", "previous")
        phy2log = rebalance_with_previous(weight, num_replicas, num_groups, num_nodes, num_gpus,
                                          prev, algorithm, **options)
        return np.asarray(phy2log, dtype=np.int64), None
    if algorithm == "deepseek":
        phy2log, phyrank, _ = deepseek_plan(weight, num_replicas, num_groups, num_nodes, num_gpus)
        return phy2log, phyrank
    phy2log = _entry_point(algorithm)(weight, num_replicas, num_groups, num_nodes, num_gpus,
                                      **options)
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
