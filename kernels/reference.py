"""Single-process dense reference for the MoE layer: every token through its top-k logical
experts, weighted sum, in float64. Shares only the router with the layer."""

from __future__ import annotations

import torch
from torch import Tensor

from expertplane.kernels.experts import ExpertWeightFn, swiglu_ffn
from expertplane.kernels.routing import RouterConfig, route

__all__ = ["dense_moe_reference"]


def dense_moe_reference(x: Tensor, router_weight: Tensor, config: RouterConfig,
                        expert_weights: ExpertWeightFn, bias: Tensor | None = None) -> Tensor:
    """x [T, H], router_weight [E, H] -> [T, H] float64 on x's device."""
    logits = x.float() @ router_weight.float().t()
    topk_ids, weights = route(logits, config, bias)
    x64 = x.double()
    out = torch.zeros_like(x64)
    for e in torch.unique(topk_ids).tolist():
        rows, cols = torch.nonzero(topk_ids == e, as_tuple=True)
        w13, w2 = (w.double() for w in expert_weights(e))
        out.index_add_(0, rows, swiglu_ffn(x64[rows], w13, w2) * weights[rows, cols, None].double())
    return out
