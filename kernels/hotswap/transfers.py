"""The hot-swap's transfer plan: :func:`expertplane.planner.transfers.plan_transfers` (old and
new ``phy2log [L, R]`` -> which slots copy, receive or duplicate which expert) for the engine,
with its input errors raised as :class:`SwapError` like every other hot-swap error."""

from __future__ import annotations

from torch import Tensor

from expertplane.errors import FieldError
from expertplane.planner import transfers
from expertplane.planner.transfers import DUP, LOCAL, REMOTE, SlotFill, TransferPlan

__all__ = ["DUP", "LOCAL", "REMOTE", "SlotFill", "SwapError", "TransferPlan", "plan_transfers"]


class SwapError(ValueError):
    """Bad hot-swap input or state; the message names the field or the state."""


def plan_transfers(old_phy2log: Tensor, new_phy2log: Tensor, world_size: int,
                   gpus_per_node: int | None = None) -> TransferPlan:
    """:func:`expertplane.planner.transfers.plan_transfers` of ``old_phy2log`` ->
    ``new_phy2log`` (both ``[L, R]``, tensors or arrays) over ``world_size`` ranks
    (``gpus_per_node`` per node, default one node); bad input raises :class:`SwapError` with
    the planner's message (naming the field)."""
    try:
        return transfers.plan_transfers(old_phy2log, new_phy2log, world_size, gpus_per_node)
    except FieldError as exc:
        raise SwapError(str(exc)) from None
