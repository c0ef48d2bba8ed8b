"""Staging of one new plan on one rank: which rows receive the experts that move to this
rank's slots, every step's copies (built ahead, so issuing them is launches only), and the
staged version's readiness and stats."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from expertplane.kernels.experts import LocalExperts, Segment
from expertplane.kernels.hotswap.copies import Batch, Completion, landed, piece, side_stream
from expertplane.kernels.hotswap.pacing import CopyChunk, rank_batches, schedule_chunks
from expertplane.kernels.hotswap.transfers import (DUP, LOCAL, REMOTE, SlotFill, SwapError,
                                                   TransferPlan, plan_transfers)
from expertplane.kernels.moe import LayerPlacement

__all__ = ["LayerStage", "Staging", "SwapStats", "TransferGroup", "plan_staging"]


@dataclass(frozen=True)
class TransferGroup:
    """Where this rank's copies go: ``rank`` of ``world_size`` (``gpus_per_node`` per node),
    ``group`` the process group reserved for the weight transfers (None: the default group or a
    single process), ``side`` the CUDA stream the copies run on (None on CPU)."""

    rank: int
    world_size: int
    gpus_per_node: int
    group: dist.ProcessGroup | None
    side: torch.cuda.Stream | None


@dataclass(frozen=True)
class SwapStats:
    """What one prepare moved: counts of fills on this rank and bytes it received/sent;
    ``steps``: step boundaries its copies were spread over (1 = all issued with the prepare);
    ``seconds``: host time from the prepare until the copies were seen complete (or so far);
    ``copy_seconds``: GPU time from the first copy issued to the last one done (None on CPU or
    before the copies are complete); ``compacted_layers``: layers this rank brought back to one
    stacked buffer so far (:meth:`HotSwapEngine.compact`), when the stats were read."""

    version: int
    layers_changed: int
    local_fills: int
    remote_fills: int
    dup_fills: int
    bytes_received: int
    bytes_sent: int
    steps: int = 1
    seconds: float = 0.0
    copy_seconds: float | None = None
    compacted_layers: int = 0


@dataclass
class LayerStage:
    """Staged weights of one changed layer: ``segments`` = the live layer's segments plus, when
    they lacked free rows, one new segment of exactly the missing rows; ``rows[slot]`` =
    (segment, row) that holds changed local slot ``slot``'s new weights; ``switched``: the
    layer's experts after the commit (built, weight tables included, with the plan, so the
    commit only swaps pointers)."""

    segments: tuple[Segment, ...]
    rows: dict[int, tuple[int, int]]
    switched: LocalExperts | None = None

    def weights(self, slot: int) -> Segment:
        g, r = self.rows[slot]
        return self.segments[g][0][r], self.segments[g][1][r]


@dataclass
class Staging:
    """One staged version on one rank, made by :func:`plan_staging` (pass it to
    :meth:`HotSwapEngine.prepare`): new placements, staged layers, this rank's work per step
    (``batches``; the first ``issued`` of them are issued), the (placement, experts) of every
    layer it was planned against (``base``), and the last issued batch's completion (``last``:
    a CUDA event on the side stream, or the CPU thread finishing it; None before any)."""

    version: int
    placements: list[LayerPlacement]
    layers: dict[int, LayerStage]
    stats: SwapStats
    batches: list[Batch]
    base: tuple[tuple[LayerPlacement, LocalExperts], ...]
    issued: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    finished: float | None = None
    error: BaseException | None = None
    last: Completion = None
    copy_start: torch.cuda.Event | None = None

    def unissued_transfers(self) -> bool:
        """True when a remote fill's send or receive of this rank is not issued yet."""
        return any(batch.transfers for batch in self.batches[self.issued:])

    @property
    def label(self) -> str:
        return f"v{self.version}"

    @property
    def progress(self) -> tuple[int, int]:
        """(step batches issued, step batches in all)."""
        return self.issued, len(self.batches)

    @property
    def error_message(self) -> str | None:
        """Why the copies failed on this rank (a CPU copy thread raised), else None."""
        return None if self.error is None else \
            f"staging of version {self.version} failed: {self.error}"

    def ready(self) -> bool:
        """True when every chunk is issued and has landed (received and sent); raises
        SwapError when a copy failed (the version can never be ready)."""
        done = self.issued == len(self.batches) and landed(self.last)
        if self.error is not None:
            raise SwapError(self.error_message) from self.error
        if done and self.finished is None:
            self.finished = time.perf_counter()
        return self.finished is not None

    def copy_ms(self) -> float | None:
        """GPU: milliseconds from the first copy issued to the last one done on the side
        stream, once :meth:`ready`; None on CPU or before."""
        if self.copy_start is None or not self.ready():
            return None
        return self.copy_start.elapsed_time(self.last)

    def current_stats(self, compacted_layers: int) -> SwapStats:
        """:attr:`stats` with the staging time so far (or in total) and the copy time."""
        copy_ms = self.copy_ms()
        return dataclasses.replace(
            self.stats, seconds=(self.finished or time.perf_counter()) - self.started,
            copy_seconds=None if copy_ms is None else copy_ms / 1e3,
            compacted_layers=compacted_layers)


def plan_staging(version: int, placements: Sequence[LayerPlacement],
                 base: tuple[tuple[LayerPlacement, LocalExperts], ...], where: TransferGroup,
                 budget_bytes: int | None) -> Staging:
    """The staging of ``placements`` (one per layer) as ``version`` against ``base`` (the
    (placement, experts) each layer serves now), issuing nothing: the transfer plan, the staged
    rows (allocated for the side stream), every step's operations at most ``budget_bytes`` per
    step (:func:`schedule_chunks`), and each changed layer's experts after the switch, weight
    tables included. Not collective."""
    live = [experts for _, experts in base]
    new = torch.stack([torch.as_tensor(p.phy2log) for p in placements])
    plan = plan_transfers(torch.stack([p.phy2log for p, _ in base]), new, where.world_size,
                          where.gpus_per_node)
    w13, w2 = live[0].weights(0)
    chunks = schedule_chunks(plan, (w13.numel(), w2.numel()), w13.element_size(), budget_bytes)
    steps = rank_batches(plan, chunks, where.rank)
    mine = plan.for_rank(where.rank)
    expert_bytes = (w13.numel() + w2.numel()) * w13.element_size()
    stats = SwapStats(
        version=version, layers_changed=len({f.layer for f in mine}),
        local_fills=sum(f.source == LOCAL for f in mine),
        remote_fills=sum(f.source == REMOTE for f in mine),
        dup_fills=sum(f.source == DUP for f in mine),
        bytes_received=int(plan.received_bytes(expert_bytes)[:, :, where.rank].sum()),
        bytes_sent=expert_bytes * len(plan.sends_from(where.rank)), steps=len(steps))
    with side_stream(where.side):
        stages = {layer: _new_stage(live[layer], [f for f in mine if f.layer == layer])
                  for layer in sorted({f.layer for f in mine})}
        batches = [_batch(plan, stages, live, step, where) for step in steps]
    for layer, stage in stages.items():
        stage.switched = _switched_experts(live[layer], stage)
        if stage.switched.triton_capable:
            stage.switched.weight_tables()
    return Staging(version, list(placements), stages, stats, batches, base)


def _batch(plan: TransferPlan, stages: dict[int, LayerStage], live: Sequence[LocalExperts],
           chunks: list[CopyChunk], where: TransferGroup) -> Batch:
    """This rank's operations for one step's ``chunks``: point-to-point ops tagged by schedule
    index, and (destination, source) views of the local and dup copies; sources are rows of
    ``live`` (the experts of each layer the staging is planned against)."""
    out = Batch([], [], [])
    for c in chunks:
        f = plan.fills[c.fill]
        if f.source == REMOTE and f.rank == where.rank:
            buf = piece(stages[f.layer].weights(f.slot), c)
            out.transfers.append(dist.P2POp(dist.irecv, buf, f.src_rank, where.group, c.tag))
        elif f.source == REMOTE:
            buf = piece(live[f.layer].weights(f.src_slot), c)
            out.transfers.append(dist.P2POp(dist.isend, buf, f.rank, where.group, c.tag))
        else:
            stage = stages[f.layer]
            src = stage.weights(f.src_slot) if f.source == DUP \
                else live[f.layer].weights(f.src_slot)
            copies = out.dups if f.source == DUP else out.local
            copies.append((piece(stage.weights(f.slot), c), piece(src, c)))
    return out


def _new_stage(live: LocalExperts, fills: list[SlotFill]) -> LayerStage:
    """Rows of ``live`` (one layer's experts) for its ``fills``: free rows of its segments
    first, then one new segment of exactly the missing rows (allocated on the current
    stream)."""
    segments = list(live.segments)
    free = live.free_rows()
    missing = len(fills) - len(free)
    if missing > 0:
        w13, w2 = segments[0]
        segments.append((w13.new_empty(missing, *w13.shape[1:]),
                         w2.new_empty(missing, *w2.shape[1:])))
        free += [(len(segments) - 1, r) for r in range(missing)]
    return LayerStage(tuple(segments), {f.slot: free[i] for i, f in enumerate(fills)})


def _switched_experts(live: LocalExperts, stage: LayerStage) -> LocalExperts:
    """``live`` with the changed slots pointed at their staged rows; segments no slot reads
    any more are dropped (freed once the serving stream is past them)."""
    rows = list(live.rows)
    for slot, ref in stage.rows.items():
        rows[slot] = ref
    kept = sorted({g for g, _ in rows})
    index = {g: i for i, g in enumerate(kept)}
    return LocalExperts.from_segments([stage.segments[g] for g in kept],
                                      [(index[g], r) for g, r in rows])

