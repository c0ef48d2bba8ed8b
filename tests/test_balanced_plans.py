"""algorithm="balanced": valid plans, never worse than "deepseek" per layer, closes the gap to
the lower bound on skewed loads; the lower bound never exceeds an achieved balance."""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from expertplane.benchmarks.planner import make_loads
from expertplane.planner import balance, rebalance_experts
from expertplane.planner.bounds import (group_partitions, lower_bound, partition_count,
                                        water_fill)
from expertplane.planner.deepseek import is_hierarchical
from expertplane.planner.validation import check_plan

sys.path.insert(0, str(Path(__file__).parent))
from strategies import problems  # noqa: E402


def _balance(w, plan, gpus):
    return balance(w, plan[0].numpy(), plan[2].numpy(), gpus)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_balanced_valid_never_worse_and_bound_below(problem):
    w, shape = problem
    replicas, groups, nodes, gpus = shape.args
    ours = rebalance_experts(w, replicas, groups, nodes, gpus, algorithm="balanced")
    theirs = rebalance_experts(w, replicas, groups, nodes, gpus)
    hier = is_hierarchical(groups, nodes)
    check_plan(*ours[::2], ours[1], w.shape[1], gpus, nodes, groups, hierarchical=hier)
    b_ours, b_theirs = _balance(w, ours, gpus), _balance(w, theirs, gpus)
    assert (b_ours <= b_theirs + 1e-12).all()
    bound = lower_bound(w, replicas, groups, nodes, gpus, hier)
    assert (bound <= b_ours * (1 + 1e-9)).all() and (bound >= 1 - 1e-12).all()


def _brute_force_optimum(w, replicas, gpus):
    """Best max GPU load over every replica-count vector, two slots per GPU (fold is optimal)."""
    experts = w.size
    best = np.inf
    for extra in itertools.product(range(replicas - experts + 1), repeat=experts):
        if sum(extra) != replicas - experts:
            continue
        counts = np.array(extra) + 1
        items = np.sort(np.repeat(w / counts, counts))
        best = min(best, (items[:gpus] + items[::-1][:gpus]).max())
    return best


def test_bound_counts_an_exact_split_of_the_hot_expert():
    # found by hypothesis: 73.78 / (73.78 / 7) rounds above 7, so the bound needed 8 replicas for
    # the hot expert, found no spare slot and stepped to 6 replicas (1.396 > the achieved 1.263)
    w = np.array([[0.43062802, 0.586798571, 73.7837787, 0.956267255, 0.284201164, 0.648547207,
                   0.696215997, 0.292720749, 0.00149008351, 0.973460275, 0.298401223,
                   0.313986002]])
    plan = rebalance_experts(w, 18, 4, 3, 9, algorithm="balanced")
    bound = lower_bound(w, 18, 4, 3, 9, False)
    hot_replica = w[0, 2] / 7 / (w.sum() / 9)  # 7 replicas: the GPU holding one carries at least this
    assert hot_replica <= bound[0] <= _balance(w, plan, 9)[0]


@pytest.mark.parametrize("seed", range(6))
def test_bound_below_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    w = rng.zipf(1.5, size=4).astype(np.float64)
    replicas, gpus = 8, 4
    optimum = _brute_force_optimum(w, replicas, gpus) / (w.sum() / gpus)
    bound = lower_bound(w[None], replicas, 1, 1, gpus, False)[0]
    ours = rebalance_experts(w[None], replicas, 1, 1, gpus, algorithm="balanced")
    assert bound <= optimum + 1e-12
    assert _balance(w[None], ours, gpus)[0] >= optimum - 1e-12


def test_water_fill_minimises_the_largest_replica_load():
    rng = np.random.default_rng(3)
    for _ in range(50):
        w = rng.random(int(rng.integers(1, 6))) * 10
        slots = w.size + int(rng.integers(0, 6))
        counts = water_fill(w, slots)
        assert counts.sum() == slots and counts.min() >= 1
        best = min(max(w / (np.array(extra) + 1)) for extra in
                   itertools.product(range(slots - w.size + 1), repeat=w.size)
                   if sum(extra) == slots - w.size)
        assert max(w / counts) == pytest.approx(best, rel=1e-12)


def test_group_partitions_enumerate_every_split_once():
    blocks, partitions = group_partitions(8, 4)
    assert partitions.shape == (partition_count(8, 4), 4) == (105, 4)
    splits = {tuple(sorted(tuple(blocks[b]) for b in p)) for p in partitions}
    assert len(splits) == 105
    for p in partitions:
        assert sorted(np.concatenate(blocks[p]).tolist()) == list(range(8))
    assert group_partitions(32, 4) is None  # too many: the bound relaxes


@pytest.mark.parametrize("shape,family", [((288, 8, 4, 32), "zipf1.2"),
                                          ((288, 8, 4, 32), "deepseek-like"),
                                          ((640, 8, 40, 320), "zipf1.2"),
                                          ((640, 8, 40, 320), "zipf1.5")])
def test_balanced_closes_half_the_gap_on_skewed_loads(shape, family):
    w = make_loads(family, 4, 256, np.random.default_rng(7))
    replicas, groups, nodes, gpus = shape
    ours = _balance(w, rebalance_experts(w, *shape, algorithm="balanced"), gpus)
    theirs = _balance(w, rebalance_experts(w, *shape), gpus)
    bound = lower_bound(w, *shape, is_hierarchical(groups, nodes))
    assert (bound <= ours + 1e-12).all() and (ours <= theirs + 1e-12).all()
    assert (theirs - ours).sum() >= 0.5 * (theirs - bound).sum()
