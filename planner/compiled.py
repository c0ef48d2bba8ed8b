"""Whether the planner's compiled (numba) kernels can run now, and building them in the background
when they cannot.

numba compiles a kernel on its first call unless its on-disk cache holds it (``expertplane warm``
and ``make setup`` fill the cache). Compiling every kernel takes 40-300 s on 2 CPUs, so a process
that finds the cache empty or stale does not compile on the caller's time: ``use_compiled()``
starts ``python -m expertplane.planner.warm`` in a separate process (it fills the cache; the
process outlives this one if need be) and answers False until that process has finished. The
algorithms then serve the call with their numpy paths (``planner.numpy_paths``,
``planner.interpreted``: same algorithm, same results), and switch to the compiled kernels,
loaded from the cache, at the first call after the build. Work without a numpy path
(movement-aware re-planning of deepseek and balanced) calls ``wait_compiled``, which logs what
it waits for and blocks until the build has cached what that work needs.

``$EXPERTPLANE_PLANNER_KERNELS`` chooses: ``auto`` (the default, above); ``numba``: always the
compiled kernels, compiled in this process on first use if not cached; ``numpy``: the numpy
paths wherever they exist (nothing started in the background; work without one compiles in
this process).
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

MODE_ENV = "EXPERTPLANE_PLANNER_KERNELS"
MODES = ("auto", "numba", "numpy")


_forced: str | None = None


def mode() -> str:
    """The mode ``forced_mode`` set, else ``$EXPERTPLANE_PLANNER_KERNELS`` (default ``auto``);
    raises ValueError naming the variable if unknown."""
    if _forced is not None:
        return _forced
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {list(MODES)}, got {value!r}")
    return value


@contextmanager
def forced_mode(value: str) -> Iterator[None]:
    """Use mode ``value`` (one of ``MODES``) in this process inside the block (the builds use
    ``numba``)."""
    global _forced
    if value not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {value!r}")
    before, _forced = _forced, value
    try:
        yield
    finally:
        _forced = before


def kernel_modules() -> list:
    """The planner's modules (its subpackages excluded: the pipeline partitioner's kernels are
    not placement kernels), imported."""
    import expertplane.planner as package

    return [importlib.import_module(f"{package.__name__}.{info.name}")
            for info in pkgutil.iter_modules(package.__path__) if not info.ispkg]


def kernels() -> list:
    """Every cached numba dispatcher of ``kernel_modules()`` (``inline="always"`` ones
    excluded: numba inlines them into their callers and never compiles or caches them alone)."""
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    found = {}
    for module in kernel_modules():
        for obj in vars(module).values():
            if (isinstance(obj, Dispatcher) and not isinstance(obj._cache, NullCache)
                    and obj.targetoptions.get("inline", "never") != "always"):
                found[id(obj)] = obj
    return list(found.values())


def is_cached(kernel) -> bool:
    """True when numba's cache holds a compiled version of ``kernel`` (a dispatcher) that this
    process can load: an index entry for these sources, this CPU and this numba version."""
    cache = kernel._cache
    entries = cache._cache_file._load_index()   # {} when missing, stale or of another version
    codegen = kernel.targetctx.codegen()
    return any(cache._index_key(key[0], codegen) == key for key in entries)


def all_cached() -> bool:
    """True when every placement kernel is in numba's cache (nothing would compile)."""
    return all(is_cached(k) for k in kernels())


class BackgroundBuild:
    """The build of the kernels in another process: started once per process, polled.

    ``command``: the argv that fills numba's cache (default: ``python -m
    expertplane.planner.warm``). ``state()``: ``"ready"`` (compiled kernels usable now),
    ``"building"``, or ``"failed"`` (the build process exited non-zero; compiled kernels are
    then used anyway and compile on first use, as without this class)."""

    def __init__(self, command: list[str] | None = None):
        self.command = command or [sys.executable, "-m", "expertplane.planner.warm"]
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._started = 0.0
        self._state: str | None = None   # None: not checked yet

    def state(self) -> str:
        """Check the cache on the first call (start the build if anything is missing), then
        poll the build process."""
        with self._lock:
            if self._state is None:
                self._state = "ready" if self._cached() else self._start()
            elif self._state == "building":
                self._poll()
            return self._state

    def wait(self, what: str, step: str | None = None, every: float = 30.0) -> None:
        """Block until the build is over, or has printed the line of ``step`` (its kernels are
        then cached), logging that ``what`` waits, then every ``every`` seconds how far the
        build got."""
        if self.state() != "building" or self._step_done(step):
            return
        log.warning("%s needs the planner's compiled kernels: waiting for their build "
                    "(pid %d, running for %.0f s; one-off, later processes load them from "
                    "numba's cache)", what, self._proc.pid, time.monotonic() - self._started)
        waited = 0.0
        while not self._step_done(step):
            try:
                self._proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                waited += 1.0
            if waited >= every:
                waited = 0.0
                done = self._output().strip().splitlines()
                log.warning("still building the planner's kernels: %.0f s so far, last step "
                            "done: %s", time.monotonic() - self._started,
                            done[-1] if done else "none yet")
        self.state()

    def _step_done(self, step: str | None) -> bool:
        return step is not None and any(line.partition(" ")[2].startswith(f"{step}:")
                                        for line in self._output().splitlines())

    def _output(self) -> str:
        """What the build printed so far (read without moving the offset it writes at)."""
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @staticmethod
    def _cached() -> bool:
        try:
            return all_cached()
        except Exception:   # numba's cache internals changed: fall back to compiling on use
            log.exception("could not read numba's cache index; the planner's kernels compile "
                          "on first use")
            return True

    def _start(self) -> str:
        self._log = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                          stdout=self._log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        except OSError as exc:
            log.warning("could not start the background build of the planner's kernels (%s); "
                        "they compile on first use", exc)
            return "failed"
        self._started = time.monotonic()
        log.warning("the planner's compiled kernels are not in numba's cache: building them "
                    "in the background (pid %d, 40-300 s of one CPU, once); until then plans "
                    "are computed with the numpy paths (same results)", self._proc.pid)
        return "building"

    def _poll(self) -> None:
        code = self._proc.poll()
        if code is None:
            return
        seconds = time.monotonic() - self._started
        if code == 0:
            log.info("planner kernels built in the background in %.0f s: using them", seconds)
            self._state = "ready"
            return
        tail = self._output()[-2000:]
        log.warning("the background build of the planner's kernels failed (exit %d after "
                    "%.0f s); they compile on first use instead:\n%s", code, seconds, tail)
        self._state = "failed"


build = BackgroundBuild()   # this process's


def use_compiled() -> bool:
    """True when the caller should run the compiled kernels now, False when it should take its
    numpy path (see the module docstring). Never blocks on a compile."""
    chosen = mode()
    if chosen != "auto":
        return chosen == "numba"
    return build.state() != "building"


def wait_compiled(what: str, step: str | None = None) -> None:
    """Before work that has no numpy path: in ``auto`` mode, wait for a background build in
    progress (logging ``what`` waits) until it ends or has done ``step`` (a
    ``planner.warm.step_label``: the kernels that work needs are then cached); otherwise
    return at once."""
    if mode() == "auto":
        build.wait(what, step)
