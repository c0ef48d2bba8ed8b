"""Router-side load balancing: DeepSeek-V3's auxiliary-loss-free selection bias and
capacity-based token dropping (worker side).

Bias. The router adds a per-expert bias to the scores used for top-k selection only
(``routing.route``); after each step the bias moves against the load by the rule
:class:`~expertplane.planner.bias_rule.BiasUpdate` (shared with the controller). The bias can be updated from the worker's own counts (:func:`expert_load`,
:func:`logical_load`) or set from outside (``EPMoELayer.set_selection_bias``).

Capacity. Every physical slot accepts at most ``C = ceil(factor * rows / R)`` (token, expert)
rows per step, ``rows`` being the rows of all ranks of the group (T_r * k summed). Each rank
all-gathers the per-slot requests [W, R]; sources are served in rank order, and inside a rank
the rows are served in (column, token) order (every token's first choice before any second
choice). Rows beyond C are dropped (``mode="drop"``), or (``mode="next_best"``) re-routed to
the token's next-best expert by selection score (up to ``max_reroutes`` rounds, one
all-gather each); rows still refused after the last round are dropped. Drops are counted per
physical slot where the row was last refused: exactly the slot's excess in drop mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from expertplane.kernels.replica_choice import rank_among_equal
from expertplane.planner.bias_rule import BIAS_RULES, BalancingError, BiasUpdate

__all__ = ["BIAS_RULES", "CAPACITY_MODES", "BalancingError", "BiasUpdate", "CapacityConfig",
           "CapacityResult", "Rerouter", "enforce_capacity", "expert_load", "gather_per_slot",
           "grant_capacity", "keep_within_grant", "logical_load", "slot_capacity"]

CAPACITY_MODES = ("drop", "next_best")


def expert_load(topk_ids: Tensor, num_experts: int) -> Tensor:
    """Selections per logical expert [E] (int64) from topk_ids [T, k]; no host sync."""
    flat = topk_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat))


def logical_load(slot_counts: Tensor, phy2log: Tensor, num_experts: int) -> Tensor:
    """Load per logical expert [E] from counts per physical slot [R] (all slots of the layer,
    e.g. the ranks' counters gathered) and phy2log [R]."""
    if slot_counts.shape != phy2log.shape:
        raise BalancingError(f"slot_counts must be [{phy2log.numel()}] like phy2log, "
                             f"got {list(slot_counts.shape)}")
    return torch.zeros(num_experts, dtype=slot_counts.dtype, device=slot_counts.device
                       ).index_add_(0, phy2log.to(slot_counts.device), slot_counts)


@dataclass(frozen=True)
class CapacityConfig:
    """Per-slot capacity: ``factor`` x the mean rows per slot; ``mode`` "drop" or "next_best";
    ``max_reroutes``: re-routing rounds in next_best mode (>= 1)."""

    factor: float
    mode: str = "drop"
    max_reroutes: int = 1

    def __post_init__(self) -> None:
        if not self.factor > 0 or not math.isfinite(self.factor):
            raise BalancingError(f"factor must be a finite number > 0, got {self.factor}")
        if self.mode not in CAPACITY_MODES:
            raise BalancingError(f"mode must be one of {CAPACITY_MODES}, got {self.mode!r}")
        if self.max_reroutes < 1:
            raise BalancingError(f"max_reroutes must be >= 1, got {self.max_reroutes}")


def slot_capacity(total_rows: int, num_slots: int, factor: float) -> int:
    """``ceil(factor * total_rows / num_slots)`` rows per physical slot."""
    return math.ceil(factor * total_rows / num_slots - 1e-9)


def grant_capacity(requests: Tensor, remaining: Tensor) -> Tensor:
    """Rows granted [W, R] to each source rank for each slot: sources in rank order take from
    ``remaining`` [R] until it is used up. requests: [W, R] int64."""
    after = torch.cumsum(requests, dim=0)
    before = after - requests
    cap = remaining.unsqueeze(0)
    return torch.minimum(after, cap) - torch.minimum(before, cap)


def keep_within_grant(phys: Tensor, granted: Tensor) -> Tensor:
    """keep [T, k] bool: row (t, j) to slot ``phys[t, j]`` (-1: no slot) is among the first
    ``granted[slot]`` rows of its slot in (column, token) order. granted: [R] int64."""
    tokens, k = phys.shape
    col_major = phys.t().reshape(-1)
    key = torch.where(col_major < 0, granted.numel(), col_major)
    order_rank = rank_among_equal(key).view(k, tokens).t()
    limit = torch.cat([granted, granted.new_zeros(1)])[torch.where(phys < 0, granted.numel(), phys)]
    return (phys >= 0) & (order_rank < limit)


def gather_per_slot(phys: Tensor, num_slots: int, group: dist.ProcessGroup | None,
                    extra: Tensor | None = None) -> Tensor:
    """Rows per slot [W, R] of every rank of ``group`` (entries < 0 of phys [T, k] ignored).
    ``extra`` [R] rides along in the same all_gather: the result is then [W, 2R]."""
    flat = phys.reshape(-1)
    flat = flat[flat >= 0]
    mine = torch.zeros(num_slots, dtype=torch.int64, device=phys.device).index_add_(
        0, flat, torch.ones_like(flat))
    if extra is not None:
        mine = torch.cat([mine, extra.to(mine.device, torch.int64)])
    if group is None and not dist.is_initialized():
        return mine.unsqueeze(0)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts)


# denied [T, k] bool -> (substitute slots [T, k] (-1: none), substitute gating weights [T, k])
Rerouter = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class CapacityResult:
    """phys [T, k]: slot of each row, -1 where dropped; weights [T, k]: gating weights, 0 where
    dropped; dropped_per_slot [R] int64: rows dropped at each slot (all ranks, same on each)."""

    phys: Tensor
    weights: Tensor
    dropped_per_slot: Tensor


def enforce_capacity(phys: Tensor, weights: Tensor, config: CapacityConfig, num_slots: int,
                     rank: int, group: dist.ProcessGroup | None,
                     reroute: Rerouter | None = None) -> CapacityResult:
    """Apply the per-slot capacity (module doc) to this rank's rows phys/weights [T, k].
    Collective: every rank of ``group`` must call it in the same step. ``reroute`` is needed in
    next_best mode."""
    if config.mode == "next_best" and reroute is None:
        raise BalancingError("mode 'next_best' needs a reroute callable")
    rounds = config.max_reroutes if config.mode == "next_best" else 0
    requests = gather_per_slot(phys, num_slots, group)
    total_rows = int(requests.sum())
    remaining = torch.full((num_slots,), slot_capacity(total_rows, num_slots, config.factor),
                           dtype=torch.int64, device=phys.device)
    dropped = torch.zeros(num_slots, dtype=torch.int64, device=phys.device)
    final = torch.full_like(phys, -1)
    current_w = weights.clone()
    pending = phys
    for round_ in range(rounds + 1):
        granted = grant_capacity(requests, remaining)
        keep = keep_within_grant(pending, granted[rank])
        final = torch.where(keep, pending, final)
        remaining = remaining - granted.sum(dim=0)
        refused = requests.sum(dim=0) - granted.sum(dim=0)
        if round_ == rounds or int(refused.sum()) == 0:     # global value: same on all ranks
            dropped += refused
            break
        denied = (pending >= 0) & ~keep
        substitute, substitute_w = reroute(denied)
        lost = denied & (substitute < 0)
        lost_slots = pending[lost]
        lost_per_slot = torch.zeros(num_slots, dtype=torch.int64, device=phys.device
                                    ).index_add_(0, lost_slots, torch.ones_like(lost_slots))
        current_w = torch.where(denied & (substitute >= 0), substitute_w, current_w)
        pending = torch.where(denied, substitute, -1)
        both = gather_per_slot(pending, num_slots, group, extra=lost_per_slot)
        requests, dropped = both[:, :num_slots], dropped + both[:, num_slots:].sum(dim=0)
    return CapacityResult(final, torch.where(final >= 0, current_w, 0.0), dropped)
