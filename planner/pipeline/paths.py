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

``PathBounds`` keeps a growing set of such rows ``[P]`` for the outside-in search of two-stage
ranks (``partition._search_dual``), whose nodes fix the boundaries ``0..k`` and ``S-k..S`` and
leave the middle ones free between ``lo = x_k`` and ``hi = x_{S-k}``. The least value of a row's
middle terms over all increasing ``lo < x_{k+1} < ... < x_{S-k-1} < hi`` is one right-to-left
pass with running minima, tabulated for every ``lo`` at once per ``(first, last, hi)``
(``_middle_min``, cached). The fixed terms plus that minimum is a valid bound for every
partition below the node; the largest over the rows is the node's path bound.

One path alone can be dodged: its least completion moves layers off the stages it weighs most.
A convex combination of rows is also a lower bound whose least completion is one dynamic
program (``_middle_argmin``), and the bound is concave in the weights, so
``add_combination`` maximises it for a node by Kelley's cutting planes (each round's weights
solve the matrix game of the rows against the completions found so far, ``_game``) and keeps
the combination as a row.
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
    P = terms.shape[0]
    out[:, :] = np.inf
    for p in range(P):
        cur = out[p]
        for v in range(hi):
            cur[v] = terms[p, last, v] if first <= last else 0.0
        if first > last:
            continue
        for j in range(last - 1, first - 1, -1):
            best = np.inf
            for v in range(hi - 1, -1, -1):
                nxt = cur[v]
                cur[v] = terms[p, j, v] + best
                if nxt < best:
                    best = nxt
        best = np.inf
        for v in range(hi - 1, -1, -1):              # shift: out[e] = min over y_first > e
            nxt = cur[v]
            cur[v] = best
            if nxt < best:
                best = nxt


@njit(cache=True)
def _middle_argmin(terms, first, last, lo, hi, ys):
    """Least ``sum_{j=first..last} terms[j, y_j]`` over ``lo < y_first < ... < y_last < hi``
    (``terms`` ``[S+1, L+1]``); writes the minimiser to ``ys`` ``[last - first + 1]``."""
    L = terms.shape[1] - 1
    n = last - first + 1
    val = np.full((n, L + 1), np.inf)
    nxt = np.full((n, L + 1), -1)
    for v in range(L + 1):
        if v < hi:
            val[n - 1, v] = terms[last, v]
    for i in range(n - 2, -1, -1):
        best, arg = np.inf, -1
        for v in range(L, -1, -1):
            val[i, v] = terms[first + i, v] + best
            nxt[i, v] = arg
            if val[i + 1, v] < best:
                best, arg = val[i + 1, v], v
    best, arg = np.inf, -1
    for v in range(lo + 1, L + 1):
        if val[0, v] < best:
            best, arg = val[0, v], v
    if arg < 0:
        return np.inf
    ys[0] = arg
    for i in range(1, n):
        ys[i] = nxt[i - 1, ys[i - 1]]
    return best


class PathBounds:
    """A growing set of lower bounds ``const + sum_j terms[j, x_j]`` for one problem.

    ``cum`` ``[L+1, 3]``: prefix sums of the layers' ``(F, B, W)``. Rows are critical paths
    (``add``) and convex combinations of rows (``add_combination``). ``terms`` ``[P, S+1,
    L+1]`` (seconds): row ``p``'s term of boundary ``j`` at layer ``v``; ``const`` ``[P]``
    seconds, including the term of the fixed ``x_S = L``. At most ``capacity`` rows are kept
    (about ``max_bytes`` of terms); ``middle`` tables are cached up to ``max_bytes`` too.
    """

    def __init__(self, cum: np.ndarray, num_stages: int, p2p: float,
                 max_bytes: float = 64e6):
        self.cum, self.S, self.p2p = cum, num_stages, p2p
        row_bytes = 8 * (num_stages + 1) * len(cum)
        self.capacity = int(max(8, min(1024, max_bytes // row_bytes)))
        self._cache_floats = int(max_bytes // 8)
        self._terms = np.empty((self.capacity, num_stages + 1, len(cum)))
        self._const = np.empty(self.capacity)
        self.size = 0
        self._seen: set[bytes] = set()
        self._middle: dict[tuple[int, int, int], np.ndarray] = {}
        self._cached = 0

    def __len__(self) -> int:
        return self.size

    @property
    def terms(self) -> np.ndarray:
        return self._terms[:self.size]

    @property
    def const(self) -> np.ndarray:
        return self._const[:self.size]

    def add(self, coef: np.ndarray, hops: int) -> bool:
        """Add the path with stage counts ``coef`` ``[S, 3]`` and ``hops`` cross-rank edges
        (``critical_path``); False if it is already held or the set is full."""
        key = np.round(coef, 9).tobytes() + int(hops).to_bytes(4, "little")
        if key in self._seen or self.size >= self.capacity:
            return False
        self._seen.add(key)
        d = np.zeros((self.S + 1, 3))
        d[1:] += coef
        d[:-1] -= coef
        self._append(d @ self.cum.T, hops * self.p2p)
        return True

    def _append(self, terms: np.ndarray, const: float) -> None:
        """Store the row ``const + sum_j terms[j, x_j]`` (``terms`` ``[S+1, L+1]``)."""
        self._terms[self.size] = terms
        self._const[self.size] = const + terms[self.S, -1]
        self.size += 1

    def fixed(self, bounds: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Constants plus the terms ``[P]`` of boundaries ``index`` at ``bounds[index]``."""
        return self.const + self.terms[:, index, bounds[index]].sum(axis=1)

    def node_fixed(self, bounds: np.ndarray, k: int) -> np.ndarray:
        """``fixed`` ``[P]`` of a node whose boundaries ``0..k`` and ``S-k..S`` are set."""
        return self.fixed(bounds, np.r_[1:k + 1, self.S - k:self.S])

    def middle(self, first: int, last: int, hi: int) -> np.ndarray:
        """``[P, L+1]``: least terms of boundaries ``first..last`` strictly between ``e`` (the
        column) and ``hi`` (``_middle_min``; cached, extended when rows are added)."""
        key = (first, last, hi)
        have = self._middle.get(key)
        if have is None or len(have) < self.size:
            done = 0 if have is None else len(have)
            new = np.empty((self.size - done, self.terms.shape[2]))
            _middle_min(self.terms[done:], first, last, hi, new)
            have = new if have is None else np.concatenate([have, new])
            if self._cached + new.size > self._cache_floats:
                self._middle.clear()
                self._cached = 0
            self._middle[key] = have
            self._cached += new.size
        return have

    def child_bounds(self, bounds: np.ndarray, k: int, e: np.ndarray,
                     f: np.ndarray) -> np.ndarray:
        """Bounds ``[n]`` (the largest row) for the children ``x_{k+1} = e``, ``x_{S-1-k} =
        f`` of the node with ``0..k`` and ``S-k..S`` of ``bounds`` fixed."""
        if self.size == 0 or len(e) == 0:
            return np.zeros(len(e))
        j = self.S - 1 - k
        base = self.node_fixed(bounds, k)[:, None] + self.terms[:, k + 1, :]     # [P, L+1]
        right = self.terms[:, j, :]
        order = np.argsort(f, kind="stable")
        his, starts = np.unique(f[order], return_index=True)
        out = np.empty(len(e))
        for hi, a, b in zip(his, starts, np.r_[starts[1:], len(order)]):
            idx = order[a:b]
            cols = e[idx]
            vals = base[:, cols] + self.middle(k + 2, j - 1, int(hi))[:, cols]
            out[idx] = (vals + right[:, hi, None]).max(axis=0)
        return out

    def value(self, cuts: np.ndarray) -> np.ndarray:
        """Largest row ``[K]`` at complete partitions ``cuts`` ``[K, S+1]``."""
        if self.size == 0:
            return np.zeros(len(cuts))
        j = np.arange(1, self.S)
        vals = self.terms[:, j[None, :], cuts[:, 1:-1]].sum(axis=2) + self.const[:, None]
        return vals.max(axis=0)

    def _weights(self, bounds: np.ndarray, k: int, rounds: int) -> np.ndarray | None:
        """Weights ``[P]`` of the convex combination of the rows that maximises the bound of
        the node with boundaries ``0..k`` and ``S-k..S`` of ``bounds`` fixed (None if the
        node has no completion).

        A weighted sum of lower bounds is one, and its least completion of the node is one
        dynamic program (``_middle_argmin``), so the weights are found by Kelley's cutting
        planes on the Lagrangian dual: the matrix game of the rows against the completions
        found so far (``_game``) gives weights, their least completion joins the game, until
        the two agree or ``rounds`` run out.
        """
        S, P = self.S, self.size
        fixed = self.node_fixed(bounds, k)
        first, last, lo, hi = k + 1, S - k - 1, int(bounds[k]), int(bounds[S - k])
        index = np.arange(first, last + 1)
        ys = np.zeros(len(index), dtype=np.int64)
        lam = np.full(P, 1.0 / P)
        cols, best, best_lam = [], -np.inf, lam
        for _ in range(rounds):
            value = _middle_argmin(self._mix(lam, first, last), first, last, lo, hi,
                                   ys) + lam @ fixed
            if not np.isfinite(value):
                return None
            if value > best:
                best, best_lam = value, lam
            cols.append(fixed + self.terms[:, index, ys].sum(axis=1))
            lam, top = _game(np.array(cols))
            if top - best <= 1e-9 * abs(best):
                break
        return best_lam

    def add_combination(self, bounds: np.ndarray, k: int, rounds: int = 6) -> bool:
        """Add the node's best combination of the rows (``_weights``) as a row; False if
        there are fewer than two rows, no room, or no completion."""
        if self.size < 2 or self.size >= self.capacity:
            return False
        lam = self._weights(bounds, k, rounds)
        if lam is not None:
            self._append(np.tensordot(lam, self.terms, axes=1),
                         float(lam @ (self.const - self.terms[:, self.S, -1])))
        return lam is not None

    def _mix(self, lam: np.ndarray, first: int, last: int) -> np.ndarray:
        """``sum_p lam[p] terms[p]`` ``[S+1, L+1]`` on boundaries ``first..last`` (zero
        elsewhere), summed over the rows with a positive weight only."""
        used = np.flatnonzero(lam > 0)
        out = np.zeros(self.terms.shape[1:])
        out[first:last + 1] = np.tensordot(lam[used], self.terms[used, first:last + 1], axes=1)
        return out


@njit(cache=True)
def _game(values):
    """Weights ``lam`` ``[P]`` on the simplex maximising ``min_x values[x] . lam`` over the
    rows of ``values`` ``[X, P]``, and that maximum: the matrix game ``values.T``.

    With the payoffs shifted to be positive (which moves the value, not the weights) the
    game is the packing LP ``max sum(w) s.t. values.T @ w <= 1, w >= 0``; its dual prices
    ``u`` give ``lam = u / sum(u)`` and the value ``1 / sum(u)``. Solved by the simplex method
    on the condensed tableau ``[P+1, X+1]`` from the slack basis, Bland's rule."""
    X, P = values.shape
    low = values.min()
    spread = values.max() - low
    shift = spread + 1.0 if spread > 0 else 1.0
    tab = np.zeros((P + 1, X + 1))
    for p in range(P):
        for x in range(X):
            tab[p, x] = (values[x, p] - low + shift) / shift       # in [1, 2]
        tab[p, X] = 1.0
    for x in range(X):
        tab[P, x] = -1.0
    basic = np.arange(X, X + P)                                    # slack of row p: X + p
    free = np.arange(X)
    eps = 1e-12
    for _ in range(50 * (P + X)):
        q = -1
        for j in range(X):
            if tab[P, j] < -eps and (q < 0 or free[j] < free[q]):
                q = j
        if q < 0:
            break
        r, ratio = -1, np.inf
        for i in range(P):
            if tab[i, q] > eps:
                t = tab[i, X] / tab[i, q]
                if t < ratio - eps or (abs(t - ratio) <= eps and basic[i] < basic[r]):
                    r, ratio = i, t
        piv = tab[r, q]
        for i in range(P + 1):
            if i != r and tab[i, q] != 0.0:
                f = tab[i, q] / piv
                for j in range(X + 1):
                    if j != q:
                        tab[i, j] -= f * tab[r, j]
                tab[i, q] = -f
        for j in range(X + 1):
            if j != q:
                tab[r, j] /= piv
        tab[r, q] = 1.0 / piv
        basic[r], free[q] = free[q], basic[r]
    lam = np.zeros(P)
    for j in range(X):
        if free[j] >= X:
            lam[free[j] - X] = max(tab[P, j], 0.0)
    total = lam.sum()
    lam /= total
    return lam, (1.0 / total) * shift + low - shift
