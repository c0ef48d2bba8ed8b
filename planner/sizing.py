"""Redundancy sizing: balance against the number of redundant experts, and a recommendation.

A redundant expert is a physical slot beyond one per logical expert: ``num_replicas = E + r``.
Only counts with ``num_replicas`` a multiple of ``num_gpus`` are plans (every GPU holds the same
number of slots), so candidates are ``r = k * num_gpus - E >= 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertplane.errors import FieldError
from expertplane.planner.bounds import lower_bound
from expertplane.planner.deepseek import is_hierarchical
from expertplane.planner.eplb import rebalance_experts
from expertplane.planner.metrics import balance
from expertplane.planner.validation import as_int, check_loads


@dataclass(frozen=True)
class SizingPoint:
    """One point of the sizing curve.

    num_redundant: slots beyond one per expert (r); num_replicas: E + r slots per layer;
    balance_mean / balance_max: mean and worst over layers of max / mean GPU load of the plan;
    bound_max: worst over layers of the balance lower bound (``planner.bounds``) at this size.
    """

    num_redundant: int
    num_replicas: int
    balance_mean: float
    balance_max: float
    bound_max: float


def default_candidates(num_experts: int, num_gpus: int, max_redundant: int | None = None
                       ) -> list[int]:
    """Every valid redundant count from the smallest up to ``max_redundant`` (default: E)."""
    limit = num_experts if max_redundant is None else int(max_redundant)
    first = -(-num_experts // num_gpus) * num_gpus - num_experts
    return list(range(first, limit + 1, num_gpus))


def _check_candidates(candidates, num_experts: int, num_gpus: int) -> list[int]:
    out = []
    for value in candidates:
        r = as_int(value, "candidates", minimum=0)
        if (num_experts + r) % num_gpus:
            raise FieldError("candidates", f"{r} redundant experts give {num_experts + r} "
                                               f"slots, not a multiple of num_gpus ({num_gpus})")
        out.append(r)
    if not out:
        raise FieldError("candidates", "must not be empty")
    return sorted(set(out))


def sizing_curve(weight, num_groups, num_nodes, num_gpus, candidates=None,
                 algorithm: str = "balanced") -> list[SizingPoint]:
    """Balance of ``algorithm``'s plan for each redundant count in ``candidates``.

    weight: [L, E] loads (tensor, array or list); candidates: redundant counts (each giving a
    multiple of num_gpus slots; default ``default_candidates``). Returns points sorted by count.
    """
    w = check_loads(weight)
    num_gpus = as_int(num_gpus, "num_gpus")
    experts = w.shape[1]
    if candidates is None:
        candidates = default_candidates(experts, num_gpus)
    points = []
    hier = is_hierarchical(as_int(num_groups, "num_groups"), as_int(num_nodes, "num_nodes"))
    for r in _check_candidates(candidates, experts, num_gpus):
        replicas = experts + r
        phy2log, _, logcnt = rebalance_experts(w, replicas, num_groups, num_nodes, num_gpus,
                                               algorithm=algorithm)
        b = balance(w, phy2log.numpy(), logcnt.numpy(), num_gpus)
        bound = lower_bound(w, replicas, num_groups, num_nodes, num_gpus, hier)
        points.append(SizingPoint(r, replicas, float(b.mean()), float(b.max()),
                                  float(bound.max())))
    return points


def recommend_redundancy(weight, num_groups, num_nodes, num_gpus, target_balance: float,
                         candidates=None, algorithm: str = "balanced",
                         metric: str = "max") -> tuple[SizingPoint | None, list[SizingPoint]]:
    """Smallest redundant count whose plan reaches ``target_balance``.

    metric: "max" (worst layer, default) or "mean" (mean over layers) balance compared with the
    target. Returns (the recommended point, or None if no candidate reaches the target; the
    whole curve).
    """
    if metric not in ("max", "mean"):
        raise FieldError("metric", f"must be 'max' or 'mean', got {metric!r}")
    target = float(target_balance)
    if not np.isfinite(target) or target < 1.0:
        raise FieldError("target_balance", f"must be a number >= 1.0, got {target_balance!r}")
    curve = sizing_curve(weight, num_groups, num_nodes, num_gpus, candidates, algorithm)
    for point in curve:
        value = point.balance_max if metric == "max" else point.balance_mean
        if value <= target:
            return point, curve
    return None, curve
