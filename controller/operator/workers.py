"""Debounce of worker-pod changes: a placement whose GPUs come from ``topology.workerSelector``
is reshaped only once the matching pods have given the same topology for ``stableSeconds``, so a
rolling restart of the engine pods (one pod gone, then back) does not flap the plan."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from expertplane.controller.operator.crd import Topology


@dataclass(frozen=True)
class Settled:
    """What to plan for: ``topology`` (None: no worker pods). ``waiting``: the pods show
    ``observed`` (None: no pods) instead, not for long enough yet; ``since`` when they first
    did (monotonic seconds)."""

    topology: Topology | None
    waiting: bool = False
    observed: Topology | None = None
    since: float = 0.0


_NONE = object()


class WorkerSettle:
    """Per placement: the topology the pods showed last and since when (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._seen: dict[str, tuple[Topology | None, float]] = {}
        self._lock = threading.Lock()

    def settle(self, key: str, observed: Topology | None, registered: Topology | None,
               stable_seconds: float) -> Settled:
        """The topology to register for ``key`` given the pods' ``observed`` one (None: no pods)
        and the ``registered`` one (None: not registered yet, so no debounce)."""
        now = self._clock()
        with self._lock:
            if registered is None or observed == registered:
                self._seen.pop(key, None)
                return Settled(observed if registered is None else registered)
            seen, since = self._seen.get(key, (_NONE, now))
            if seen != observed:
                since = now
            self._seen[key] = (observed, since)
            if now - since >= stable_seconds:
                self._seen.pop(key, None)
                return Settled(observed)
            return Settled(registered, True, observed, since)

    def forget(self, key: str) -> None:
        with self._lock:
            self._seen.pop(key, None)
