"""EPMoELayer against the dense reference, for any placement: one process and 2-4 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from expertplane.errors import FieldError
from expertplane.kernels.experts import LocalExperts
from expertplane.kernels.moe import EPMoELayer, LayerPlacement, PlacementError
from expertplane.kernels.reference import dense_moe_reference

HIDDEN, INTER, EXPERTS = 32, 16, 8
ROUTING = dict(top_k=3, num_groups=4, topk_groups=2, scoring="sigmoid", scaling=1.5)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def random_phy2log(gen: torch.Generator, experts: int, slots: int) -> torch.Tensor:
    """Every expert at least once, the rest random replicas, in random slot order."""
    extra = torch.randint(0, experts, (slots - experts,), generator=gen)
    phy2log = torch.cat([torch.arange(experts), extra])
    return phy2log[torch.randperm(slots, generator=gen)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), extra=st.integers(0, 12), tokens=st.integers(1, 40),
       biased=st.booleans())
def test_single_process_any_placement_matches_reference(seed, extra, tokens, biased):
    gen = torch.Generator().manual_seed(seed)
    placement = LayerPlacement.from_phy2log(random_phy2log(gen, EXPERTS, EXPERTS + extra), EXPERTS)
    layer = EPMoELayer(HIDDEN, INTER, EXPERTS, placement, seed=5, layer=1, **ROUTING)
    if biased:
        layer.set_selection_bias(torch.randn(EXPERTS, generator=gen) * 0.2)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    out = layer(x)
    ref = dense_moe_reference(x, layer.router_weight, layer.router, layer.expert_weights,
                              layer.selection_bias)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert _rel_err(out, ref) < 1e-5
    counts = layer.read_counters()
    assert int(counts.sum()) == tokens * ROUTING["top_k"]
    assert int(layer.read_counters().sum()) == 0


def test_bf16_layer_matches_reference_to_bf16_tolerance():
    placement = LayerPlacement.from_phy2log([0, 1, 2, 3, 4, 5, 6, 7, 1, 1, 6, 0], EXPERTS)
    layer = EPMoELayer(HIDDEN, INTER, EXPERTS, placement, dtype=torch.bfloat16, **ROUTING)
    # the reference gets the same bf16 input, so both route identically (no near-tie flips)
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(8)).bfloat16()
    ref = dense_moe_reference(x, layer.router_weight, layer.router, layer.expert_weights)
    assert _rel_err(layer(x), ref) < 2e-2


def test_swap_switches_weights_and_tables():
    old = LayerPlacement.from_phy2log([0, 1, 2, 3, 4, 5, 6, 7], EXPERTS)
    new = LayerPlacement.from_phy2log([7, 6, 5, 4, 3, 2, 1, 0], EXPERTS)
    layer = EPMoELayer(HIDDEN, INTER, EXPERTS, old, **ROUTING)
    x = torch.randn(20, HIDDEN)
    before = layer(x)
    layer.swap(new, LocalExperts.from_logical(layer.local_logical_ids(new), layer.expert_weights))
    assert torch.allclose(layer(x), before, atol=1e-5)
    with pytest.raises(PlacementError, match="phy2log"):
        layer.swap(LayerPlacement.from_phy2log(list(range(8)) + [0], EXPERTS), layer.experts)
    with pytest.raises(ValueError, match="experts must have"):
        layer.swap(new, LocalExperts(torch.zeros(8, HIDDEN, 4), torch.zeros(8, 2, HIDDEN)))


@pytest.mark.parametrize("phy2log, log2phy, logcnt, field", [
    ([0, 1], [[0], [1]], [1, 2], "logcnt"),
    ([0, 0], [[0], [1]], [1, 1], "log2phy"),
    ([0, 5], [[0], [1]], [1, 1], "phy2log"),
    ([0, 1], [[0, 1], [1, -1]], [1, 1], "log2phy"),
])
def test_bad_placement_names_field(phy2log, log2phy, logcnt, field):
    with pytest.raises(PlacementError, match=field):
        LayerPlacement(torch.tensor(phy2log), torch.tensor(log2phy), torch.tensor(logcnt))


def test_placement_errors_are_field_errors_named_by_tensor():
    with pytest.raises(FieldError) as exc:
        LayerPlacement(torch.tensor([0, 1]), torch.tensor([[1], [0]]), torch.tensor([1, 1]))
    assert isinstance(exc.value, PlacementError)
    assert (exc.value.field, exc.value.message) == ("log2phy[0]", "disagrees with phy2log")
    assert str(exc.value) == "log2phy[0]: disagrees with phy2log"


def _ranks_main(rank: int, world: int, store: str, seed: int, cases: int, gpus_per_node: int):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(seed)           # same placements on every rank
        tokens_gen = torch.Generator().manual_seed(seed * 100 + rank)
        layer = None
        for case in range(cases):
            slots = world * int(torch.randint(2, 5, (1,), generator=gen))
            slots = max(slots, world * -(-EXPERTS // world))
            placement = LayerPlacement.from_phy2log(random_phy2log(gen, EXPERTS, slots), EXPERTS)
            if layer is None or layer.num_slots != slots:
                layer = EPMoELayer(HIDDEN, INTER, EXPERTS, placement, seed=3,
                                   gpus_per_node=gpus_per_node, **ROUTING)
            else:   # same slot count: exercise swap
                layer.swap(placement, LocalExperts.from_logical(
                    layer.local_logical_ids(placement), layer.expert_weights))
            tokens = int(torch.randint(0, 30, (1,), generator=tokens_gen))  # 0 tokens allowed
            x = torch.randn(tokens, HIDDEN, generator=tokens_gen)
            out = layer(x)
            assert out.shape == (tokens, HIDDEN)
            if tokens:
                ref = dense_moe_reference(x, layer.router_weight, layer.router,
                                          layer.expert_weights)
                err = _rel_err(out, ref)
                assert err < 1e-5, f"rank {rank} case {case}: rel err {err}"
            total = layer.read_counters().sum().reshape(1)
            sent = torch.tensor([tokens * ROUTING["top_k"]])
            dist.all_reduce(total)
            dist.all_reduce(sent)
            assert int(total) == int(sent), f"case {case}: counters {int(total)} != {int(sent)}"
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world, gpus_per_node, seed", [(2, 1, 11), (4, 2, 12)])
def test_gloo_ranks_any_placement_match_reference(tmp_path, world, gpus_per_node, seed):
    mp.spawn(_ranks_main, args=(world, str(tmp_path / "store"), seed, 6, gpus_per_node),
             nprocs=world, join=True)
