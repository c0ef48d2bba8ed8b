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

__all__ = ["ReplicaChoiceError", "choose_replicas", "occurrence_index"]


class ReplicaChoiceError(ValueError):
    """An input to the replica-choice rule is invalid; the message names the field."""


def choose_replicas(topk_ids: Tensor, source_rank: int | Tensor, log2phy: Tensor,
                    logcnt: Tensor, slot_gpu: Tensor, gpus_per_node: int | None = None) -> Tensor:
    """Physical slot ids [T, k] (int64) for logical experts ``topk_ids`` [T, k].

    source_rank: the GPU the tokens come from, an int, or a LongTensor [T] (one per token).
    log2phy: [E, X] physical slots of each logical expert, -1 padded; logcnt: [E] replica counts.
    slot_gpu: [R] GPU of each physical slot. gpus_per_node: GPUs per node (None: one node).
    """
    _check(topk_ids, log2phy, logcnt, slot_gpu, gpus_per_node)
    device = topk_ids.device
    tokens, k = topk_ids.shape
    log2phy = log2phy.to(device=device, dtype=torch.int64)
    logcnt = logcnt.to(device=device, dtype=torch.int64)
    slot_gpu = slot_gpu.to(device=device, dtype=torch.int64)
    per_node = gpus_per_node or (int(slot_gpu.max()) + 1 if slot_gpu.numel() else 1)
    slot_node = slot_gpu // per_node
    num_nodes = int(slot_node.max()) + 1 if slot_node.numel() else 1
    src = torch.as_tensor(source_rank, dtype=torch.int64, device=device).expand(tokens)
    src_node = src // per_node
    num_experts, max_rep = log2phy.shape

    sent = torch.zeros(tokens, num_nodes + 1, dtype=torch.bool, device=device)
    seen = torch.zeros(0, dtype=torch.int64, device=device)   # keys of earlier columns
    out = torch.empty(tokens, k, dtype=torch.int64, device=device)
    rep_pos = torch.arange(max_rep, device=device)
    for j in range(k):
        experts = topk_ids[:, j]
        cand = log2phy[experts]                                            # [T, X]
        valid = rep_pos < logcnt[experts].unsqueeze(1)
        cand_node = torch.where(valid, slot_node[cand.clamp_min(0)], num_nodes)
        tiers = torch.stack([
            valid & (cand_node == src_node.unsqueeze(1)),
            valid & sent.gather(1, cand_node),
            valid,
        ])                                                                 # [3, T, X]
        nonempty = tiers.any(dim=2)                                        # [3, T]
        tier = torch.argmax(nonempty.to(torch.int8), dim=0)                # first non-empty
        mask = tiers.gather(0, tier.view(1, tokens, 1).expand(1, tokens, max_rep)).squeeze(0)
        size = mask.sum(dim=1)
        key = (src * num_experts + experts) * 3 + tier
        occ = occurrence_index(key, seen)
        seen = torch.cat([seen, key])
        pick = (occ + src) % size                                          # [T]
        rank_in_tier = torch.cumsum(mask.to(torch.int64), dim=1) - 1
        col = torch.argmax((mask & (rank_in_tier == pick.unsqueeze(1))).to(torch.int8), dim=1)
        chosen = cand.gather(1, col.unsqueeze(1)).squeeze(1)
        out[:, j] = chosen
        sent[torch.arange(tokens, device=device), slot_node[chosen]] = True
    return out


def occurrence_index(keys: Tensor, earlier: Tensor) -> Tensor:
    """For each element of ``keys`` [N]: how many equal keys come before it, counting all of
    ``earlier`` [M] first and then ``keys`` in order. Returns int64 [N]."""
    allkeys = torch.cat([earlier, keys])
    order = torch.sort(allkeys, stable=True).indices
    sorted_keys = allkeys[order]
    first = torch.searchsorted(sorted_keys, sorted_keys, right=False)
    rank_sorted = torch.arange(allkeys.numel(), device=keys.device) - first
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank[earlier.numel():]


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
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= log2phy.shape[0]):
        raise ReplicaChoiceError(f"topk_ids must be in [0, {log2phy.shape[0]})")
