"""Transfer planning of the hot-swap (pure): every changed slot filled exactly once, from a
rank that holds the expert, on the same node when possible, sends spread over holders."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertplane.kernels.hotswap import SwapError, plan_transfers


@st.composite
def plan_pairs(draw):
    nodes = draw(st.integers(1, 3))
    gpn = draw(st.integers(1, 3))
    world = nodes * gpn
    spr = draw(st.integers(1, 4))
    slots = world * spr
    experts = draw(st.integers(1, slots))
    layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def placement():
        base = np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)])
        return rng.permutation(base)

    old = np.stack([placement() for _ in range(layers)])
    new = np.stack([placement() for _ in range(layers)])
    keep = rng.random(new.shape) < draw(st.floats(0, 1))
    new = np.where(keep, old, new)
    # keep every expert present in the new plan (EPLB invariant)
    for l in range(layers):
        missing = set(range(experts)) - set(new[l].tolist())
        counts = Counter(new[l].tolist())
        for e in missing:
            p = next(i for i, x in enumerate(new[l]) if counts[x] > 1)
            counts[new[l, p]] -= 1
            new[l, p] = e
            counts[e] += 1
    return old, new, world, gpn


@settings(max_examples=150, deadline=None)
@given(plan_pairs())
def test_every_changed_slot_filled_once_from_a_holder(case):
    old, new, world, gpn = case
    plan = plan_transfers(old, new, world, gpn)
    spr = old.shape[1] // world
    filled = Counter((f.layer, f.rank * spr + f.slot) for f in plan.fills)
    changed = {(l, p) for l, p in zip(*np.nonzero(old != new))}
    assert set(filled) == changed
    assert all(n == 1 for n in filled.values())
    by_dst = {(f.layer, f.rank, f.slot): f for f in plan.fills}
    for f in plan.fills:
        assert new[f.layer, f.rank * spr + f.slot] == f.expert
        if f.source in ("local", "remote"):
            assert old[f.layer, f.src_rank * spr + f.src_slot] == f.expert
            assert (f.source == "local") == (f.src_rank == f.rank)
        else:
            assert f.source == "dup" and f.src_rank == f.rank
            first = by_dst[(f.layer, f.rank, f.src_slot)]
            assert first.expert == f.expert and first.source == "remote"


@settings(max_examples=150, deadline=None)
@given(plan_pairs())
def test_sources_prefer_the_same_node_and_fetch_each_expert_once(case):
    old, new, world, gpn = case
    plan = plan_transfers(old, new, world, gpn)
    spr = old.shape[1] // world
    fetched = Counter((f.layer, f.rank, f.expert) for f in plan.fills if f.source == "remote")
    assert all(n == 1 for n in fetched.values())
    for f in plan.fills:
        holders = {p // spr for p in np.nonzero(old[f.layer] == f.expert)[0]}
        if f.source == "remote":
            assert f.rank not in holders  # else it would be a local copy
            same_node = {r for r in holders if r // gpn == f.rank // gpn}
            if same_node:
                assert f.src_rank in same_node


def test_sends_are_spread_over_the_holders():
    # expert 0 on ranks 0 and 1 (old); ranks 2 and 3 both need it: one send each.
    old = np.array([[0, 1, 0, 1, 2, 3, 2, 3]])
    new = np.array([[0, 1, 0, 1, 0, 3, 0, 3]])
    plan = plan_transfers(old, new, world_size=4, gpus_per_node=4)
    assert sorted(f.src_rank for f in plan.fills) == [0, 1]
    assert plan.remote_fills == 2 and plan.bytes_moved(100) == 200


def test_local_and_duplicate_fills():
    old = np.array([[0, 1, 2, 3]])
    new = np.array([[1, 0, 2, 2]])  # rank 0 swaps its slots; rank 1 copies its own expert 2
    plan = plan_transfers(old, new, world_size=2)
    assert {f.source for f in plan.fills} == {"local"}
    new = np.array([[2, 2, 0, 1]])  # rank 0 needs 2 in both slots: one receive, one dup
    plan = plan_transfers(old, new, world_size=2)
    kinds = Counter(f.source for f in plan.fills if f.rank == 0)
    assert kinds == {"remote": 1, "dup": 1}


def test_unchanged_plan_moves_nothing():
    old = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    plan = plan_transfers(old, old.copy(), world_size=2)
    assert plan.fills == () and plan.changed_layers == []


@pytest.mark.parametrize("old,new,world,gpn,field", [
    ([[0, 1]], [[0, 1, 1]], 1, None, "new_phy2log"),
    ([[0, 1, 2]], [[0, 1, 2]], 2, None, "world_size"),
    ([[0, 1, 2, 3]], [[0, 1, 2, 3]], 2, 3, "gpus_per_node"),
    ([[0, 0, 1, 1]], [[0, 2, 1, 1]], 2, None, "new_phy2log"),
    ([0, 1], [0, 1], 1, None, "old_phy2log"),
])
def test_bad_input_names_the_field(old, new, world, gpn, field):
    with pytest.raises(SwapError, match=field):
        plan_transfers(np.array(old), np.array(new), world, gpn)


def test_received_bytes_split_by_node_and_summed_into_bytes_moved():
    # 2 nodes x 2 ranks, 2 slots each: rank 0 receives expert 2 from rank 1 (its node), rank 2
    # receives expert 0 from rank 0 (the other node); nothing else moves between ranks.
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    new = np.array([[0, 2, 2, 3, 4, 0, 6, 7]])
    plan = plan_transfers(old, new, world_size=4, gpus_per_node=2)
    got = plan.received_bytes(100)
    assert got[0].tolist() == [[100, 0, 0, 0]] and got[1].tolist() == [[0, 0, 100, 0]]
    assert plan.bytes_moved(100) == 200 == 100 * plan.remote_fills
