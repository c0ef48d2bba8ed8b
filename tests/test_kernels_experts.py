"""Grouped GEMM, LocalExperts, token-movement ops (torch paths on CPU) and slot counters."""

from __future__ import annotations

import pytest
import torch

from expertplane.kernels import triton_ops
from expertplane.kernels.counters import SlotCounters
from expertplane.kernels.experts import (LocalExperts, grouped_mm, make_expert_weights,
                                         seeded_expert_weights, swiglu_ffn)


def _split_counts(gen, rows, groups):
    cuts = torch.sort(torch.randint(0, rows + 1, (groups - 1,), generator=gen)).values
    return torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([rows])]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_per_group_matmul(dtype):
    gen = torch.Generator().manual_seed(0)
    counts = _split_counts(gen, 50, 6)
    counts[2] = 0
    counts[5] += 50 - int(counts.sum())
    x = torch.randn(50, 16, generator=gen).to(dtype)
    w = torch.randn(6, 16, 24, generator=gen).to(dtype)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    out = grouped_mm(x, w, offsets)
    ref = torch.cat([xs.double() @ w[s].double() for s, xs in enumerate(x.split(counts.tolist()))])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((out.double() - ref).norm() / ref.norm()) < tol
    # the loop fallback (odd widths are not 16-byte aligned) computes the same
    xo, wo = x[:, :15].contiguous(), w[:, :15, :].contiguous()
    ref_o = torch.cat([xs.double() @ wo[s].double() for s, xs in enumerate(xo.split(counts.tolist()))])
    assert float((grouped_mm(xo, wo, offsets).double() - ref_o).norm() / ref_o.norm()) < tol


def test_local_experts_forward_is_per_slot_swiglu():
    fn = seeded_expert_weights(1, 2, 16, 8)
    experts = LocalExperts.from_logical([3, 0, 3], fn)
    counts = torch.tensor([4, 0, 5])
    x = torch.randn(9, 16)
    out = experts(x, counts)
    ref = torch.cat([swiglu_ffn(x[:4], *fn(3)), swiglu_ffn(x[4:], *fn(3))])
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="tokens_per_slot"):
        experts(x, torch.tensor([9]))


def test_expert_weights_are_deterministic_per_logical_expert():
    a = make_expert_weights(7, 1, 5, 16, 8)
    b = make_expert_weights(7, 1, 5, 16, 8)
    c = make_expert_weights(7, 1, 6, 16, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (16, 16) and a[1].shape == (8, 16)


def test_local_experts_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="w2"):
        LocalExperts(torch.zeros(2, 8, 6), torch.zeros(2, 4, 8))


def test_token_movement_ops_cpu():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 12, generator=gen)
    pos = torch.randint(0, 10, (6, 3), generator=gen)
    w = torch.rand(6, 3, generator=gen)
    ref = sum(w[:, j, None] * x[pos[:, j]] for j in range(3))
    assert torch.allclose(triton_ops.weighted_combine(x, pos, w), ref, atol=1e-6)
    ids = torch.randint(0, 7, (100,), generator=gen)
    assert torch.equal(triton_ops.histogram(ids, 9), torch.bincount(ids, minlength=9))


def test_slot_counters_accumulate_read_and_poll():
    counters = SlotCounters(4)
    counters.add(torch.tensor([1, 0, 2, 3]))
    counters.add(torch.tensor([1, 1, 1, 1]))
    assert counters.read(reset=False).tolist() == [2, 1, 3, 4]
    counters.request()
    assert counters.poll().tolist() == [2, 1, 3, 4]
    assert counters.read().tolist() == [0, 0, 0, 0]
    with pytest.raises(RuntimeError, match="request"):
        counters.poll()


def test_experts_in_several_buffers_compute_what_the_stacked_ones_do():
    gen = torch.Generator().manual_seed(5)
    w13, w2 = torch.randn(5, 16, 12, generator=gen), torch.randn(5, 6, 16, generator=gen)
    extra = (w13[[4, 0]].clone(), w2[[4, 0]].clone())
    perm = [4, 2, 0, 3, 1]
    split = LocalExperts.from_segments([(w13, w2), extra], [(1, 0), (0, 2), (1, 1), (0, 3), (0, 1)])
    assert split.stacked is None and split.free_rows() == [(0, 0), (0, 4)]
    assert torch.equal(split.weights(2)[0], w13[0])
    counts = torch.tensor([3, 0, 7, 1, 4])
    x = torch.randn(15, 16, generator=gen)
    assert torch.allclose(split(x, counts), LocalExperts(w13[perm], w2[perm])(x, counts),
                          atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        LocalExperts.from_segments([(w13, w2)], [(0, 5)])
