"""Redundancy sizing: the curve, its bound, the recommendation, errors and the table."""

import numpy as np
import pytest

from expertplane.benchmarks.planner import make_loads
from expertplane.cli.plan import format_sizing_table
from expertplane.errors import FieldError
from expertplane.planner.sizing import default_candidates, recommend_redundancy, sizing_curve


@pytest.fixture(scope="module")
def loads():
    return make_loads("zipf1.2", 3, 64, np.random.default_rng(4))


def test_default_candidates_give_whole_gpus():
    assert default_candidates(64, 16) == [0, 16, 32, 48, 64]
    assert default_candidates(60, 16) == [4, 20, 36, 52]
    assert default_candidates(64, 16, max_redundant=40) == [0, 16, 32]


def test_curve_improves_with_redundancy_and_stays_above_bound(loads):
    curve = sizing_curve(loads, 1, 1, 16)  # global policy, 16 GPUs
    assert [p.num_redundant for p in curve] == [0, 16, 32, 48, 64]
    assert all(p.num_replicas == 64 + p.num_redundant for p in curve)
    bounds = [p.bound_max for p in curve]
    assert all(a >= b - 1e-12 for a, b in zip(bounds, bounds[1:]))  # bound never rises
    assert all(p.balance_max >= p.bound_max - 1e-12 for p in curve)
    assert all(p.balance_max >= p.balance_mean - 1e-12 for p in curve)
    assert curve[-1].balance_max < curve[0].balance_max  # replicas of hot experts pay off


def test_recommendation_is_the_smallest_count_reaching_the_target(loads):
    curve = sizing_curve(loads, 1, 1, 16)
    target = curve[2].balance_max + 1e-9
    point, again = recommend_redundancy(loads, 1, 1, 16, target)
    assert again == curve
    assert point.balance_max <= target
    assert all(p.balance_max > target for p in curve if p.num_redundant < point.num_redundant)
    mean_point, _ = recommend_redundancy(loads, 1, 1, 16, target, metric="mean")
    assert mean_point.num_redundant <= point.num_redundant
    none, _ = recommend_redundancy(loads, 1, 1, 16, 1.0 + 1e-12, candidates=[0])
    assert none is None


def test_table_lists_every_point_and_marks_the_recommendation(loads):
    point, curve = recommend_redundancy(loads, 1, 1, 16, 10.0)
    text = format_sizing_table(curve, point)
    assert text.count("recommended") == 1
    for p in curve:
        assert f"{p.balance_max:.4f}" in text and str(p.num_replicas) in text


@pytest.mark.parametrize("kwargs,field", [
    ({"candidates": [3]}, "candidates"), ({"candidates": [-16]}, "candidates"),
    ({"candidates": []}, "candidates"), ({"target_balance": 0.5}, "target_balance"),
    ({"target_balance": float("nan")}, "target_balance"), ({"metric": "p99"}, "metric")])
def test_bad_arguments_name_the_field(loads, kwargs, field):
    args = {"target_balance": 1.2, **kwargs}
    with pytest.raises(FieldError, match=f"^{field}:"):
        recommend_redundancy(loads, 1, 1, 16, **args)
