"""Token dispatch to expert slots over a process group, and the weighted combine back.

Shapes: ``T`` tokens on this rank, ``k`` experts per token, ``H`` hidden size, ``W`` ranks,
``S`` slots per rank, ``R = W * S`` physical slots, ``N = T * k`` (token, expert) rows sent,
``M`` rows received by this rank.

Steps (one host sync per step, for the variable split sizes):
1. :func:`plan_dispatch`: sort the N rows by destination physical slot, count rows per slot,
   exchange the per-slot counts with an all_to_all so each rank knows what it will receive.
2. :func:`dispatch`: permute the token rows, all_to_all_single with variable splits, reorder
   the received rows (source-major) to slot-major for the grouped GEMM.
3. :func:`combine`: undo the reorder, all_to_all_single back, and the top-k weighted sum.
With one rank (no process group, or a group of size 1) the exchanges are skipped: they
would be identity copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from expertplane.kernels.triton_ops import histogram, weighted_combine

__all__ = ["DispatchLayout", "combine", "dispatch", "plan_dispatch", "world_of"]


def world_of(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if group is None and not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass
class DispatchLayout:
    """Where every row goes. Built by :func:`plan_dispatch`, used by dispatch and combine.

    order: [N'] int64, the flat (token * k + j) row indices sorted by destination slot
    (N' = N minus the rows without a slot).
    position: [T, k] int64, the position of row (t, j) in ``order`` (0 for rows without a slot).
    unplaced: [T, k] bool, rows without a slot (phys == -1, e.g. dropped by capacity).
    send_counts / recv_counts: [W] host ints, rows sent to / received from each rank.
    recv_order: [M] int64, received row (source-major) feeding each slot-major row; None when
    the two orders agree (one rank).
    recv_position: [M] int64, its inverse (slot-major row of each received row), or None.
    tokens_per_slot: [S] int64 on the device, rows received per local slot (all sources).
    slot_counts: the same as host ints.
    """

    order: Tensor
    position: Tensor
    unplaced: Tensor
    send_counts: list[int]
    recv_counts: list[int]
    recv_order: Tensor | None
    recv_position: Tensor | None
    tokens_per_slot: Tensor
    slot_counts: list[int]


def plan_dispatch(phys: Tensor, num_slots: int, group: dist.ProcessGroup | None = None
                  ) -> DispatchLayout:
    """Layout for physical slot ids ``phys`` [T, k] over R = ``num_slots`` slots; entries -1
    (rows dropped before dispatch) are not sent and add nothing in :func:`combine`."""
    rank, world = world_of(group)
    if num_slots % world:
        raise ValueError(f"num_slots={num_slots} must be a multiple of the world size {world}")
    per_rank = num_slots // world
    tokens, k = phys.shape
    unplaced = phys < 0
    flat = torch.where(unplaced, num_slots, phys).reshape(-1)          # unplaced sort last
    order = torch.sort(flat, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    sent_per_slot = histogram(flat, num_slots + 1)[:num_slots]          # [R]
    recv_per_slot = _all_to_all_counts(sent_per_slot, world, group)     # [W * S], source-major
    host = torch.cat([sent_per_slot.view(world, per_rank).sum(1),
                      recv_per_slot.view(world, per_rank).sum(1),
                      recv_per_slot.view(world, per_rank).sum(0)]).tolist()
    send_counts, recv_counts, slot_counts = host[:world], host[world:2 * world], host[2 * world:]
    recv_order = recv_position = None
    if world > 1:   # received rows come grouped (source, slot); the grouped GEMM wants (slot, source)
        segment = torch.repeat_interleave(torch.arange(world * per_rank, device=phys.device),
                                          recv_per_slot, output_size=sum(recv_counts))
        slot_major = (segment % per_rank) * world + segment // per_rank
        recv_order = torch.sort(slot_major, stable=True).indices
        recv_position = torch.empty_like(recv_order)
        recv_position[recv_order] = torch.arange(recv_order.numel(), device=recv_order.device)
    position = torch.where(unplaced, 0, position.view(tokens, k))
    return DispatchLayout(order=order[:sum(send_counts)], position=position, unplaced=unplaced,
                          send_counts=send_counts, recv_counts=recv_counts,
                          recv_order=recv_order, recv_position=recv_position,
                          tokens_per_slot=recv_per_slot.view(world, per_rank).sum(0),
                          slot_counts=slot_counts)


def dispatch(x: Tensor, layout: DispatchLayout, k: int,
             group: dist.ProcessGroup | None = None) -> Tensor:
    """Token rows x [T, H] -> this rank's received rows [M, H], grouped by local slot."""
    send = x.index_select(0, torch.div(layout.order, k, rounding_mode="floor"))
    recv = _all_to_all(send, layout.recv_counts, layout.send_counts, group)
    return recv if layout.recv_order is None else recv.index_select(0, layout.recv_order)


def combine(y: Tensor, layout: DispatchLayout, weights: Tensor,
            group: dist.ProcessGroup | None = None) -> Tensor:
    """Expert outputs y [M, H] (slot-major) -> weighted sum per token [T, H] with
    ``weights`` [T, k] (fp32 accumulation, output in y's dtype); unplaced rows add nothing."""
    recv = y if layout.recv_position is None else y.index_select(0, layout.recv_position)
    back = _all_to_all(recv, layout.send_counts, layout.recv_counts, group)
    tokens = layout.position.shape[0]
    if back.shape[0] == 0:
        return back.new_zeros(tokens, back.shape[1])
    weights = torch.where(layout.unplaced, 0.0, weights.float())
    return weighted_combine(back, layout.position, weights)


def _all_to_all_counts(per_slot: Tensor, world: int, group: dist.ProcessGroup | None) -> Tensor:
    if world == 1:
        return per_slot
    out = torch.empty_like(per_slot)
    dist.all_to_all_single(out, per_slot, group=group)
    return out


def _all_to_all(rows: Tensor, out_counts: list[int], in_counts: list[int],
                group: dist.ProcessGroup | None) -> Tensor:
    if len(out_counts) == 1:
        return rows
    out = rows.new_empty(sum(out_counts), rows.shape[1])
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=out_counts,
                           input_split_sizes=in_counts, group=group)
    return out
