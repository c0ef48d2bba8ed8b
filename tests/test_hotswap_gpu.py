"""Hot-swap on CUDA (opt-in: pytest -m gpu): one rank over an NCCL group of one; staging runs
on the side stream while steps continue on the compute stream, unpaced or paced over several
step boundaries; after the switch every slot holds its logical expert's weights and the model
matches the dense reference."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist

from expertplane.kernels.experts import make_expert_weights
from expertplane.kernels.hotswap import HotSwapEngine, SwapCoordinator
from expertplane.kernels.moe import LayerPlacement
from expertplane.kernels.synthetic import ModelConfig, StreamConfig, SyntheticMoEModel, TokenStream

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
    step = 0
    while not done.is_set() and step < 5000:
        coord.step_boundary()
        result = model(stream.batch(step), verify=step % 5 == 0)
        assert result.max_error is None or result.max_error < model.tolerance
        step += 1
    assert done.is_set() and coord.version == 2
    assert stats[0].steps == 1 if budget is None else stats[0].steps > 4
    assert stats[0].copy_seconds is not None and stats[0].copy_seconds > 0
    assert model(stream.batch(step), verify=True).max_error < model.tolerance
    for l, layer in enumerate(model.layers):
        for s, e in enumerate(b[l].phy2log.tolist()):
            w13, w2 = make_expert_weights(MODEL.seed, l, e, MODEL.hidden, MODEL.intermediate,
                                          dtype=torch.bfloat16, device="cuda")
            got13, got2 = layer.experts.weights(s)
            assert torch.equal(got13, w13) and torch.equal(got2, w2)
