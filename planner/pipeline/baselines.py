"""Baseline partitions: an even split by layer count and a min-max split of a per-layer weight
(DeepSpeed's ``partition_method="parameters"`` balances parameter counts this way)."""

from __future__ import annotations

import numpy as np

from expertplane.planner.errors import PlanInputError


def _check(num_layers: int, num_stages: int) -> None:
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not \
            1 <= num_stages <= num_layers:
        raise PlanInputError("num_stages", f"must be an integer in [1, {num_layers}], "
                                           f"got {num_stages!r}")


def even_boundaries(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """``num_stages + 1`` boundaries giving every stage ``L // S`` or ``L // S + 1`` layers
    (the larger stages first, like DeepSpeed's ``uniform`` method)."""
    _check(num_layers, num_stages)
    base, extra = divmod(num_layers, num_stages)
    sizes = [base + (s < extra) for s in range(num_stages)]
    return tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)]))


def balanced_boundaries(weights, num_stages: int) -> tuple[int, ...]:
    """Contiguous split of ``weights`` ``[L]`` (>= 0) minimising the largest stage sum.

    Bisects the largest stage sum; a greedy pass (each stage takes the longest run of layers
    within the threshold, found on the prefix sums) checks each threshold. Stages left empty by
    the greedy pass are made by splitting off single layers, which never raises the maximum.
    """
    w = np.asarray(weights, dtype=float)
    _check(len(w), num_stages)
    if (w < 0).any() or not np.isfinite(w).all():
        raise PlanInputError("weights", "must be finite and >= 0")
    cum = np.concatenate([[0.0], np.cumsum(w)])

    def greedy(limit: float) -> list[int] | None:
        cuts = [0]
        while cuts[-1] < len(w) and len(cuts) <= num_stages:
            end = int(np.searchsorted(cum, cum[cuts[-1]] + limit, side="right")) - 1
            if end == cuts[-1]:
                return None
            cuts.append(end)
        return cuts if cuts[-1] == len(w) else None

    lo, hi = float(w.max(initial=0.0)), float(cum[-1])
    for _ in range(100):
        mid = (lo + hi) / 2
        if greedy(mid) is None:
            lo = mid
        else:
            hi = mid
    cuts = greedy(hi)
    while len(cuts) < num_stages + 1:             # split the first multi-layer stage
        s = next(i for i in range(len(cuts) - 1) if cuts[i + 1] - cuts[i] > 1)
        cuts.insert(s + 1, cuts[s] + 1)
    return tuple(int(x) for x in cuts)
