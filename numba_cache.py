"""numba's on-disk cache of the planner's compiled kernels: seeding it, and saying so when a
kernel has to be compiled.

The planner's kernels are ``@njit(cache=True)``: compiled on first use, then loaded from the
cache (numba's ``__pycache__`` next to the sources, or ``$NUMBA_CACHE_DIR``). ``expertplane
warm`` fills it ahead of time (``make setup`` and the Docker build run it). An image whose
runtime cache is an empty ``/tmp`` folder sets ``$EXPERTPLANE_NUMBA_CACHE_SEED`` to the folder
warmed at build time; ``seed_cache`` copies it into ``$NUMBA_CACHE_DIR`` before anything is
compiled.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

SEED_ENV = "EXPERTPLANE_NUMBA_CACHE_SEED"
COMPILE_NOTICE = ("compiling the planner's numba kernels (no cached copy for this machine yet; "
                  "this takes 10-100 s on 2 busy CPUs, once: `expertplane warm` or `make setup` "
                  "does it ahead of time)")


def seed_cache() -> int:
    """Copy the warmed cache ``$EXPERTPLANE_NUMBA_CACHE_SEED`` into ``$NUMBA_CACHE_DIR``, keeping
    files already there; returns the number of files copied (0 when either is unset)."""
    seed, target = os.environ.get(SEED_ENV), os.environ.get("NUMBA_CACHE_DIR")
    if not seed or not target or not Path(seed).is_dir():
        return 0
    copied = 0
    for src in Path(seed).rglob("*"):
        dst = Path(target) / src.relative_to(seed)
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            copied += 1
    return copied


class CompileNotice:
    """Calls ``emit(COMPILE_NOTICE)`` once, at the first kernel of this package that numba
    compiles instead of loading from its cache (a cache hit fires no compile event).
    ``announce_compiles`` registers the process's one notice with numba."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit
        self._lock = threading.Lock()
        self.fired = False

    def on_compile(self, module: str) -> None:
        if not module.startswith("expertplane."):
            return
        with self._lock:
            if self.fired:
                return
            self.fired = True
        self.emit(COMPILE_NOTICE)


_notice: CompileNotice | None = None


def announce_compiles(emit: Callable[[str], None]) -> CompileNotice:
    """Have ``emit`` called once when a kernel of this package is compiled in this process
    (registered with numba's ``numba:compile`` event once; a later call replaces ``emit``)."""
    global _notice
    if _notice is None:
        from numba.core import event

        notice = CompileNotice(emit)

        class _Listener(event.Listener):
            def on_start(self, ev):
                notice.on_compile(ev.data["dispatcher"].py_func.__module__)

            def on_end(self, ev):
                pass

        event.register("numba:compile", _Listener())
        _notice = notice
    _notice.emit = emit
    return _notice
