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

import numpy as np
from torch import Tensor

from expertplane.errors import FieldError

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


@dataclass(frozen=True)
class TransferPlan:
    """All slot fills of one plan change, sorted by (layer, rank, slot).

    Slots whose expert is unchanged have no fill. Every rank computes the same plan from the
    same inputs, so the order of point-to-point operations matches on both ends.
    """

    num_layers: int
    world_size: int
    slots_per_rank: int
    gpus_per_node: int
    fills: tuple[SlotFill, ...]

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
        return sum(f.source == REMOTE for f in self.fills)

    def received_bytes(self, expert_bytes: int) -> np.ndarray:
        """Bytes each rank receives from other ranks, int64 [2, L, P]: ``[0]`` from ranks of
        its own node, ``[1]`` from other nodes; one expert's weights (``expert_bytes``) per
        remote fill. Local and dup fills copy within the rank and move nothing."""
        out = np.zeros((2, self.num_layers, self.world_size), dtype=np.int64)
        for f in self.fills:
            if f.source == REMOTE:
                cross = f.src_rank // self.gpus_per_node != f.rank // self.gpus_per_node
                out[int(cross), f.layer, f.rank] += int(expert_bytes)
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
    num_layers, num_slots = old.shape
    spr = num_slots // world_size
    sends = np.zeros(world_size, dtype=np.int64)
    fills: list[SlotFill] = []
    for layer in range(num_layers):
        holders: dict[int, dict[int, int]] = {}  # expert -> {rank: first old local slot}
        for p, e in enumerate(old[layer].tolist()):
            holders.setdefault(e, {}).setdefault(p // spr, p % spr)
        for rank in range(world_size):
            fetched: dict[int, int] = {}  # expert -> new slot that receives it on this rank
            for slot in range(spr):
                p = rank * spr + slot
                e = int(new[layer, p])
                if e == old[layer, p]:
                    continue
                held = holders.get(e)
                if not held:
                    raise FieldError("new_phy2log", f"layer {layer} expert {e} has no "
                                                        "replica in old_phy2log to copy from")
                if rank in held:
                    fills.append(SlotFill(layer, rank, slot, e, LOCAL, rank, held[rank]))
                elif e in fetched:
                    fills.append(SlotFill(layer, rank, slot, e, DUP, rank, fetched[e]))
                else:
                    same_node = [r for r in held if r // gpn == rank // gpn]
                    src = min(same_node or held, key=lambda r: (sends[r], r))
                    sends[src] += 1
                    fetched[e] = slot
                    fills.append(SlotFill(layer, rank, slot, e, REMOTE, src, held[src]))
    return TransferPlan(num_layers, world_size, spr, gpn, tuple(fills))

