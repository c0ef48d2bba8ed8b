"""Stored plans: storing them, the plan-version gauges, and the watchers.

``Plans`` stores records (built by ``convert.plan_record``) and feeds ``PlanWatch`` subscribers.
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Callable

from expertplane.controller.convert import plan_record
from expertplane.controller.metrics import ControllerMetrics
from expertplane.controller.placements import PlacementState, Placements
from expertplane.controller.planning import Candidate
from expertplane.controller.store import PlanRecord, Store
from expertplane.errors import FieldError, NotFound

MAX_VERSION = 2 ** 63 - 1      # plan versions are stored as signed 64-bit integers


class PlanWatch:
    """A subscriber to new plans: a bounded queue; ``overflowed`` when it fell too far behind.
    ``wake()`` is called (from the offering thread) after every offer, so that the reader can
    wait without holding a thread."""

    def __init__(self, placement: str, maxsize: int, wake: Callable[[], None] = lambda: None):
        self.placement = placement
        self.queue: queue.Queue[PlanRecord | None] = queue.Queue(maxsize)
        self.overflowed = False
        self._wake = wake

    def offer(self, plan: PlanRecord) -> None:
        if not self.placement or plan.placement == self.placement:
            self._put(plan)

    def offer_end(self) -> None:
        """Tell the reader that the stream is over (a None in the queue)."""
        self._put(None)

    def _put(self, item: PlanRecord | None) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.overflowed = True
        self._wake()


class Plans:
    """The plans of the registered placements in ``store``; ``watch_queue`` bounds each
    watcher's queue."""

    def __init__(self, store: Store, placements: Placements, metrics: ControllerMetrics,
                 watch_queue: int):
        self._store = store
        self._placements = placements
        self._metrics = metrics
        self._watch_queue = watch_queue
        self._watches: set[PlanWatch] = set()

    def add(self, state: PlacementState, cand: Candidate, reason: str, previous: int, *,
            in_force: bool = False, version: int = 0) -> PlanRecord:
        """Store ``cand`` as the placement's next version, or as ``version`` if higher (a
        restored plan), in force at once if ``in_force`` (a first plan, a new shape), and tell
        the watchers."""
        spec = state.spec
        plan = self._store.add_plan(dataclasses.replace(
            plan_record(spec, cand, reason, previous), version=version), in_force=in_force)
        state.window.add_plan(plan.version, plan.phy2log)
        if in_force:
            self.put_in_force(state, plan)
        self._metrics.plan_version.labels(spec.name, "latest").set(plan.version)
        for w in list(self._watches):
            w.offer(plan)
        return plan

    def put_in_force(self, state: PlacementState, plan: PlanRecord) -> None:
        """``plan`` (stored) is now in force on ``state``'s workers."""
        state.put_in_force(plan)
        self._metrics.plan_version.labels(state.name, "in_force").set(plan.version)

    def get(self, name: str, version: int = 0) -> PlanRecord:
        """Version ``version`` (0: the latest) of ``name``; ``NotFound`` naming the field."""
        if version > MAX_VERSION:            # a valid uint64 on the wire, beyond the store's BIGINT
            self._placements.require(name)
            raise NotFound("version", f"placement {name!r} has no plan version {version}")
        return self._store.get_plan(name, version)

    def in_force(self, name: str) -> PlanRecord:
        """The plan in force on ``name``'s workers: its initial plan or the version its last
        committed rollout put in force (never an aborted rollout's). ``NotFound`` naming the
        placement when it is unknown or has no plan in force."""
        entry = self._placements.require(name).in_force
        if entry is None:
            raise NotFound("placement", f"placement {name!r} has no plan in force")
        return entry.plan

    def page(self, name: str, page_size: int, page_token: str) -> tuple[list[PlanRecord], str]:
        """A page of plan summaries in version order; the token is the last version returned."""
        self._placements.require(name)
        if page_token and not (page_token.isascii() and page_token.isdigit()
                               and int(page_token) <= MAX_VERSION):
            raise FieldError("page_token", f"not a token from a previous page: {page_token!r}")
        size = min(page_size or 100, 1000)
        plans = self._store.list_plans(name, after_version=int(page_token or 0), limit=size + 1)
        more = len(plans) > size
        plans = plans[:size]
        return plans, (str(plans[-1].version) if more else "")

    def watch(self, placement: str, after_version: int, wake: Callable[[], None] = lambda: None
              ) -> tuple[PlanWatch, list[PlanRecord]]:
        """Subscribe to new plans (``wake`` as in ``PlanWatch``); returns the watch and the stored
        plans after ``after_version`` (the watch may repeat some of them: callers skip versions
        already sent)."""
        if placement:
            self._placements.require(placement)
        w = PlanWatch(placement, self._watch_queue, wake)
        self._watches.add(w)
        return w, self._store.list_plans(placement, after_version=min(after_version, MAX_VERSION),
                                         limit=10_000)

    def unwatch(self, w: PlanWatch) -> None:
        self._watches.discard(w)

    def end_watches(self) -> None:
        """Shutting down: end every open watch stream."""
        for w in list(self._watches):
            w.offer_end()
