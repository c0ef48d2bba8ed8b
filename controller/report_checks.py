"""Checks of a LoadReport's own fields (before its counts are looked at): who sent it, when its
window ended, its step counters and the GPU statistics it carries. Each failure is the message
of a REJECTED acknowledgement, naming the field."""

from __future__ import annotations

import math

from expertplane.proto import expertplane_pb2 as pb

MAX_CLOCK_SKEW_SECONDS = 5.0     # a window may end this far after the controller's clock
MAX_TEMPERATURE_C = 200.0


def report_problem(r: pb.LoadReport, now: float) -> str | None:
    """Why report ``r`` (received at ``now``, unix seconds) must be refused, or None.

    node must be named; window_end (when set) not later than now + MAX_CLOCK_SKEW_SECONDS;
    failed_steps <= steps; gpu (when set): utilization in [0, 1], power >= 0, temperature
    below MAX_TEMPERATURE_C, all finite, memory used <= total when a total is given.
    """
    if not r.node:
        return "node: is required (the agent's node name)"
    if r.HasField("window_end"):
        end = r.window_end.seconds + r.window_end.nanos * 1e-9
        if end > now + MAX_CLOCK_SKEW_SECONDS:
            return (f"window_end: {end - now:.1f} s in the future (clocks may differ by at most "
                    f"{MAX_CLOCK_SKEW_SECONDS:g} s)")
    if r.failed_steps > r.steps:
        return f"failed_steps: {r.failed_steps} is more than steps ({r.steps})"
    return _gpu_problem(r.gpu) if r.HasField("gpu") else None


def _gpu_problem(g: pb.GpuStats) -> str | None:
    for name in ("utilization", "power_watts", "temperature_c"):
        value = getattr(g, name)
        if not math.isfinite(value):
            return f"gpu.{name}: must be finite, got {value}"
    if not 0.0 <= g.utilization <= 1.0:
        return f"gpu.utilization: must lie in [0, 1], got {g.utilization}"
    if g.power_watts < 0:
        return f"gpu.power_watts: must be >= 0, got {g.power_watts}"
    if g.temperature_c >= MAX_TEMPERATURE_C:
        return f"gpu.temperature_c: must be below {MAX_TEMPERATURE_C:g}, got {g.temperature_c}"
    if g.memory_total_bytes and g.memory_used_bytes > g.memory_total_bytes:
        return (f"gpu.memory_used_bytes: {g.memory_used_bytes} is more than memory_total_bytes "
                f"({g.memory_total_bytes})")
    return None
