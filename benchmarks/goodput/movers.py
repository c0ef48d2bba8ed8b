"""How each engine moves expert weights to a new plan, and what the move costs the serving steps.

A ``Move`` is what a plan change copies, the planner's one definition of moved bytes
(``planner.transfers``: one expert's weights per slot whose expert the rank did not hold, from a
holder on its own node when there is one (NVLink), else from another node (RDMA); copies within
a rank move nothing).

Movers (``Transition.advance`` is called at every step boundary until ``done``):

* ``blocking`` (SGLang's ``ExpertLocationUpdater``, vLLM sync ``rearrange``): serving
  stops while every rank receives its bytes of every layer; the new plan holds for all layers
  at the next step. Stall = the slowest rank's bytes over the links.
* ``async`` (vLLM ``use_async``): a background thread transfers one layer at a time
  into a one-layer buffer at link speed; the main thread commits a transferred layer at a step
  boundary (at most one per step: the buffer is then free for the next layer) by copying the
  buffer into the weights (a device copy). Steps carrying transfers are slowed by the copies
  (``unpaced_s_per_byte``).
* ``free`` (the oracle): the new plan holds at the next step, nothing stalls.
* ``paced`` (ExpertPlane hot-swap): copies at most ``step_budget_bytes`` per rank and step
  (and no more than the links carry in a step) into staging, slowing each such step by
  ``paced_s_per_byte``; commits all layers at one step boundary (``commit_s_per_layer``), then
  compacts the moved experts back into one stacked buffer, paced the same way
  (``compact_s_per_byte``).

Constants (``MoverConstants.measured``; docs/goodput.md gives each derivation): the slowdowns
are our H100 hot-swap measurements (benchmarks/hotswap.md, one GPU, local copies) turned into
seconds per byte copied alongside a step; link speeds are DeepEP's published H800 + CX7 figures
(NVLink ~153 GB/s measured intranode, RDMA 400 Gb/s = ~50 GB/s per GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from expertplane.planner.transfers import plan_transfers

GB = 1e9
MIB = 2 ** 20


@dataclass(frozen=True)
class MoverConstants:
    """Link speeds (bytes/s) and the measured cost of copies running alongside steps."""

    nvlink_bps: float
    rdma_bps: float
    device_copy_bps: float
    paced_s_per_byte: float
    unpaced_s_per_byte: float
    compact_s_per_byte: float
    commit_s_per_layer: float
    step_budget_bytes: int

    @classmethod
    def measured(cls) -> "MoverConstants":
        # benchmarks/hotswap.md, H100 runs 11a and 11d (normal ms, paced 256 MiB median x normal)
        paced = np.mean([(1.06 - 1) * 8.27e-3, (1.05 - 1) * 7.26e-3]) / (256 * MIB)
        # runs 11b and 11d unpaced: one 16-expert swap (1,409 MB) in one step
        unpaced = np.mean([(1.17 - 1) * 7.61e-3, (1.16 - 1) * 7.35e-3]) / 1.409e9
        # runs 12-14: compaction of a 16-expert swap, 6 steps at median 1.07-1.15x (1.08 the
        # median), normal step 7.3 ms (runs 11d)
        compact = (1.08 - 1) * 7.3e-3 * 6 / 1.409e9
        # runs 11a and 11d: committing step 1.07x of 8.27 ms and 1.04x of 7.26 ms (one layer)
        commit = np.mean([(1.07 - 1) * 8.27e-3, (1.04 - 1) * 7.26e-3])
        return cls(nvlink_bps=153 * GB, rdma_bps=50 * GB,
                   device_copy_bps=2956 * GB / 2,  # H100 copy 2956 GB/s read+write (kernels.md)
                   paced_s_per_byte=float(paced), unpaced_s_per_byte=float(unpaced),
                   compact_s_per_byte=compact, commit_s_per_layer=float(commit),
                   step_budget_bytes=256 * MIB)


@dataclass(frozen=True)
class Move:
    """One plan change. ``near`` / ``far`` [L, P]: bytes each GPU receives per layer from its own
    node / another node; ``slots``: slots whose expert changed; ``bytes``: near + far."""

    slots: int
    bytes: int
    near: np.ndarray
    far: np.ndarray

    def layer_rank_seconds(self, c: MoverConstants) -> np.ndarray:
        """[L, P] seconds each rank spends receiving each layer."""
        return self.near / c.nvlink_bps + self.far / c.rdma_bps

    def rank_bytes(self) -> np.ndarray:
        """[P] bytes each rank receives over all layers."""
        return (self.near + self.far).sum(axis=0)


def plan_move(previous: np.ndarray, new: np.ndarray, num_gpus: int, gpus_per_node: int,
              expert_bytes: int) -> Move:
    """The move from ``previous`` to ``new`` (both phy2log [L, R]): the planner's transfer plan
    (``planner.transfers.plan_transfers``, what the hot-swap executes), its bytes received per
    rank and layer from the same node and from other nodes."""
    received = plan_transfers(previous, new, num_gpus, gpus_per_node).received_bytes(expert_bytes)
    return Move(int((np.asarray(previous) != np.asarray(new)).sum()), int(received.sum()),
                received[0].astype(np.float64), received[1].astype(np.float64))


@dataclass(frozen=True)
class StepEffect:
    """What a move does at one step boundary: ``switch`` [L] bool layers whose new placement
    holds from this step on (None: none), ``stall_s`` seconds serving stops before the step,
    ``extra_s`` seconds the step itself is slower; ``done``: the move is over."""

    switch: np.ndarray | None
    stall_s: float
    extra_s: float
    done: bool


class Transition:
    """A move in progress; ``advance(step_s)`` is called before each step with that step's
    normal duration and returns its ``StepEffect``."""

    def advance(self, step_s: float) -> StepEffect:
        raise NotImplementedError


class _Blocking(Transition):
    def __init__(self, move: Move, c: MoverConstants):
        self.stall = float(move.layer_rank_seconds(c).sum(axis=0).max(initial=0.0))
        self.layers = move.near.shape[0]

    def advance(self, step_s: float) -> StepEffect:
        return StepEffect(np.ones(self.layers, dtype=bool), self.stall, 0.0, True)


class _Free(Transition):
    def __init__(self, move: Move, c: MoverConstants):
        self.layers = move.near.shape[0]

    def advance(self, step_s: float) -> StepEffect:
        return StepEffect(np.ones(self.layers, dtype=bool), 0.0, 0.0, True)


class _AsyncLayers(Transition):
    def __init__(self, move: Move, c: MoverConstants):
        self.c = c
        self.layer_s = move.layer_rank_seconds(c).max(axis=1)          # [L] slowest rank
        self.layer_bytes = (move.near + move.far).max(axis=1)         # [L] busiest rank's bytes
        self.next = 0                                # layer in transfer
        self.remaining = float(self.layer_s[0])      # seconds of its transfer left

    def advance(self, step_s: float) -> StepEffect:
        layers = self.layer_s.shape[0]
        switch, stall = None, 0.0
        if self.remaining <= 0:  # transferred: committed at this boundary (buffer -> weights)
            switch = np.zeros(layers, dtype=bool)
            switch[self.next] = True
            stall = float(self.layer_bytes[self.next]) / self.c.device_copy_bps
            self.next += 1
            if self.next == layers:
                return StepEffect(switch, stall, 0.0, True)
            self.remaining = float(self.layer_s[self.next])
        total = float(self.layer_s[self.next])
        copied = min(self.remaining, step_s) / total * self.layer_bytes[self.next] if total else 0.0
        self.remaining -= step_s
        return StepEffect(switch, stall, float(copied) * self.c.unpaced_s_per_byte, False)


class _Paced(Transition):
    def __init__(self, move: Move, c: MoverConstants):
        self.c = c
        self.layers = move.near.shape[0]
        self.bytes = float(move.rank_bytes().max(initial=0.0))         # busiest rank
        link_s = float(move.layer_rank_seconds(c).sum(axis=0).max(initial=0.0))
        self.rate = self.bytes / link_s if link_s > 0 else math.inf   # bytes/s its links carry
        self.staged = 0.0
        self.compacted: float | None = None  # bytes compacted, once committed

    def advance(self, step_s: float) -> StepEffect:
        c, budget = self.c, float(self.c.step_budget_bytes)
        if self.compacted is None:
            if self.staged >= self.bytes:
                self.compacted = 0.0
                return StepEffect(np.ones(self.layers, dtype=bool), 0.0,
                                  c.commit_s_per_layer * self.layers, self.bytes == 0)
            chunk = min(budget, self.bytes - self.staged, self.rate * step_s)
            self.staged += chunk
            return StepEffect(None, 0.0, chunk * c.paced_s_per_byte, False)
        chunk = min(budget, self.bytes - self.compacted)
        self.compacted += chunk
        return StepEffect(None, 0.0, chunk * c.compact_s_per_byte, self.compacted >= self.bytes)


@dataclass(frozen=True)
class Mover:
    """A mover kind ("blocking", "async", "paced", or "free": the oracle's, instant and free)
    with its constants."""

    kind: str
    constants: MoverConstants

    def begin(self, move: Move) -> Transition:
        cls = {"blocking": _Blocking, "async": _AsyncLayers, "paced": _Paced,
               "free": _Free}.get(self.kind)
        if cls is None:
            raise ValueError(f"mover: must be blocking, async, paced or free, got {self.kind!r}")
        return cls(move, self.constants)

