"""The placement algorithms by name, each run fresh (no plan in force to stay close to).

* ``"deepseek"``: exactly DeepSeek's open-source EPLB (:mod:`planner.deepseek`);
* ``"balanced"``: better-balanced packing, same policy constraints (:mod:`planner.balanced`);
* ``"topology"``: hierarchical layout plus cross-node replicas of hot experts
  (:mod:`planner.topology`; options ``remote_cost``, ``topk``).

Used by :func:`planner.eplb.plan_placement` and, for the fresh plan it starts from, by the
movement-aware re-planning (:mod:`planner.movement`).
"""

from __future__ import annotations

import numpy as np

from expertplane.errors import FieldError
from expertplane.planner.balanced import rebalance_balanced
from expertplane.planner.deepseek import deepseek_plan
from expertplane.planner.topology import rebalance_topology

__all__ = ["ALGORITHMS", "check_options", "fresh_placement"]

ALGORITHMS = ("deepseek", "balanced", "topology")

# algorithm -> the keyword options it accepts
_OPTIONS = {"deepseek": (), "balanced": (), "topology": ("remote_cost", "topk")}


def check_options(algorithm: str, options: dict) -> None:
    """Raise ``FieldError`` naming ``algorithm`` if unknown, or the first option it does not
    accept."""
    if algorithm not in ALGORITHMS:
        raise FieldError("algorithm", f"must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    allowed = _OPTIONS[algorithm]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FieldError(unknown[0], f"is not an option of algorithm {algorithm!r} "
                                         f"(options: {list(allowed) or 'none'})")


def fresh_placement(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                    num_gpus: int, algorithm: str,
                    **options) -> tuple[np.ndarray, np.ndarray | None]:
    """``algorithm``'s placement of validated loads ``weight`` [L, E]: (phy2log [L, R] int64,
    phyrank [L, R] where the algorithm defines one (deepseek), else None)."""
    if algorithm == "deepseek":
        phy2log, phyrank, _ = deepseek_plan(weight, num_replicas, num_groups, num_nodes, num_gpus)
        return phy2log, phyrank
    solve = rebalance_balanced if algorithm == "balanced" else rebalance_topology
    phy2log = solve(weight, num_replicas, num_groups, num_nodes, num_gpus, **options)
    return np.asarray(phy2log, dtype=np.int64), None
