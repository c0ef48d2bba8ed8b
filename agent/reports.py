"""Turn a worker's CounterSnapshot into the LoadReport the controller ingests."""

from __future__ import annotations

import secrets
import threading
import time

from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import to_numpy


_last_epoch = 0
_epoch_lock = threading.Lock()


def new_agent_epoch() -> int:
    """A fresh ``agent_epoch``: milliseconds since the Unix epoch in the high bits, 16 random bits
    below (agents on different nodes starting in the same millisecond still differ), and strictly
    increasing within a process (several in-process agents, as in the demo, never share one)."""
    global _last_epoch
    with _epoch_lock:
        _last_epoch = max((time.time_ns() // 1_000_000) << 16 | secrets.randbits(16), _last_epoch + 1)
        return _last_epoch


def build_report(snapshot: pb.CounterSnapshot, worker: pb.WorkerInfo, *, sequence: int,
                 agent_epoch: int, gpu: pb.GpuStats | None = None) -> pb.LoadReport:
    """A LoadReport for ``worker`` from its ``snapshot``.

    ``snapshot.slot_counts``: int64 [L, R / num_gpus] token deltas per local physical slot;
    ``snapshot.dropped_tokens``: optional, same shape. ``snapshot.rank`` must be the worker's rank
    and ``snapshot.placement`` its placement (empty = the registered one). Raises
    ``FieldError`` naming the field.
    """
    if snapshot.rank != worker.rank:
        raise FieldError("rank", f"snapshot is for rank {snapshot.rank}, worker is {worker.rank}")
    if snapshot.placement and snapshot.placement != worker.placement:
        raise FieldError("placement", f"snapshot is for {snapshot.placement!r}, worker serves "
                                         f"{worker.placement!r}")
    if snapshot.plan_version == 0:
        raise FieldError("plan_version", "must be >= 1 (the plan the counts were taken under)")
    counts = to_numpy(snapshot.slot_counts, "slot_counts", ndim=2)
    if snapshot.HasField("dropped_tokens") and len(snapshot.dropped_tokens.shape):
        to_numpy(snapshot.dropped_tokens, "dropped_tokens", shape=counts.shape)
    if (counts < 0).any():
        raise FieldError("slot_counts", "token counts must be >= 0")
    report = pb.LoadReport(
        node=worker.node, worker_rank=worker.rank, placement=worker.placement,
        plan_version=snapshot.plan_version, sequence=sequence, agent_epoch=agent_epoch,
        slot_counts=snapshot.slot_counts, steps=snapshot.steps, failed_steps=snapshot.failed_steps,
    )
    report.window_start.CopyFrom(snapshot.window_start)
    report.window_end.CopyFrom(snapshot.window_end)
    if snapshot.HasField("dropped_tokens") and len(snapshot.dropped_tokens.shape):
        report.dropped_tokens.CopyFrom(snapshot.dropped_tokens)
    if gpu is not None:
        report.gpu.CopyFrom(gpu)
    return report
