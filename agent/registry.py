"""The workers registered with this agent: their identity, channel and liveness."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.security import SecurityConfig

log = logging.getLogger(__name__)

WorkerKey = tuple[str, int]  # (placement, rank)


@dataclass
class WorkerHandle:
    """One registered worker. ``info`` is this agent's latest view of its WorkerInfo."""

    info: pb.WorkerInfo
    channel: grpc.Channel
    stub: pb_grpc.WorkerServiceStub
    missed_pulls: int = 0
    pulling: bool = False
    last_pull: float = 0.0       # time.time() of the last successful pull (0 = none yet)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self) -> WorkerKey:
        return self.info.placement, int(self.info.rank)


def worker_key(info: pb.WorkerInfo) -> WorkerKey:
    return info.placement, int(info.rank)


class WorkerRegistry:
    """Thread-safe map of registered workers.

    ``on_joined(info)`` runs when a worker registers for the first time or with anything new
    (address, world size, plan or prepared version: e.g. a restarted worker on an older plan);
    ``on_lost(info, reason)`` when it is dropped. Both run outside the registry's lock. Channels
    to the workers use ``security`` (TLS / mTLS client cert / bearer token).
    """

    def __init__(self, node: str, *, on_joined: Callable[[pb.WorkerInfo], None],
                 on_lost: Callable[[pb.WorkerInfo, str], None],
                 security: SecurityConfig | None = None):
        self.node = node
        self._security = security or SecurityConfig()
        self._on_joined = on_joined
        self._on_lost = on_lost
        self._workers: dict[WorkerKey, WorkerHandle] = {}
        self._lock = threading.Lock()

    def register(self, info: pb.WorkerInfo) -> WorkerHandle:
        """Add or refresh a worker; raises ``FieldError`` naming the bad field."""
        info = _validated(info, self.node)
        key = worker_key(info)
        old_channel = None
        with self._lock:
            handle = self._workers.get(key)
            changed = handle is None or any(
                getattr(handle.info, f) != getattr(info, f)
                for f in ("address", "world_size", "plan_version", "prepared_version"))
            if handle is not None and handle.info.address == info.address:
                handle.info.CopyFrom(info)         # same endpoint: keep its channel
                handle.missed_pulls = 0
                if not changed:
                    return handle
            else:
                if handle is not None:
                    old_channel = handle.channel
                channel = make_channel(info.address, self._security)
                handle = WorkerHandle(info=info, channel=channel,
                                      stub=pb_grpc.WorkerServiceStub(channel))
                self._workers[key] = handle
        if old_channel is not None:
            old_channel.close()
        log.info("worker %s rank %d registered at %s (plan v%d)", info.placement, info.rank,
                 info.address, info.plan_version)
        self._on_joined(_copy(info))
        return handle

    def lose(self, handle: WorkerHandle, reason: str) -> bool:
        """Drop ``handle`` (if it is still the registered one) and report it lost."""
        with self._lock:
            if self._workers.get(handle.key) is not handle:
                return False
            del self._workers[handle.key]
        handle.channel.close()
        log.warning("worker %s rank %d lost: %s", handle.info.placement, handle.info.rank, reason)
        self._on_lost(_copy(handle.info), reason)
        return True

    def handles(self, placement: str | None = None) -> list[WorkerHandle]:
        """Registered workers (of ``placement`` if given), ordered by (placement, rank)."""
        with self._lock:
            items = sorted(self._workers.items())
        return [h for k, h in items if placement is None or k[0] == placement]

    def infos(self) -> list[pb.WorkerInfo]:
        """Copies of every registered worker's latest WorkerInfo."""
        return [_copy(h.info) for h in self.handles()]

    def update(self, handle: WorkerHandle, *, plan_version: int | None = None,
               prepared_version: int | None = None) -> pb.WorkerInfo:
        """Record what a worker reported about its plan versions; returns a copy of its info."""
        with self._lock:
            if plan_version is not None:
                handle.info.plan_version = int(plan_version)
            if prepared_version is not None:
                handle.info.prepared_version = int(prepared_version)
            return _copy(handle.info)

    def __len__(self) -> int:
        with self._lock:
            return len(self._workers)

    def close(self) -> None:
        with self._lock:
            handles, self._workers = list(self._workers.values()), {}
        for h in handles:
            h.channel.close()


def _copy(info: pb.WorkerInfo) -> pb.WorkerInfo:
    out = pb.WorkerInfo()
    out.CopyFrom(info)
    return out


def _validated(info: pb.WorkerInfo, node: str) -> pb.WorkerInfo:
    info = _copy(info)
    if info.node and info.node != node:
        raise FieldError("worker.node", f"this agent serves node {node!r}, not {info.node!r}")
    info.node = node
    if not info.placement:
        raise FieldError("worker.placement", "required")
    if not info.address:
        raise FieldError("worker.address", "required (unix:/path or host:port of WorkerService)")
    if info.world_size == 0:
        raise FieldError("worker.world_size", "must be >= 1")
    if info.rank >= info.world_size:
        raise FieldError("worker.rank", f"{info.rank} is not below world_size {info.world_size}")
    return info
