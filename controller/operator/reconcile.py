"""Level-triggered reconciliation, shared parts: what reconcilers get (``OperatorContext``)
and return (``Outcome``: the complete status the object should have, events, annotations to
drop), conditions with the Warning events of their transitions, and the PipelinePlan reconciler.
Calling a reconciler again changes nothing."""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from kubernetes.client.exceptions import ApiException

from expertplane.controller.operator import conditions as cond
from expertplane.controller.operator.client import ControllerClient, ControllerCallError, Rejected
from expertplane.controller.operator.crd import SpecError, pipeline_request_from_cr
from expertplane.controller.operator.kube import Kube
from expertplane.controller.operator.workers import WorkerSettle

NORMAL, WARNING = "Normal", "Warning"
MAX_MESSAGE = 1024          # condition and event messages are cut to this many characters
# Ready=False reasons that the user must act on: posted as Warning events.
_BAD_READY = ("InvalidSpec", "NoWorkers")


@dataclass
class ProposalClock:
    """When each placement last asked for a proposal (monotonic seconds), to space the asks
    ``interval`` seconds apart (thread-safe)."""

    interval: float = 60.0
    _last: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def due(self, key: str, now: float | None = None) -> bool:
        """True (and the clock restarts) if ``key`` last asked ``interval`` seconds ago or never."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._last.get(key, -self.interval) < self.interval:
                return False
            self._last[key] = now
            return True


@dataclass
class OperatorContext:
    """What reconcilers share: the controller client, Kubernetes calls, the controller address
    (published in status.planRef), the worker-pod debounce, the spacing of proposals."""

    client: ControllerClient
    kube: Kube
    controller_address: str
    workers: WorkerSettle = field(default_factory=WorkerSettle)
    proposals: ProposalClock = field(default_factory=ProposalClock)


@dataclass
class Outcome:
    """New ``status`` of an object; Kubernetes events to post as (type, reason, message);
    annotations to set on the object (None removes one: a handled one-shot request)."""

    status: dict
    events: list[tuple[str, str, str]] = field(default_factory=list)
    annotations: dict[str, str | None] = field(default_factory=dict)


def short(message: str) -> str:
    """``message`` cut to ``MAX_MESSAGE`` characters."""
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


def health(conds: list[dict], gen: int, ready: bool | None, reason: str, message: str,
           degraded: tuple[str, str] | None) -> list[dict]:
    """Conditions with Ready set (left as is when ``ready`` is None and no ``reason``) and
    Degraded True with ``degraded`` = (reason, message), or False when None."""
    if ready is not None or reason:
        conds = cond.set_condition(conds, cond.READY, ready, reason, short(message), gen)
    d_reason, d_message = degraded or ("AsExpected", "operating normally")
    return cond.set_condition(conds, cond.DEGRADED, degraded is not None, d_reason,
                              short(d_message), gen)


def warnings(old: list[dict], new: list[dict]) -> list[tuple[str, str, str]]:
    """Warning events for conditions that turned bad: Degraded=True with a new reason, Ready=False
    with a new InvalidSpec/NoWorkers message. Posted once per transition, not every refresh."""
    out = []
    d_old, d_new = cond.get_condition(old, cond.DEGRADED), cond.get_condition(new, cond.DEGRADED)
    if d_new and d_new["status"] == "True" and (
            not d_old or d_old["status"] != "True" or d_old["reason"] != d_new["reason"]):
        out.append((WARNING, d_new["reason"], d_new["message"]))
    r_old, r_new = cond.get_condition(old, cond.READY), cond.get_condition(new, cond.READY)
    if r_new and r_new["status"] == "False" and r_new["reason"] in _BAD_READY and (
            not r_old or (r_old["reason"], r_old["message"]) != (r_new["reason"], r_new["message"])):
        out.append((WARNING, r_new["reason"], r_new["message"]))
    return out


def mean(values) -> float | None:
    return round(float(np.mean(values)), 6) if len(values) else None


# ------------------------------------------------------------------ PipelinePlan

_RESULT_FIELDS = ("boundaries", "stepTime", "bubbleFraction", "peakMemoryBytes", "stageBusy", "layers")


def reconcile_pipeline(ctx: OperatorContext, obj: Mapping, *, force: bool) -> Outcome | None:
    """Reconcile one PipelinePlan: compute the partition through the controller unless the
    status already holds it for this generation and profile ConfigMap version (``force``
    recomputes). Returns None when nothing needs doing."""
    meta, spec = obj["metadata"], obj["spec"]
    namespace, gen = meta["namespace"], int(meta.get("generation", 1))
    old = copy.deepcopy(dict(obj.get("status") or {}))
    conds = list(old.get("conditions") or [])
    status = dict(old, observedGeneration=gen)

    def done(ready, reason="", message="", degraded=None, clear=False):
        status["conditions"] = health(conds, gen, ready, reason, message, degraded)
        if clear:
            status.update({k: None for k in _RESULT_FIELDS})
        return Outcome(status, warnings(conds, status["conditions"]))

    text = version = None
    try:
        ref = spec["profile"].get("configMapRef")
        if ref:
            text, version = ctx.kube.read_config_value(namespace, ref, "spec.profile.configMapRef")
        degraded = cond.get_condition(conds, cond.DEGRADED)
        if (not force and old.get("observedGeneration") == gen
                and old.get("profileVersion") == version
                and not (degraded and degraded["status"] == "True")):
            return None
        request = pipeline_request_from_cr(spec, text)
        part = ctx.client.compute_pipeline(request)
    except SpecError as exc:
        return done(False, "InvalidSpec", str(exc), clear=True)
    except Rejected as exc:
        return done(False, "InvalidSpec", f"rejected by the controller: {exc.details}", clear=True)
    except ControllerCallError as exc:
        return done(None, degraded=("ControllerUnavailable", str(exc)))
    except ApiException as exc:
        return done(None, degraded=("KubernetesError", f"{exc.status} {exc.reason}"))
    status.update(boundaries=list(part.boundaries), stepTime=round(part.step_time, 9),
                  bubbleFraction=round(part.bubble_fraction, 6),
                  peakMemoryBytes=list(part.peak_memory_bytes),
                  stageBusy=[round(b, 9) for b in part.stage_busy],
                  layers=int(part.boundaries[-1]) if part.boundaries else 0,
                  profileVersion=version)
    return done(True, "Computed", f"{len(part.boundaries) - 1} stages, step {part.step_time:.4g} s, "
                                  f"bubble {100 * part.bubble_fraction:.1f}%")
