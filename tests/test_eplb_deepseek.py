"""algorithm="deepseek" reproduces DeepSeek's EPLB bit for bit (shared vectors) and the oracle."""

import pathlib
import sys

import numpy as np
import pytest
import torch

from expertplane.benchmarks.reference_eplb import reference_rebalance_experts
from expertplane.planner import rebalance_experts
from expertplane.planner.deepseek import _descending_order, balanced_packing, replicate_experts

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from shared_data import eplb_json  # noqa: E402

CASES = eplb_json("deepseek_vectors.json")["cases"]


def test_readme_example_exact():
    case = eplb_json("readme_example.json")
    phy2log, _, _ = rebalance_experts(torch.tensor(case["weight"]), case["num_replicas"],
                                      case["num_groups"], case["num_nodes"], case["num_gpus"])
    assert phy2log.dtype == torch.int64
    assert phy2log.tolist() == case["phy2log"]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_shared_vectors_exact(index):
    case = CASES[index]
    weight = np.array(case["weight"], dtype=np.float32)  # the vectors' float loads are float32
    out = rebalance_experts(weight, case["num_replicas"], case["num_groups"], case["num_nodes"],
                            case["num_gpus"])
    for tensor, key in zip(out, ("phy2log", "log2phy", "logcnt")):
        assert tensor.dtype == torch.int64
        assert tensor.tolist() == case[key], key


def test_all_48_vectors_present():
    assert len(CASES) == 48
    assert {c["policy"] for c in CASES} == {"global", "hierarchical"}


@pytest.mark.parametrize("n", [2, 16, 17, 40, 257, 640])
def test_sort_order_matches_torch_on_ties(n):
    rng = np.random.default_rng(n)
    w = rng.integers(0, 3, size=(20, n)).astype(np.float32)
    expected = torch.from_numpy(w).sort(-1, descending=True).indices.numpy()
    assert np.array_equal(_descending_order(w), expected)


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_oracle_on_random_tied_loads(seed):
    rng = np.random.default_rng(seed)
    layers, groups = 3, int(rng.choice([4, 8]))
    experts = groups * int(rng.choice([4, 8]))
    nodes = int(rng.choice([1, 2, 4, 3]))
    gpus = nodes * int(rng.choice([2, 4]))
    replicas = gpus * int(np.ceil((experts + rng.integers(0, experts)) / gpus))
    w = rng.integers(0, 6, size=(layers, experts)).astype(np.float64)
    ours = rebalance_experts(w, replicas, groups, nodes, gpus)
    ref = reference_rebalance_experts(torch.from_numpy(w), replicas, groups, nodes, gpus)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_building_blocks_shapes():
    w = np.array([[4.0, 1.0, 3.0, 2.0]], dtype=np.float32)
    pack, rank = balanced_packing(w, 2)
    assert pack.tolist() == [[0, 0, 1, 1]] and rank.tolist() == [[0, 1, 0, 1]]
    phy2log, rank, cnt = replicate_experts(w, 6)
    assert phy2log.tolist() == [[0, 1, 2, 3, 0, 2]]
    assert rank.tolist() == [[0, 0, 0, 0, 1, 1]] and cnt.tolist() == [[2, 1, 2, 1]]
