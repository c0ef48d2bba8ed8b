"""GPU checks (opt-in: pytest -m gpu): Triton ops vs torch ops, grouped GEMM paths, the layer
on CUDA (with and without an NCCL group of one) against the dense reference, and counters
read without a stream sync."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from expertplane.kernels import triton_ops
from expertplane.kernels.counters import SlotCounters
from expertplane.kernels.experts import LocalExperts, grouped_mm
from expertplane.kernels.moe import EPMoELayer, LayerPlacement
from expertplane.kernels.reference import dense_moe_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_ops_match_torch(dtype):
    assert triton_ops.HAVE_TRITON
    x = torch.randn(3000, 7168, device="cuda").to(dtype)
    pos = torch.randint(0, 3000, (700, 8), device="cuda")
    w = torch.rand(700, 8, device="cuda")
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert _rel(triton_ops.weighted_combine(x, pos, w),
                triton_ops.weighted_combine_torch(x, pos, w)) < tol
    h = torch.randn(999, 4096, device="cuda").to(dtype)
    assert _rel(triton_ops.swiglu(h), triton_ops.swiglu_torch(h.double())) < tol
    ids = torch.randint(0, 300, (123_457,), device="cuda")
    assert torch.equal(triton_ops.histogram(ids, 300), torch.bincount(ids, minlength=300))


def test_grouped_mm_cuda_bf16_matches_loop():
    counts = torch.tensor([100, 0, 37, 400, 1, 262])
    x = torch.randn(800, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(6, 256, 128, device="cuda", dtype=torch.bfloat16) / 16
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    ref = torch.cat([xs.double() @ w[s].double() for s, xs in enumerate(x.split(counts.tolist()))])
    assert _rel(grouped_mm(x, w, offs), ref) < 1e-2


def test_experts_pointing_into_several_buffers_match_stacked_on_cuda():
    gen = torch.Generator(device="cuda").manual_seed(4)
    w13 = torch.randn(6, 256, 256, device="cuda", generator=gen).bfloat16() / 16
    w2 = torch.randn(6, 128, 256, device="cuda", generator=gen).bfloat16() / 12
    extra = (w13[:3].flip(0).contiguous(), w2[:3].flip(0).contiguous())   # rows 2, 1, 0
    perm = [5, 1, 3, 0, 4, 2]
    stacked = LocalExperts(w13[perm], w2[perm])
    # slots 1 and 3 read the second buffer, the others rows of the first, out of order
    rows = [(0, 5), (1, 1), (0, 3), (1, 2), (0, 4), (0, 2)]
    split = LocalExperts.from_segments([(w13, w2), extra], rows)
    counts = torch.tensor([300, 0, 77, 129, 1, 64], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", generator=gen).bfloat16()
    got, want = split(x, counts), stacked(x, counts)
    assert _rel(got, want) < 1e-2


def test_pretuned_experts_tune_nothing_while_serving():
    gen = torch.Generator(device="cuda").manual_seed(5)
    w13 = torch.randn(4, 256, 768, device="cuda", generator=gen).bfloat16() / 16
    w2 = torch.randn(4, 384, 256, device="cuda", generator=gen).bfloat16() / 16
    experts = LocalExperts.from_segments([(w13, w2), (w13[:1].clone(), w2[:1].clone())],
                                         [(0, 0), (1, 0), (0, 2), (0, 3)])   # Triton path
    assert experts.pretune(300)
    tuned = triton_ops.tuned_configs()
    assert {key[0] for key in tuned} >= {1, 2, 4, 8, 16, 32, 64, 128, 256, 512}   # buckets
    for total in (3, 77, 400, 1200):   # every load level up to 300 rows per slot
        counts = torch.full((4,), total // 4, device="cuda")
        experts(torch.randn(int(counts.sum()), 256, device="cuda").bfloat16(), counts)
    assert triton_ops.tuned_configs() == tuned


@pytest.mark.parametrize("with_group", [False, True])
def test_layer_on_cuda_matches_reference(tmp_path, with_group):
    group = None
    if with_group:
        dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0,
                                world_size=1)
        group = dist.group.WORLD
    try:
        gen = torch.Generator().manual_seed(9)
        phy2log = torch.cat([torch.arange(64), torch.randint(0, 64, (32,), generator=gen)])
        placement = LayerPlacement.from_phy2log(phy2log[torch.randperm(96, generator=gen)], 64)
        layer = EPMoELayer(512, 256, 64, placement, group=group, top_k=8, num_groups=8,
                           topk_groups=4, scoring="sigmoid", scaling=2.5,
                           dtype=torch.bfloat16, device="cuda")
        x = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16)
        out = layer(x)
        ref = dense_moe_reference(x, layer.router_weight, layer.router, layer.expert_weights)
        assert _rel(out, ref) < 2e-2
        assert int(layer.read_counters().sum()) == 8000
    finally:
        if with_group:
            dist.destroy_process_group()


def test_counters_request_does_not_wait_for_the_stream():
    counters = SlotCounters(8, "cuda")
    counters.add(torch.ones(8, dtype=torch.int64, device="cuda"))
    a = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()
    for _ in range(20):           # keep the stream busy for tens of ms
        a = a @ a / 100
    counters.add(torch.ones(8, dtype=torch.int64, device="cuda"))
    counters.request()
    assert counters.poll() is None          # copy queued behind the matmuls, host not blocked
    torch.cuda.synchronize()
    assert counters.poll().tolist() == [2] * 8


@pytest.mark.parametrize("mode", ["drop", "next_best"])
def test_capacity_layer_on_cuda_matches_cpu(mode):
    from expertplane.kernels.balancing import CapacityConfig
    from expertplane.kernels.experts import seeded_expert_weights

    torch.manual_seed(0)                                 # fixed draw: no near-tie routing
    cpu_weights = seeded_expert_weights(0, 0, 256, 128)
    router = torch.randn(32, 256) / 16
    router[:4] *= 3                                     # hot experts so the capacity binds
    placement = LayerPlacement.from_phy2log(list(range(32)) + [0, 1, 2, 3], 32)
    layers = [EPMoELayer(256, 128, 32, placement, top_k=4, scoring="sigmoid", device=device,
                         router_weight=router,
                         expert_weights=lambda e, d=device: tuple(w.to(d) for w in cpu_weights(e)),
                         capacity=CapacityConfig(1.0, mode=mode))
              for device in ("cpu", "cuda")]
    x = torch.randn(512, 256)
    out_cpu, out_gpu = layers[0](x), layers[1](x.cuda())
    assert _rel(out_gpu.cpu(), out_cpu) < 1e-4
    dropped = layers[1].read_dropped()
    assert int(dropped.sum()) > 0 and torch.equal(dropped, layers[0].read_dropped())
