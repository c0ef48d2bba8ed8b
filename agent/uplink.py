"""Stream buffered LoadReports to the controller's LoadService.ReportLoad and apply its ACKs."""

from __future__ import annotations

import logging
import time
import random
import threading

import grpc

from expertplane.agent.buffer import ReportBuffer
from expertplane.agent.config import AgentConfig
from expertplane.agent.metrics import AgentMetrics
from expertplane.agent.reconnect import StreamFailed, keep_open
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_DONE = (pb.LoadAck.ACCEPTED, pb.LoadAck.DUPLICATE, pb.LoadAck.STALE, pb.LoadAck.REJECTED)


class LoadUplink:
    """Keeps one ReportLoad stream open and feeds it from ``buffer``.

    At most ``config.max_in_flight`` reports are unacknowledged at a time. A report leaves the
    buffer only when ACKed ACCEPTED / DUPLICATE / STALE / REJECTED; OVERLOADED puts it back for a
    jittered, growing delay. When the stream breaks, or an ACK is ``config.ack_timeout`` late,
    the stream is re-opened (exponential backoff with jitter) and unacknowledged reports are
    resent with their original sequence numbers.
    """

    def __init__(self, config: AgentConfig, channel: grpc.Channel, buffer: ReportBuffer,
                 metrics: AgentMetrics):
        self._config = config
        self._stub = pb_grpc.LoadServiceStub(channel)
        self._buffer = buffer
        self._metrics = metrics
        self._stopping = threading.Event()
        self._call = None
        self._call_lock = threading.Lock()
        self._opened = 0
        self.connected = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=keep_open, name="agent-uplink", daemon=True,
                                        args=("load", self._stream_once, self._stopping),
                                        kwargs={"initial": self._config.backoff_initial,
                                                "maximum": self._config.backoff_max})
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._cancel()
        self._buffer.new_generation()   # wakes a request generator waiting for reports
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _cancel(self) -> None:
        with self._call_lock:
            if self._call is not None:
                self._call.cancel()

    def _stream_once(self) -> None:
        generation = self._buffer.new_generation()
        if self._opened:
            self._metrics.reconnects.labels(stream="load").inc()
        self._opened += 1
        acked, opened_at = 0, time.monotonic()
        call = self._stub.ReportLoad(self._requests(generation))
        with self._call_lock:
            self._call = call
        if self._stopping.is_set():
            call.cancel()
        try:
            for ack in call:
                self.connected.set()
                self._on_ack(ack)
                acked += 1
            error = "controller closed the stream"
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.connected.clear()
            self._buffer.new_generation()
            with self._call_lock:
                self._call = None
        if self._stopping.is_set():
            return
        if not acked and time.monotonic() - opened_at < self._config.backoff_max:
            raise StreamFailed(error)
        log.warning("load stream to %s ended after %d ACKs (%s); re-opening", self._config.controller,
                    acked, error)

    def _requests(self, generation: int):
        """The request stream of one ReportLoad call: buffered reports, until the call ends."""
        while not self._stopping.is_set():
            if self._buffer.oldest_in_flight_age() > self._config.ack_timeout:
                log.warning("no ACK within %.1fs: re-opening the load stream", self._config.ack_timeout)
                self._cancel()
                return
            report = self._buffer.take(generation, self._config.max_in_flight, timeout=0.25)
            if report is not None:
                self._metrics.reports_sent.inc()
                yield report
            elif not self._buffer.is_current(generation):
                return

    def _on_ack(self, ack: pb.LoadAck) -> None:
        status = pb.LoadAck.Status.Name(ack.status)
        self._metrics.reports_acked.labels(status=status).inc()
        if ack.status in _DONE:
            if ack.status in (pb.LoadAck.STALE, pb.LoadAck.REJECTED):
                log.warning("controller answered %s for rank %d sequence %d: %s", status,
                            ack.worker_rank, ack.sequence, ack.message)
            self._buffer.ack(ack.worker_rank, ack.sequence)
        else:   # OVERLOADED (or an unknown status): keep it and resend later
            tries = self._buffer.overloads(ack.worker_rank, ack.sequence)
            delay = min(self._config.backoff_max, self._config.backoff_initial * 2 ** tries)
            self._buffer.retry_later(ack.worker_rank, ack.sequence, random.uniform(delay / 2, delay))
        self._metrics.buffer_depth.set(len(self._buffer))
