"""The rebalance policy: is a candidate plan worth its migration now?

Pure decision logic (no I/O). Rules, in order, for a candidate with relative gain
``g = (current - predicted) / current`` (mean per-layer balance, max GPU load / mean GPU load):

1. ``force`` -> rebalance.
2. mode ``off`` -> never; mode ``manual`` -> only on a manual trigger.
3. cooldown: no rebalance within ``cooldown_seconds`` of the previous one.
4. threshold with hysteresis: ``g >= threshold`` when armed, ``g >= threshold + hysteresis``
   after a rebalance until the gain has fallen below ``threshold`` once (re-arming).
5. ``move_budget_bytes`` (if > 0) caps the bytes one rollout may move.
6. pays for the bytes: ``g >= min_gain_per_gib * bytes_moved / 2**30``.

``candidate_for`` computes what rule 4 judges cheaply: the movement-aware re-plan (the costly part:
seconds per plan at 320 GPUs) only once a fresh plan gains what rule 4 asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertplane.controller.planning import Candidate, compute_candidate
from expertplane.controller.spec import PlacementSpec, PolicySpec

GIB = float(2 ** 30)


@dataclass
class PolicyState:
    """Per-placement memory of the policy: hysteresis arming and the last rebalance (unix s)."""

    armed: bool = True
    last_rebalance: float | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome with its numbers (balances are means over layers)."""

    rebalance: bool
    reason: str
    current_balance: float
    predicted_balance: float
    gain: float
    slots_moved: int
    bytes_moved: int

    @classmethod
    def about(cls, candidate: Candidate, rebalance: bool, reason: str) -> Decision:
        """The decision ``rebalance`` (for ``reason``) with ``candidate``'s numbers."""
        return cls(rebalance, reason, float(np.mean(candidate.current_balance)),
                   float(np.mean(candidate.predicted_balance)), candidate.gain,
                   candidate.slots_moved, candidate.bytes_moved)


def required_gain(policy: PolicySpec, state: PolicyState) -> float:
    """The relative gain rule 4 asks now: the threshold, plus the hysteresis until re-armed."""
    return policy.threshold + (0.0 if state.armed else policy.hysteresis)


def candidate_for(spec: PlacementSpec, load: np.ndarray | None, previous: np.ndarray,
              state: PolicyState, *, manual: bool = False, force: bool = False) -> Candidate:
    """The candidate to judge against the plan in force ``previous`` [L, R] on ``load`` [L, E].

    Automatic decisions first plan afresh: a fresh plan that gains less than ``required_gain``
    is returned as it is (rule 4 turns it down; a movement-aware plan, within 2% of a fresh
    plan's balance, gains no more), so the movement-aware re-plan runs only when it may pass;
    it starts from that fresh plan and re-plans only the layers that drifted from it
    (``planner.movement``). Manual and forced decisions get the movement-aware candidate
    directly."""
    if manual or force:
        return compute_candidate(spec, load, previous)
    fresh = compute_candidate(spec, load, previous, movement_aware=False)
    if fresh.gain < required_gain(spec.policy, state):
        return fresh
    return compute_candidate(spec, load, previous, fresh=fresh.phy2log)


def decide(policy: PolicySpec, candidate: Candidate, state: PolicyState, now: float, *,
           manual: bool = False, force: bool = False) -> Decision:
    """Apply the rules above; does not change ``state`` (see ``record``)."""
    gain = candidate.gain

    def out(rebalance: bool, reason: str) -> Decision:
        return Decision.about(candidate, rebalance, reason)

    if force:
        return out(True, "forced")
    if policy.mode == "off":
        return out(False, "policy mode is off")
    if policy.mode == "manual" and not manual:
        return out(False, "policy mode is manual: waiting for a trigger")
    if state.last_rebalance is not None and now - state.last_rebalance < policy.cooldown_seconds:
        left = policy.cooldown_seconds - (now - state.last_rebalance)
        return out(False, f"cooldown: {left:.0f} s left")
    required = required_gain(policy, state)
    if gain <= 0 or gain < required:
        return out(False, f"gain {gain:.4f} below {'threshold' if state.armed else 'threshold + hysteresis'} "
                          f"{required:.4f}")
    if policy.move_budget_bytes and candidate.bytes_moved > policy.move_budget_bytes:
        return out(False, f"moves {candidate.bytes_moved} bytes, over the budget of "
                          f"{policy.move_budget_bytes}")
    needed = policy.min_gain_per_gib * candidate.bytes_moved / GIB
    if gain < needed:
        return out(False, f"gain {gain:.4f} does not pay for {candidate.bytes_moved / GIB:.3f} GiB "
                          f"(needs {needed:.4f})")
    return out(True, "manual trigger" if manual else "gain above threshold")


def record(state: PolicyState, decision: Decision, policy: PolicySpec, now: float,
           *, rolled_out: bool) -> None:
    """Update the hysteresis and cooldown memory after a decision (and its rollout, if any)."""
    if rolled_out:
        state.armed = False
        state.last_rebalance = now
    elif decision.gain < policy.threshold:
        state.armed = True
