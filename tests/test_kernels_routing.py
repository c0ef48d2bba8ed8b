"""Router: top-k, DeepSeek-V3 group-limited routing, selection-only bias."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertplane.kernels.routing import RouterConfig, RouterConfigError, route, router_scores


def _per_token_route(logits, cfg, bias):
    """Direct per-token restatement of the rule, for comparison."""
    scores = router_scores(logits, cfg.scoring)
    ids, weights = [], []
    per_group = cfg.num_experts // cfg.num_groups
    for t in range(scores.shape[0]):
        sel = scores[t] + (bias if bias is not None else 0)
        groups = []
        for g in range(cfg.num_groups):
            block = sorted(sel[g * per_group:(g + 1) * per_group].tolist(), reverse=True)
            groups.append(sum(block[:2]))
        kept = sorted(range(cfg.num_groups), key=lambda g: -groups[g])[:cfg.topk_groups]
        allowed = [e for e in range(cfg.num_experts) if e // per_group in kept]
        chosen = sorted(allowed, key=lambda e: -float(sel[e]))[:cfg.top_k]
        w = scores[t, chosen]
        if cfg.normalize:
            w = w / w.sum()
        ids.append(sorted(chosen))
        weights.append(dict(zip(chosen, (w * cfg.scaling).tolist())))
    return ids, weights


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.sampled_from([(1, 1), (4, 2), (8, 4), (8, 3)]),
       k=st.integers(1, 6), scoring=st.sampled_from(["softmax", "sigmoid"]),
       use_bias=st.booleans())
def test_route_matches_per_token_rule(seed, groups, k, scoring, use_bias):
    num_groups, topk_groups = groups
    experts = 32
    k = min(k, topk_groups * experts // num_groups)
    cfg = RouterConfig(num_experts=experts, top_k=k, num_groups=num_groups,
                       topk_groups=topk_groups, scoring=scoring, scaling=2.5)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, experts, generator=gen)
    bias = torch.randn(experts, generator=gen) * 0.1 if use_bias else None
    ids, weights = route(logits, cfg, bias)
    want_ids, want_weights = _per_token_route(logits, cfg, bias)
    assert ids.shape == (16, k) and weights.dtype == torch.float32
    for t in range(16):
        assert sorted(ids[t].tolist()) == want_ids[t]
        for e, w in zip(ids[t].tolist(), weights[t].tolist()):
            assert w == pytest.approx(want_weights[t][e], rel=1e-5)


def test_bias_changes_selection_not_gating_weights():
    cfg = RouterConfig(num_experts=16, top_k=4, scoring="sigmoid", normalize=False)
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    bias = torch.zeros(16)
    bias[:4] = 10.0                       # forces experts 0..3 for every token
    ids, weights = route(logits, cfg, bias)
    assert (ids.sort(dim=1).values == torch.arange(4)).all()
    assert torch.equal(weights, torch.sigmoid(logits).gather(1, ids))


def test_group_limited_routing_stays_in_kept_groups():
    cfg = RouterConfig(num_experts=64, top_k=8, num_groups=8, topk_groups=3, scoring="sigmoid")
    ids, _ = route(torch.randn(128, 64, generator=torch.Generator().manual_seed(2)), cfg)
    groups_used = torch.tensor([len(set((row // 8).tolist())) for row in ids])
    assert int(groups_used.max()) <= 3


def test_normalised_weights_sum_to_scaling():
    cfg = RouterConfig(num_experts=8, top_k=3, scaling=2.0)
    _, weights = route(torch.randn(10, 8), cfg)
    assert torch.allclose(weights.sum(1), torch.full((10,), 2.0))


@pytest.mark.parametrize("kwargs, field", [
    ({"num_experts": 0}, "num_experts"),
    ({"num_experts": 10, "num_groups": 3}, "num_groups"),
    ({"num_experts": 8, "num_groups": 2, "topk_groups": 3}, "topk_groups"),
    ({"num_experts": 8, "top_k": 9}, "top_k"),
    ({"num_experts": 8, "scoring": "tanh"}, "scoring"),
])
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(RouterConfigError, match=field):
        RouterConfig(**kwargs)


def test_bad_shapes_name_field():
    cfg = RouterConfig(num_experts=8, top_k=2)
    with pytest.raises(RouterConfigError, match="logits"):
        route(torch.randn(4, 7), cfg)
    with pytest.raises(RouterConfigError, match="bias"):
        route(torch.randn(4, 8), cfg, torch.zeros(7))
