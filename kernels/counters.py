"""Device-side per-slot token counters, read without stalling the stream.

The layer adds each step's per-slot counts on the device (no host sync). A reader calls
:meth:`SlotCounters.request`, which queues on the current stream an asynchronous copy of the
counts into a pinned host buffer followed by a reset, and records a CUDA event; the stream
runs on. :meth:`SlotCounters.poll` returns the counts once the event has completed (None
before), :meth:`SlotCounters.read` waits for that event only (not for later work).
On CPU the same calls complete at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SlotCounters"]


class SlotCounters:
    """Token counts [S] per local physical slot (int64), accumulated on ``device``."""

    def __init__(self, num_slots: int, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.counts = torch.zeros(num_slots, dtype=torch.int64, device=self.device)
        cuda = self.device.type == "cuda"
        self._host = torch.zeros(num_slots, dtype=torch.int64, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None
        self._pending = False

    @property
    def num_slots(self) -> int:
        return self.counts.shape[0]

    def add(self, tokens_per_slot: Tensor) -> None:
        """Add one step's counts [S] (any integer dtype, on the counters' device)."""
        self.counts += tokens_per_slot

    def request(self, reset: bool = True) -> None:
        """Queue a copy of the counts to the host (and a reset of the device counts)."""
        self._host.copy_(self.counts, non_blocking=True)
        if reset:
            self.counts.zero_()
        if self._event is not None:
            self._event.record()
        self._pending = True

    def poll(self) -> Tensor | None:
        """The counts of the last :meth:`request` (a host LongTensor [S]) once copied, else None."""
        if not self._pending:
            raise RuntimeError("SlotCounters.poll called without a pending request()")
        if self._event is not None and not self._event.query():
            return None
        self._pending = False
        return self._host.clone()

    def read(self, reset: bool = True) -> Tensor:
        """Request and wait for the counts: host LongTensor [S]."""
        self.request(reset)
        if self._event is not None:
            self._event.synchronize()
        return self.poll()
