"""The shared replica-choice rule: tiers, evenness, determinism."""

from __future__ import annotations

import pytest
import torch

from expertplane.kernels.moe import LayerPlacement
from expertplane.kernels.replica_choice import (ReplicaChoiceError, choose_replicas,
                                                rank_among_equal)


def _slot_gpu(slots: int, gpus: int) -> torch.Tensor:
    return torch.arange(slots) // (slots // gpus)


def test_rank_among_equal_counts_earlier_equal_keys():
    keys = torch.tensor([5, 1, 5, 5, 2, 1, 5, 2])
    assert rank_among_equal(keys).tolist() == [0, 0, 1, 2, 0, 1, 3, 1]


def _rule_by_the_letter(topk, src, placement, gpu, per_node):
    """The documented rule, one (column, token) pair at a time."""
    tokens, k = topk.shape
    node = [int(g) // per_node for g in gpu]
    seen: dict[tuple, int] = {}
    out = torch.empty(tokens, k, dtype=torch.int64)
    sent = [set() for _ in range(tokens)]
    for j in range(k):
        for t in range(tokens):
            e, s = int(topk[t, j]), int(src[t])
            reps = placement.log2phy[e, :int(placement.logcnt[e])].tolist()
            tiers = [[r for r in reps if node[r] == s // per_node],
                     [r for r in reps if node[r] in sent[t]], reps]
            tier = next(i for i, c in enumerate(tiers) if c)
            o = seen.get((s, e, tier), 0)
            seen[(s, e, tier)] = o + 1
            out[t, j] = tiers[tier][(o + s) % len(tiers[tier])]
            sent[t].add(node[int(out[t, j])])
    return out


@pytest.mark.parametrize("seed, per_node", [(0, 1), (1, 2), (2, 4), (3, 8)])
def test_vectorised_rule_equals_the_letter(seed, per_node):
    gen = torch.Generator().manual_seed(seed)
    experts, slots, gpus = 12, 24, 8
    phy2log = torch.cat([torch.arange(experts),
                         torch.randint(0, experts, (slots - experts,), generator=gen)])
    placement = LayerPlacement.from_phy2log(phy2log[torch.randperm(slots, generator=gen)], experts)
    topk = torch.stack([torch.randperm(experts, generator=gen)[:4] for _ in range(60)])
    src = torch.randint(0, gpus, (60,), generator=gen)
    gpu = _slot_gpu(slots, gpus)
    got = choose_replicas(topk, src, placement.log2phy, placement.logcnt, gpu, per_node)
    assert torch.equal(got, _rule_by_the_letter(topk, src, placement, gpu, per_node))


def test_same_node_replica_preferred():
    # 4 GPUs, 2 per node, 2 slots per GPU; expert 0 has one replica on each node.
    placement = LayerPlacement.from_phy2log([0, 1, 2, 3, 4, 5, 0, 6], 7)
    topk = torch.zeros(10, 1, dtype=torch.int64)
    gpu = _slot_gpu(8, 4)
    node0 = choose_replicas(topk, 1, placement.log2phy, placement.logcnt, gpu, 2)
    node1 = choose_replicas(topk, 2, placement.log2phy, placement.logcnt, gpu, 2)
    assert set(node0.flatten().tolist()) == {0}
    assert set(node1.flatten().tolist()) == {6}


def test_prefers_a_node_already_sent_to():
    # expert 1 lives on node 2 only; expert 0 on nodes 2 and 3; source node 0 holds neither.
    phy2log = [2, 2, 2, 2, 1, 0, 3, 0]            # gpus of 2 slots, 1 gpu per node
    placement = LayerPlacement.from_phy2log(phy2log, 4)
    topk = torch.tensor([[1, 0]] * 6)
    out = choose_replicas(topk, 0, placement.log2phy, placement.logcnt, _slot_gpu(8, 4), 1)
    assert (out[:, 0] == 4).all()
    assert (out[:, 1] == 5).all()                 # the expert-0 replica on node 2


def test_even_spread_and_rank_offset():
    placement = LayerPlacement.from_phy2log([0, 0, 0, 1, 1, 2], 3)
    topk = torch.zeros(301, 1, dtype=torch.int64)
    gpu = torch.zeros(6, dtype=torch.int64)
    out = choose_replicas(topk, 1, placement.log2phy, placement.logcnt, gpu)
    counts = torch.bincount(out.flatten(), minlength=6)[:3]
    assert counts.tolist() == [100, 101, 100]
    assert out[0, 0].item() == 1                  # round robin starts at source_rank % n


def test_deterministic_and_per_token_ranks_match_per_rank_calls():
    gen = torch.Generator().manual_seed(3)
    experts, slots, gpus = 16, 32, 8
    phy2log = torch.cat([torch.arange(experts), torch.randint(0, experts, (slots - experts,),
                                                               generator=gen)])
    placement = LayerPlacement.from_phy2log(phy2log[torch.randperm(slots, generator=gen)], experts)
    topk = torch.stack([torch.randperm(experts, generator=gen)[:4] for _ in range(200)])
    src = torch.randint(0, gpus, (200,), generator=gen)
    gpu = _slot_gpu(slots, gpus)
    batch = choose_replicas(topk, src, placement.log2phy, placement.logcnt, gpu, 2)
    assert torch.equal(batch, choose_replicas(topk, src, placement.log2phy, placement.logcnt,
                                              gpu, 2))
    for rank in range(gpus):
        rows = src == rank
        alone = choose_replicas(topk[rows], rank, placement.log2phy, placement.logcnt, gpu, 2)
        assert torch.equal(batch[rows], alone)
    # every choice is a replica of the chosen logical expert
    assert torch.equal(placement.phy2log[batch], topk)


def test_bad_inputs_name_field():
    placement = LayerPlacement.from_phy2log([0, 1], 2)
    gpu = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ReplicaChoiceError, match="topk_ids"):
        choose_replicas(torch.tensor([[2]]), 0, placement.log2phy, placement.logcnt, gpu)
    with pytest.raises(ReplicaChoiceError, match="logcnt"):
        choose_replicas(torch.tensor([[1]]), 0, placement.log2phy, torch.ones(3), gpu)
    with pytest.raises(ReplicaChoiceError, match="gpus_per_node"):
        choose_replicas(torch.tensor([[1]]), 0, placement.log2phy, placement.logcnt, gpu, 0)
