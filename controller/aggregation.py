"""Load aggregation: worker slot counts -> decayed sliding-window load per logical expert.

A ``LoadReport`` carries one of two kinds of counts (its ``counts`` oneof):

- ``slot_counts``: tokens per local physical slot ``[L, R / num_gpus]`` counted under some plan
  version. The slots of worker ``rank`` are ``rank*S .. (rank+1)*S - 1`` of that plan's
  ``phy2log [L, R]``, so a report maps to logical experts exactly even when the plan in force
  has changed since.
- ``expert_load``: tokens per logical expert ``[L, E]`` (engines that count per expert, such as
  vLLM's EPLB window). Added to the window as is, with no plan mapping. Its share of the per-GPU
  load is estimated under the plan in force: each expert's load split evenly over its replicas.

Reports land in time buckets as raw slot counts per plan version, or logical load
(cheap to ingest); the mapping to experts happens when the window is read. Buckets (``window / BUCKETS`` seconds wide); the
window load is the sum of the buckets younger than the window, each weighted by
``2 ** (-age / half_life)`` (no decay when half_life is 0). Memory per placement is bounded:
at most ``BUCKETS + 2`` buckets, ``MAX_CACHED_VERSIONS`` slot maps and ``MAX_SEQUENCES`` dedupe
entries.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from expertplane.controller.spec import PlacementSpec
from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import to_numpy

BUCKETS = 32
MAX_CACHED_VERSIONS = 16
MAX_SEQUENCES = 65536
Ack = pb.LoadAck

# (placement, version) -> phy2log [L, R] of a stored plan, or None if there is none.
PlanLookup = Callable[[str, int], "np.ndarray | None"]


@dataclass(frozen=True)
class IngestResult:
    status: int            # a pb.LoadAck.Status value
    message: str = ""
    lag_seconds: float = 0.0   # receive time - report window_end (0 if window_end unset)


@dataclass(frozen=True)
class WindowView:
    """A placement's window at ``as_of`` (unix seconds): load [L, E] decayed tokens per logical
    expert; gpu_load [L, num_gpus] decayed tokens per GPU counted under the plan in force."""

    load: np.ndarray
    gpu_load: np.ndarray
    reports: int
    as_of: float


class _Bucket:
    """Token counts received in one time bucket: per plan version as slots [G, L, S] float64,
    and logical-expert load [L, E] float64 (None until a logical report lands)."""

    __slots__ = ("start", "slots", "logical")

    def __init__(self, start: float):
        self.start = start
        self.slots: dict[int, np.ndarray] = {}
        self.logical: np.ndarray | None = None


class PlacementWindow:
    """The window of one placement; thread-safe. Reports of a plan version are accepted once
    ``add_plan`` made a version at least as new known."""

    def __init__(self, spec: PlacementSpec, lookup: PlanLookup):
        self.spec = spec
        self.latest = 0
        self._lookup = lookup
        self._lock = threading.Lock()
        self._buckets: collections.deque[_Bucket] = collections.deque()
        self._slot_maps: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._seen: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self.reports = 0

    def sizes(self) -> dict[str, int]:
        """How full the bounded state is: time buckets (<= BUCKETS + 2), cached slot maps
        (<= MAX_CACHED_VERSIONS), and dedupe entries (<= MAX_SEQUENCES)."""
        with self._lock:
            return {"buckets": len(self._buckets), "slot_maps": len(self._slot_maps),
                    "sequences": len(self._seen)}

    @property
    def bucket_seconds(self) -> float:
        return self.spec.policy.window_seconds / BUCKETS

    def fits(self, spec: PlacementSpec) -> bool:
        """Whether this window can go on counting for ``spec`` (an update of its placement):
        same shape and window length."""
        return self.spec.same_shape(spec) and \
            self.spec.policy.window_seconds == spec.policy.window_seconds

    def add_plan(self, version: int, phy2log: np.ndarray) -> None:
        """Make ``version`` known."""
        with self._lock:
            self._cache(version, phy2log)
            self.latest = max(self.latest, version)

    def _cache(self, version: int, phy2log: np.ndarray) -> np.ndarray:
        """Flat index [G, L*S] into load[L*E] for every slot of every GPU under ``version``."""
        s = self.spec
        flat = np.arange(s.num_layers)[:, None] * s.num_experts + np.asarray(phy2log, np.int64)
        idx = flat.reshape(s.num_layers, s.num_gpus, s.slots_per_gpu).transpose(1, 0, 2) \
            .reshape(s.num_gpus, -1).copy()
        self._slot_maps[version] = idx
        self._slot_maps.move_to_end(version)
        while len(self._slot_maps) > MAX_CACHED_VERSIONS:
            self._slot_maps.popitem(last=False)
        return idx

    def ingest(self, r: pb.LoadReport, now: float) -> IngestResult:
        """Validate and count one report (received at ``now``, unix seconds)."""
        s = self.spec
        if r.worker_rank >= s.num_gpus:
            return IngestResult(Ack.REJECTED, f"worker_rank: must be < {s.num_gpus} (GPUs of "
                                              f"{s.name!r}), got {r.worker_rank}")
        if r.WhichOneof("counts") == "expert_load":
            return self._ingest_logical(r, now)
        if r.plan_version == 0:
            return IngestResult(Ack.REJECTED, "plan_version: must be >= 1")
        t = r.slot_counts
        if len(t.shape) == 2 and t.shape[0] == s.num_layers and t.shape[1] == s.slots_per_gpu \
                and len(t.values) == s.num_layers * s.slots_per_gpu:   # the common, valid case
            counts = np.asarray(t.values, dtype=np.int64).reshape(s.num_layers, s.slots_per_gpu)
        else:
            try:  # the shared helper produces the error message naming the field
                counts = to_numpy(t, "slot_counts", shape=(s.num_layers, s.slots_per_gpu))
            except FieldError as exc:
                return IngestResult(Ack.REJECTED, str(exc))
        if counts.size and counts.min() < 0:
            return IngestResult(Ack.REJECTED, "slot_counts: must be non-negative")
        lag, stale = self._lag(r, now)
        if stale is not None:
            return stale
        key = (r.node, r.worker_rank, r.agent_epoch)
        with self._lock:
            if r.plan_version > self.latest:
                return IngestResult(Ack.REJECTED, f"plan_version: {r.plan_version} is from the "
                                                  f"future (latest is {self.latest})", lag)
            if r.plan_version in self._slot_maps:
                return self._accept(r, key, counts, now, lag)
        phy2log = self._lookup(s.name, r.plan_version)   # outside the lock: a store query
        if phy2log is None:
            return IngestResult(Ack.STALE, f"plan_version: {r.plan_version} is not stored", lag)
        with self._lock:
            self._cache(r.plan_version, phy2log)
            return self._accept(r, key, counts, now, lag)

    def _lag(self, r: pb.LoadReport, now: float) -> tuple[float, IngestResult | None]:
        """Seconds since the report's window_end (0 if unset), and a STALE result when that is
        older than the window."""
        end = r.window_end.seconds + r.window_end.nanos * 1e-9 if r.HasField("window_end") else 0.0
        lag = max(0.0, now - end) if end else 0.0
        window = self.spec.policy.window_seconds
        if end and lag > window:
            return lag, IngestResult(Ack.STALE, f"window_end: {lag:.1f} s old, older than the "
                                                f"{window:g} s window", lag)
        return lag, None

    def _ingest_logical(self, r: pb.LoadReport, now: float) -> IngestResult:
        """Validate and count a report of load per logical expert ``expert_load [L, E]``."""
        s = self.spec
        try:
            load = to_numpy(r.expert_load, "expert_load", shape=(s.num_layers, s.num_experts))
        except FieldError as exc:
            return IngestResult(Ack.REJECTED, str(exc))
        if not np.isfinite(load).all():
            return IngestResult(Ack.REJECTED, "expert_load: must be finite (no NaN or infinity)")
        if load.size and load.min() < 0:
            return IngestResult(Ack.REJECTED, "expert_load: must be non-negative")
        lag, stale = self._lag(r, now)
        if stale is not None:
            return stale
        with self._lock:
            if not self._first_count((r.node, r.worker_rank, r.agent_epoch), r.sequence):
                return IngestResult(Ack.DUPLICATE, f"sequence: {r.sequence} already counted", lag)
            bucket = self._bucket(now)
            if bucket.logical is None:
                bucket.logical = np.zeros((s.num_layers, s.num_experts))
            bucket.logical += load
            self.reports += 1
        return IngestResult(Ack.ACCEPTED, "", lag)

    def _first_count(self, key: tuple, sequence: int) -> bool:
        """Record ``sequence`` for ``key``; False when it was already counted (caller holds the
        lock)."""
        last = self._seen.get(key)
        if last is not None and sequence <= last:
            return False
        self._seen[key] = sequence
        self._seen.move_to_end(key)
        if len(self._seen) > MAX_SEQUENCES:
            self._seen.popitem(last=False)
        return True

    def _accept(self, r: pb.LoadReport, key: tuple, counts: np.ndarray, now: float,
                lag: float) -> IngestResult:
        """Dedupe and count (caller holds the lock)."""
        last = self._seen.get(key)
        if not self._first_count(key, r.sequence):
            return IngestResult(Ack.DUPLICATE, f"sequence: {r.sequence} already counted "
                                               f"(last {last})", lag)
        bucket = self._bucket(now)
        slots = bucket.slots.get(r.plan_version)
        if slots is None:
            s = self.spec
            slots = bucket.slots[r.plan_version] = np.zeros((s.num_gpus, s.num_layers,
                                                             s.slots_per_gpu))
        slots[r.worker_rank] += counts
        self.reports += 1
        return IngestResult(Ack.ACCEPTED, "", lag)

    def _bucket(self, now: float) -> _Bucket:
        width = self.bucket_seconds
        if not self._buckets or now >= self._buckets[-1].start + width:
            self._buckets.append(_Bucket(now - (now % width)))
        horizon = now - self.spec.policy.window_seconds - width
        while self._buckets and self._buckets[0].start < horizon:
            self._buckets.popleft()
        return self._buckets[-1]

    def view(self, now: float, in_force: int) -> WindowView:
        """The decayed window at ``now``: slot counts of each plan version mapped to experts;
        GPU loads from the counts taken under version ``in_force``."""
        s = self.spec
        half = s.policy.half_life_seconds
        totals: dict[int, np.ndarray] = {}
        logical = np.zeros((s.num_layers, s.num_experts))
        with self._lock:
            for b in self._buckets:
                age = now - (b.start + self.bucket_seconds / 2)
                if age > s.policy.window_seconds:
                    continue
                w = 2.0 ** (-max(age, 0.0) / half) if half > 0 else 1.0
                if b.logical is not None:
                    logical += w * b.logical
                for version, slots in b.slots.items():
                    if version in totals:
                        totals[version] += w * slots
                    else:
                        totals[version] = w * slots
            reports = self.reports
            maps = {v: self._slot_maps.get(v) for v in (*totals, in_force)}
        load = logical.ravel().copy()
        for version, slots in totals.items():
            idx = maps[version] if maps[version] is not None else self._slot_map(version)
            if idx is None:
                continue  # the plan is gone (placement re-created): its counts are void
            load += np.bincount(idx.ravel(), weights=slots.ravel(), minlength=load.size)
        gpu = totals[in_force].sum(axis=2).T if in_force in totals else \
            np.zeros((s.num_layers, s.num_gpus))
        if logical.any():
            idx = maps[in_force] if maps[in_force] is not None else self._slot_map(in_force)
            if idx is not None:
                gpu = gpu + _spread_over_replicas(logical.ravel(), idx, s.num_layers)
        return WindowView(load.reshape(s.num_layers, s.num_experts), gpu, reports, now)

    def _slot_map(self, version: int) -> np.ndarray | None:
        """The cached slot map of ``version``, fetched from the store on a miss (None when the
        plan is not stored)."""
        phy2log = self._lookup(self.spec.name, version)
        if phy2log is None:
            return None
        with self._lock:
            return self._cache(version, phy2log)


def _spread_over_replicas(logical: np.ndarray, idx: np.ndarray, num_layers: int) -> np.ndarray:
    """Per-GPU load [L, G] of logical load ``logical`` [L*E] under a slot map ``idx`` [G, L*S]
    (flat expert index of every slot): each expert's load split evenly over its replicas."""
    replicas = np.bincount(idx.ravel(), minlength=logical.size)
    per_slot = logical[idx] / np.maximum(replicas[idx], 1)
    return per_slot.reshape(idx.shape[0], num_layers, -1).sum(axis=2).T

