"""Router: top-k expert selection with DeepSeek-V3 group-limited routing and an optional
selection-only bias.

Shapes: ``T`` tokens, ``E`` logical experts, ``k`` experts per token, ``G`` expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RouterConfig", "RouterConfigError", "gating_weights", "ranked_experts", "route", "router_scores"]

SCORING_FUNCS = ("softmax", "sigmoid")


class RouterConfigError(ValueError):
    """A router argument is invalid; the message names the field."""


@dataclass(frozen=True)
class RouterConfig:
    """Router settings.

    num_experts: logical experts E. top_k: experts per token k.
    num_groups: expert groups G (E % G == 0); experts ``g*E/G .. (g+1)*E/G-1`` form group g.
    topk_groups: groups kept per token (DeepSeek-V3: 4 of 8); 1 group == plain top-k.
    scoring: ``"softmax"`` or ``"sigmoid"`` (DeepSeek-V3) over the router logits.
    normalize: divide the k gating weights by their sum.
    scaling: factor applied to the gating weights after normalisation (DeepSeek-V3: 2.5).
    """

    num_experts: int
    top_k: int = 8
    num_groups: int = 1
    topk_groups: int = 1
    scoring: str = "softmax"
    normalize: bool = True
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise RouterConfigError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise RouterConfigError(
                f"num_groups must divide num_experts={self.num_experts}, got {self.num_groups}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise RouterConfigError(
                f"topk_groups must be in [1, num_groups={self.num_groups}], got {self.topk_groups}")
        per_group = self.num_experts // self.num_groups
        if not 1 <= self.top_k <= self.topk_groups * per_group:
            raise RouterConfigError(
                f"top_k must be in [1, topk_groups*experts_per_group="
                f"{self.topk_groups * per_group}], got {self.top_k}")
        if self.scoring not in SCORING_FUNCS:
            raise RouterConfigError(f"scoring must be one of {SCORING_FUNCS}, got {self.scoring!r}")


def router_scores(logits: Tensor, scoring: str) -> Tensor:
    """Affinity scores [T, E] (fp32) from router logits [T, E]."""
    logits = logits.float()
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    raise RouterConfigError(f"scoring must be one of {SCORING_FUNCS}, got {scoring!r}")


def route(logits: Tensor, config: RouterConfig, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Choose k logical experts per token.

    logits: [T, E] router logits (any float dtype).
    bias: optional [E] selection bias, added to the scores for selection only (group scores and
    top-k); the gating weights are always gathered from the unbiased scores.
    Returns (topk_ids [T, k] int64, topk_weights [T, k] float32).

    Group-limited routing (DeepSeek-V3): a group's score is the sum of its two best (biased)
    expert scores (its best score when a group holds one expert); the ``topk_groups`` best
    groups are kept and the k experts are the top-k (biased) scores inside them.
    """
    scores, selection = _selection(logits, config, bias)
    topk_ids = torch.topk(selection, config.top_k, dim=-1, sorted=True).indices
    return topk_ids, gating_weights(scores, topk_ids, config)


def gating_weights(scores: Tensor, topk_ids: Tensor, config: RouterConfig) -> Tensor:
    """Gating weights [T, k] fp32: unbiased scores [T, E] of topk_ids [T, k], normalised to
    sum 1 when ``config.normalize``, times ``config.scaling``."""
    weights = scores.gather(1, topk_ids)
    if config.normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if config.scaling != 1.0:
        weights = weights * config.scaling
    return weights


def ranked_experts(logits: Tensor, config: RouterConfig, bias: Tensor | None, count: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The ``count`` best experts per token by selection score (the first k are
    :func:`route`'s choice, in the same order), for re-routing past the top-k.
    Returns (ids [T, count] int64, eligible [T, count] bool: inside the token's kept groups,
    scores [T, E] fp32 unbiased)."""
    count = min(count, config.num_experts)
    scores, selection = _selection(logits, config, bias)
    top = torch.topk(selection, count, dim=-1, sorted=True)
    return top.indices, torch.isfinite(top.values), scores


def _selection(logits: Tensor, config: RouterConfig, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(unbiased scores [T, E], selection scores [T, E]: biased, -inf outside kept groups)."""
    if logits.dim() != 2 or logits.shape[1] != config.num_experts:
        raise RouterConfigError(
            f"logits must be [T, {config.num_experts}], got {list(logits.shape)}")
    scores = router_scores(logits, config.scoring)
    selection = scores
    if bias is not None:
        if bias.shape != (config.num_experts,):
            raise RouterConfigError(f"bias must be [{config.num_experts}], got {list(bias.shape)}")
        selection = scores + bias.to(device=scores.device, dtype=scores.dtype)
    if config.topk_groups < config.num_groups:
        selection = _mask_groups(selection, config.num_groups, config.topk_groups)
    return scores, selection


def _mask_groups(selection: Tensor, num_groups: int, topk_groups: int) -> Tensor:
    """Set the scores of experts outside each token's best ``topk_groups`` groups to -inf."""
    tokens, experts = selection.shape
    grouped = selection.view(tokens, num_groups, experts // num_groups)
    best = min(2, grouped.shape[-1])
    group_scores = grouped.topk(best, dim=-1).values.sum(dim=-1)          # [T, G]
    keep_groups = group_scores.topk(topk_groups, dim=-1).indices          # [T, topk_groups]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    masked = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf"))
    return masked.view(tokens, experts)
