"""The step-boundary protocol of a hot-swap: makes every rank start the transfer of a plan,
and switch to it, at the SAME step, whatever order the prepare/commit/abort requests (gRPC
calls) reach the ranks in."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from expertplane.kernels.hotswap.engine import HotSwapEngine
from expertplane.kernels.hotswap.staging import Staging, SwapStats
from expertplane.kernels.hotswap.transfers import SwapError
from expertplane.kernels.moe import LayerPlacement

__all__ = ["SwapCoordinator"]


@dataclass
class _Request:
    """A prepare request of this rank; ``planned``: its staging, worked out ahead on the
    request's thread (None until then, or if that failed)."""

    version: int
    placements: list[LayerPlacement]
    planned: Staging | None = None


class SwapCoordinator:
    """Turns prepare/commit/abort requests that reach ranks at different times into
    operations every rank performs at the same step.

    Request side (any thread, e.g. gRPC handlers): :meth:`prepare`, :meth:`commit`,
    :meth:`abort` block until done or ``timeout``. Step side (the serving loop, between two
    forward passes): :meth:`step_boundary` runs one MIN all_reduce of
    ``[p, -p, c, -c, -stop, -a]`` over ``group``: the transfer of version ``p`` starts when
    every rank has a prepare request for ``p``, and its paced chunks are issued one step's
    worth per boundary on every rank (:meth:`HotSwapEngine.pump`); the switch to ``c`` happens
    when every rank has a commit request for ``c`` AND has finished staging it; all ranks stop
    together as soon as one asks to. An abort drops the staging on its own rank at the next
    boundary, unless sends or receives of that rank are still to be issued: then ``a`` carries
    it and every rank drops it at the same boundary (a peer's pending prepare then fails).
    Staging copies that failed on a rank (:meth:`HotSwapEngine.staging_error`) ride ``a`` too:
    every rank drops that version at the same boundary and keeps serving the plan in force.
    At the boundaries with no swap starting or dropped and no prepare request pending, each
    rank compacts its layers on its own (:meth:`HotSwapEngine.compact`).
    """

    def __init__(self, engine: HotSwapEngine, version: int,
                 group: dist.ProcessGroup | None = None) -> None:
        self.engine = engine
        self.group = group
        self.version = version  # in force
        self.last_stats: SwapStats | None = None
        self.stop_requested = False
        self._cond = threading.Condition()
        self._prepare: _Request | None = None
        self._commit = 0
        self._abort = 0
        self._failed: dict[int, str] = {}
        self._dropped_by_peer: set[int] = set()
        self._ready_seen = 0
        self._closed = ""
        self._sync_device = engine.device

    # -- request side

    @property
    def prepared_version(self) -> int:
        with self._cond:
            return self._ready_seen if self._ready_seen == self.engine.staged_version else 0

    def prepare(self, version: int, placements: Sequence[LayerPlacement],
                timeout: float) -> SwapStats | None:
        """Ask to stage ``version``; blocks until staged on this rank. Returns the staging
        stats (None if already staged or in force). Raises SwapError (state) or TimeoutError.
        A new request is planned here (:meth:`HotSwapEngine.plan`), on the caller's thread, so
        the boundary that starts it only launches the first step's copies."""
        with self._cond:
            self._check_open()
            if version == self.version:
                return None
            request = self._request_prepare(version, placements)
        if request is not None:
            try:
                planned = self.engine.plan(version, request.placements)
            except SwapError:
                planned = None   # the boundary that starts it plans again and reports the error
            with self._cond:
                if self._prepare is request:
                    request.planned = planned
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._ready_seen == version or version in self._failed, timeout)
            if version in self._failed:
                raise SwapError(self._failed[version])
            if not ok:
                if self._prepare is not None and self._prepare.version == version:
                    self._prepare = None  # never started: no other rank can have started it
                raise TimeoutError(f"version {version}: not staged within {timeout:.1f}s "
                                   "(not every rank was asked to prepare it?)")
            return self.last_stats if self.last_stats and self.last_stats.version == version \
                else None

    def _request_prepare(self, version: int,
                         placements: Sequence[LayerPlacement]) -> _Request | None:
        """Check a prepare request for a version not in force against the state (under the
        lock) and record it; returns the new request, or None when ``version`` is already
        requested or staged."""
        if version < self.version:
            raise SwapError(f"version: {version} is older than the plan in force "
                            f"({self.version})")
        staged = self.engine.staged_version
        if staged and staged != version:
            raise SwapError(f"version: {staged} is staged; commit or abort it first")
        if staged or (self._prepare is not None and self._prepare.version == version):
            return None
        if self._prepare is not None:
            raise SwapError(f"version: {self._prepare.version} is being prepared")
        self._failed.pop(version, None)
        self._prepare = _Request(version, list(placements))
        return self._prepare

    def commit(self, version: int, timeout: float) -> None:
        """Ask to switch to ``version`` (staged or being staged); blocks until switched."""
        with self._cond:
            if version == self.version:
                return
            self._check_open()
            pending = self._prepare.version if self._prepare else 0
            if version not in (self.engine.staged_version, pending):
                raise SwapError(f"version: {version} is not prepared on this rank")
            self._commit = version
            ok = self._cond.wait_for(lambda: self.version == version or version in self._failed,
                                     timeout)
            if version in self._failed:
                raise SwapError(self._failed[version])
            if not ok:
                raise TimeoutError(f"version {version}: not committed within {timeout:.1f}s "
                                   "(not every rank was asked to commit it?)")

    def abort(self, version: int, timeout: float) -> bool:
        """Drop ``version`` if staged or pending; True if there was something to drop."""
        with self._cond:
            if version == self.version:
                raise SwapError(f"version: {version} is already in force")
            if self._closed:
                return False  # serving has ended: nothing will ever be switched to
            if version in self._dropped_by_peer:
                self._dropped_by_peer.discard(version)
                return True
            known = version in (self.engine.staged_version,
                                self._prepare.version if self._prepare else 0)
            if not known:
                return False
            self._abort = version
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._abort != version, timeout):
                raise TimeoutError(f"version {version}: abort not done within {timeout:.1f}s")
            return True

    def request_stop(self) -> None:
        """Ask every rank to stop at the next step boundary (safe from a signal handler)."""
        self.stop_requested = True

    def close(self, reason: str) -> None:
        """The serving loop has ended (stopped, or a collective failed because a peer died): fail
        every pending or staged prepare and commit with ``reason`` and wake their waiters, so no
        request thread waits for a step boundary that will never come. Later requests fail too."""
        with self._cond:
            if self._closed:
                return
            self._closed = reason
            for v in (self._prepare.version if self._prepare else 0, self._commit,
                      self.engine.staged_version):
                if v:
                    self._failed[v] = reason
            self._prepare, self._commit = None, 0
            self._cond.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise SwapError(f"worker: serving has ended ({self._closed})")

    # -- step side

    def step_boundary(self) -> bool:
        """Run between two forward passes on every rank. Returns False when all must stop."""
        with self._cond:
            a = self._apply_abort()
            error = self.engine.staging_error()
            a = a or (self.engine.staged_version if error else 0)
            prepare = self._prepare if self._prepare and not self.engine.staged_version else None
            p = prepare.version if prepare else 0
            ready = self._poll_ready()
            c = self._commit if self._commit and ready == self._commit else 0
        flags = torch.tensor([p, -p, c, -c, -int(self.stop_requested), -a], dtype=torch.int64,
                             device=self._sync_device)
        if self.group is not None or dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        pmin, pmax, cmin, cmax, stop, amax = flags.tolist()
        with self._cond:
            if amax < 0 and -amax == self.engine.staged_version:
                self._drop_everywhere(-amax, error)
            elif pmin > 0 and pmin == -pmax:
                self._start(prepare)
            else:
                self.engine.pump()
                if self._prepare is None:   # a prepare is planned against today's layers
                    self.engine.compact()
            if cmin > 0 and cmin == -cmax:
                self._switch(cmin)
            self._poll_ready()
            self._cond.notify_all()
        return stop == 0

    def _start(self, prepare: _Request) -> None:
        if self._prepare is prepare:
            self._prepare = None
        try:
            self.engine.prepare(prepare.version, prepare.placements, prepare.planned)
        except SwapError as exc:
            self._failed[prepare.version] = str(exc)

    def _switch(self, version: int) -> None:
        self.last_stats = self.engine.commit()
        self.version = version
        self._commit = 0

    def _poll_ready(self) -> int:
        """Staged version whose copies are complete on this rank (0 if none)."""
        staged = self.engine.staged_version
        if not staged:
            return 0
        try:
            ready = self.engine.ready()
        except SwapError:
            return 0   # its copies failed: the next boundary's all_reduce drops it everywhere
        if ready and self._ready_seen != staged:
            self._ready_seen = staged
            self.last_stats = self.engine.staged_stats()
        return staged if ready else 0

    def _drop_everywhere(self, version: int, error: str | None) -> None:
        """Drop ``version`` on this rank at the boundary every rank drops it: an abort that
        arrived while transfers were still to be issued, or copies that failed (``error``:
        this rank's, seen before the all_reduce), here or on a peer."""
        self.engine.abort()
        if self._abort == version:
            self._forget(version, f"version {version}: aborted")
        elif error is not None:
            self._forget(version, error)
        else:
            self._dropped_by_peer.add(version)
            self._forget(version, f"version {version}: aborted on another rank while staging "
                                  "(an abort request, or copies that failed there)")

    def _apply_abort(self) -> int:
        """Apply this rank's abort request before the boundary's all_reduce; returns the version
        every rank must drop at this boundary (see :meth:`_drop_everywhere`), else 0."""
        v = self._abort
        if not v:
            return 0
        if self.engine.staged_version == v:
            if self.engine.has_unissued_transfers():
                return v
            self.engine.abort()
        self._forget(v, f"version {v}: aborted")
        return 0

    def _forget(self, version: int, reason: str) -> None:
        """Clear the requests and readiness this rank holds for the dropped ``version``; its
        pending prepare or commit waiters fail with ``reason``."""
        self._failed[version] = reason
        if self._prepare is not None and self._prepare.version == version:
            self._prepare = None
        if self._commit == version:
            self._commit = 0
        if self._ready_seen == version:
            self._ready_seen = 0
        if self._abort == version:
            self._abort = 0

