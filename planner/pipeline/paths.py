"""Critical-path lower bounds on the step time, as sums of per-boundary terms.

The step time of a partition is the longest path through the step DAG (``dag.py``). For any
fixed path ``p``, its length is a lower bound on the step time of *every* partition, and it is
linear in the stage times: an ``F``/``B``/``W`` operation of stage ``s`` lasts ``F_s``,
``B_s``, ``B_s - W_s`` or ``W_s``; an ``F&B`` pair lasts ``max(f, b) + (1 - overlap) min(f, b)
>= f + (1 - overlap) b`` (and ``>= b + (1 - overlap) f``), so fixing which half is the longer one
gives a linear lower bound; each hop to another rank adds ``p2p``. With stage ``s`` =
layers ``[x_s, x_{s+1})`` and prefix sums ``cum`` ``[L+1, 3]``, ``T_s = cum[x_{s+1}] - cum[x_s]``,
so the path's length is ``const + sum_j D[j] . cum[x_j]`` (``D[j] = C[j-1] - C[j]``, ``C[s]`` the
path's ``(F, B, W)`` count of stage ``s``), a sum of one term per boundary.

``PathBounds`` keeps a growing set of such paths (``P`` rows) and, per row, the table
``Q[p, j, v]``: the least value of the terms of boundaries ``j..S`` over all increasing
completions ``v = x_j < x_{j+1} < ... < x_S = L`` (one right-to-left pass with running minima).
For a search node with boundaries ``x_0..x_k`` fixed, ``max_p (terms of x_1..x_k +
Q[p, k+1, e])`` is a valid lower bound of every partition with ``x_{k+1} = e``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from expertplane.planner.pipeline.dag import Dag, finish_times


@njit(cache=True)
def _backtrack(start, end, f_stage, b_stage, b_coef, preds, remote, lag, times, overlap, coef):
    """Walk back from the last-ending op along the predecessors that set each op's start.

    Adds each op's linearised ``(F, B, W)`` count per stage to ``coef`` ``[S, 3]``; returns
    the number of cross-rank edges taken (``remote``).
    """
    n = len(f_stage)
    i = 0
    for k in range(n):
        if end[k] > end[i]:
            i = k
    hops = 0
    while True:
        fs, bs = f_stage[i], b_stage[i]
        f = times[fs, 0] if fs >= 0 else 0.0
        b = times[bs, 1] * b_coef[i, 0] + times[bs, 2] * b_coef[i, 1] if bs >= 0 else 0.0
        wf, wb = (1.0, 1.0 - overlap) if f >= b else (1.0 - overlap, 1.0)
        if fs >= 0:
            coef[fs, 0] += wf
        if bs >= 0:
            coef[bs, 1] += wb * b_coef[i, 0]
            coef[bs, 2] += wb * b_coef[i, 1]
        nxt, gap = -1, np.inf
        for j in range(3):
            p = preds[i, j]
            if p < n and start[i] - (end[p] + lag[i, j]) < gap:
                nxt, gap = j, start[i] - (end[p] + lag[i, j])
        if nxt < 0:
            return hops
        if remote[i, nxt]:
            hops += 1
        i = preds[i, nxt]


def critical_path(dag: Dag, times: np.ndarray, p2p: float, overlap: float
                  ) -> tuple[np.ndarray, int]:
    """The longest path of the step with stage times ``times`` ``[S, 3]`` as ``(coef [S, 3],
    hops)``: its length is ``sum(coef * times) + hops * p2p`` (exactly the step time, up to
    rounding; a lower bound of the step time for any other stage times)."""
    times = np.ascontiguousarray(times, dtype=float)
    start, end = finish_times(dag, times, p2p, overlap)
    coef = np.zeros(times.shape)
    hops = _backtrack(start, end, dag.f_stage, dag.b_stage, dag.b_coef, dag.preds, dag.remote,
                      dag.remote * p2p, times, overlap, coef)
    return coef, int(hops)


@njit(cache=True)
def _middle_min(terms, first, last, hi, out):
    """``out[p, e]``: least ``sum_{j=first..last} terms[p, j, y_j]`` over ``e < y_first < ... <
    y_last < hi`` (0 where ``first > last`` and ``e < hi``; infinite where nothing fits).
    ``terms`` ``[P, S+1, L+1]``, ``out`` ``[P, L+1]``."""
    P, L = terms.shape[0], terms.shape[2] - 1
    cur = np.empty(L + 1)
    for p in range(P):
        for v in range(L + 1):
            cur[v] = 0.0 if v < hi else np.inf
        if first <= last:
            for v in range(L + 1):
                cur[v] = terms[p, last, v] if v < hi else np.inf
            for j in range(last - 1, first - 1, -1):
                best = np.inf
                for v in range(L, -1, -1):
                    nxt = cur[v]
                    cur[v] = terms[p, j, v] + best
                    if nxt < best:
                        best = nxt
            best = np.inf
            for v in range(L, -1, -1):          # shift: out[e] = min over y_first > e
                nxt = cur[v]
                cur[v] = best
                if nxt < best:
                    best = nxt
        for v in range(L + 1):
            out[p, v] = cur[v]


class PathBounds:
    """A growing set of path lower bounds for one problem (prefix sums ``cum`` ``[L+1, 3]``).

    ``terms [P, S+1, L+1]``: per row ``p``, ``D[j] . cum[v]``, the term of boundary ``j`` at
    layer ``v``; ``const [P]`` seconds (hops x ``p2p`` plus the fixed ``x_S = L`` term).
    ``middle(first, last, hi)`` tables are cached and extended when rows are added.
    """

    def __init__(self, cum: np.ndarray, num_stages: int, p2p: float, capacity: int = 128):
        self.cum, self.S, self.p2p, self.capacity = cum, num_stages, p2p, capacity
        self.terms = np.zeros((0, num_stages + 1, len(cum)))
        self.const = np.zeros(0)
        self._seen: set[bytes] = set()
        self._middle: dict[tuple[int, int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.const)

    def add(self, coef: np.ndarray, hops: int) -> bool:
        """Add the path with stage counts ``coef`` ``[S, 3]`` and ``hops`` cross-rank edges;
        False if it is already held or the set is full."""
        key = np.round(coef, 9).tobytes() + int(hops).to_bytes(4, "little")
        if key in self._seen or len(self) >= self.capacity:
            return False
        self._seen.add(key)
        d = np.zeros((self.S + 1, 3))
        d[1:] += coef
        d[:-1] -= coef
        terms = d @ self.cum.T                                                  # [S+1, L+1]
        self.terms = np.concatenate([self.terms, terms[None]])
        self.const = np.append(self.const, hops * self.p2p + terms[self.S, -1])
        return True

    def fixed(self, bounds: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Constants plus the terms ``[P]`` of boundaries ``index`` at ``bounds[index]``."""
        return self.const + self.terms[:, index, bounds[index]].sum(axis=1)

    def middle(self, first: int, last: int, hi: int) -> np.ndarray:
        """``[P, L+1]``: least terms of boundaries ``first..last`` strictly between ``e`` (the
        column) and ``hi`` (cached; ``_middle_min``)."""
        key = (first, last, hi)
        have = self._middle.get(key)
        if have is None or len(have) < len(self):
            done = 0 if have is None else len(have)
            new = np.empty((len(self) - done, self.terms.shape[2]))
            _middle_min(self.terms[done:], first, last, hi, new)
            have = new if have is None else np.concatenate([have, new])
            self._middle[key] = have
        return have

    def value(self, cuts: np.ndarray) -> np.ndarray:
        """Largest row length ``[K]`` at complete partitions ``cuts`` ``[K, S+1]``."""
        if len(self) == 0:
            return np.zeros(len(cuts))
        j = np.arange(1, self.S)
        vals = self.terms[:, j[None, :], cuts[:, 1:-1]].sum(axis=2) + self.const[:, None]
        return vals.max(axis=0)
