"""Issuing a hot-swap's copies, one step boundary's batch at a time: point-to-point transfers
on the transfer group, local copies on a side CUDA stream (priority 0, never the serving
stream) or, on CPU, on a helper thread per batch, in order. Used by the staging of a new plan
and by the compaction of split layers alike."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from expertplane.kernels.experts import Segment
from expertplane.kernels.hotswap.pacing import CopyChunk

__all__ = ["Batch", "PacedWork", "copy_all", "issue_next", "landed", "piece", "settle",
           "side_stream"]

Completion = torch.cuda.Event | threading.Thread | None


@dataclass
class Batch:
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


class PacedWork(Protocol):
    """Copies spread over step boundaries (a staging or a compaction): ``batches`` per step, the
    first ``issued`` of them issued; ``last``: the last issued batch's completion (a CUDA event
    on the side stream, or the CPU thread finishing it; None before any); ``error``: what a CPU
    copy thread raised; ``label`` names its threads."""

    batches: list[Batch]
    issued: int
    error: BaseException | None
    last: Completion

    @property
    def label(self) -> str: ...


def side_stream(side: torch.cuda.Stream | None):
    """A context that makes ``side`` current (nothing on CPU, ``side`` None)."""
    return torch.cuda.stream(side) if side is not None else contextlib.nullcontext()


def issue_next(work: PacedWork, side: torch.cuda.Stream | None) -> int:
    """Issue batch ``work.issued``: its transfers (NCCL's/gloo's streams), then its local copies,
    then, once the transfers landed, its dup copies (``side`` stream on GPU; a helper thread
    after the previous batch's on CPU). Returns the chunks issued."""
    batch = work.batches[work.issued]
    work.issued += 1
    if not batch.chunks:
        return 0
    if side is None:
        works = dist.batch_isend_irecv(batch.transfers) if batch.transfers else []
        thread = threading.Thread(target=_finish_cpu, args=(work, work.last, works, batch),
                                  name=f"hotswap-{work.label}-{work.issued}", daemon=True)
        thread.start()
        work.last = thread
        return batch.chunks
    with side_stream(side):
        works = dist.batch_isend_irecv(batch.transfers) if batch.transfers else []
        copy_all(batch.local)
        for w in works:
            w.wait()  # the side stream waits for the transfers
        copy_all(batch.dups)
        work.last = torch.cuda.Event(enable_timing=True)
        work.last.record(side)
    return batch.chunks


def copy_all(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """``dst.copy_(src)`` for each (dst, src) pair."""
    for dst, src in pairs:
        dst.copy_(src)


def _finish_cpu(work: PacedWork, previous: threading.Thread | None, works: list,
                batch: Batch) -> None:
    """CPU: a batch's local copies, transfers and dup copies, after the previous batch's; an
    error is kept in ``work.error`` for the serving thread."""
    if previous is not None:
        previous.join()
    try:
        copy_all(batch.local)
        for w in works:
            w.wait()
        copy_all(batch.dups)
    except BaseException as exc:
        work.error = work.error or exc


def piece(pair: Segment, chunk: CopyChunk) -> Tensor:
    """The chunk's element range of (w13, w2)[chunk.tensor]: the tensor itself when the chunk
    is all of it, else a flat view of the range."""
    t = pair[chunk.tensor]
    return t if chunk.stop - chunk.start == t.numel() else t.view(-1)[chunk.start:chunk.stop]


def landed(last: Completion) -> bool:
    """Whether the work ``last`` stands for is complete (None: there was none)."""
    if last is None:
        return True
    if isinstance(last, threading.Thread):
        return not last.is_alive()
    return last.query()


def settle(last: Completion, timeout: float | None) -> None:
    """Block until ``last`` is complete (a CUDA event ignores ``timeout``)."""
    if isinstance(last, threading.Thread):
        last.join(timeout)
    elif last is not None:
        last.synchronize()
