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
  one step's chunks per step boundary while serving continues, then switches the slots' weight pointers and the routing tables
  (:meth:`EPMoELayer.swap`) at a step boundary, copying no weight there; or drops the staging.
- :class:`SwapCoordinator`: the step-boundary protocol that makes every rank start the
  transfer, and switch, at the SAME step, whatever order the prepare/commit/abort requests
  (gRPC calls) reach the ranks in: one tiny MIN all_reduce per step; between swaps, each rank
  compacts its split layers back to one stacked buffer on its own
  (:meth:`HotSwapEngine.compact`).

Invariant: routing tables and weights change together, in one call between two forward
passes, on every rank at the same step, so no token is ever routed to a slot whose weights
are not in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from expertplane.kernels.experts import LocalExperts, Segment
from expertplane.kernels.moe import EPMoELayer, LayerPlacement

__all__ = ["DEFAULT_STEP_BUDGET_BYTES", "CopyChunk", "HotSwapEngine", "SlotFill",
           "Staging", "SwapCoordinator", "SwapError", "SwapStats", "TransferPlan", "plan_transfers",
           "schedule_chunks"]

LOCAL, REMOTE, DUP = "local", "remote", "dup"


class SwapError(ValueError):
    """Bad hot-swap input or state; the message names the field or the state."""


# ---------------------------------------------------------------- planning (pure)

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

    def bytes_moved(self, expert_bytes: int) -> int:
        """Bytes sent between ranks: one expert's weights per remote fill."""
        return self.remote_fills * int(expert_bytes)


def _as_plan_array(a, field: str) -> np.ndarray:
    arr = np.asarray(a.cpu() if isinstance(a, Tensor) else a)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise SwapError(f"{field}: must be an integer [L, R] array, got shape "
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
        raise SwapError(f"new_phy2log: shape {list(new.shape)} differs from old_phy2log "
                        f"{list(old.shape)}")
    if world_size < 1 or old.shape[1] % world_size:
        raise SwapError(f"world_size: {world_size} must divide R={old.shape[1]}")
    gpn = gpus_per_node or world_size
    if gpn < 1 or world_size % gpn:
        raise SwapError(f"gpus_per_node: {gpn} must divide world_size={world_size}")
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
                    raise SwapError(f"new_phy2log: layer {layer} expert {e} has no replica in "
                                    "old_phy2log to copy from")
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


# ---------------------------------------------------------------- pacing (pure)

# Bytes of expert weights each rank copies, receives or sends per serving step when staging is
# paced (HotSwapEngine's default). 256 MiB is ~0.19 ms of device copy at the 1.3-1.5 TB/s an
# H100 reached in benchmarks/hotswap.md, <= 3% of its 7.6-9 ms step (DeepSeek-V3 experts, 32
# slots, 4,096 tokens): the staging steps keep within 1.1x normal even if the copy and the step
# were fully serialized, and 16 such experts (1.4 GB) land in 6 steps.
DEFAULT_STEP_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CopyChunk:
    """One piece of one fill's weights, issued at one step boundary.

    ``fill``: index into :attr:`TransferPlan.fills`; ``tensor``: 0 = w13, 1 = w2;
    ``start``/``stop``: element range of that expert tensor flattened; ``step``: the step
    boundary it is issued at, counted from the prepare's (0); ``tag``: its index in the
    schedule, the point-to-point tag on both ends of a remote fill.
    """

    fill: int
    tensor: int
    start: int
    stop: int
    step: int
    tag: int


def _pieces(numel: int, element_size: int, budget_bytes: int | None) -> list[tuple[int, int]]:
    """[start, stop) element ranges cutting a tensor of ``numel`` elements into near-equal
    pieces of at most ``budget_bytes`` (one piece when it fits, or when unpaced)."""
    count = 1 if budget_bytes is None else max(1, -(-numel * element_size // budget_bytes))
    bounds = [numel * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def schedule_chunks(plan: TransferPlan, numels: tuple[int, int], element_size: int,
                    budget_bytes: int | None) -> tuple[CopyChunk, ...]:
    """Spread the copies of ``plan`` over step boundaries, at most ``budget_bytes`` per rank
    and step.

    ``numels``: elements of one expert's (w13, w2); ``element_size``: their bytes per element.
    A chunk costs its bytes to the rank it lands on and, for a remote fill, to the sender too.
    Walking the fills in plan order (dup fills last, after the fills they copy from), each
    chunk goes to the first step where every rank it costs has budget left, never before a
    step that rank already used (each rank issues its chunks in order); a rank takes at least
    one chunk per step, so tensors larger than the budget are cut into pieces of at most the
    budget. ``budget_bytes`` None: every whole tensor at step 0 (unpaced). Pure: every rank
    computes the same schedule, so both ends of a transfer issue it at the same step.
    """
    if budget_bytes is not None and budget_bytes < 1:
        raise SwapError(f"budget_bytes: must be >= 1 or None, got {budget_bytes}")
    step = [0] * plan.world_size   # per rank: the step it fills now
    load = [0] * plan.world_size   # per rank: bytes it already has at that step
    order = sorted(range(len(plan.fills)), key=lambda i: plan.fills[i].source == DUP)
    chunks: list[CopyChunk] = []
    for i in order:
        fill = plan.fills[i]
        ranks = {fill.rank, fill.src_rank}
        for tensor, numel in enumerate(numels):
            for start, stop in _pieces(numel, element_size, budget_bytes):
                size = (stop - start) * element_size
                at = max(step[r] + (budget_bytes is not None and load[r] > 0
                                    and load[r] + size > budget_bytes) for r in ranks)
                for r in ranks:
                    if at > step[r]:
                        step[r], load[r] = at, 0
                    load[r] += size
                chunks.append(CopyChunk(i, tensor, start, stop, at, len(chunks)))
    return tuple(chunks)


def _rank_batches(plan: TransferPlan, chunks: Sequence[CopyChunk],
                  rank: int) -> list[list[CopyChunk]]:
    """The chunks ``rank`` issues (lands, or sends) at each step, one list per step of the
    whole schedule (empty where it has none), so every rank pumps the same number of steps."""
    batches: list[list[CopyChunk]] = [[] for _ in range(max((c.step for c in chunks),
                                                            default=0) + 1)]
    for c in chunks:
        fill = plan.fills[c.fill]
        if fill.rank == rank or (fill.source == REMOTE and fill.src_rank == rank):
            batches[c.step].append(c)
    return batches


# ---------------------------------------------------------------- engine

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
class _LayerStage:
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
class _Batch:
    """What this rank issues at one step boundary, built at the prepare so that issuing it is
    launches only: ``transfers`` (sends from live slots, receives into staged rows), then
    ``local`` copies (destination, source) from live slots, then, after the transfers landed,
    ``dups`` copies from staged rows."""

    transfers: list[dist.P2POp]
    local: list[tuple[Tensor, Tensor]]
    dups: list[tuple[Tensor, Tensor]]

    @property
    def chunks(self) -> int:
        return len(self.transfers) + len(self.local) + len(self.dups)

    @property
    def copy_bytes(self) -> int:
        """Bytes the local and dup copies write."""
        return sum(dst.numel() * dst.element_size() for dst, _ in self.local + self.dups)


@dataclass
class Staging:
    """One staged version on one rank, made by :meth:`HotSwapEngine.plan` (pass it to
    :meth:`HotSwapEngine.prepare`; its fields are the engine's): new placements, staged layers,
    this rank's work per step (``batches``; the first ``issued`` of them are issued), the
    (placement, experts) of every layer it was planned against (``base``), and the last
    issued batch's completion (``last``: a CUDA event on the side stream, or the CPU thread
    finishing it; None before any)."""

    version: int
    placements: list[LayerPlacement]
    layers: dict[int, _LayerStage]
    stats: SwapStats
    batches: list[_Batch]
    base: tuple[tuple[LayerPlacement, LocalExperts], ...]
    issued: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    finished: float | None = None
    error: BaseException | None = None
    last: torch.cuda.Event | threading.Thread | None = None
    copy_start: torch.cuda.Event | None = None

    def unissued_transfers(self) -> bool:
        """True when a remote fill's send or receive of this rank is not issued yet."""
        return any(batch.transfers for batch in self.batches[self.issued:])

    @property
    def label(self) -> str:
        return f"v{self.version}"


@dataclass
class _Compaction:
    """One layer being brought back to one stacked segment on this rank: ``base`` = the
    layer's experts it copies from (its switch is skipped if the layer serves others by
    then); ``result`` = the experts it switches to, slot s in row s of one [S, ...] buffer
    (a segment of ``base`` whose rows the misplaced slots need are free, else a new one),
    weight tables included; ``batches``: this rank's copies per step boundary (the first
    ``issued`` of them issued); ``last``/``error`` as in :class:`Staging`."""

    layer: int
    base: LocalExperts
    result: LocalExperts
    batches: list[_Batch]
    issued: int = 0
    error: BaseException | None = None
    last: torch.cuda.Event | threading.Thread | None = None

    @property
    def label(self) -> str:
        return f"compact-l{self.layer}"


class HotSwapEngine:
    """Stages and switches the expert placements of this rank's MoE layers.

    layers: this rank's :class:`EPMoELayer` s (one per MoE layer, same group); group: a
    process group over the same ranks reserved for the weight transfers (so they never
    interleave with the layers' all-to-alls; create it with ``dist.new_group()`` on every
    rank), None for a single process. ``step_budget_bytes``: bytes of weights this rank copies,
    receives or sends per step boundary while staging (:func:`schedule_chunks`; the same on
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

    def __init__(self, layers: Sequence[EPMoELayer], group: dist.ProcessGroup | None = None,
                 gpus_per_node: int | None = None,
                 step_budget_bytes: int | None = DEFAULT_STEP_BUDGET_BYTES) -> None:
        if not layers:
            raise SwapError("layers: need at least one MoE layer")
        self.layers = list(layers)
        self.group = group
        first = self.layers[0]
        self.rank, self.world_size = first.rank, first.world_size
        self.gpus_per_node = gpus_per_node or first.gpus_per_node
        self.device = first.device
        self.step_budget_bytes = step_budget_bytes
        self._staging: Staging | None = None
        self._compaction: _Compaction | None = None
        self.compacted_layers = 0   # layers this engine brought back to one stacked segment
        self.compaction_error: str | None = None
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if group is not None and self.world_size > 1:
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
    def staged_version(self) -> int:
        """Version staged or being staged, 0 if none."""
        return self._staging.version if self._staging else 0

    def staging_progress(self) -> tuple[int, int] | None:
        """(step batches issued, step batches in all) of the staged version; None if none."""
        s = self._staging
        return None if s is None else (s.issued, len(s.batches))

    def has_unissued_transfers(self) -> bool:
        """True while a send or receive of the staged version on this rank is not issued yet:
        dropping it then needs every rank to drop it at the same step (peers would wait for
        it forever), which :class:`SwapCoordinator` arranges."""
        return self._staging is not None and self._staging.unissued_transfers()

    def ready(self) -> bool:
        """True when every chunk of the staged version is issued and has landed (received and
        sent)."""
        s = self._staging
        if s is None:
            return False
        landed = s.issued == len(s.batches) and _landed(s.last)
        if s.error is not None:
            raise SwapError(self.staging_error()) from s.error
        if landed and s.finished is None:
            s.finished = time.perf_counter()
        return s.finished is not None

    def staging_error(self) -> str | None:
        """Why the staged version's copies failed on this rank (a CPU copy thread raised; the
        version can never be ready), else None."""
        s = self._staging
        return None if s is None or s.error is None else \
            f"staging of version {s.version} failed: {s.error}"

    def wait(self, timeout: float | None = None) -> bool:
        """Issue every chunk not issued yet (collective when they include transfers), then
        block until :meth:`ready` (or ``timeout`` seconds on CPU); returns :meth:`ready`."""
        s = self._staging
        if s is None:
            return False
        while s.issued < len(s.batches):
            self._issue_next(s)
        _settle(s.last, timeout)
        return self.ready()

    def pump(self) -> int:
        """Issue the staged version's next step of chunks (at a step boundary, on every rank at
        the same step); returns the number of chunks issued (0 when none is left)."""
        s = self._staging
        if s is None or s.issued == len(s.batches):
            return 0
        return self._issue_next(s)

    def staged_stats(self) -> SwapStats | None:
        """Stats of the staged version, ``seconds`` = staging time so far (or in total)."""
        s = self._staging
        return None if s is None else self._stats(s)

    def staged_copy_ms(self) -> float | None:
        """GPU: milliseconds from the first staging copy issued to the last one done on the side
        stream (the transfers alone, without the planning before them; paced: across the steps
        they were spread over), once :meth:`ready`; None on CPU or before."""
        s = self._staging
        if s is None or s.copy_start is None or not self.ready():
            return None
        return s.copy_start.elapsed_time(s.last)

    @property
    def compacting(self) -> int | None:
        """Layers whose experts are not one stacked segment yet (:meth:`compact` brings them
        back), None when every layer is stacked."""
        return sum(layer.experts.stacked is None for layer in self.layers) or None

    def current_phy2log(self) -> Tensor:
        """The plan in force on this rank: [L, R]."""
        return torch.stack([layer.placement.phy2log for layer in self.layers])

    # -- collective operations

    def plan(self, version: int, placements: Sequence[LayerPlacement]) -> Staging:
        """Work out the staging of ``placements`` (one per layer) as ``version`` without issuing
        anything: the transfer plan, the staged rows (allocated for the side stream) and every
        step's operations. Not collective, and safe on another thread while serving goes on
        (no swap can be committed meanwhile: none is staged), so the host work can stay off
        the step boundary; :meth:`prepare` re-plans if the layers changed since."""
        if len(placements) != len(self.layers):
            raise SwapError(f"placements: need {len(self.layers)} layers, got {len(placements)}")
        # One read of every layer: a compaction may switch a layer's experts meanwhile (on the
        # serving thread); the staging is built from this snapshot alone, and prepare() re-plans
        # when it is no longer what the layers serve.
        base = tuple((layer.placement, layer.experts) for layer in self.layers)
        live = [experts for _, experts in base]
        new = torch.stack([torch.as_tensor(p.phy2log) for p in placements])
        plan = plan_transfers(torch.stack([p.phy2log for p, _ in base]), new, self.world_size,
                              self.gpus_per_node)
        w13, w2 = live[0].weights(0)
        chunks = schedule_chunks(plan, (w13.numel(), w2.numel()), w13.element_size(),
                                 self._budget)
        steps = _rank_batches(plan, chunks, self.rank)
        mine = plan.for_rank(self.rank)
        expert_bytes = (w13.numel() + w2.numel()) * w13.element_size()
        stats = SwapStats(
            version=version, layers_changed=len({f.layer for f in mine}),
            local_fills=sum(f.source == LOCAL for f in mine),
            remote_fills=sum(f.source == REMOTE for f in mine),
            dup_fills=sum(f.source == DUP for f in mine),
            bytes_received=expert_bytes * sum(f.source == REMOTE for f in mine),
            bytes_sent=expert_bytes * len(plan.sends_from(self.rank)), steps=len(steps))
        with self._side_stream():
            stages = {layer: _new_stage(live[layer], [f for f in mine if f.layer == layer])
                      for layer in sorted({f.layer for f in mine})}
            batches = [self._batch(plan, stages, live, step) for step in steps]
        for layer, stage in stages.items():
            stage.switched = _switched_experts(live[layer], stage)
            if stage.switched.triton_capable:
                stage.switched.weight_tables()
        return Staging(version, list(placements), stages, stats, batches, base)

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
        self._cancel_compaction()
        current = tuple((layer.placement, layer.experts) for layer in self.layers)
        fresh = planned is not None and planned.version == version and planned.issued == 0 \
            and len(planned.base) == len(current) \
            and all(a is c and b is d for (a, b), (c, d) in zip(planned.base, current))
        staging = planned if fresh else self.plan(version, placements)
        staging.started = time.perf_counter()
        if self._side is not None:
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            staging.copy_start = torch.cuda.Event(enable_timing=True)
            staging.copy_start.record(self._side)
            staging.last = staging.copy_start
        self._staging = staging
        self._issue_next(staging)
        return staging.stats

    def commit(self) -> SwapStats:
        """Switch every changed layer to its staged weights and placement; call at a step
        boundary on every rank at the same step, after :meth:`ready` on every rank."""
        s = self._staging
        if s is None:
            raise SwapError("version: nothing is staged")
        if not self.wait():
            raise SwapError(f"version: {s.version} is not staged yet")
        stats = self._stats(s)
        if self._side is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(s.last)
            for stage in s.layers.values():
                for w13, w2 in stage.segments:
                    w13.record_stream(current)
                    w2.record_stream(current)
        for i, layer in enumerate(self.layers):
            mine = slice(self.rank * layer.experts.num_slots,
                         (self.rank + 1) * layer.experts.num_slots)
            if i in s.layers:
                layer.swap(s.placements[i], s.layers[i].switched)
            elif not torch.equal(layer.placement.phy2log[mine], s.placements[i].phy2log[mine]):
                raise SwapError(f"placements[{i}]: this rank's slots changed but have no staged weights")
            else:
                layer.swap(s.placements[i], layer.experts)  # other ranks' slots changed: routing only
        self._staging = None
        self.compaction_error = None   # new layouts: compact again
        return stats

    def abort(self) -> int:
        """Drop the staged version: issue nothing more, wait for the chunks in flight, free the
        staging; returns its version, or 0. Safe alone only when :meth:`has_unissued_transfers`
        is False (else every rank must abort at the same step)."""
        s = self._staging
        if s is None:
            return 0
        _settle(s.last, None)
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
        if self._staging is not None or self.compaction_error is not None:
            return 0
        c = self._compaction
        if c is not None and c.issued == len(c.batches):
            if not _landed(c.last):
                return 0
            self._switch_compacted(c)
            c = None
        if c is None:
            todo = next((i for i, layer in enumerate(self.layers)
                         if layer.experts.stacked is None), None)
            if todo is None or self.compaction_error is not None:
                return 0
            try:
                c = self._compaction = self._plan_compaction(todo, self.layers[todo].experts)
            except torch.cuda.OutOfMemoryError as exc:   # no room for a new [S, ...] buffer
                self.compaction_error = f"layer {todo}: no memory for a compaction buffer: {exc}"
                return 0
        batch = c.batches[c.issued]
        self._issue_next(c)
        return batch.copy_bytes

    def _plan_compaction(self, index: int, live: LocalExperts) -> _Compaction:
        """The compaction of layer ``index`` serving ``live``: its target buffer (see
        :func:`_stacked_target`; a new one allocated for the side stream), its stacked experts
        with their weight tables (made on the side stream, no host copy), and its copies cut
        into batches of at most the budget. On GPU the side stream then waits for the serving
        stream's work so far (it may still read the rows the copies overwrite)."""
        slots = live.num_slots
        target = _stacked_target(live)
        with self._side_stream():
            if target is None:
                w13, w2 = live.segments[0]
                buffer = (w13.new_empty(slots, *w13.shape[1:]),
                          w2.new_empty(slots, *w2.shape[1:]))
            else:
                buffer = live.segments[target]
            result = LocalExperts(*buffer)
            if result.triton_capable:
                result.weight_tables()
        pairs = [(buffer[t][s], live.weights(s)[t]) for s in range(slots)
                 if live.rows[s] != (target, s) for t in (0, 1)]
        if self._side is not None:
            for t in buffer:
                t.record_stream(self._side)
            self._side.wait_stream(torch.cuda.current_stream(self.device))
        batches = [_Batch([], copies, []) for copies in _paced_copies(pairs, self._budget)]
        return _Compaction(index, live, result, batches)

    def _switch_compacted(self, c: _Compaction) -> None:
        """At a step boundary, once every copy of ``c`` landed: point its layer at the stacked
        experts (skipped if the layer serves other experts by now; recorded in
        :attr:`compaction_error` if a copy failed)."""
        self._compaction = None
        if c.error is not None:
            self.compaction_error = f"layer {c.layer}: compaction copy failed: {c.error}"
            return
        layer = self.layers[c.layer]
        if layer.experts is not c.base:
            return
        if self._side is not None:
            current = torch.cuda.current_stream(self.device)
            if c.last is None:   # nothing to copy: the weight tables alone, on the side stream
                current.wait_stream(self._side)
            else:
                current.wait_event(c.last)
            handed = list(c.result.segments[0])
            if c.result.triton_capable:
                handed += [offsets for _, offsets in c.result.weight_tables()]
            for t in handed:
                t.record_stream(current)
        layer.experts = c.result   # routing unchanged: the placement stays
        self.compacted_layers += 1

    def _cancel_compaction(self) -> None:
        """Drop the compaction in progress (a prepare takes priority): CPU: wait for its copy
        thread; GPU: nothing to wait for, whatever is issued next on the side stream runs after
        its copies, and its new buffer (allocated for the side stream) is reused only after
        them. Freed once unreferenced; :meth:`compact` starts the layer again later."""
        c, self._compaction = self._compaction, None
        if c is not None and isinstance(c.last, threading.Thread):
            c.last.join()

    # -- helpers

    def _side_stream(self):
        return torch.cuda.stream(self._side) if self._side is not None \
            else contextlib.nullcontext()

    def _stats(self, s: Staging) -> SwapStats:
        copy_ms = self.staged_copy_ms() if s is self._staging else None
        return dataclasses.replace(
            s.stats, seconds=(s.finished or time.perf_counter()) - s.started,
            copy_seconds=None if copy_ms is None else copy_ms / 1e3,
            compacted_layers=self.compacted_layers)

    def _batch(self, plan: TransferPlan, stages: dict[int, _LayerStage],
               live: Sequence[LocalExperts], chunks: list[CopyChunk]) -> _Batch:
        """This rank's operations for one step's ``chunks``: point-to-point ops tagged by
        schedule index, and (destination, source) views of the local and dup copies; sources
        are rows of ``live`` (the experts of each layer the staging is planned against)."""
        out = _Batch([], [], [])
        for c in chunks:
            f = plan.fills[c.fill]
            if f.source == REMOTE and f.rank == self.rank:
                buf = _piece(stages[f.layer].weights(f.slot), c)
                out.transfers.append(dist.P2POp(dist.irecv, buf, f.src_rank, self.group, c.tag))
            elif f.source == REMOTE:
                buf = _piece(live[f.layer].weights(f.src_slot), c)
                out.transfers.append(dist.P2POp(dist.isend, buf, f.rank, self.group, c.tag))
            else:
                stage = stages[f.layer]
                src = stage.weights(f.src_slot) if f.source == DUP \
                    else live[f.layer].weights(f.src_slot)
                copies = out.dups if f.source == DUP else out.local
                copies.append((_piece(stage.weights(f.slot), c), _piece(src, c)))
        return out

    def _issue_next(self, s: Staging | _Compaction) -> int:
        """Issue batch ``s.issued`` of a staging or a compaction: its transfers (NCCL's/gloo's
        streams), then its local copies, then, once the transfers landed, its dup copies (side
        stream on GPU; a helper thread after the previous batch's on CPU). Returns the chunks
        issued."""
        batch = s.batches[s.issued]
        s.issued += 1
        if not batch.chunks:
            return 0
        if self._side is None:
            works = dist.batch_isend_irecv(batch.transfers) if batch.transfers else []
            thread = threading.Thread(target=_finish_cpu, args=(s, s.last, works, batch),
                                      name=f"hotswap-{s.label}-{s.issued}", daemon=True)
            thread.start()
            s.last = thread
            return batch.chunks
        with self._side_stream():
            works = dist.batch_isend_irecv(batch.transfers) if batch.transfers else []
            _copy_all(batch.local)
            for w in works:
                w.wait()  # the side stream waits for the transfers
            _copy_all(batch.dups)
            s.last = torch.cuda.Event(enable_timing=True)
            s.last.record(self._side)
        return batch.chunks


def _stacked_target(live: LocalExperts) -> int | None:
    """The segment of ``live`` that can become the stacked [S, ...] buffer in place: S rows,
    and row s free (no slot reads it) for every slot s not already in it; the one with the
    fewest slots to move. None when no segment can (a new buffer is needed)."""
    used = set(live.rows)
    best: tuple[int, int] | None = None   # (moves, segment)
    for g, (w13, _) in enumerate(live.segments):
        if w13.shape[0] != live.num_slots:
            continue
        moves = [s for s, row in enumerate(live.rows) if row != (g, s)]
        if all((g, s) not in used for s in moves) and (best is None or len(moves) < best[0]):
            best = (len(moves), g)
    return None if best is None else best[1]


def _paced_copies(pairs: list[tuple[Tensor, Tensor]],
                  budget_bytes: int | None) -> list[list[tuple[Tensor, Tensor]]]:
    """(dst, src) tensor copies cut into pieces of at most ``budget_bytes`` (:func:`_pieces`)
    and packed in order into per-step lists of at most ``budget_bytes`` each (all in one list
    when None)."""
    steps: list[list[tuple[Tensor, Tensor]]] = [[]]
    load = 0
    for dst, src in pairs:
        for start, stop in _pieces(dst.numel(), dst.element_size(), budget_bytes):
            size = (stop - start) * dst.element_size()
            if budget_bytes is not None and steps[-1] and load + size > budget_bytes:
                steps.append([])
                load = 0
            load += size
            whole = stop - start == dst.numel()
            steps[-1].append((dst, src) if whole else
                             (dst.view(-1)[start:stop], src.view(-1)[start:stop]))
    return steps


def _copy_all(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """``dst.copy_(src)`` for each (dst, src) pair."""
    for dst, src in pairs:
        dst.copy_(src)


def _finish_cpu(s: Staging | _Compaction, previous: threading.Thread | None, works: list,
                batch: _Batch) -> None:
    """CPU: a batch's local copies, transfers and dup copies, after the previous batch's; an
    error is kept in ``s.error`` for the serving thread."""
    if previous is not None:
        previous.join()
    try:
        _copy_all(batch.local)
        for w in works:
            w.wait()
        _copy_all(batch.dups)
    except BaseException as exc:
        s.error = s.error or exc


def _piece(pair: Segment, chunk: CopyChunk) -> Tensor:
    """The chunk's element range of (w13, w2)[chunk.tensor]: the tensor itself when the chunk
    is all of it, else a flat view of the range."""
    t = pair[chunk.tensor]
    return t if chunk.stop - chunk.start == t.numel() else t.view(-1)[chunk.start:chunk.stop]


def _landed(last: torch.cuda.Event | threading.Thread | None) -> bool:
    """Whether the work ``last`` stands for is complete (None: there was none)."""
    if last is None:
        return True
    if isinstance(last, threading.Thread):
        return not last.is_alive()
    return last.query()


def _settle(last: torch.cuda.Event | threading.Thread | None, timeout: float | None) -> None:
    """Block until ``last`` is complete (a CUDA event ignores ``timeout``)."""
    if isinstance(last, threading.Thread):
        last.join(timeout)
    elif last is not None:
        last.synchronize()


def _new_stage(live: LocalExperts, fills: list[SlotFill]) -> _LayerStage:
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
    return _LayerStage(tuple(segments), {f.slot: free[i] for i, f in enumerate(fills)})


def _switched_experts(live: LocalExperts, stage: _LayerStage) -> LocalExperts:
    """``live`` with the changed slots pointed at their staged rows; segments no slot reads
    any more are dropped (freed once the serving stream is past them)."""
    rows = list(live.rows)
    for slot, ref in stage.rows.items():
        rows[slot] = ref
    kept = sorted({g for g, _ in rows})
    index = {g: i for i, g in enumerate(kept)}
    return LocalExperts.from_segments([stage.segments[g] for g in kept],
                                      [(index[g], r) for g, r in rows])


# ---------------------------------------------------------------- step-boundary protocol

@dataclass
class _Request:
    """A prepare request of this rank; ``planned``: its staging, worked out ahead on the
    request's thread (None until then, or if that failed)."""

    version: int
    placements: list[LayerPlacement]
    planned: Staging | None = None


class SwapCoordinator:
    """Turns prepare/commit/abort requests that reach ranks at different times into
    operations every rank performs at the same step.

    Request side (any thread, e.g. gRPC handlers): :meth:`prepare`, :meth:`commit`,
    :meth:`abort` block until done or ``timeout``. Step side (the serving loop, between two
    forward passes): :meth:`step_boundary` runs one MIN all_reduce of
    ``[p, -p, c, -c, -stop, -a]`` over ``group``: the transfer of version ``p`` starts when
    every rank has a prepare request for ``p``, and its paced chunks are issued one step's
    worth per boundary on every rank (:meth:`HotSwapEngine.pump`); the switch to ``c`` happens
    when every rank has a commit request for ``c`` AND has finished staging it; all ranks stop
    together as soon as one asks to. An abort drops the staging on its own rank at the next
    boundary, unless sends or receives of that rank are still to be issued: then ``a`` carries
    it and every rank drops it at the same boundary (a peer's pending prepare then fails).
    Staging copies that failed on a rank (:meth:`HotSwapEngine.staging_error`) ride ``a`` too:
    every rank drops that version at the same boundary and keeps serving the plan in force.
    At the boundaries with no swap starting or dropped and no prepare request pending, each
    rank compacts its layers on its own (:meth:`HotSwapEngine.compact`).
    """

    def __init__(self, engine: HotSwapEngine, version: int,
                 group: dist.ProcessGroup | None = None) -> None:
        self.engine = engine
        self.group = group
        self.version = version  # in force
        self.last_stats: SwapStats | None = None
        self.stop_requested = False
        self._cond = threading.Condition()
        self._prepare: _Request | None = None
        self._commit = 0
        self._abort = 0
        self._failed: dict[int, str] = {}
        self._dropped_by_peer: set[int] = set()
        self._ready_seen = 0
        self._closed = ""
        self._sync_device = engine.device

    # -- request side

    @property
    def prepared_version(self) -> int:
        with self._cond:
            return self._ready_seen if self._ready_seen == self.engine.staged_version else 0

    def prepare(self, version: int, placements: Sequence[LayerPlacement],
                timeout: float) -> SwapStats | None:
        """Ask to stage ``version``; blocks until staged on this rank. Returns the staging
        stats (None if already staged or in force). Raises SwapError (state) or TimeoutError.
        A new request is planned here (:meth:`HotSwapEngine.plan`), on the caller's thread, so
        the boundary that starts it only launches the first step's copies."""
        with self._cond:
            self._check_open()
            if version == self.version:
                return None
            request = self._request_prepare(version, placements)
        if request is not None:
            try:
                planned = self.engine.plan(version, request.placements)
            except SwapError:
                planned = None   # the boundary that starts it plans again and reports the error
            with self._cond:
                if self._prepare is request:
                    request.planned = planned
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._ready_seen == version or version in self._failed, timeout)
            if version in self._failed:
                raise SwapError(self._failed[version])
            if not ok:
                if self._prepare is not None and self._prepare.version == version:
                    self._prepare = None  # never started: no other rank can have started it
                raise TimeoutError(f"version {version}: not staged within {timeout:.1f}s "
                                   "(not every rank was asked to prepare it?)")
            return self.last_stats if self.last_stats and self.last_stats.version == version \
                else None

    def _request_prepare(self, version: int,
                         placements: Sequence[LayerPlacement]) -> _Request | None:
        """Check a prepare request for a version not in force against the state (under the
        lock) and record it; returns the new request, or None when ``version`` is already
        requested or staged."""
        if version < self.version:
            raise SwapError(f"version: {version} is older than the plan in force "
                            f"({self.version})")
        staged = self.engine.staged_version
        if staged and staged != version:
            raise SwapError(f"version: {staged} is staged; commit or abort it first")
        if staged or (self._prepare is not None and self._prepare.version == version):
            return None
        if self._prepare is not None:
            raise SwapError(f"version: {self._prepare.version} is being prepared")
        self._failed.pop(version, None)
        self._prepare = _Request(version, list(placements))
        return self._prepare

    def commit(self, version: int, timeout: float) -> None:
        """Ask to switch to ``version`` (staged or being staged); blocks until switched."""
        with self._cond:
            if version == self.version:
                return
            self._check_open()
            pending = self._prepare.version if self._prepare else 0
            if version not in (self.engine.staged_version, pending):
                raise SwapError(f"version: {version} is not prepared on this rank")
            self._commit = version
            ok = self._cond.wait_for(lambda: self.version == version or version in self._failed,
                                     timeout)
            if version in self._failed:
                raise SwapError(self._failed[version])
            if not ok:
                raise TimeoutError(f"version {version}: not committed within {timeout:.1f}s "
                                   "(not every rank was asked to commit it?)")

    def abort(self, version: int, timeout: float) -> bool:
        """Drop ``version`` if staged or pending; True if there was something to drop."""
        with self._cond:
            if version == self.version:
                raise SwapError(f"version: {version} is already in force")
            if self._closed:
                return False  # serving has ended: nothing will ever be switched to
            if version in self._dropped_by_peer:
                self._dropped_by_peer.discard(version)
                return True
            known = version in (self.engine.staged_version,
                                self._prepare.version if self._prepare else 0)
            if not known:
                return False
            self._abort = version
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._abort != version, timeout):
                raise TimeoutError(f"version {version}: abort not done within {timeout:.1f}s")
            return True

    def request_stop(self) -> None:
        """Ask every rank to stop at the next step boundary (safe from a signal handler)."""
        self.stop_requested = True

    def close(self, reason: str) -> None:
        """The serving loop has ended (stopped, or a collective failed because a peer died): fail
        every pending or staged prepare and commit with ``reason`` and wake their waiters, so no
        request thread waits for a step boundary that will never come. Later requests fail too."""
        with self._cond:
            if self._closed:
                return
            self._closed = reason
            for v in (self._prepare.version if self._prepare else 0, self._commit,
                      self.engine.staged_version):
                if v:
                    self._failed[v] = reason
            self._prepare, self._commit = None, 0
            self._cond.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise SwapError(f"worker: serving has ended ({self._closed})")

    # -- step side

    def step_boundary(self) -> bool:
        """Run between two forward passes on every rank. Returns False when all must stop."""
        with self._cond:
            a = self._apply_abort()
            error = self.engine.staging_error()
            a = a or (self.engine.staged_version if error else 0)
            prepare = self._prepare if self._prepare and not self.engine.staged_version else None
            p = prepare.version if prepare else 0
            ready = self._poll_ready()
            c = self._commit if self._commit and ready == self._commit else 0
        flags = torch.tensor([p, -p, c, -c, -int(self.stop_requested), -a], dtype=torch.int64,
                             device=self._sync_device)
        if self.group is not None or dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        pmin, pmax, cmin, cmax, stop, amax = flags.tolist()
        with self._cond:
            if amax < 0 and -amax == self.engine.staged_version:
                self._drop_everywhere(-amax, error)
            elif pmin > 0 and pmin == -pmax:
                self._start(prepare)
            else:
                self.engine.pump()
                if self._prepare is None:   # a prepare is planned against today's layers
                    self.engine.compact()
            if cmin > 0 and cmin == -cmax:
                self._switch(cmin)
            self._poll_ready()
            self._cond.notify_all()
        return stop == 0

    def _start(self, prepare: _Request) -> None:
        if self._prepare is prepare:
            self._prepare = None
        try:
            self.engine.prepare(prepare.version, prepare.placements, prepare.planned)
        except SwapError as exc:
            self._failed[prepare.version] = str(exc)

    def _switch(self, version: int) -> None:
        self.last_stats = self.engine.commit()
        self.version = version
        self._commit = 0

    def _poll_ready(self) -> int:
        """Staged version whose copies are complete on this rank (0 if none)."""
        staged = self.engine.staged_version
        if not staged:
            return 0
        try:
            ready = self.engine.ready()
        except SwapError:
            return 0   # its copies failed: the next boundary's all_reduce drops it everywhere
        if ready and self._ready_seen != staged:
            self._ready_seen = staged
            self.last_stats = self.engine.staged_stats()
        return staged if ready else 0

    def _drop_everywhere(self, version: int, error: str | None) -> None:
        """Drop ``version`` on this rank at the boundary every rank drops it: an abort that
        arrived while transfers were still to be issued, or copies that failed (``error``:
        this rank's, seen before the all_reduce), here or on a peer."""
        self.engine.abort()
        if self._abort == version:
            self._forget(version, f"version {version}: aborted")
        elif error is not None:
            self._forget(version, error)
        else:
            self._dropped_by_peer.add(version)
            self._forget(version, f"version {version}: aborted on another rank while staging "
                                  "(an abort request, or copies that failed there)")

    def _apply_abort(self) -> int:
        """Apply this rank's abort request before the boundary's all_reduce; returns the version
        every rank must drop at this boundary (see :meth:`_drop_everywhere`), else 0."""
        v = self._abort
        if not v:
            return 0
        if self.engine.staged_version == v:
            if self.engine.has_unissued_transfers():
                return v
            self.engine.abort()
        self._forget(v, f"version {v}: aborted")
        return 0

    def _forget(self, version: int, reason: str) -> None:
        """Clear the requests and readiness this rank holds for the dropped ``version``; its
        pending prepare or commit waiters fail with ``reason``."""
        self._failed[version] = reason
        if self._prepare is not None and self._prepare.version == version:
            self._prepare = None
        if self._commit == version:
            self._commit = 0
        if self._ready_seen == version:
            self._ready_seen = 0
        if self._abort == version:
            self._abort = 0
