"""Critical-path bounds (planner/pipeline/paths.py): a simulated step's critical path has the
step's length and bounds every other step from below; the completion tables are exact minima
over increasing boundaries; rows and their Lagrangian combinations never exceed the simulated
step time of any partition (brute force)."""

import itertools

import numpy as np
import pytest

from expertplane.planner.pipeline.dag import schedule_dag, step_times
from expertplane.planner.pipeline.partition import _setup
from expertplane.planner.pipeline.paths import (PathBounds, _game, _middle_argmin, _middle_min,
                                                critical_path)
from expertplane.planner.pipeline.profile import profile_from_layers
from expertplane.planner.pipeline.schedules import layout

LAYOUTS = [("1f1b", 4, 6), ("zb1p", 4, 6), ("dualpipe", 4, 8), ("dualpipev", 6, 6)]


def random_times(rng, k, stages):
    times = rng.uniform(0.2, 3.0, size=(k, stages, 3))
    times[..., 2] = times[..., 1] * rng.uniform(0.0, 1.0, size=(k, stages))
    return times


@pytest.mark.parametrize("schedule, stages, m", LAYOUTS)
@pytest.mark.parametrize("p2p, overlap", [(0.0, 0.0), (0.3, 0.5), (0.05, 1.0)])
def test_critical_path_is_the_step_and_bounds_other_steps(schedule, stages, m, p2p, overlap):
    rng = np.random.default_rng(stages + m)
    dag = schedule_dag(layout(schedule, stages, m))
    times = random_times(rng, 40, stages)
    steps = step_times(dag, times, p2p, overlap)
    for i in range(8):
        coef, hops = critical_path(dag, times[i], p2p, overlap)
        lengths = (coef * times).sum(axis=(1, 2)) + hops * p2p          # the path at every T
        assert lengths[i] == pytest.approx(steps[i], rel=1e-12)
        assert (lengths <= steps * (1 + 1e-12)).all()


def brute_middle(terms, first, last, lo, hi):
    """Least sum over lo < y_first < ... < y_last < hi, by enumeration (inf if none)."""
    if first > last:
        return 0.0 if lo < hi else np.inf
    return min((sum(terms[j, y] for j, y in zip(range(first, last + 1), ys))
                for ys in itertools.combinations(range(lo + 1, hi), last - first + 1)),
               default=np.inf)


def test_middle_tables_are_exact_minima():
    rng = np.random.default_rng(0)
    S, L = 6, 9
    terms = rng.normal(size=(2, S + 1, L + 1))
    ys = np.zeros(S, dtype=np.int64)
    for first, last in [(1, 3), (2, 2), (3, 2), (1, 5)]:
        for hi in range(1, L + 1):
            out = np.empty((2, L + 1))
            _middle_min(terms, first, last, hi, out)
            for p in range(2):
                for lo in range(0, L + 1):
                    assert out[p, lo] == pytest.approx(brute_middle(terms[p], first, last, lo, hi))
            if first <= last:
                for lo in range(0, L):
                    best = brute_middle(terms[0], first, last, lo, hi)
                    n = last - first + 1
                    got = _middle_argmin(terms[0], first, last, lo, hi, ys[:n])
                    assert got == pytest.approx(best)
                    if np.isfinite(best):
                        assert lo < ys[0] and (np.diff(ys[:n]) > 0).all() and ys[n - 1] < hi
                        assert sum(terms[0, first + i, ys[i]] for i in range(n)) == \
                            pytest.approx(best)


@pytest.mark.parametrize("schedule, stages, m", [("dualpipe", 6, 12), ("dualpipev", 6, 6)])
@pytest.mark.parametrize("p2p, overlap", [(0.0, 0.0), (0.2, 0.5)])
def test_rows_and_combinations_bound_every_partition(schedule, stages, m, p2p, overlap):
    rng = np.random.default_rng(3)
    layers = [{"F": float(f), "B": float(b), "W": float(b * w)} for f, b, w in
              zip(rng.uniform(0.5, 2, 10), rng.uniform(1, 4, 10), rng.uniform(0, 1, 10))]
    profile = profile_from_layers(layers)
    pb, lay = _setup(profile, stages, schedule, m, p2p, overlap, None)
    cuts = np.array([(0,) + c + (10,) for c in itertools.combinations(range(1, 10), stages - 1)])
    steps = step_times(pb.dag, pb.stage_times(cuts), p2p, overlap)
    paths = PathBounds(pb.cum, stages, p2p)
    for i in rng.choice(len(cuts), 6, replace=False):
        paths.add(*critical_path(pb.dag, pb.stage_times(cuts[i:i + 1])[0], p2p, overlap))
    before = len(paths)
    for k in (0, 1):                    # combinations for the nodes of the fastest partition
        paths.add_combination(cuts[np.argmin(steps)], k)
    assert len(paths) == before + 2
    assert (paths.value(cuts) <= steps * (1 + 1e-12)).all()
    # a node's child bounds never exceed the fastest completion of that child
    node = cuts[np.argmin(steps)]
    for k in (0, 1):
        fixed = (cuts[:, :k + 1] == node[:k + 1]).all(axis=1) & \
                (cuts[:, stages - k:] == node[stages - k:]).all(axis=1)
        e, f = cuts[fixed, k + 1], cuts[fixed, stages - 1 - k]
        bound = paths.child_bounds(node, k, e, f)
        for i, (a, b) in enumerate(zip(e, f)):
            same = fixed & (cuts[:, k + 1] == a) & (cuts[:, stages - 1 - k] == b)
            assert bound[i] <= steps[same].min() * (1 + 1e-12)


def test_add_ignores_repeats():
    paths = PathBounds(np.zeros((5, 3)), 2, 0.0)
    coef = np.ones((2, 3))
    assert paths.add(coef, 1) and not paths.add(coef, 1) and len(paths) == 1


@pytest.mark.parametrize("seed", range(4))
def test_game_weights_solve_the_lp(seed):
    """The combination weights are the LP optimum (HiGHS), also with tied payoffs."""
    from scipy.optimize import linprog
    rng = np.random.default_rng(seed)
    for _ in range(25):
        X, P = int(rng.integers(1, 8)), int(rng.integers(1, 40))
        values = rng.normal(size=(X, P)) * 3 + 10
        if seed % 2:
            values = np.round(values)
        lam, value = _game(values)
        res = linprog(np.r_[np.zeros(P), -1.0], A_ub=np.c_[-values, np.ones(X)],
                      b_ub=np.zeros(X), A_eq=np.r_[np.ones(P), 0.0][None], b_eq=[1.0],
                      bounds=[(0, None)] * P + [(None, None)], method="highs")
        assert (lam >= 0).all() and lam.sum() == pytest.approx(1.0)
        assert (values @ lam).min() == pytest.approx(value, rel=1e-9)
        assert value == pytest.approx(-res.fun, rel=1e-7)
