"""Status conditions following the Kubernetes API conventions (metav1.Condition)."""

from __future__ import annotations

import datetime as dt

READY = "Ready"
REBALANCING = "Rebalancing"
DEGRADED = "Degraded"


def now_rfc3339() -> str:
    """Current UTC time as RFC 3339 with second precision (the API's format)."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(conditions: list[dict], type_: str, status: bool | None, reason: str,
                  message: str, generation: int) -> list[dict]:
    """A copy of ``conditions`` with condition ``type_`` set.

    ``status``: True/False, or None for "Unknown". ``lastTransitionTime`` changes only when the
    status changes; ``observedGeneration`` is the object generation the condition was computed for.
    """
    value = "Unknown" if status is None else ("True" if status else "False")
    old = next((c for c in conditions if c.get("type") == type_), None)
    changed = old is None or old.get("status") != value
    new = {"type": type_, "status": value, "reason": reason, "message": message,
           "lastTransitionTime": now_rfc3339() if changed else old["lastTransitionTime"],
           "observedGeneration": int(generation)}
    return [c for c in conditions if c.get("type") != type_] + [new]


def get_condition(conditions: list[dict] | None, type_: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)
