"""What the demo observes over time: typed samples and events, filled by polling the controller."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One poll of the controller.

    ``t``: seconds since the demo started. ``balance``: [L] observed max/mean GPU load of the load
    window under the plan in force. ``control``: [L] the same window's balance under the initial
    plan (what the cluster would show had it never rebalanced). ``predicted``: [L] balance a fresh
    plan would reach on this window. ``gpu_load``: [L, G] tokens per GPU in the window.
    """

    t: float
    plan_version: int
    balance: np.ndarray
    control: np.ndarray
    predicted: np.ndarray
    gpu_load: np.ndarray


@dataclass(frozen=True)
class RolloutEvent:
    """A finished rollout as recorded by the controller (seconds for prepare/commit phases)."""

    t: float
    from_version: int
    to_version: int
    state: str
    slots_moved: int
    bytes_moved: int
    gain: float
    prepare_seconds: float
    commit_seconds: float


@dataclass
class Timeline:
    samples: list[Sample] = field(default_factory=list)
    rollouts: list[RolloutEvent] = field(default_factory=list)
    steps: int = 0            # model steps, summed over ranks
    failed_steps: int = 0
    tokens_per_step: int = 0  # per rank and step

    @property
    def tokens(self) -> int:
        """Tokens routed so far over all ranks."""
        return self.steps * self.tokens_per_step

    def mean_balance(self, attr: str, settle: float = 0.0) -> float:
        """Layer-mean of ``attr`` (balance/control) averaged over the samples taken at least
        ``settle`` seconds after the first sample (the first load to reach the controller)."""
        if not self.samples:
            return float("nan")
        start = self.samples[0].t + settle
        values = [float(np.mean(getattr(s, attr))) for s in self.samples if s.t >= start]
        return float(np.mean(values)) if values else float("nan")
