"""Bad input to rebalance_experts raises FieldError naming the argument."""

import numpy as np
import pytest
import torch

from expertplane.errors import FieldError
from expertplane.planner import rebalance_experts
from expertplane.planner.validation import check_plan

W = np.ones((2, 16))


@pytest.mark.parametrize("weight, args, field, fragment", [
    (np.ones(16), (16, 4, 2, 8), "weight", "2-D"),
    (np.ones((2, 0)), (16, 4, 2, 8), "weight", "empty"),
    (np.array([[1.0, -1.0] * 8] * 2), (16, 4, 2, 8), "weight", "non-negative"),
    (np.array([[1.0, np.nan] * 8] * 2), (16, 4, 2, 8), "weight", "finite"),
    (np.array([[1.0, np.inf] * 8] * 2), (16, 4, 2, 8), "weight", "finite"),
    (np.array([["a"] * 16] * 2), (16, 4, 2, 8), "weight", "numeric"),
    (W, (8, 4, 2, 8), "num_replicas", ">= the number of experts (16)"),
    (W, (20, 4, 2, 8), "num_replicas", "multiple of num_gpus (8)"),
    (W, (16, 5, 1, 8), "num_groups", "divide the number of experts (16)"),
    (W, (18, 4, 2, 3), "num_gpus", "multiple of num_nodes (2)"),
    (W, (16.5, 4, 2, 8), "num_replicas", "integer"),
    (W, (16, True, 2, 8), "num_groups", "integer"),
    (W, (16, 4, 0, 8), "num_nodes", ">= 1"),
    (W, (16, 4, 2, "8"), "num_gpus", "integer"),
])
def test_errors_name_the_argument(weight, args, field, fragment):
    with pytest.raises(FieldError) as exc:
        rebalance_experts(weight, *args)
    assert exc.value.field == field
    assert str(exc.value).startswith(field + ":")
    assert fragment in str(exc.value)


def test_unknown_algorithm_and_option():
    with pytest.raises(FieldError, match="^algorithm:"):
        rebalance_experts(W, 16, 4, 2, 8, algorithm="magic")
    with pytest.raises(FieldError, match="^remote_cost: is not an option of algorithm 'deepseek'"):
        rebalance_experts(W, 16, 4, 2, 8, remote_cost=1.0)


def test_previous_shape_checked():
    with pytest.raises(FieldError, match="^previous:"):
        rebalance_experts(W, 16, 4, 2, 8, previous=np.zeros((2, 24), dtype=np.int64))
    with pytest.raises(FieldError, match=r"^previous: expert ids must lie in \[0, 16\)"):
        rebalance_experts(W, 16, 4, 2, 8, previous=np.full((2, 16), 16))


def test_accepts_torch_numpy_list_and_integer_scalars():
    ref = rebalance_experts(W, 16, 4, 2, 8)
    for weight in (torch.ones(2, 16, dtype=torch.int32), W.tolist(), W.astype(np.float32)):
        out = rebalance_experts(weight, np.int64(16), torch.tensor(4), 2.0, 8)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_check_plan_catches_inconsistencies():
    phy2log, log2phy, logcnt = (t.numpy() for t in rebalance_experts(np.arange(32.0).reshape(2, 16),
                                                                     24, 4, 2, 8))
    check_plan(phy2log, logcnt, log2phy, 16, 8, 2, 4, hierarchical=True)
    missing = phy2log.copy()
    missing[missing == 3] = 4
    with pytest.raises(FieldError, match="expert 3 has no replica"):
        check_plan(missing, logcnt, log2phy, 16, 8)
    with pytest.raises(FieldError, match="^logcnt:"):
        check_plan(phy2log, logcnt + 1, log2phy, 16, 8)
    swapped = log2phy.copy()
    swapped[0, [0, 1], 0] = swapped[0, [1, 0], 0]
    with pytest.raises(FieldError, match="^log2phy:"):
        check_plan(phy2log, logcnt, swapped, 16, 8)
    scattered = phy2log.copy()
    scattered[0, [0, -1]] = scattered[0, [-1, 0]]  # first and last slot sit on different nodes
    assert scattered[0, 0] // 4 != phy2log[0, 0] // 4
    with pytest.raises(FieldError, match="several nodes"):
        check_plan(scattered, logcnt, _l2p(scattered), 16, 8, 2, 4, hierarchical=True)


def _l2p(phy2log):
    from expertplane.planner.plan import build_log2phy
    return build_log2phy(phy2log, 16)[0]
