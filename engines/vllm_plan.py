"""The map vLLM's EPLB moves to: the plan in force, checked against vLLM's own shapes.

Pure functions (numpy in, numpy out), the same on every rank given the same inputs, so ranks
that received the same plan decide the same map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlanChoice:
    """What the policy returns: ``phy2log`` [L, R] int64 to move to, or None for vLLM's current
    map unchanged (zero moves); ``reason`` says why in one line; ``version`` of the plan used
    (0 when none)."""

    phy2log: np.ndarray | None
    reason: str
    version: int = 0


def choose_map(plan: tuple[int, np.ndarray] | None, old: np.ndarray, num_logical: int,
               pinned: int, missing: str = "no plan file") -> PlanChoice:
    """The map to move to, from ``plan`` = (version, phy2log [L, R]) or None.

    ``old``: vLLM's current physical-to-logical map [L, R] (MoE layers x physical slots);
    ``num_logical``: logical experts per layer E; ``pinned``: the highest plan version this
    process has moved to (an older plan is never moved back to); ``missing``: the reason given
    when ``plan`` is None. A plan of another shape, with an expert id outside [0, E) or a
    logical expert without any slot gives zero moves with the reason.
    """
    if plan is None:
        return PlanChoice(None, missing)
    version, phy2log = plan
    phy2log = np.asarray(phy2log)
    if phy2log.shape != old.shape:
        return PlanChoice(None, f"plan v{version} has shape {list(phy2log.shape)} (MoE layers x "
                                f"slots); vLLM's map is {list(old.shape)}")
    if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= num_logical):
        return PlanChoice(None, f"plan v{version} names experts outside 0..{num_logical - 1}")
    for layer, row in enumerate(phy2log):
        if np.bincount(row, minlength=num_logical).min() == 0:
            absent = int(np.argmin(np.bincount(row, minlength=num_logical)))
            return PlanChoice(None, f"plan v{version} gives expert {absent} of MoE layer "
                                    f"{layer} no slot")
    if version < pinned:
        return PlanChoice(None, f"plan v{version} is older than v{pinned}, already moved to")
    moved = int((phy2log != old).sum())
    if moved == 0:
        return PlanChoice(None, f"plan v{version} is in place", version)
    return PlanChoice(phy2log.astype(np.int64), f"plan v{version}: {moved} slots change", version)
