"""``LoopThread``: an asyncio event loop on a thread of its own, for ``grpc.aio`` servers driven
from synchronous code, that stops with nothing left pending on it.

A ``grpc.aio`` server's ``stop()`` returns once the gRPC core has ended every call, but the
Python side of those calls still needs the loop for a few iterations: the per-call tasks wake up
from their handler's end, and a streaming handler interrupted at a ``yield`` (the call cancelled
while its response was being written) is an open asynchronous generator whose clean-up the loop
schedules as a new task (``aclose()``) when it is collected. Stopping and closing the loop right
away destroys those tasks while pending ("Task was destroyed but it is pending") and skips the
generators' ``finally`` blocks. ``close()`` drains the loop first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
DRAIN_SECONDS = 5.0     # for the loop's remaining tasks to end by themselves before they are cancelled


class LoopThread:
    """``start()``, ``run(coro)`` from other threads, ``close()`` once the servers on it stopped."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self, timeout: float = DRAIN_SECONDS) -> None:
        """Drain the loop (``drain``), then stop it, join its thread and close it. Idempotent."""
        if self._thread.is_alive():
            cancelled = self.run(drain(timeout))
            if cancelled:
                log.warning("%s: %d task(s) still running %g s after the servers stopped were "
                            "cancelled: %s", self._thread.name, len(cancelled), timeout,
                            ", ".join(sorted(t.get_name() for t in cancelled)))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()


async def drain(timeout: float) -> list[asyncio.Task]:
    """(On the loop.) Wait up to ``timeout`` s for every other task of the loop to end, those
    started meanwhile included; cancel what is left; then close the asynchronous generators still
    open (their ``finally`` blocks run) and drain what that started. Returns the tasks that had
    to be cancelled."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    cancelled: list[asyncio.Task] = []
    generators_closed = False
    while True:
        await asyncio.sleep(0)      # let the callbacks already scheduled run (they may start tasks)
        others = asyncio.all_tasks() - {asyncio.current_task(), *cancelled}
        if others:
            _, late = await asyncio.wait(others, timeout=max(deadline - loop.time(), 0))
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=timeout)
            cancelled += late
        elif generators_closed:
            return cancelled
        else:
            await loop.shutdown_asyncgens()
            generators_closed = True
