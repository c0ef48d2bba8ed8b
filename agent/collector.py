"""Pull per-slot counters from every registered worker at a fixed interval, into the send buffer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import grpc

from expertplane.agent.buffer import ReportBuffer
from expertplane.agent.config import AgentConfig
from expertplane.agent.gpu import GpuSampler
from expertplane.agent.metrics import AgentMetrics
from expertplane.agent.registry import WorkerHandle, WorkerKey, WorkerRegistry
from expertplane.agent.reports import build_report
from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb

log = logging.getLogger(__name__)

# final pulls at stop: a window per plan version since the last pull (rarely more than two),
# then the round that acknowledges the last one
FINAL_PULL_ROUNDS = 4


class Collector:
    """Every ``config.interval`` seconds, calls PullCounters on each worker in parallel.

    A pull has the short deadline ``config.deadlines.pull``; a worker whose previous pull is still
    running is skipped that round, so a slow worker never delays the others and is never called
    twice at once. ``config.lost_after`` consecutive failed pulls, or an UNAVAILABLE answer, drop
    the worker from the registry (reported WORKER_LOST). Each good snapshot becomes a LoadReport
    with the next sequence of its rank (strictly increasing per rank, within ``agent_epoch``).

    Pulls acknowledge the (epoch, sequence) of the last snapshot received from that worker (kept
    per (placement, rank), so across a re-registration too), so a worker sends a snapshot again
    until it is known to have arrived (a lost answer loses nothing); a snapshot whose (epoch,
    sequence) was already counted is not reported again.

    A worker answers one counter window per pull and may hold several (one per plan version
    since the last pull), so the final pulls at ``stop`` go on while they bring new steps.
    """

    def __init__(self, config: AgentConfig, registry: WorkerRegistry, buffer: ReportBuffer,
                 gpu: GpuSampler, metrics: AgentMetrics, agent_epoch: int):
        self._config = config
        self._registry = registry
        self._buffer = buffer
        self._gpu = gpu
        self._metrics = metrics
        self.agent_epoch = agent_epoch
        self._sequences: dict[int, int] = {}
        self._counted: dict[WorkerKey, tuple[int, int]] = {}
        self._seq_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="agent-pull")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="agent-collector", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_tick = time.monotonic() + self._config.interval
        while not self._stopping.wait(max(0.0, next_tick - time.monotonic())):
            self.collect()
            next_tick += self._config.interval
            if next_tick < time.monotonic():   # fell behind (e.g. suspended): skip missed ticks
                next_tick = time.monotonic() + self._config.interval

    def collect(self) -> list[Future]:
        """Start one pull per idle registered worker; returns their futures (not waited on)."""
        futures = []
        for handle in self._registry.handles():
            with handle.lock:
                if handle.pulling:
                    log.debug("rank %d still answering its previous pull: skipped", handle.info.rank)
                    continue
                handle.pulling = True
            futures.append(self._pool.submit(self._pull, handle))
        return futures

    def _pull(self, handle: WorkerHandle) -> int:
        try:
            return self._pull_once(handle)
        finally:   # only now may the next pull of this worker start: its report is queued
            with handle.lock:
                handle.pulling = False

    def _pull_once(self, handle: WorkerHandle) -> int:
        """One pull of ``handle``; returns the steps of the snapshot it reported (0: none)."""
        started = time.time()
        t0 = time.monotonic()
        with self._seq_lock:
            epoch, sequence = self._counted.get(handle.key, (0, 0))
        request = pb.PullCountersRequest(agent_epoch=self.agent_epoch, ack_epoch=epoch,
                                         ack_sequence=sequence)
        try:
            snapshot = handle.stub.PullCounters(request, timeout=self._config.deadlines.pull)
        except grpc.RpcError as exc:
            self._metrics.pull_latency.observe(time.monotonic() - t0)
            self._metrics.pull_failures.inc()
            self._missed(handle, exc)
            return 0
        self._metrics.pull_latency.observe(time.monotonic() - t0)
        handle.missed_pulls = 0
        previous, handle.last_pull = handle.last_pull, started
        info = self._registry.update(handle, plan_version=snapshot.plan_version or None)
        if not snapshot.HasField("window_end"):
            snapshot.window_end.FromNanoseconds(time.time_ns())
        if not snapshot.HasField("window_start"):
            snapshot.window_start.FromNanoseconds(int((previous or started) * 1e9))
        gpu = self._gpu.sample(info.rank)
        with self._seq_lock:
            if _already_counted(snapshot, self._counted.get(handle.key, (0, 0))):
                log.info("rank %d sent snapshot %d again: already counted, not reported twice",
                         info.rank, snapshot.sequence)
                self._metrics.snapshots_duplicate.inc()
                return 0
            self._counted[handle.key] = (snapshot.epoch, snapshot.sequence)  # the next pull's ack
            sequence = self._sequences.get(info.rank, 0) + 1
            try:
                report = build_report(snapshot, info, sequence=sequence,
                                      agent_epoch=self.agent_epoch, gpu=gpu)
            except FieldError as exc:   # acknowledged all the same: sent again, still malformed
                log.warning("rank %d sent a malformed counter snapshot, not reported: %s",
                            info.rank, exc)
                return 0
            self._sequences[info.rank] = sequence
            dropped = self._buffer.put(report)
        if dropped:
            self._metrics.reports_dropped.inc(dropped)
        self._metrics.buffer_depth.set(len(self._buffer))
        return snapshot.steps

    def enqueue(self, rank: int, build: Callable[[int], pb.LoadReport]) -> int:
        """Buffer ``build(sequence)`` under ``rank``'s next sequence (numbered and buffered under
        one lock, so each rank's reports wait in sequence order); returns reports dropped."""
        with self._seq_lock:
            sequence = self._sequences.get(rank, 0) + 1
            self._sequences[rank] = sequence
            dropped = self._buffer.put(build(sequence))
        self._metrics.buffer_depth.set(len(self._buffer))
        return dropped

    def _missed(self, handle: WorkerHandle, exc: grpc.RpcError) -> None:
        code = exc.code() if hasattr(exc, "code") else None
        handle.missed_pulls += 1
        if code == grpc.StatusCode.UNAVAILABLE:
            reason = f"PullCounters: UNAVAILABLE: {exc.details()}"
        elif handle.missed_pulls >= self._config.lost_after:
            reason = f"{handle.missed_pulls} pulls missed in a row (last: {code.name if code else exc})"
        else:
            log.info("rank %d missed a pull (%s)", handle.info.rank, code.name if code else exc)
            return
        if self._registry.lose(handle, reason):
            self._metrics.workers_lost.inc()
            self._metrics.workers.set(len(self._registry))

    def stop(self, final_pull: bool = True) -> None:
        """Stop the interval loop; with ``final_pull`` pull every worker again, one round after
        another while a round reports new steps (each round also acknowledges the previous one's
        windows), at most ``FINAL_PULL_ROUNDS`` rounds."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        for _ in range(FINAL_PULL_ROUNDS if final_pull else 0):
            done, _ = wait(self.collect(), timeout=self._config.deadlines.pull + 1.0)
            if not any(f.exception() is None and f.result() for f in done):
                break
        self._pool.shutdown(wait=True, cancel_futures=True)


def _already_counted(snapshot: pb.CounterSnapshot, counted: tuple[int, int]) -> bool:
    """True when ``snapshot`` was received before: same worker epoch, sequence not beyond the last
    counted one. Snapshots without a sequence (workers that keep no pending window) are new."""
    return bool(snapshot.sequence) and snapshot.epoch == counted[0] \
        and snapshot.sequence <= counted[1]
