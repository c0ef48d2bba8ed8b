"""The replica-choice rule: which physical replica serves each (token, logical expert) pair.

Shared by the MoE layer (``kernels.moe``) and the planner's topology evaluator, so that the
traffic the planner predicts is the traffic the workers produce.

The rule, for the tokens of one source rank (or a batch where each token carries its own
source rank), processed in rank order of the chosen experts (column j = the token's j-th expert,
all tokens' column 0 first, then column 1, ...):

1. Tiers. Among the replicas of the chosen logical expert ``e`` (``log2phy[e, :logcnt[e]]``):
   tier 0 = replicas on the token's own node; tier 1 = replicas on a node the token already
   sends to for one of its higher-ranked experts (columns < j); tier 2 = all replicas.
   The first non-empty tier is used.
2. Spreading. Within the tier, the (token, expert) pairs with the same source rank, the same
   expert and the same tier are numbered 0, 1, 2, ... in (column, token) order: their occurrence
   index ``o``. The pair takes the ``(o + source_rank) % n``-th replica of its tier, ``n`` being
   the tier's size for that token and replicas ordered as in ``log2phy``. Tiers 0 and 2 hold the
   same replicas for every token of a rank, so each replica there gets floor or ceil of
   occurrences / n; tier 1 differs per token and is spread as evenly as its candidate sets allow.

Everything is vectorised over tokens (a loop over the k columns only) and deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ReplicaChoiceError", "choose_replicas", "rank_among_equal"]


class ReplicaChoiceError(ValueError):
    """An input to the replica-choice rule is invalid; the message names the field."""


def choose_replicas(topk_ids: Tensor, source_rank: int | Tensor, log2phy: Tensor,
                    logcnt: Tensor, slot_gpu: Tensor, gpus_per_node: int | None = None) -> Tensor:
    """Physical slot ids [T, k] (int64) for logical experts ``topk_ids`` [T, k].

    source_rank: the GPU the tokens come from, an int, or a LongTensor [T] (one per token).
    log2phy: [E, X] physical slots of each logical expert, -1 padded; logcnt: [E] replica counts.
    slot_gpu: [R] GPU of each physical slot. gpus_per_node: GPUs per node (None: one node).

    Tier-0 pairs (a replica on the token's node) are all chosen at once; only the pairs whose
    expert has no replica on the token's node go through the loop over columns.
    """
    _check(topk_ids, log2phy, logcnt, slot_gpu, gpus_per_node)
    device = topk_ids.device
    tokens, k = topk_ids.shape
    log2phy = log2phy.to(device=device, dtype=torch.int64)
    logcnt = logcnt.to(device=device, dtype=torch.int64)
    slot_gpu = slot_gpu.to(device=device, dtype=torch.int64)
    src = torch.as_tensor(source_rank, dtype=torch.int64, device=device).expand(tokens)
    num_experts = log2phy.shape[0]
    if tokens == 0:
        return torch.empty(0, k, dtype=torch.int64, device=device)
    per_node = gpus_per_node or slot_gpu.numel()        # one node: every GPU id is < R
    slot_node = slot_gpu // per_node
    safe_ids = topk_ids.clamp(0, num_experts - 1)      # bounds are checked after the sync
    cand = log2phy[safe_ids]                                                   # [T, k, X]
    valid = torch.arange(log2phy.shape[1], device=device) < logcnt[safe_ids].unsqueeze(-1)
    cand_node = torch.where(valid, slot_node[cand.clamp_min(0)], -1)
    local = valid & (cand_node == (src // per_node).view(tokens, 1, 1))
    has_local = local.any(dim=-1)                                              # [T, k]
    # one host sync: bounds, and whether any pair needs tiers 1-2
    lo, hi, max_gpu, max_src, remote = torch.stack([
        topk_ids.min(), topk_ids.max(), slot_gpu.max(), src.max(), (~has_local).sum()]).tolist()
    if lo < 0 or hi >= num_experts:
        raise ReplicaChoiceError(f"topk_ids must be in [0, {num_experts})")
    num_nodes = max_gpu // per_node + 1
    num_keys = (max(max_gpu, max_src) + 1) * num_experts * 3
    key = (src.unsqueeze(1) * num_experts + topk_ids) * 3                      # tier 0 keys
    key_cm = torch.where(has_local, key, -1).t().reshape(-1)                  # (column, token)
    occ = rank_among_equal(key_cm).view(k, tokens).t()
    out = _pick(cand, local, occ, src.unsqueeze(1))
    if remote:
        remote_rows = torch.nonzero(~has_local.all(dim=1)).squeeze(1)
        out[remote_rows] = _choose_remote(
            cand[remote_rows], valid[remote_rows], cand_node[remote_rows], has_local[remote_rows],
            key[remote_rows], src[remote_rows], out[remote_rows], slot_node, num_nodes, num_keys)
    return out


def _choose_remote(cand: Tensor, valid: Tensor, cand_node: Tensor, has_local: Tensor,
                   key: Tensor, src: Tensor, out: Tensor, slot_node: Tensor, num_nodes: int,
                   num_keys: int) -> Tensor:
    """Tiers 1 and 2 for the pairs of ``has_local == False``, column by column ([t, k, X] inputs
    restricted to the tokens that have such pairs; ``out`` holds their tier-0 choices).
    ``sent`` tracks only the nodes of these pairs' choices: tier-0 choices sit on the token's
    own node, where these experts have no replica, so they never widen tier 1."""
    tokens, k = has_local.shape
    base = torch.zeros(num_keys + 1, dtype=torch.int64, device=cand.device)
    sent = torch.zeros(tokens, num_nodes + 1, dtype=torch.bool, device=cand.device)
    rows = torch.arange(tokens, device=cand.device)
    cand_node = torch.where(cand_node < 0, num_nodes, cand_node)
    out = out.clone()
    for j in range(k):
        remote = ~has_local[:, j]
        via_sent = valid[:, j] & sent.gather(1, cand_node[:, j])
        tier = torch.where(via_sent.any(dim=1), 1, 2)
        mask = torch.where((tier == 1).unsqueeze(1), via_sent, valid[:, j])
        col_key = torch.where(remote, key[:, j] + tier, num_keys)
        occ = base[col_key] + rank_among_equal(col_key)
        base.index_add_(0, col_key, torch.ones_like(col_key))
        chosen = _pick(cand[:, j], mask, occ, src)
        out[:, j] = torch.where(remote, chosen, out[:, j])
        sent[rows, torch.where(remote, slot_node[chosen], num_nodes)] = True
    return out


def _pick(cand: Tensor, mask: Tensor, occ: Tensor, src: Tensor) -> Tensor:
    """The ``(occ + src) % n``-th True entry of ``mask`` [..., X] (n = its count) in ``cand``;
    where mask is all False the result is unspecified (a valid slot id of cand's row)."""
    size = mask.sum(dim=-1).clamp_min(1)
    pick = (occ + src) % size
    width = mask.shape[-1]
    upper = torch.ones(width, width, device=mask.device).triu_()    # inclusive prefix sum
    rank_in_tier = (mask.float() @ upper).long() - 1
    col = torch.argmax((mask & (rank_in_tier == pick.unsqueeze(-1))).to(torch.int8), dim=-1)
    return cand.gather(-1, col.unsqueeze(-1)).squeeze(-1)


def rank_among_equal(keys: Tensor) -> Tensor:
    """For each element of ``keys`` [N]: how many equal keys come before it. int64 [N]."""
    order = torch.sort(keys, stable=True).indices
    sorted_keys = keys[order]
    first = torch.searchsorted(sorted_keys, sorted_keys, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(keys.numel(), device=keys.device) - first
    return rank


def _check(topk_ids: Tensor, log2phy: Tensor, logcnt: Tensor, slot_gpu: Tensor,
           gpus_per_node: int | None) -> None:
    if topk_ids.dim() != 2:
        raise ReplicaChoiceError(f"topk_ids must be [T, k], got {list(topk_ids.shape)}")
    if log2phy.dim() != 2:
        raise ReplicaChoiceError(f"log2phy must be [E, X], got {list(log2phy.shape)}")
    if logcnt.shape != (log2phy.shape[0],):
        raise ReplicaChoiceError(f"logcnt must be [{log2phy.shape[0]}], got {list(logcnt.shape)}")
    if slot_gpu.dim() != 1:
        raise ReplicaChoiceError(f"slot_gpu must be [R], got {list(slot_gpu.shape)}")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ReplicaChoiceError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
