"""Rank-local compaction: brings the layers a swap left in several weight segments (or rows out
of slot order, so :attr:`LocalExperts.stacked` is None and the FFN cannot take
``torch._grouped_mm``) back to one stacked [S, ...] segment, one layer at a time, paced by the
staging's byte budget. No collective: routing does not change."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from expertplane.kernels.experts import LocalExperts
from expertplane.kernels.hotswap.copies import (Batch, Completion, issue_next, landed,
                                                side_stream)
from expertplane.kernels.hotswap.pacing import paced_copies
from expertplane.kernels.moe import ExpertParallelExperts

__all__ = ["Compaction", "Compactor"]


@dataclass
class Compaction:
    """One layer being brought back to one stacked segment on this rank: ``base`` = the
    layer's experts it copies from (its switch is skipped if the layer serves others by
    then); ``result`` = the experts it switches to, slot s in row s of one [S, ...] buffer
    (a segment of ``base`` whose rows the misplaced slots need are free, else a new one),
    weight tables included; ``batches``: this rank's copies per step boundary (the first
    ``issued`` of them issued); ``last``/``error`` as in
    :class:`~expertplane.kernels.hotswap.staging.Staging`."""

    layer: int
    base: LocalExperts
    result: LocalExperts
    batches: list[Batch]
    issued: int = 0
    error: BaseException | None = None
    last: Completion = None

    @property
    def label(self) -> str:
        return f"compact-l{self.layer}"


class Compactor:
    """The compaction of ``layers`` on this rank: at most one layer in progress
    (:attr:`current`), the layers brought back so far (:attr:`compacted_layers`), and why it
    stopped (:attr:`error`: a copy failed or no memory for a buffer; cleared by the next commit).
    ``side``: the CUDA stream the copies run on (None on CPU), ``device`` the layers' device."""

    def __init__(self, layers: Sequence[ExpertParallelExperts], side: torch.cuda.Stream | None,
                 device: torch.device) -> None:
        self.layers = layers
        self.side = side
        self.device = device
        self.current: Compaction | None = None
        self.compacted_layers = 0
        self.error: str | None = None

    @property
    def pending(self) -> int | None:
        """Layers whose experts are not one stacked segment yet, None when every layer is."""
        return sum(layer.experts.stacked is None for layer in self.layers) or None

    def step(self, budget_bytes: int | None) -> int:
        """One step boundary's compaction (see :meth:`HotSwapEngine.compact`): switch the layer
        whose copies have all landed (an event query on GPU, never a wait), then issue the
        next step's copies, at most ``budget_bytes`` (None: a whole layer), of the layer in
        progress or of the next one to compact. Returns the bytes of copies issued."""
        if self.error is not None:
            return 0
        c = self.current
        if c is not None and c.issued == len(c.batches):
            if not landed(c.last):
                return 0
            self._switch(c)
            c = None
        if c is None:
            todo = next((i for i, layer in enumerate(self.layers)
                         if layer.experts.stacked is None), None)
            if todo is None or self.error is not None:
                return 0
            try:
                c = self.current = self.plan(todo, self.layers[todo].experts, budget_bytes)
            except torch.cuda.OutOfMemoryError as exc:   # no room for a new [S, ...] buffer
                self.error = f"layer {todo}: no memory for a compaction buffer: {exc}"
                return 0
        batch = c.batches[c.issued]
        issue_next(c, self.side)
        return batch.copy_bytes

    def plan(self, index: int, live: LocalExperts, budget_bytes: int | None) -> Compaction:
        """The compaction of layer ``index`` serving ``live``: its target buffer (see
        :func:`_stacked_target`; a new one allocated for the side stream), its stacked experts
        with their weight tables (made on the side stream, no host copy), and its copies cut
        into batches of at most ``budget_bytes``. On GPU the side stream then waits for the
        serving stream's work so far (it may still read the rows the copies overwrite)."""
        slots = live.num_slots
        target = _stacked_target(live)
        with side_stream(self.side):
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
        if self.side is not None:
            for t in buffer:
                t.record_stream(self.side)
            self.side.wait_stream(torch.cuda.current_stream(self.device))
        batches = [Batch([], copies, []) for copies in paced_copies(pairs, budget_bytes)]
        return Compaction(index, live, result, batches)

    def _switch(self, c: Compaction) -> None:
        """At a step boundary, once every copy of ``c`` landed: point its layer at the stacked
        experts (skipped if the layer serves other experts by now; recorded in :attr:`error`
        if a copy failed)."""
        self.current = None
        if c.error is not None:
            self.error = f"layer {c.layer}: compaction copy failed: {c.error}"
            return
        layer = self.layers[c.layer]
        if layer.experts is not c.base:
            return
        if self.side is not None:
            current = torch.cuda.current_stream(self.device)
            if c.last is None:   # nothing to copy: the weight tables alone, on the side stream
                current.wait_stream(self.side)
            else:
                current.wait_event(c.last)
            handed = list(c.result.segments[0])
            if c.result.triton_capable:
                handed += [offsets for _, offsets in c.result.weight_tables()]
            for t in handed:
                t.record_stream(current)
        layer.experts = c.result   # routing unchanged: the placement stays
        self.compacted_layers += 1

    def cancel(self) -> None:
        """Drop the compaction in progress (a prepare takes priority): CPU: wait for its copy
        thread; GPU: nothing to wait for, whatever is issued next on the side stream runs after
        its copies, and its new buffer (allocated for the side stream) is reused only after
        them. Freed once unreferenced; :meth:`step` starts the layer again later."""
        c, self.current = self.current, None
        if c is not None and isinstance(c.last, threading.Thread):
            c.last.join()


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

