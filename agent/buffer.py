"""Bounded send buffer of LoadReports: held until the controller acknowledges them.

Reports are kept in the order they were produced. The uplink takes the oldest one that is not in
flight (at most one per worker rank at a time, so each worker's reports arrive in sequence order
even across OVERLOADED retries and reconnects), marks it in flight under the current stream *generation*, and the buffer forgets it only
when the controller answers it (``ack``). When a stream breaks, ``new_generation`` puts every
in-flight report back (it is resent with the SAME sequence, so the controller's dedupe keeps
retries idempotent). When full, the oldest report not in flight is dropped; the window it covered
is counted into the ``dropped_windows`` of the next report of the same worker that is still
waiting to be sent (or of the worker's next report), so the gap reaches the controller exactly
once, with a count that does not change when that report is resent.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from expertplane.proto import expertplane_pb2 as pb

Key = tuple[int, int]  # (worker_rank, sequence): sequences are unique per rank within an agent


@dataclass
class _Entry:
    report: pb.LoadReport
    generation: int = 0          # stream generation it is in flight on; 0 = waiting to be sent
    sent_at: float = 0.0         # time.monotonic() of the last send
    not_before: float = 0.0      # time.monotonic() before which it is not resent (OVERLOADED)
    overloads: int = 0


def report_key(report: pb.LoadReport) -> Key:
    return int(report.worker_rank), int(report.sequence)


class ReportBuffer:
    """Thread-safe bounded FIFO of LoadReports with in-flight tracking.

    ``capacity``: the most reports held (in flight included). ``dropped_total`` counts reports
    dropped because the buffer was full.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.dropped_total = 0
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._pending_drops: dict[int, int] = {}   # rank -> dropped windows not yet attached
        self._generation = 1
        self._in_flight = 0
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    def put(self, report: pb.LoadReport) -> int:
        """Add ``report`` (dropping the oldest waiting one when full); returns how many were dropped."""
        with self._cond:
            rank = int(report.worker_rank)
            report.dropped_windows += self._pending_drops.pop(rank, 0)
            dropped = 0
            if len(self._entries) >= self.capacity:
                victim = next((k for k, e in self._entries.items() if not e.generation), None)
                if victim is None:   # everything is in flight: the new report is the oldest waiting
                    self._carry(rank, report.dropped_windows + 1, after=None)
                    self.dropped_total += 1
                    return 1
                gone = self._entries.pop(victim)
                self._carry(victim[0], gone.report.dropped_windows + 1, after=victim)
                self.dropped_total += 1
                dropped = 1
            self._entries[report_key(report)] = _Entry(report)
            self._cond.notify_all()
            return dropped

    def _carry(self, rank: int, windows: int, after: Key | None) -> None:
        """Attach ``windows`` dropped windows of ``rank`` to its next waiting report (or later)."""
        if after is not None:
            for key, entry in self._entries.items():
                if key[0] == rank and key[1] > after[1] and not entry.generation:
                    entry.report.dropped_windows += windows
                    return
        self._pending_drops[rank] = self._pending_drops.get(rank, 0) + windows

    def take(self, generation: int, max_in_flight: int, timeout: float) -> pb.LoadReport | None:
        """The oldest sendable report, marked in flight on ``generation``; None after ``timeout``.

        Per worker rank, reports go strictly in sequence order, one at a time: a rank's next
        report is sendable only once the previous one is acknowledged (the controller dedupes on
        the last sequence counted per worker, so a report overtaken by a newer one would be lost).
        Returns None at once when ``generation`` is no longer current (its stream was closed).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while generation == self._generation:
                now = time.monotonic()
                wake = deadline
                if self._in_flight < max_in_flight:
                    ranks_seen: set[int] = set()
                    for (rank, _seq), entry in self._entries.items():
                        if rank in ranks_seen:       # only the oldest report of a rank may go
                            continue
                        ranks_seen.add(rank)
                        if entry.generation:
                            continue
                        if entry.not_before <= now:
                            entry.generation, entry.sent_at = generation, now
                            self._in_flight += 1
                            return entry.report
                        wake = min(wake, entry.not_before)
                if now >= deadline:
                    return None
                self._cond.wait(max(0.0, wake - now))
            return None

    def ack(self, rank: int, sequence: int) -> bool:
        """Forget the report (``rank``, ``sequence``): the controller answered it for good."""
        with self._cond:
            entry = self._entries.pop((int(rank), int(sequence)), None)
            if entry is None:
                return False
            if entry.generation:
                self._in_flight -= 1
            self._cond.notify_all()
            return True

    def retry_later(self, rank: int, sequence: int, delay: float) -> None:
        """The controller shed this report (OVERLOADED): resend it after ``delay`` seconds."""
        with self._cond:
            entry = self._entries.get((int(rank), int(sequence)))
            if entry is None:
                return
            if entry.generation:
                self._in_flight -= 1
            entry.generation = 0
            entry.overloads += 1
            entry.not_before = time.monotonic() + delay
            self._cond.notify_all()

    def overloads(self, rank: int, sequence: int) -> int:
        with self._cond:
            entry = self._entries.get((int(rank), int(sequence)))
            return entry.overloads if entry else 0

    def oldest_in_flight_age(self) -> float:
        """Seconds the oldest unacknowledged in-flight report has waited (0 if none)."""
        with self._cond:
            sent = [e.sent_at for e in self._entries.values() if e.generation]
            return time.monotonic() - min(sent) if sent else 0.0

    def is_current(self, generation: int) -> bool:
        with self._cond:
            return generation == self._generation

    def new_generation(self) -> int:
        """Close the current stream generation: in-flight reports wait to be resent. Returns the new one."""
        with self._cond:
            self._generation += 1
            for entry in self._entries.values():
                entry.generation = 0
            self._in_flight = 0
            self._cond.notify_all()
            return self._generation

    def wait_empty(self, timeout: float) -> bool:
        """Block until every report is acknowledged or ``timeout`` seconds pass; True if empty."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._entries, timeout=timeout)
