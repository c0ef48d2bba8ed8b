"""Reference oracle: DeepSeek's EPLB (github deepseek-ai/EPLB, eplb.py) as plain torch code.

Written for this project from the algorithm's description (not copied) so the benchmarks and
tests can measure the baseline and cross-check ``expertplane.planner.deepseek`` on new inputs.
It deliberately keeps the original's cost profile: torch tensors, a Python loop per layer per
item in the packing step and a torch ``max`` per redundant slot in the replication step.
Do not use it in production code; use ``expertplane.planner.rebalance_experts``.
"""

from __future__ import annotations

import torch


def _pack(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight float32 [X, n] -> (pack [X, n], rank in pack [X, n]), n/num_packs items a pack."""
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return (torch.arange(n, dtype=torch.int64).expand(rows, n).clone(),
                torch.zeros(rows, n, dtype=torch.int64))
    order = weight.sort(-1, descending=True).indices
    pack = torch.full((rows, n), -1, dtype=torch.int64)
    rank = torch.full((rows, n), -1, dtype=torch.int64)
    for row in range(rows):
        loads: list = [0] * num_packs
        counts = [0] * num_packs
        for item in order[row].tolist():
            open_packs = [p for p in range(num_packs) if counts[p] < per_pack]
            target = min(open_packs, key=lambda p: loads[p])
            pack[row, item] = target
            rank[row, item] = counts[target]
            loads[target] = loads[target] + weight[row, item]  # float32 tensor arithmetic
            counts[target] += 1
    return pack, rank


def _replicate(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight float32 [X, num_log] -> (phy2log [X, num_phy], rank [X, num_phy], logcnt [X, num_log])."""
    rows, num_log = weight.shape
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(rows, 1)
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(rows, num_log, dtype=torch.int64)
    all_rows = torch.arange(rows)
    for slot in range(num_log, num_phy):
        chosen = (weight / logcnt).max(dim=-1).indices
        phy2log[:, slot] = chosen
        rank[:, slot] = logcnt[all_rows, chosen]
        logcnt[all_rows, chosen] += 1
    return phy2log, rank, logcnt


def _invert(perm: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(perm)
    out.scatter_(1, perm, torch.arange(perm.size(1)).expand_as(perm).contiguous())
    return out


def _hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layers, num_log = weight.shape
    group_size = num_log // num_groups
    per_node_log = num_log // num_nodes
    per_gpu = num_phy // num_gpus
    group_load = weight.view(layers, num_groups, group_size).sum(-1)
    gpack, grank = _pack(group_load, num_nodes)
    log2mlog = ((gpack * (num_groups // num_nodes) + grank) * group_size).unsqueeze(-1)
    log2mlog = (log2mlog + torch.arange(group_size)).flatten(-2)
    mlog2log = _invert(log2mlog)
    mlog_load = weight.gather(-1, mlog2log).view(-1, per_node_log)
    phy2mlog, phyrank, mlogcnt = _replicate(mlog_load, num_phy // num_nodes)
    phy_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    gpu, grank2 = _pack(phy_load, num_gpus // num_nodes)
    pphy2phy = _invert(gpu * per_gpu + grank2)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy).view(layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + torch.arange(num_nodes).view(1, -1, 1) * per_node_log).flatten(-2)
    return (mlog2log.gather(-1, pphy2mlog), phyrank.gather(-1, pphy2phy).view(layers, -1),
            mlogcnt.view(layers, -1).gather(-1, log2mlog))


def reference_rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int,
                                num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek EPLB: (phy2log [L, R], log2phy [L, E, X], logcnt [L, E]) int64 torch tensors."""
    weight = torch.as_tensor(weight).float().cpu()
    layers, num_log = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, rank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    width = int(logcnt.max())
    log2phy = torch.full((layers, num_log * width), -1, dtype=torch.int64)
    log2phy.scatter_(-1, phy2log * width + rank,
                     torch.arange(num_replicas).expand(layers, -1).contiguous())
    return phy2log, log2phy.view(layers, num_log, width), logcnt
