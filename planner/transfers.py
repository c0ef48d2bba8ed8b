"""The weight moves between two placements, and the bytes a plan change moves.

:func:`plan_transfers` (pure): old and new ``phy2log [L, R]`` over ``world_size`` ranks -> a
:class:`TransferPlan` saying, for every physical slot whose expert changes, where its weights
come from: a copy on the same rank, one receive from another rank, or a copy of a slot just
received. It is what the hot-swap (``kernels.hotswap``) executes, and
:meth:`TransferPlan.bytes_moved` is the one definition of the bytes a plan moves, which the
controller's move budget counts too (``planner.plan.migration``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numba import njit
from torch import Tensor

from expertplane.errors import FieldError
from expertplane.planner.compiled import use_compiled
from expertplane.planner.interpreted import interpreted

__all__ = ["DUP", "LOCAL", "REMOTE", "SlotFill", "TransferPlan", "plan_transfers"]

LOCAL, REMOTE, DUP = "local", "remote", "dup"


@dataclass(frozen=True)
class SlotFill:
    """How one changed slot of the new plan gets its weights.

    ``rank``/``slot``: the destination (local slot index on ``rank``; physical slot
    ``rank * S + slot``); ``expert``: its logical expert in the new plan.
    ``source``: ``"local"`` (copy from ``src_slot`` of the same rank in the OLD plan),
    ``"remote"`` (receive from ``src_rank``'s old slot ``src_slot``), or ``"dup"`` (the same
    expert already arrives in this rank's new slot ``src_slot``; copy it once staged).
    """

    layer: int
    rank: int
    slot: int
    expert: int
    source: str
    src_rank: int
    src_slot: int


# source codes of the columns of ``TransferPlan.table``
_SOURCES = (LOCAL, REMOTE, DUP)


@dataclass(frozen=True, eq=False)
class TransferPlan:
    """All slot fills of one plan change, sorted by (layer, rank, slot).

    Slots whose expert is unchanged have no fill. Every rank computes the same plan from the
    same inputs, so the order of point-to-point operations matches on both ends. ``table``:
    int64 [F, 7], one row per fill: layer, rank, slot, expert, source (index into
    ``(LOCAL, REMOTE, DUP)``), src_rank, src_slot; ``fills`` gives them as ``SlotFill``.
    """

    num_layers: int
    world_size: int
    slots_per_rank: int
    gpus_per_node: int
    table: np.ndarray

    @cached_property
    def fills(self) -> tuple[SlotFill, ...]:
        """The fills as ``SlotFill``, in ``table``'s order."""
        return tuple(SlotFill(layer, rank, slot, expert, _SOURCES[source], src_rank, src_slot)
                     for layer, rank, slot, expert, source, src_rank, src_slot
                     in self.table.tolist())

    def for_rank(self, rank: int) -> list[SlotFill]:
        """Fills whose destination is ``rank``."""
        return [f for f in self.fills if f.rank == rank]

    def sends_from(self, rank: int) -> list[SlotFill]:
        """Remote fills whose source is ``rank`` (it must send its old slot's weights)."""
        return [f for f in self.fills if f.source == REMOTE and f.src_rank == rank]

    @property
    def changed_layers(self) -> list[int]:
        return sorted({f.layer for f in self.fills})

    @property
    def remote_fills(self) -> int:
        return int((self.table[:, 4] == _SOURCES.index(REMOTE)).sum())

    def received_bytes(self, expert_bytes: int) -> np.ndarray:
        """Bytes each rank receives from other ranks, int64 [2, L, P]: ``[0]`` from ranks of
        its own node, ``[1]`` from other nodes; one expert's weights (``expert_bytes``) per
        remote fill. Local and dup fills copy within the rank and move nothing."""
        out = np.zeros((2, self.num_layers, self.world_size), dtype=np.int64)
        remote = self.table[self.table[:, 4] == _SOURCES.index(REMOTE)]
        cross = remote[:, 5] // self.gpus_per_node != remote[:, 1] // self.gpus_per_node
        np.add.at(out, (cross.astype(np.int64), remote[:, 0], remote[:, 1]), int(expert_bytes))
        return out

    def bytes_moved(self, expert_bytes: int) -> int:
        """The bytes a plan change moves between ranks: what the hot-swap sends, one expert's
        weights per remote fill (the sum of :meth:`received_bytes`). The controller's move
        budget and the hot-swap's stats both count this."""
        return int(self.received_bytes(expert_bytes).sum())


def _as_plan_array(a, field: str) -> np.ndarray:
    arr = np.asarray(a.cpu() if isinstance(a, Tensor) else a)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise FieldError(field, f"must be an integer [L, R] array, got shape "
                                    f"{list(arr.shape)} dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise FieldError(field, f"expert ids must be >= 0, got {arr.min()}")
    return arr.astype(np.int64)


def plan_transfers(old_phy2log, new_phy2log, world_size: int,
                   gpus_per_node: int | None = None) -> TransferPlan:
    """Plan the weight moves from ``old_phy2log`` to ``new_phy2log`` (both ``[L, R]``).

    For each rank and each local slot whose logical expert changes: a local copy when the
    rank held that expert in the old plan; else one receive per (layer, rank, expert) from a
    rank holding it in the old plan — on the destination's node when possible, spreading
    the sends evenly over the holders (fewest sends assigned so far, then lowest rank); the
    further new slots of the same expert on that rank copy the received weights (``dup``).
    ``gpus_per_node`` defaults to ``world_size`` (one node).
    """
    old = _as_plan_array(old_phy2log, "old_phy2log")
    new = _as_plan_array(new_phy2log, "new_phy2log")
    if old.shape != new.shape:
        raise FieldError("new_phy2log", f"shape {list(new.shape)} differs from "
                                            f"old_phy2log {list(old.shape)}")
    if world_size < 1 or old.shape[1] % world_size:
        raise FieldError("world_size", f"{world_size} must divide R={old.shape[1]}")
    gpn = gpus_per_node or world_size
    if gpn < 1 or world_size % gpn:
        raise FieldError("gpus_per_node", f"{gpn} must divide world_size={world_size}")
    spr = old.shape[1] // world_size
    experts = int(max(old.max(initial=-1), new.max(initial=-1))) + 1
    kernel = _fill_table if use_compiled() else interpreted(_fill_table)
    table, missing = kernel(old, new, world_size, gpn, spr, max(experts, 1))
    if missing[0] >= 0:
        raise FieldError("new_phy2log", f"layer {missing[0]} expert {missing[1]} has no "
                                        "replica in old_phy2log to copy from")
    return TransferPlan(old.shape[0], world_size, spr, gpn, table)


@njit(cache=True)
def _fill_table(old, new, world_size, gpn, spr, experts):
    """(int64 [F, 7] rows of ``TransferPlan.table``, [layer, expert] of the first new expert
    without an old replica or [-1, -1]) for ``old`` / ``new`` [L, R]: per layer, rank and slot
    in order, a local copy when the rank held the expert in the old plan (its first old slot
    there), a dup when this rank already receives it (that new slot), else one receive from the
    holder on the rank's own node if any (else any holder) with the fewest sends so far, then
    the lowest rank (``sends`` counted over all layers)."""
    layers, slots = old.shape
    table = np.empty((layers * slots, 7), dtype=np.int64)
    first = np.full((experts, world_size), -1, dtype=np.int64)   # first old local slot
    holders = np.empty(slots, dtype=np.int64)                     # ranks per expert (CSR)
    start = np.zeros(experts + 1, dtype=np.int64)
    fetched = np.full(experts, -1, dtype=np.int64)                # new slot receiving it
    sends = np.zeros(world_size, dtype=np.int64)
    missing = np.full(2, -1, dtype=np.int64)
    n = 0
    for layer in range(layers):
        row_old, row_new = old[layer], new[layer]
        start[:] = 0
        for p in range(slots):
            e, rank = row_old[p], p // spr
            if first[e, rank] < 0:
                first[e, rank] = p % spr
                start[e + 1] += 1
        for e in range(experts):
            start[e + 1] += start[e]
        fill = start[:-1].copy()
        for p in range(slots):   # ascending slots: each expert's holders in ascending rank
            e, rank = row_old[p], p // spr
            if first[e, rank] == p % spr:
                holders[fill[e]] = rank
                fill[e] += 1
        for rank in range(world_size):
            node = rank // gpn
            for slot in range(spr):
                p = rank * spr + slot
                e = row_new[p]
                if e == row_old[p]:
                    continue
                if start[e] == start[e + 1]:
                    missing[0], missing[1] = layer, e
                    return table[:0], missing
                table[n, 0], table[n, 1], table[n, 2], table[n, 3] = layer, rank, slot, e
                if first[e, rank] >= 0:
                    table[n, 4], table[n, 5], table[n, 6] = 0, rank, first[e, rank]
                elif fetched[e] >= 0:
                    table[n, 4], table[n, 5], table[n, 6] = 2, rank, fetched[e]
                else:
                    src, local = -1, False
                    for k in range(start[e], start[e + 1]):
                        r = holders[k]
                        near = r // gpn == node
                        if src < 0 or (near and not local) or (near == local and (
                                sends[r] < sends[src] or (sends[r] == sends[src] and r < src))):
                            src, local = r, near
                    sends[src] += 1
                    fetched[e] = slot
                    table[n, 4], table[n, 5], table[n, 6] = 1, src, first[e, src]
                n += 1
            for slot in range(spr):
                fetched[row_new[rank * spr + slot]] = -1
        for p in range(slots):
            first[row_old[p], p // spr] = -1
    return table[:n].copy(), missing
