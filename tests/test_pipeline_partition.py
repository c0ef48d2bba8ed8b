"""partition() is optimal: it matches brute force over all contiguous partitions."""

import itertools

import numpy as np
import pytest

from expertplane.planner.pipeline import (MemoryLimitError, balanced_boundaries, evaluate,
                                          even_boundaries, partition)


def random_layers(rng, n):
    layers = []
    for _ in range(n):
        b = float(rng.uniform(1, 4))
        layers.append({"F": float(rng.uniform(0.5, 2)), "B": b, "W": b * float(rng.uniform(0, 0.6)),
                       "activation_bytes": float(rng.uniform(1, 3)),
                       "param_bytes": float(rng.uniform(1, 5))})
    return layers


def all_plans(layers, stages, **kw):
    n = len(layers)
    return [evaluate(layers, (0,) + cut + (n,), **kw)
            for cut in itertools.combinations(range(1, n), stages - 1)]


CASES = [("1f1b", 2, 4), ("1f1b", 4, 8), ("1f1b", 3, 9), ("zb1p", 4, 8), ("zb1p", 3, 6),
         ("dualpipe", 2, 4), ("dualpipe", 4, 8), ("dualpipev", 4, 4), ("dualpipev", 4, 6),
         ("dualpipev", 2, 3)]


@pytest.mark.parametrize("schedule, stages, m", CASES)
@pytest.mark.parametrize("seed", range(3))
def test_matches_brute_force(schedule, stages, m, seed):
    rng = np.random.default_rng(seed)
    layers = random_layers(rng, int(rng.integers(stages + 2, 10)))
    kw = dict(schedule=schedule, micro_batches=m, p2p=[0.0, 0.2, 0.05][seed],
              overlap=[0.0, 0.5, 1.0][seed])
    plan = partition(layers, stages, node_limit=None, **kw)
    brute = min(p.step_time for p in all_plans(layers, stages, **kw))
    assert plan.optimal
    assert plan.step_time == pytest.approx(brute, rel=1e-12, abs=1e-12)
    assert evaluate(layers, plan.boundaries, **kw).step_time == pytest.approx(plan.step_time)


@pytest.mark.parametrize("schedule, stages, m", CASES)
def test_memory_limit_is_respected_and_optimal(schedule, stages, m):
    rng = np.random.default_rng(7)
    layers = random_layers(rng, 8)
    kw = dict(schedule=schedule, micro_batches=m)
    plans = all_plans(layers, stages, **kw)
    peaks = sorted(p.peak_memory.max() for p in plans)
    limit = peaks[len(peaks) // 3]
    plan = partition(layers, stages, memory_limit=limit, node_limit=None, **kw)
    assert plan.peak_memory.max() <= limit
    assert plan.step_time == pytest.approx(
        min(p.step_time for p in plans if p.peak_memory.max() <= limit), rel=1e-12)


@pytest.mark.parametrize("schedule, stages, m", [("1f1b", 4, 8), ("zb1p", 3, 6)])
def test_infeasible_memory_names_rank_and_overflow(schedule, stages, m):
    layers = random_layers(np.random.default_rng(3), 8)
    least = min(p.peak_memory.max()
                for p in all_plans(layers, stages, schedule=schedule, micro_batches=m))
    with pytest.raises(MemoryLimitError) as exc:
        partition(layers, stages, schedule=schedule, micro_batches=m, memory_limit=least * 0.9)
    err = exc.value
    assert err.field == "memory_limit" and err.need == pytest.approx(least)
    assert f"rank {err.rank}" in str(err) and "over the limit" in str(err)
    assert f"{(least - least * 0.9) / 2**30:.2f} GiB over" in str(err)


def test_dual_infeasible_memory_names_a_rank():
    layers = random_layers(np.random.default_rng(4), 8)
    with pytest.raises(MemoryLimitError, match=r"rank \d \(stages \d, \d\) needs"):
        partition(layers, 4, schedule="dualpipe", micro_batches=8, memory_limit=1.0)


def test_plan_fields_and_memory_accounting():
    layers = [{"F": 1.0, "B": 2.0, "W": 1.0, "activation_bytes": 10.0, "param_bytes": 100.0}] * 8
    plan = partition(layers, 4, micro_batches=8)
    assert plan.boundaries == (0, 2, 4, 6, 8) and plan.optimal
    np.testing.assert_allclose(plan.param_memory, 200.0)
    np.testing.assert_allclose(plan.activation_memory, [80.0, 60.0, 40.0, 20.0])  # 1F1B: R-r held
    np.testing.assert_allclose(plan.peak_memory, plan.param_memory + plan.activation_memory)
    assert plan.step_time == pytest.approx((8 + 3) * 2 * 3.0)
    dual = partition(layers, 4, schedule="dualpipe", micro_batches=8)
    np.testing.assert_allclose(dual.param_memory, 400.0)      # two stage copies per rank
    assert dual.rank_stages == ((0, 3), (1, 2), (2, 1), (3, 0))


def test_node_limit_returns_best_found_and_says_so():
    layers = random_layers(np.random.default_rng(5), 30)
    plan = partition(layers, 8, schedule="dualpipe", micro_batches=16, node_limit=3)
    assert not plan.optimal
    assert plan.step_time <= evaluate(layers, even_boundaries(30, 8), schedule="dualpipe",
                                      micro_batches=16).step_time


def test_baselines():
    assert even_boundaries(10, 4) == (0, 3, 6, 8, 10)
    assert balanced_boundaries([1, 1, 1, 1, 8, 1, 1, 1], 3) == (0, 4, 5, 8)
    assert balanced_boundaries([5, 0, 0, 0], 4) == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="^num_stages:"):
        even_boundaries(3, 4)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_stages=9), "num_stages"),
    (dict(num_stages=0), "num_stages"),
    (dict(num_stages=2, memory_limit=-1.0), "memory_limit"),
    (dict(num_stages=2, node_limit=0), "node_limit"),
    (dict(num_stages=3, schedule="dualpipe"), "num_stages"),
])
def test_partition_argument_errors(kwargs, field):
    layers = [{"F": 1.0, "B": 2.0, "W": 1.0}] * 8
    with pytest.raises(ValueError) as exc:
        partition(layers, **kwargs)
    assert exc.value.field == field


def test_evaluate_rejects_bad_boundaries():
    with pytest.raises(ValueError, match="^boundaries:"):
        evaluate([{"F": 1.0, "B": 1.0}] * 4, (0, 2, 2, 4))
