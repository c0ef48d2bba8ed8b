"""The operator's gRPC client of the controller: deadlines on every call, gRPC errors mapped to
``Rejected`` (the controller refused the request: the spec is wrong) or ``Unavailable``."""

from __future__ import annotations

import grpc

from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.security import SecurityConfig, call_metadata

_REJECTIONS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.OUT_OF_RANGE)


class ControllerCallError(Exception):
    """A controller call failed; ``code`` is the gRPC status, the message the controller's."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str):
        super().__init__(f"{method}: {code.name}: {details}")
        self.code = code
        self.details = details


class Rejected(ControllerCallError):
    """The controller refused the request (INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE)."""


class NotKnown(ControllerCallError):
    """The controller does not know the placement or version (NOT_FOUND)."""


class Unavailable(ControllerCallError):
    """The controller could not be reached or failed; worth retrying later."""


class ControllerClient:
    """PlanService and PlanningService calls used by the operator (thread-safe)."""

    def __init__(self, target: str, security: SecurityConfig | None = None,
                 timeout_seconds: float = 30.0):
        self.target = target
        self._channel = make_channel(target, security)
        self._metadata = call_metadata(security or SecurityConfig())
        self._timeout = timeout_seconds
        self._plans = pb_grpc.PlanServiceStub(self._channel)
        self._planning = pb_grpc.PlanningServiceStub(self._channel)

    def _call(self, method, name: str, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            kind = (Rejected if code in _REJECTIONS else
                    NotKnown if code == grpc.StatusCode.NOT_FOUND else Unavailable)
            raise kind(name, code, details) from None

    def apply_placement(self, placement: pb.Placement) -> pb.PlacementState:
        """Register or update a placement (idempotent); the controller plans it if new."""
        return self._call(self._plans.ApplyPlacement, "ApplyPlacement", placement)

    def delete_placement(self, name: str) -> bool:
        """Forget a placement; False if the controller did not know it."""
        req = pb.DeletePlacementRequest(placement=name)
        return self._call(self._plans.DeletePlacement, "DeletePlacement", req).deleted

    def placement_state(self, name: str) -> pb.PlacementState | None:
        """The controller's state of placement ``name``, or None if it is not registered."""
        resp = self._call(self._plans.ListPlacements, "ListPlacements", pb.ListPlacementsRequest())
        return next((p for p in resp.placements if p.spec.name == name), None)

    def get_plan(self, name: str, version: int = 0) -> pb.Plan:
        """Plan ``version`` of placement ``name`` (0 = latest)."""
        req = pb.GetPlanRequest(placement=name, version=version)
        return self._call(self._plans.GetPlan, "GetPlan", req)

    def list_plans(self, name: str, after_version: int = 0) -> list[pb.PlanSummary]:
        """Summaries of placement ``name``'s stored plans after ``after_version`` (one page, in
        version order)."""
        req = pb.ListPlansRequest(placement=name, page_token=str(after_version) if after_version else "")
        return list(self._call(self._plans.ListPlans, "ListPlans", req).plans)

    def trigger_rebalance(self, name: str, *, force: bool = False, propose: bool = False,
                          version: int = 0) -> pb.RebalanceDecision:
        """Ask the controller for a rebalance of ``name``: roll out (default), ``propose`` (store
        a proposal, no rollout), or roll out stored ``version`` (an approval or a rollback)."""
        req = pb.TriggerRebalanceRequest(placement=name, force=force, propose=propose,
                                         version=version)
        return self._call(self._planning.TriggerRebalance, "TriggerRebalance", req)

    def compute_pipeline(self, request: pb.ComputePipelineRequest) -> pb.PipelinePartition:
        return self._call(self._planning.ComputePipeline, "ComputePipeline", request)

    def close(self) -> None:
        self._channel.close()
