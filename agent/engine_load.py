"""Load windows per logical expert from inference engines -> LoadReports for the controller.

Engines that count per logical expert and not per physical slot (vLLM: its plugin sends the
window vLLM hands its EPLB policy, see ``expertplane.engines.vllm``) send ``EngineLoadReport``
to the agent's node-local AgentService. Each valid window becomes one ``LoadReport`` carrying
``expert_load`` [L, E] under worker rank 0: the window is the placement's whole load (vLLM has
already all-reduced it over its ranks), so exactly one report per window reaches the controller.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import to_numpy

log = logging.getLogger(__name__)

# (worker rank, build(sequence) -> LoadReport) -> reports dropped from the full buffer
Enqueue = Callable[[int, Callable[[int], pb.LoadReport]], int]
MAX_ENGINES = 64   # engine processes whose last sequence is remembered (oldest forgotten first)


def check_engine_load(msg: pb.EngineLoadReport) -> np.ndarray:
    """The window's ``expert_load`` [L, E] float64; raises ``FieldError`` naming the field."""
    if not msg.placement:
        raise FieldError("placement", "required (the placement the engine serves)")
    load = to_numpy(msg.expert_load, "expert_load", ndim=2)
    if load.size == 0:
        raise FieldError("expert_load", f"must not be empty, got shape {list(load.shape)}")
    if not np.isfinite(load).all():
        raise FieldError("expert_load", "must be finite (no NaN or infinity)")
    if load.min() < 0:
        raise FieldError("expert_load", "token counts must be >= 0")
    return load


class EngineLoadSink:
    """Validates engine windows, drops repeats, and enqueues one logical LoadReport per window.

    ``enqueue`` numbers and buffers a report under a worker rank (the collector's, so engine
    reports and worker reports of one rank share one strictly increasing sequence). Thread-safe.
    """

    def __init__(self, node: str, agent_epoch: int, enqueue: Enqueue, metrics=None):
        self._node = node
        self._epoch = agent_epoch
        self._enqueue = enqueue
        self._metrics = metrics
        self._last: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def accept(self, msg: pb.EngineLoadReport) -> bool:
        """Count ``msg``; False when its (engine_epoch, sequence) was already counted. Raises
        ``FieldError`` naming the field when it is malformed."""
        check_engine_load(msg)
        with self._lock:
            if msg.sequence:
                last = self._last.get(msg.engine_epoch, 0)
                if msg.sequence <= last:
                    return False
                self._last[msg.engine_epoch] = msg.sequence
                self._last.move_to_end(msg.engine_epoch)
                while len(self._last) > MAX_ENGINES:
                    self._last.popitem(last=False)
        received = time.time_ns()

        def build(sequence: int) -> pb.LoadReport:
            report = pb.LoadReport(node=self._node, worker_rank=0, placement=msg.placement,
                                   sequence=sequence, agent_epoch=self._epoch,
                                   expert_load=msg.expert_load)
            if msg.HasField("window_start"):
                report.window_start.CopyFrom(msg.window_start)
            if msg.HasField("window_end"):
                report.window_end.CopyFrom(msg.window_end)
            else:
                report.window_end.FromNanoseconds(received)
            return report

        dropped = self._enqueue(0, build)
        if dropped and self._metrics is not None:
            self._metrics.reports_dropped.inc(dropped)
        log.debug("%s window for %s queued (%d x %d)", msg.engine or "engine", msg.placement,
                  *msg.expert_load.shape)
        return True
