"""The hot-swap engine of one rank: stages a new plan's experts while serving goes on, switches
every layer to them at one step boundary, or drops them; between swaps, compacts split layers
(:class:`~expertplane.kernels.hotswap.compaction.Compactor`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from expertplane.kernels.hotswap.compaction import Compactor
from expertplane.kernels.hotswap.copies import issue_next, settle
from expertplane.kernels.hotswap.pacing import DEFAULT_STEP_BUDGET_BYTES
from expertplane.kernels.hotswap.staging import Staging, SwapStats, TransferGroup, plan_staging
from expertplane.kernels.hotswap.transfers import SwapError
from expertplane.kernels.moe import ExpertParallelExperts, LayerPlacement

__all__ = ["HotSwapEngine"]


class HotSwapEngine:
    """Stages and switches the expert placements of this rank's MoE layers.

    layers: this rank's :class:`ExpertParallelExperts` (``EPMoELayer`` or a model's experts
    through ``engines.hf``; one per MoE layer, same group); group: a
    process group over the same ranks reserved for the weight transfers (so they never
    interleave with the layers' all-to-alls; create it with ``dist.new_group()`` on every
    rank), None for a single process. ``step_budget_bytes``: bytes of weights this rank copies,
    receives or sends per step boundary while staging (:func:`~expertplane.kernels.hotswap.pacing.schedule_chunks`; the same on
    every rank, checked when the engine is built); None = unpaced, every copy issued with the prepare. ``prepare`` and
    ``commit`` are collective: every rank calls them at the same step, and :meth:`pump` at
    every step boundary in between (use :class:`SwapCoordinator`).

    Staging holds exactly the k experts that move to this rank per changed layer: they land in
    rows of the layer's weight segments that no slot reads (the rows a previous swap
    released) and, for the rest, in one new buffer of exactly the missing rows. The prepare
    issues the first step's chunks, each :meth:`pump` the next step's; the staged version is
    ready once every chunk has landed. The commit points the changed slots at their staged
    rows (a new :class:`LocalExperts` over the same buffers, no weight copied) and drops
    buffers no slot reads any more, so a layer holds at most S + (largest k so far) experts.
    Device copies run on a side stream (priority 0, the lowest) and NCCL's stream, never on
    the serving stream; on CPU, on a helper thread per step's chunks, in order. Between swaps,
    :meth:`compact` (rank-local) brings the layers a commit left in several buffers back to one
    stacked buffer, paced by the same budget, so their FFN takes ``torch._grouped_mm`` again.
    """


    def __init__(self, layers: Sequence[ExpertParallelExperts], group: dist.ProcessGroup | None = None,
                 gpus_per_node: int | None = None,
                 step_budget_bytes: int | None = DEFAULT_STEP_BUDGET_BYTES) -> None:
        if not layers:
            raise SwapError("layers: need at least one MoE layer")
        self.layers = list(layers)
        first = self.layers[0]
        self.device = first.device
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.where = TransferGroup(first.rank, first.world_size,
                                   gpus_per_node or first.gpus_per_node, group, side)
        self.step_budget_bytes = step_budget_bytes
        self._staging: Staging | None = None
        self.compactor = Compactor(self.layers, side, self.device)
        if group is not None and self.where.world_size > 1:
            # NCCL wants every rank in a group's first operation; do it now, not in a P2P batch.
            self._check_same_budget(group)

    def _check_same_budget(self, group: dist.ProcessGroup) -> None:
        """Collective: every rank must pace by the same budget, else a rank would wait for a
        chunk its peer schedules at another step. One MIN all-reduce of ``[b, -b]`` (``b`` =
        budget in bytes, 0 = unpaced) gives the least and the largest budget of the group."""
        mine = self.step_budget_bytes or 0
        both = torch.tensor([mine, -mine], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MIN, group=group)
        least, largest = int(both[0]), -int(both[1])
        if least != largest:
            raise SwapError(f"step_budget_bytes: ranks differ ({least} to {largest} bytes, "
                            f"0 = unpaced); every rank must use the same budget")

    @property
    def step_budget_bytes(self) -> int | None:
        """Bytes per step boundary the next prepare spreads its copies by (None: unpaced)."""
        return self._budget

    @step_budget_bytes.setter
    def step_budget_bytes(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise SwapError(f"step_budget_bytes: must be an int >= 1 or None, got {value!r}")
        self._budget = value

    # -- state

    @property
    def compacted_layers(self) -> int:
        """Layers this engine brought back to one stacked segment."""
        return self.compactor.compacted_layers

    @property
    def compaction_error(self) -> str | None:
        """Why compaction stopped until the next commit (a copy failed, no memory), else None."""
        return self.compactor.error

    @property
    def compacting(self) -> int | None:
        """Layers whose experts are not one stacked segment yet (:meth:`compact` brings them
        back), None when every layer is stacked."""
        return self.compactor.pending

    @property
    def staged_version(self) -> int:
        """Version staged or being staged, 0 if none."""
        return self._staging.version if self._staging else 0

    def staging_progress(self) -> tuple[int, int] | None:
        """(step batches issued, step batches in all) of the staged version; None if none."""
        return None if self._staging is None else self._staging.progress

    def has_unissued_transfers(self) -> bool:
        """True while a send or receive of the staged version on this rank is not issued yet:
        dropping it then needs every rank to drop it at the same step (peers would wait for
        it forever), which :class:`SwapCoordinator` arranges."""
        return self._staging is not None and self._staging.unissued_transfers()

    def ready(self) -> bool:
        """True when every chunk of the staged version is issued and has landed (received and
        sent)."""
        return self._staging is not None and self._staging.ready()

    def staging_error(self) -> str | None:
        """Why the staged version's copies failed on this rank (a CPU copy thread raised; the
        version can never be ready), else None."""
        return None if self._staging is None else self._staging.error_message

    def staged_stats(self) -> SwapStats | None:
        """Stats of the staged version, ``seconds`` = staging time so far (or in total)."""
        s = self._staging
        return None if s is None else s.current_stats(self.compacted_layers)

    def staged_copy_ms(self) -> float | None:
        """GPU: milliseconds from the first staging copy issued to the last one done on the side
        stream (the transfers alone, without the planning before them; paced: across the steps
        they were spread over), once :meth:`ready`; None on CPU or before."""
        return None if self._staging is None else self._staging.copy_ms()

    def current_phy2log(self) -> Tensor:
        """The plan in force on this rank: [L, R]."""
        return torch.stack([layer.placement.phy2log for layer in self.layers])

    # -- collective operations

    def plan(self, version: int, placements: Sequence[LayerPlacement]) -> Staging:
        """Work out the staging of ``placements`` (one per layer) as ``version`` without issuing
        anything (:func:`~expertplane.kernels.hotswap.staging.plan_staging`). Not collective,
        and safe on another thread while serving goes on (no swap can be committed meanwhile:
        none is staged), so the host work can stay off the step boundary; :meth:`prepare`
        re-plans if the layers changed since."""
        if len(placements) != len(self.layers):
            raise SwapError(f"placements: need {len(self.layers)} layers, got {len(placements)}")
        # One read of every layer: a compaction may switch a layer's experts meanwhile (on the
        # serving thread); the staging is built from this snapshot alone, and prepare() re-plans
        # when it is no longer what the layers serve.
        base = tuple((layer.placement, layer.experts) for layer in self.layers)
        return plan_staging(version, placements, base, self.where, self._budget)

    def prepare(self, version: int, placements: Sequence[LayerPlacement],
                planned: Staging | None = None) -> SwapStats:
        """Start staging ``placements`` (one per layer) as ``version``: :meth:`plan` it (or take
        ``planned``, made ahead for this version against the layers as they still are), issue
        the first step's chunks; returns at once (:meth:`pump` issues the rest).

        Collective over the transfer group. Copies run on a side CUDA stream (GPU) or on gloo's
        background threads plus a helper thread (CPU) while the caller keeps serving.
        """
        if self._staging is not None:
            raise SwapError(f"version: {self._staging.version} is already staged; commit or "
                            "abort it first")
        self.compactor.cancel()
        current = tuple((layer.placement, layer.experts) for layer in self.layers)
        fresh = planned is not None and planned.version == version and planned.issued == 0 \
            and len(planned.base) == len(current) \
            and all(a is c and b is d for (a, b), (c, d) in zip(planned.base, current))
        staging = planned if fresh else self.plan(version, placements)
        staging.started = time.perf_counter()
        side = self.where.side
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
            staging.copy_start = torch.cuda.Event(enable_timing=True)
            staging.copy_start.record(side)
            staging.last = staging.copy_start
        self._staging = staging
        issue_next(staging, side)
        return staging.stats

    def pump(self) -> int:
        """Issue the staged version's next step of chunks (at a step boundary, on every rank at
        the same step); returns the number of chunks issued (0 when none is left)."""
        s = self._staging
        if s is None or s.issued == len(s.batches):
            return 0
        return issue_next(s, self.where.side)

    def wait(self, timeout: float | None = None) -> bool:
        """Issue every chunk not issued yet (collective when they include transfers), then
        block until :meth:`ready` (or ``timeout`` seconds on CPU); returns :meth:`ready`."""
        s = self._staging
        if s is None:
            return False
        while s.issued < len(s.batches):
            issue_next(s, self.where.side)
        settle(s.last, timeout)
        return self.ready()

    def commit(self) -> SwapStats:
        """Switch every changed layer to its staged weights and placement; call at a step
        boundary on every rank at the same step, after :meth:`ready` on every rank."""
        s = self._staging
        if s is None:
            raise SwapError("version: nothing is staged")
        if not self.wait():
            raise SwapError(f"version: {s.version} is not staged yet")
        stats = s.current_stats(self.compacted_layers)
        if self.where.side is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(s.last)
            for stage in s.layers.values():
                for w13, w2 in stage.segments:
                    w13.record_stream(current)
                    w2.record_stream(current)
        rank = self.where.rank
        for i, layer in enumerate(self.layers):
            mine = slice(rank * layer.experts.num_slots, (rank + 1) * layer.experts.num_slots)
            if i in s.layers:
                layer.swap(s.placements[i], s.layers[i].switched)
            elif not torch.equal(layer.placement.phy2log[mine], s.placements[i].phy2log[mine]):
                raise SwapError(f"placements[{i}]: this rank's slots changed but have no staged weights")
            else:
                layer.swap(s.placements[i], layer.experts)  # other ranks' slots changed: routing only
        self._staging = None
        self.compactor.error = None   # new layouts: compact again
        return stats

    def abort(self) -> int:
        """Drop the staged version: issue nothing more, wait for the chunks in flight, free the
        staging; returns its version, or 0. Safe alone only when :meth:`has_unissued_transfers`
        is False (else every rank must abort at the same step)."""
        s = self._staging
        if s is None:
            return 0
        settle(s.last, None)
        self._staging = None
        return s.version

    # -- compaction (rank-local)

    def compact(self) -> int:
        """Bring the layers whose experts a swap left in several segments (or rows out of slot
        order, so :attr:`LocalExperts.stacked` is None and the FFN cannot take
        ``torch._grouped_mm``) back to one stacked segment, one layer at a time, at most
        ``step_budget_bytes`` of copies per call (None: a whole layer per call). Call it at
        every step boundary; this rank alone, no collective (routing does not change).

        Each call: a layer whose copies have all landed (an event query on GPU, never a wait)
        is switched to its stacked experts (the serving stream waits on the copies' event,
        the old segments are dropped); then the next step's copies of the layer in progress,
        or of the next layer to compact, are issued (side stream on GPU, a helper thread on
        CPU). Does nothing while a version is staged (:meth:`prepare` cancels the compaction
        in progress) or after a compaction copy failed or found no memory for its buffer
        (:attr:`compaction_error`, cleared by the next commit). Returns the bytes of copies
        issued.
        """
        if self._staging is not None:
            return 0
        return self.compactor.step(self._budget)
