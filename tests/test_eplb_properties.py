"""Property tests: every algorithm's plans are valid on arbitrary loads and shapes."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertplane.planner import ALGORITHMS, PlanInputError, balance, build_log2phy, migration, rebalance_experts
from expertplane.planner.deepseek import is_hierarchical
from expertplane.planner.validation import check_plan


@st.composite
def problems(draw):
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    experts = groups * draw(st.integers(1, 6))
    nodes = draw(st.sampled_from([1, 2, 3, 4]))
    gpus = nodes * draw(st.integers(1, 3))
    replicas = gpus * -(-experts // gpus) + gpus * draw(st.integers(0, 2))
    layers = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["int", "float", "zipf", "zeros"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if kind == "int":
        w = rng.integers(0, 5, size=(layers, experts)).astype(np.float64)
    elif kind == "float":
        w = rng.random((layers, experts)) * 100
    elif kind == "zipf":
        w = np.minimum(rng.zipf(1.3, size=(layers, experts)), 1e5).astype(np.float64)
    else:
        w = np.zeros((layers, experts))
    return w, replicas, groups, nodes, gpus


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_plans_are_valid(algorithm, problem):
    w, replicas, groups, nodes, gpus = problem
    if algorithm == "topology" and not is_hierarchical(groups, nodes):
        with pytest.raises(PlanInputError, match="^num_groups: topology placement starts"):
            rebalance_experts(w, replicas, groups, nodes, gpus, algorithm=algorithm)
        return
    phy2log, log2phy, logcnt = rebalance_experts(w, replicas, groups, nodes, gpus,
                                                 algorithm=algorithm)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (w.shape[0], replicas) and logcnt.shape == w.shape
    # >= 1 replica each, R/P slots per GPU, log2phy <-> phy2log agree, groups stay on one node
    hier = is_hierarchical(groups, nodes) and algorithm != "topology"
    check_plan(phy2log, logcnt, log2phy, w.shape[1], gpus, nodes, groups, hierarchical=hier)
    b = balance(w, phy2log.numpy(), logcnt.numpy(), gpus)
    assert b.shape == (w.shape[0],) and (b >= 1 - 1e-12).all()


@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_log2phy_rebuilt_from_phy2log_agrees(problem):
    w, replicas, groups, nodes, gpus = problem
    phy2log, log2phy, logcnt = rebalance_experts(w, replicas, groups, nodes, gpus)
    rebuilt, cnt = build_log2phy(phy2log.numpy(), w.shape[1])
    assert np.array_equal(cnt, logcnt.numpy())
    # same slot sets per expert, possibly in another replica order
    assert np.array_equal(np.sort(rebuilt, -1), np.sort(log2phy.numpy(), -1))
    assert migration(phy2log, phy2log, 10).slots_moved == 0
