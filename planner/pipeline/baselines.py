"""Baseline partitions: an even split by layer count and a min-max split of a per-layer weight
(DeepSpeed's ``partition_method="parameters"`` balances parameter counts this way)."""

from __future__ import annotations

import numpy as np
from numba import njit

from expertplane.errors import FieldError


def _check(num_layers: int, num_stages: int) -> None:
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not \
            1 <= num_stages <= num_layers:
        raise FieldError("num_stages", f"must be an integer in [1, {num_layers}], "
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
    within the threshold, found on the prefix sums; numba) checks each threshold. Stages left
    empty by the greedy pass are made by splitting off single layers, which never raises the
    maximum.
    """
    w = np.asarray(weights, dtype=float)
    _check(len(w), num_stages)
    if (w < 0).any() or not np.isfinite(w).all():
        raise FieldError("weights", "must be finite and >= 0")
    cuts = list(_bisect_cuts(np.concatenate([[0.0], np.cumsum(w)]), num_stages))
    while len(cuts) < num_stages + 1:             # split the first multi-layer stage
        s = next(i for i in range(len(cuts) - 1) if cuts[i + 1] - cuts[i] > 1)
        cuts.insert(s + 1, cuts[s] + 1)
    return tuple(int(x) for x in cuts)


@njit(cache=True)
def _greedy(cum, num_stages, limit, cuts):
    """Greedy cuts of prefix sums ``cum`` ``[L+1]`` into at most ``num_stages`` runs of sum
    ``<= limit`` (each run as long as possible); returns the cut count, or 0 if impossible."""
    n, count = len(cum) - 1, 1
    cuts[0] = 0
    while cuts[count - 1] < n:
        if count > num_stages:
            return 0
        end = np.searchsorted(cum, cum[cuts[count - 1]] + limit, side="right") - 1
        if end == cuts[count - 1]:
            return 0
        cuts[count] = end
        count += 1
    return count


@njit(cache=True)
def _bisect_cuts(cum, num_stages):
    """Cuts (``0 .. L``, at most ``num_stages`` runs) of the least feasible greedy limit,
    bisected 100 times between the largest weight and the total."""
    cuts = np.zeros(num_stages + 1, dtype=np.int64)
    lo, hi = np.max(np.diff(cum)), cum[-1]
    for _ in range(100):
        mid = (lo + hi) / 2
        if _greedy(cum, num_stages, mid, cuts) == 0:
            lo = mid
        else:
            hi = mid
    return cuts[:_greedy(cum, num_stages, hi, cuts)].copy()
