"""Movement-aware re-planning (``previous=``): valid plans, balance within 2% of a fresh plan,
few moved slots on a 10% load drift, nothing moved when nothing changed."""

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertplane.benchmarks.planner import drift, make_loads
from expertplane.planner import balance, migration, rebalance_experts
from expertplane.planner.deepseek import is_hierarchical
from expertplane.planner.alignment import align
from expertplane.errors import FieldError
from expertplane.planner.algorithms import fresh_placement
from expertplane.planner.movement import TOLERANCE, drifted_layers, replan_layers
from expertplane.planner.validation import check_plan

sys.path.insert(0, str(Path(__file__).parent))
from strategies import problems  # noqa: E402


def _balance(w, plan, gpus):
    return balance(w, plan[0].numpy(), plan[2].numpy(), gpus)


# (algorithm, shape, loads): the movement-aware plan changes at most 20% of the slots a fresh
# plan changes (the target), with balance within 2% of the fresh plan's.
CASES = [("deepseek", (288, 8, 4, 32), "zipf1.2"),
         ("balanced", (288, 8, 4, 32), "zipf1.2"),
         ("deepseek", (288, 8, 18, 144), "zipf1.2"),
         ("balanced", (288, 8, 18, 144), "lognormal"),
         ("deepseek", (288, 8, 18, 144), "lognormal"),
         ("deepseek", (640, 8, 40, 320), "zipf0.8"),
         ("balanced", (640, 8, 40, 320), "zipf1.2"),
         ("balanced", (640, 8, 40, 320), "zipf0.8")]


@pytest.mark.parametrize("algorithm,shape,family", CASES)
def test_drift_moves_few_slots_and_keeps_balance(algorithm, shape, family):
    rng = np.random.default_rng(11)
    w0 = make_loads(family, 4, 256, rng)
    w1 = drift(w0, 0.1, rng)
    replicas, groups, nodes, gpus = shape
    previous = rebalance_experts(w0, *shape, algorithm=algorithm)[0]
    fresh = rebalance_experts(w1, *shape, algorithm=algorithm)
    aware = rebalance_experts(w1, *shape, algorithm=algorithm, previous=previous)
    check_plan(aware[0], aware[2], aware[1], 256, gpus, nodes, groups,
               hierarchical=is_hierarchical(groups, nodes))
    assert (_balance(w1, aware, gpus) <= _balance(w1, fresh, gpus) * (1 + TOLERANCE) + 1e-12).all()
    moved_fresh = migration(previous, fresh[0]).slots_moved
    moved_aware = migration(previous, aware[0]).slots_moved
    assert moved_aware <= 0.2 * moved_fresh


@pytest.mark.parametrize("algorithm", ["deepseek", "balanced"])
@pytest.mark.parametrize("shape", [(288, 8, 4, 32), (640, 8, 40, 320)])
def test_only_drifted_layers_are_re_planned_into_the_full_re_plan(algorithm, shape):
    # odd layers drift, even layers keep their loads: the re-plan plans only the odd ones and
    # gives exactly the plan of re-planning every layer (which keeps the even ones too)
    rng = np.random.default_rng(7)
    w0 = make_loads("zipf1.2", 6, 256, rng)
    w1 = w0.copy()
    w1[1::2] = drift(w0[1::2], 0.3, rng)
    previous = rebalance_experts(w0, *shape, algorithm=algorithm)[0].numpy()
    fresh = fresh_placement(w1, *shape, algorithm)[0]
    drifted, target = drifted_layers(w1, previous, fresh, shape[3])
    assert drifted[1::2].any() and not drifted[::2].any()
    full = replan_layers(w1, *shape, previous, fresh, algorithm)
    np.testing.assert_array_equal(full[::2], previous[::2])
    for given in (fresh, None):
        got = rebalance_experts(w1, *shape, algorithm=algorithm, previous=previous,
                                fresh=given)[0].numpy()
        np.testing.assert_array_equal(got, full)
    got_loads = balance(w1, got, np.stack([np.bincount(r, minlength=256) for r in got]),
                        shape[3]) * w1.sum(-1) / shape[3]
    assert (got_loads <= target * (1 + 1e-12)).all()


def test_fresh_plan_is_checked():
    w = make_loads("zipf1.2", 2, 256, np.random.default_rng(1))
    previous = rebalance_experts(w, 288, 8, 4, 32)[0]
    with pytest.raises(FieldError, match="^fresh: must have shape"):
        rebalance_experts(w, 288, 8, 4, 32, previous=previous, fresh=previous[:1])
    with pytest.raises(FieldError, match="^fresh: expert ids"):
        rebalance_experts(w, 288, 8, 4, 32, previous=previous, fresh=previous + 256)
    with pytest.raises(FieldError, match="^fresh: is only used with previous"):
        rebalance_experts(w, 288, 8, 4, 32, fresh=previous)


@pytest.mark.parametrize("algorithm", ["deepseek", "balanced"])
def test_unchanged_loads_move_nothing(algorithm):
    w = make_loads("zipf1.2", 3, 256, np.random.default_rng(2))
    previous = rebalance_experts(w, 288, 8, 4, 32, algorithm=algorithm)[0]
    again = rebalance_experts(w, 288, 8, 4, 32, algorithm=algorithm, previous=previous)[0]
    assert migration(previous, again).slots_moved == 0


def test_align_relabels_without_changing_balance():
    rng = np.random.default_rng(5)
    w0 = make_loads("deepseek-like", 3, 256, rng)
    w1 = drift(w0, 0.3, rng)
    previous = rebalance_experts(w0, 288, 8, 4, 32)[0].numpy()
    fresh = rebalance_experts(w1, 288, 8, 4, 32)
    aligned = align(fresh[0].numpy(), previous, 32, 4, by_node=True)
    logcnt = fresh[2].numpy()
    np.testing.assert_allclose(balance(w1, aligned, logcnt, 32), _balance(w1, fresh, 32))
    assert (np.sort(aligned, 1) == np.sort(fresh[0].numpy(), 1)).all()
    assert migration(previous, aligned).slots_moved < migration(previous, fresh[0]).slots_moved


@st.composite
def re_plans(draw):
    """(loads before [L, E], loads after a drift of 0, 10% or 100%, shape, algorithm)."""
    w0, shape = draw(problems())
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    w1 = drift(w0, draw(st.sampled_from([0.0, 0.1, 1.0])), rng)
    return w0, w1, shape, draw(st.sampled_from(["deepseek", "balanced"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=re_plans())
def test_movement_aware_plans_are_valid(case):
    w0, w1, shape, algorithm = case
    previous = rebalance_experts(w0, *shape.args, algorithm=algorithm)[0]
    aware = rebalance_experts(w1, *shape.args, algorithm=algorithm, previous=previous)
    fresh = rebalance_experts(w1, *shape.args, algorithm=algorithm)
    check_plan(aware[0], aware[2], aware[1], w1.shape[1], shape.gpus, shape.nodes, shape.groups,
               hierarchical=is_hierarchical(shape.groups, shape.nodes))
    assert (_balance(w1, aware, shape.gpus)
            <= _balance(w1, fresh, shape.gpus) * (1 + TOLERANCE) + 1e-9).all()
