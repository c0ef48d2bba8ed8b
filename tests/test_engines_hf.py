"""transformers MoE models (tiny DeepSeek-V3, Qwen3-MoE, Mixtral) served by ExpertPlane's
expert-parallel layer: logits equal the unmodified model's on 1, 2 and 4 gloo ranks with
redundant replicas and per-rank batches, expert_load equals the routers' own choices, hot-swaps
keep the logits, a checkpoint loads only this rank's slots, bad input gets one clear line."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expertplane.engines.hf import (UnsupportedModelError, ep_layers, expert_load,
                                    expert_parallel, find_moe_blocks)
from expertplane.engines.hf.load import load_expert_parallel
from expertplane.engines.hf.tiny import TinySpec, build_tiny, drifting_tokens, tiny_config
from expertplane.kernels.hotswap import HotSwapEngine
from expertplane.kernels.moe import LayerPlacement, PlacementError
from expertplane.planner.eplb import rebalance_experts

FAMILIES = ("deepseek_v3", "qwen3_moe", "mixtral")
SPEC = TinySpec()
SLOTS = 12                  # 8 experts + 4 redundant replicas: a multiple of 1, 2 and 4 ranks


def _plan(num_layers: int, world: int, seed: int) -> torch.Tensor:
    """phy2log [L, SLOTS] from rebalance_experts on a random skewed load (same on every rank)."""
    gen = np.random.default_rng(seed)
    load = gen.zipf(1.5, size=(num_layers, SPEC.experts)).astype(np.float64)
    phy2log, _, logcnt = rebalance_experts(load, SLOTS, 1, 1, world)
    assert int(logcnt.max()) > 1       # redundant replicas
    return phy2log


def _batch(rank: int, step: int) -> torch.Tensor:
    """Rank-specific token ids: batches differ in shape and content between ranks."""
    return drifting_tokens(step, 1 + rank % 2, 5 + 3 * rank, SPEC.vocab, rank=rank)


def _router_counts(model) -> list:
    """Forward hooks on the model's own routers: bincounts of their top-k choices."""
    counts = []
    for index, block in enumerate(find_moe_blocks(model)):
        def hook(module, args, out, index=index):
            counts.append((index, torch.bincount(out[2].reshape(-1), minlength=SPEC.experts)))
        block.router.register_forward_hook(hook)
    return counts


def _totals(counts: list, num_layers: int) -> np.ndarray:
    out = np.zeros((num_layers, SPEC.experts), dtype=np.int64)
    for index, c in counts:
        out[index] += c.numpy()
    counts.clear()
    return out


def _check_family(family: str, rank: int, world: int, group, swaps: bool) -> None:
    reference = build_tiny(family, SPEC)
    model = copy.deepcopy(reference)
    num_layers = len(find_moe_blocks(model))
    expert_parallel(model, _plan(num_layers, world, 1), group)
    counts = _router_counts(model)
    engine = HotSwapEngine(ep_layers(model), group=dist.new_group() if world > 1 else None,
                           step_budget_bytes=None) if swaps else None
    plans = [_plan(num_layers, world, 2), _plan(num_layers, world, 3)] if swaps else []
    for step in range(1 + len(plans)):
        ids = _batch(rank, step)
        with torch.no_grad():
            want = reference(ids).logits
            got = model(ids).logits
        diff = float((got - want).abs().max())
        assert diff < 1e-4, f"{family} rank {rank}/{world} step {step}: max abs diff {diff}"
        load = expert_load(model)
        assert load.dtype == np.int64 and load.shape == (num_layers, SPEC.experts)
        np.testing.assert_array_equal(load, _totals(counts, num_layers))
        assert int(load.sum()) == ids.numel() * SPEC.top_k * num_layers
        assert not expert_load(model).any()
        if step < len(plans):
            placements = [LayerPlacement.from_phy2log(row, SPEC.experts) for row in plans[step]]
            engine.prepare(2 + step, placements)
            assert engine.wait(30)
            if world > 1:
                dist.barrier()
            engine.commit()
            assert torch.equal(engine.current_phy2log(), plans[step])


def _ranks_main(rank: int, world: int, store: str, checkpoints: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for family in FAMILIES:
            _check_family(family, rank, world, None, swaps=True)
        for family, directory in checkpoints.items():
            _check_checkpoint(family, directory, rank, world)
    finally:
        dist.destroy_process_group()


def _check_checkpoint(family: str, directory: str, rank: int, world: int) -> None:
    reference = build_tiny(family, SPEC)
    num_layers = len(find_moe_blocks(reference))
    plan = _plan(num_layers, world, 4)
    model = load_expert_parallel(directory, plan)
    ids = _batch(rank, 0)
    with torch.no_grad():
        diff = float((model(ids).logits - reference(ids).logits).abs().max())
    assert diff < 1e-4, f"{family} from {directory}, rank {rank}: max abs diff {diff}"
    # parameter bytes: everything but the routed experts, plus exactly this rank's slots
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)   # noqa: E731
    blocks = find_moe_blocks(reference)
    expert_bytes = nbytes([blocks[0].experts.gate_up_proj[0], blocks[0].experts.down_proj[0]])
    dense = nbytes(reference.parameters()) - nbytes(
        p for b in blocks for p in (b.experts.gate_up_proj, b.experts.down_proj))
    held = [nbytes(w for seg in layer.experts.segments for w in seg)
            for layer in ep_layers(model)]
    assert held == [SLOTS // world * expert_bytes] * num_layers
    assert nbytes(model.parameters()) == dense


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_match_unmodified_model_load_and_swaps(tmp_path, world):
    checkpoints = {}
    if world == 2:      # checkpoints written by save_pretrained, loaded per rank
        for family in FAMILIES:
            checkpoints[family] = str(tmp_path / family)
            build_tiny(family, SPEC).save_pretrained(checkpoints[family])
    mp.spawn(_ranks_main, args=(world, str(tmp_path / "store"), checkpoints), nprocs=world,
             join=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_rank_matches_unmodified_model_and_swaps(family):
    _check_family(family, 0, 1, None, swaps=True)


def test_dense_and_unknown_moe_models_get_one_line(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError, match=r"^llama .*not a Mixture-of-Experts") as e:
        expert_parallel(dense, [[0]])
    assert "\n" not in str(e.value)
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(UnsupportedModelError, match="not a Mixture-of-Experts"):
        load_expert_parallel(tmp_path / "dense", [[0]])
    gpt_oss = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_oss", vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2))
    with pytest.raises(UnsupportedModelError, match=r"^gpt_oss: unsupported experts .*bias") as e:
        expert_parallel(gpt_oss, [[0, 1, 2, 3]])
    assert "\n" not in str(e.value)


def test_plan_shape_mismatch_names_both_shapes():
    model = build_tiny("qwen3_moe", SPEC)       # 3 MoE layers of 8 experts
    with pytest.raises(PlacementError, match=r"^phy2log: shape \[2, 8\].*3 MoE layers of 8 "
                                             r"experts need \[3, R\]"):
        expert_parallel(model, np.zeros((2, 8), dtype=np.int64))
    with pytest.raises(PlacementError, match=r"^phy2log: shape \[3, 6\]"):
        expert_parallel(model, np.zeros((3, 6), dtype=np.int64))
    with pytest.raises(PlacementError, match=r"^phy2log\[0\]: values must be in \[0, 8\)"):
        expert_parallel(model, np.full((3, 8), 9))
    assert hasattr(find_moe_blocks(model)[0].experts, "gate_up_proj")   # left untouched


def test_tiny_routing_is_skewed():
    model = build_tiny("mixtral", SPEC)
    expert_parallel(model, np.tile(np.arange(SPEC.experts), (len(find_moe_blocks(model)), 1)))
    with torch.no_grad():
        model(drifting_tokens(0, 4, 32, SPEC.vocab))
    load = expert_load(model)
    assert (load.max(axis=1) / load.mean(axis=1)).min() > 1.5


def test_tiny_config_unknown_family():
    with pytest.raises(ValueError, match="family"):
        tiny_config("llama")


def test_bench_models_call_matches_transformers_kernels_on_cpu():
    """The benchmark's call (a DeepseekV3MoE block's experts, identity plan, world size 1) gives
    transformers' grouped_mm and eager outputs, at small sizes in fp32."""
    import argparse

    from expertplane.benchmarks.models import baseline, build_block, routing

    args = argparse.Namespace(hidden=64, intermediate=32, experts=8, top_k=2)
    base = build_block(args, "cpu").float()
    ours = expert_parallel(copy.deepcopy(base), [list(range(args.experts))])
    hidden, index, weights = routing(40, args, "cpu")
    with torch.no_grad():
        got = ours.experts(hidden.float(), index, weights)
        for name in ("grouped_mm", "eager"):
            want = baseline(base, name, hidden.float(), index, weights)
            assert float((got - want).abs().max()) < 1e-5, name
    assert int(ep_layers(ours)[0].read_counters().sum()) == 40 * args.top_k
