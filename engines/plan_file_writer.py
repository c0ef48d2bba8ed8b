"""Agent sidecar: keep the node's plan-delivery file equal to the controller's plan in force for one placement.

Engines (SGLang, vLLM) have no ExpertPlane worker for the controller to roll a plan out to: the
agent asks the controller for the placement's plan in force (``PlanService.GetPlan`` with
``in_force``) every ``poll`` seconds and, when its version differs from the one on disk, writes
it with ``engines.plan_file.write_plan_file`` (atomic). The engine's plugin reads that file when
the engine rebalances. A plan not yet in force (NOT_FOUND) leaves the file as it is; a failed
call is logged and retried at the next poll, never fatal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from expertplane.engines.plan_file import read_plan_file, write_plan_file
from expertplane.engines.sglang_layout import HiddenLayout
from expertplane.errors import FieldError
from expertplane.planner.io import sglang_rows
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.tensors import to_numpy

log = logging.getLogger(__name__)


def plan_file_document(plan: pb.Plan, layout: HiddenLayout | None = None) -> dict:
    """The plan-file JSON document of a controller plan (the keys ``expertplane plan`` writes).

    ``phy2log`` ``[L, R]``, ``log2phy`` ``[L, E, X]``, ``logcnt`` ``[L, E]`` (int). With the
    engine's hidden-layer ``layout`` (SGLang) it also names ``num_hidden_layers`` and
    ``moe_layers``, and carries ``physical_to_logical_map`` ``[num_hidden_layers, R]``: SGLang's
    own row form (``planner.io.sglang_rows``, dense rows covering every expert).
    """
    s = plan.summary
    phy2log = to_numpy(plan.phy2log, "plan.phy2log", ndim=2)
    logcnt = to_numpy(plan.logcnt, "plan.logcnt", ndim=2)
    bal = np.asarray(s.predicted_balance, dtype=np.float64)
    doc = {
        "placement": s.placement,
        "version": int(s.version),
        "algorithm": s.algorithm,
        "num_layers": int(phy2log.shape[0]),
        "num_logical_experts": int(logcnt.shape[1]),
        "num_hidden_layers": None,
        "moe_layers": None,
        "num_replicas": int(phy2log.shape[1]),
        "num_nodes": int(plan.topology.num_nodes),
        "num_gpus": int(plan.topology.num_nodes) * int(plan.topology.gpus_per_node),
        "balance": {"per_layer": [round(float(b), 6) for b in bal],
                    "mean": round(float(bal.mean()), 6) if bal.size else None,
                    "max": round(float(bal.max()), 6) if bal.size else None},
        "previous_version": int(s.previous_version),
        "phy2log": phy2log.tolist(),
        "log2phy": to_numpy(plan.log2phy, "plan.log2phy", ndim=3).tolist(),
        "logcnt": logcnt.tolist(),
    }
    if layout is not None:
        doc["num_hidden_layers"] = layout.num_hidden_layers
        doc["moe_layers"] = list(layout.moe_layers)
        doc["physical_to_logical_map"] = sglang_rows(
            phy2log, layout.moe_layers, layout.num_hidden_layers, logcnt.shape[1]).tolist()
    return doc


class PlanFileWriter:
    """Polls the plan in force of ``placement`` and writes it to ``path`` when it changes.

    ``written`` is the version last written (or found on disk at start), 0 for none.
    ``layout``, when given, returns the engine's hidden-layer layout or None while unknown (the
    SGLang load source learns it from the dumps); the file is rewritten when it becomes known.
    """

    def __init__(self, placement: str, path, channel: grpc.Channel, *, poll: float = 2.0,
                 timeout: float = 10.0,
                 layout: Callable[[], HiddenLayout | None] | None = None):
        if not placement:
            raise FieldError("plan_placement", "required with a plan file (the placement whose "
                                               "plan in force is written)")
        if poll <= 0:
            raise FieldError("plan_poll", f"must be > 0, got {poll}")
        self.placement = placement
        self.path = Path(path)
        self._stub = pb_grpc.PlanServiceStub(channel)
        self._poll = poll
        self._timeout = timeout
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._layout = layout or (lambda: None)
        self.written, self._written_layout = self._on_disk()
        self.changed = threading.Condition()

    def _on_disk(self) -> tuple[int, HiddenLayout | None]:
        try:
            plan = read_plan_file(self.path)
        except FieldError as exc:
            log.warning("plan file %s is unusable (%s); it will be rewritten", self.path, exc)
            return 0, None
        if plan is None or plan.placement != self.placement:
            return 0, None
        known = plan.moe_layers is not None and plan.num_hidden_layers is not None
        return plan.version, (HiddenLayout(plan.num_hidden_layers, plan.moe_layers) if known
                              else None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agent-plan-file", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout + 1.0)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.sync()
            self._stopping.wait(self._poll)

    def sync(self) -> bool:
        """Fetch the plan in force once; write it if its version (or the engine's layout)
        differs. True when written."""
        try:
            plan = self._stub.GetPlan(pb.GetPlanRequest(placement=self.placement, in_force=True),
                                      timeout=self._timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("plan file: GetPlan(%s): %s: %s", self.placement, exc.code().name,
                            exc.details())
            return False
        version = int(plan.summary.version)
        layout = self._layout() or self._written_layout     # keep the file's until learned
        if version == self.written and layout == self._written_layout:
            return False
        try:
            write_plan_file(self.path, plan_file_document(plan, layout))
        except (FieldError, OSError) as exc:
            log.error("plan file: cannot write v%d of %s to %s: %s", version, self.placement,
                      self.path, exc)
            return False
        log.info("plan file: %s v%d (was v%d) -> %s", self.placement, version, self.written,
                 self.path)
        with self.changed:
            self.written, self._written_layout = version, layout
            self.changed.notify_all()
        return True
