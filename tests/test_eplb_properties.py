"""Property tests: every algorithm's plans are valid on arbitrary loads and shapes."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from expertplane.errors import FieldError
from expertplane.planner import ALGORITHMS, balance, build_log2phy, migration, rebalance_experts
from expertplane.planner.deepseek import is_hierarchical
from expertplane.planner.validation import check_plan

sys.path.insert(0, str(Path(__file__).parent))
from strategies import problems  # noqa: E402


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_plans_are_valid(algorithm, problem):
    w, shape = problem
    replicas, groups, nodes, gpus = shape.args
    if algorithm == "topology" and not is_hierarchical(groups, nodes):
        with pytest.raises(FieldError, match="^num_groups: topology placement starts"):
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
    w, shape = problem
    replicas, groups, nodes, gpus = shape.args
    phy2log, log2phy, logcnt = rebalance_experts(w, replicas, groups, nodes, gpus)
    rebuilt, cnt = build_log2phy(phy2log.numpy(), w.shape[1])
    assert np.array_equal(cnt, logcnt.numpy())
    # same slot sets per expert, possibly in another replica order
    assert np.array_equal(np.sort(rebuilt, -1), np.sort(log2phy.numpy(), -1))
    assert migration(phy2log, phy2log, 10).slots_moved == 0
