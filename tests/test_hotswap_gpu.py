"""Hot-swap on CUDA (opt-in: pytest -m gpu): one rank over an NCCL group of one; staging runs
on the side stream while steps continue on the compute stream, unpaced or paced over several
step boundaries; after the switch every slot holds its logical expert's weights and the model
matches the dense reference; the paced compaction after a swap brings torch._grouped_mm back
without a host sync."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist

from expertplane.kernels.experts import make_expert_weights
from expertplane.kernels.hotswap import HotSwapEngine, SwapCoordinator
from expertplane.kernels.moe import LayerPlacement
from expertplane.worker.synthetic import ModelConfig, StreamConfig, SyntheticMoEModel, TokenStream

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = ModelConfig(num_layers=2, num_experts=16, hidden=256, intermediate=128, top_k=4,
                    dtype="bfloat16", seed=2)
STREAM = StreamConfig(tokens_per_step=512, drift_period=4)


def _plan(seed: int) -> list[LayerPlacement]:
    rng = np.random.default_rng(seed)
    return [LayerPlacement.from_phy2log(
        rng.permutation(np.concatenate([np.arange(16), rng.integers(0, 16, 8)])), 16)
        for _ in range(MODEL.num_layers)]


@pytest.fixture
def nccl_group(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("budget", [None, 64 * 1024])   # 64 KiB: w13 (128 KiB) in 2 chunks
def test_cuda_swap_while_serving(nccl_group, budget):
    a, b = _plan(1), _plan(2)
    model = SyntheticMoEModel(MODEL, STREAM, a, device="cuda")
    engine = HotSwapEngine(list(model.layers), group=dist.new_group(), step_budget_bytes=budget)
    coord = SwapCoordinator(engine, version=1)
    stream = TokenStream(MODEL, STREAM, 0, "cuda")
    done = threading.Event()

    stats = []

    def control():
        stats.append(coord.prepare(2, b, timeout=60))
        coord.commit(2, timeout=60)
        done.set()

    threading.Thread(target=control, daemon=True).start()
    step = _serve(coord, model, stream, 0, done.is_set, 5000)
    assert done.is_set() and coord.version == 2
    assert stats[0].steps == 1 if budget is None else stats[0].steps > 4
    assert stats[0].copy_seconds is not None and stats[0].copy_seconds > 0
    assert model(stream.batch(step), verify=True).max_error < model.tolerance
    _assert_weights_match(model, b)


@pytest.mark.timeout(300)
def test_cuda_compaction_restores_grouped_mm_without_a_host_sync(nccl_group, monkeypatch):
    """A swap that moves 3 experts of layer 0 leaves it in two buffers (the Triton path); the
    paced compaction (64 KiB per step) brings it back to one stacked buffer while serving,
    no compact() call synchronizes with the device, outputs match the dense reference
    throughout, and afterwards a large step (>= 512 rows per slot) takes torch._grouped_mm in
    both layers again (layer 1, never split, was untouched)."""
    a = _plan(1)
    phy = a[0].phy2log.clone()
    slots = [int((phy == e).nonzero()[0]) for e in range(3)]
    phy[slots] = phy[slots].roll(1)
    b = [LayerPlacement.from_phy2log(phy, 16), a[1]]
    model = SyntheticMoEModel(MODEL, StreamConfig(tokens_per_step=4096, drift_period=0),
                              a, device="cuda")
    engine = HotSwapEngine(list(model.layers), group=dist.new_group(),
                           step_budget_bytes=64 * 1024)
    coord = SwapCoordinator(engine, version=1)
    stream = TokenStream(MODEL, StreamConfig(tokens_per_step=4096, drift_period=0), 0, "cuda")
    calls = [0]
    grouped = torch._grouped_mm

    def counted(*args, **kwargs):
        calls[0] += 1
        return grouped(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    compact = engine.compact

    def compact_without_sync() -> int:
        torch.cuda.set_sync_debug_mode("error")
        try:
            return compact()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    done = threading.Event()
    threading.Thread(target=lambda: (coord.prepare(2, b, 60), coord.commit(2, 60), done.set()),
                     daemon=True).start()
    step = _serve(coord, model, stream, 0, done.is_set, 5000)
    untouched = model.layers[1].experts
    assert model.layers[0].experts.stacked is None and untouched.stacked is not None
    calls[0] = 0
    assert model(stream.batch(step), verify=True).max_error < model.tolerance
    assert calls[0] == 2   # layer 1 only: layer 0 takes the Triton path
    engine.compact = compact_without_sync   # (no request thread runs from here on)
    step = _serve(coord, model, stream, step, lambda: engine.compacting is None, 10_000)
    assert engine.compacting is None and engine.compacted_layers == 1
    assert model.layers[1].experts is untouched
    calls[0] = 0
    assert model(stream.batch(step), verify=True).max_error < model.tolerance
    assert calls[0] == 4   # both layers: torch._grouped_mm again
    _assert_weights_match(model, b)


def _serve(coord, model, stream, step: int, until, limit: int) -> int:
    """Serve steps from ``step`` (a step boundary, then a forward checked against the dense
    reference every 5th step) until ``until()`` or step ``limit``; returns the next step."""
    while not until() and step < limit:
        coord.step_boundary()
        result = model(stream.batch(step), verify=step % 5 == 0)
        assert result.max_error is None or result.max_error < model.tolerance
        step += 1
    return step


def _assert_weights_match(model, placements) -> None:
    """Every layer's slot s holds the seeded weights of ``placements[l].phy2log[s]`` (one rank)."""
    for l, layer in enumerate(model.layers):
        for s, e in enumerate(placements[l].phy2log.tolist()):
            w13, w2 = make_expert_weights(MODEL.seed, l, e, MODEL.hidden, MODEL.intermediate,
                                          dtype=torch.bfloat16, device="cuda")
            got13, got2 = layer.experts.weights(s)
            assert torch.equal(got13, w13) and torch.equal(got2, w2)
