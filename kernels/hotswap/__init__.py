"""Hot-swap of expert replicas: transfer planning, staged P2P copies, switch at a step edge.

Four parts, each usable alone:

- :func:`plan_transfers` (pure): old and new ``phy2log [L, R]`` -> a :class:`TransferPlan`
  saying, for every physical slot whose expert changes, where its weights come from.
- :func:`schedule_chunks` (pure): spreads a plan's copies over step boundaries, at most a
  byte budget per rank and step (:data:`DEFAULT_STEP_BUDGET_BYTES`), so staging never takes
  more than a small share of a serving step's memory bandwidth.
- :class:`HotSwapEngine`: on every rank, stages exactly the experts the new plan brings to
  its slots (rows no slot reads, or a new buffer of the missing rows) with batched
  point-to-point operations on a dedicated process group and device copies on a side stream,
  one step's chunks per step boundary while serving continues, then switches the slots'
  weight pointers and the routing tables (:meth:`EPMoELayer.swap`) at a step boundary, copying no weight there; or drops the staging.
- :class:`SwapCoordinator`: the step-boundary protocol that makes every rank start the
  transfer, and switch, at the SAME step, whatever order the prepare/commit/abort requests
  (gRPC calls) reach the ranks in: one tiny MIN all_reduce per step; between swaps, each rank
  compacts its split layers back to one stacked buffer on its own
  (:meth:`HotSwapEngine.compact`).

Invariant: routing tables and weights change together, in one call between two forward
passes, on every rank at the same step, so no token is ever routed to a slot whose weights
are not in place.

Modules: :mod:`transfers` (pure plan), :mod:`pacing` (pure schedule), :mod:`copies` (issuing one
step's copies), :mod:`staging` (what one rank stages for a plan), :mod:`engine`,
:mod:`compaction`, :mod:`coordinator`.
"""

from expertplane.kernels.hotswap.coordinator import SwapCoordinator
from expertplane.kernels.hotswap.engine import HotSwapEngine
from expertplane.kernels.hotswap.pacing import DEFAULT_STEP_BUDGET_BYTES, CopyChunk, schedule_chunks
from expertplane.kernels.hotswap.staging import Staging, SwapStats
from expertplane.kernels.hotswap.transfers import (DUP, LOCAL, REMOTE, SlotFill, SwapError,
                                                   TransferPlan, plan_transfers)

__all__ = ["DEFAULT_STEP_BUDGET_BYTES", "DUP", "LOCAL", "REMOTE", "CopyChunk", "HotSwapEngine",
           "SlotFill", "Staging", "SwapCoordinator", "SwapError", "SwapStats", "TransferPlan",
           "plan_transfers", "schedule_chunks"]
