"""The SGLang recorder directory as an inbox: each dump file is read once, then removed.

SGLang writes ``expert_distribution_recorder_*.pt`` files (``engines.sglang_dumps``) into the
directory it shares with the agent. ``DumpInbox`` hands out the files that appeared since the
agent started and were not consumed yet, oldest first. A consumed file is deleted; one that
cannot be deleted (a read-only mount) is remembered and never handed out again. Files already
there when the inbox opens are older windows of unknown span: they are left alone and not read.
A file that cannot be read (SGLang may still be writing it: ``torch.save`` is not atomic) is
handed out again at the next window, and given up after ``read_attempts`` tries.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from expertplane.engines.sglang_dumps import dump_files, dump_loads
from expertplane.errors import FieldError

log = logging.getLogger(__name__)


class DumpInbox:
    """New dump files of ``directory``; ``read_attempts``: reads of an unreadable file before it
    is given up (logged, left on disk, never read again)."""

    def __init__(self, directory, *, read_attempts: int = 3):
        if read_attempts < 1:
            raise FieldError("read_attempts", f"must be >= 1, got {read_attempts}")
        self.directory = Path(directory)
        self._read_attempts = read_attempts
        self._seen: set[str] = {p.name for p in dump_files(self.directory)}
        self._failures: dict[str, int] = {}
        if self._seen:
            log.info("sglang: %d dump(s) already in %s are older than this agent: not read",
                     len(self._seen), self.directory)

    def pending(self) -> list[Path]:
        """Dump files not consumed yet, oldest first."""
        files = dump_files(self.directory)
        if self.directory.is_dir():                # forget files gone from the directory
            self._seen &= {p.name for p in files}
        return [p for p in files if p.name not in self._seen]

    def wait(self, timeout: float, stopping: threading.Event, poll: float = 0.05) -> list[Path]:
        """``pending()`` once it is non-empty, or after ``timeout`` seconds (then possibly
        empty), or when ``stopping`` is set."""
        files = self.pending()
        waited = 0.0
        while not files and waited < timeout and not stopping.wait(poll):
            waited += poll
            files = self.pending()
        return files

    def read(self, files: list[Path], num_logical: int | None = None) -> np.ndarray | None:
        """The summed logical counts ``[num_hidden_layers, E]`` float64 of the readable
        ``files`` (consumed), or None when none was readable. Unreadable files stay pending until
        their attempts run out; files whose shape differs from the first are consumed and
        logged, not summed."""
        total = None
        for path in files:
            try:
                loads = dump_loads(path, num_logical)
            except FieldError as exc:
                self._failed(path, exc)
                continue
            except FileNotFoundError:           # removed by someone else meanwhile
                self._seen.add(path.name)
                continue
            if total is not None and loads.shape != total.shape:
                log.error("sglang: %s has shape %s, the window's other dumps %s: not counted",
                          path.name, list(loads.shape), list(total.shape))
            else:
                total = loads if total is None else total + loads
            self.consume(path)
        return total

    def consume(self, path: Path) -> None:
        """Never hand ``path`` out again: delete it, or remember it when it cannot be deleted."""
        self._seen.add(path.name)
        self._failures.pop(path.name, None)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("sglang: cannot delete consumed dump %s (%s); it is skipped from now on",
                        path, exc)

    def _failed(self, path: Path, exc: FieldError) -> None:
        n = self._failures.get(path.name, 0) + 1
        self._failures[path.name] = n
        if n < self._read_attempts:
            log.info("sglang: %s not readable yet (try %d of %d): %s", path.name, n,
                     self._read_attempts, exc)
            return
        self._seen.add(path.name)
        self._failures.pop(path.name, None)
        log.error("sglang: giving up on dump %s after %d reads (left in place, not counted): %s",
                  path, n, exc)

