"""What the commands that talk to a running controller share (``get``, ``describe``, ``apply``,
``delete``, ``rebalance``, ``watch``): the connection options and a client of PlanService and
PlanningService whose errors are one readable line.

``--controller`` (default ``$EXPERTPLANE_CONTROLLER``, else ``localhost:50051``), the TLS
options and ``--token-file`` (default ``$EXPERTPLANE_TOKEN``) mean what they mean on
``expertplane agent`` and ``worker``.
"""

from __future__ import annotations

import os

CONTROLLER_ENV = "EXPERTPLANE_CONTROLLER"
DEFAULT_CONTROLLER = "localhost:50051"


def add_remote_arguments(parser) -> None:
    """Add --controller, --timeout and the TLS/token options to a subcommand's parser."""
    from expertplane.rpc.security import add_security_arguments

    group = parser.add_argument_group("connection")
    group.add_argument("--controller", metavar="HOST:PORT",
                       default=os.environ.get(CONTROLLER_ENV, DEFAULT_CONTROLLER),
                       help=f"controller gRPC address (env {CONTROLLER_ENV}; "
                            f"default {DEFAULT_CONTROLLER})")
    group.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="deadline of each call (default 60)")
    add_security_arguments(group)


class RemoteError(ValueError):
    """A controller call failed: one line naming the call, the status and the controller's
    message (which names the offending field)."""


class Remote:
    """Blocking PlanService and PlanningService calls with the CLI's deadline and credentials."""

    def __init__(self, args):
        from expertplane.proto import expertplane_pb2_grpc as pb_grpc
        from expertplane.rpc.channels import make_channel
        from expertplane.rpc.security import security_from_args

        if args.timeout <= 0:
            raise ValueError("--timeout: must be > 0")
        self.target = args.controller
        self.timeout = args.timeout
        self._channel = make_channel(self.target, security_from_args(args))
        self.plans = pb_grpc.PlanServiceStub(self._channel)
        self.planning = pb_grpc.PlanningServiceStub(self._channel)

    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc) -> None:
        self._channel.close()

    def call(self, stub, method: str, request):
        """``stub.method(request)``; a gRPC error becomes ``RemoteError``."""
        import grpc

        try:
            return getattr(stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self.error(method, exc) from None

    def error(self, method: str, exc) -> RemoteError:
        import grpc

        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return RemoteError(f"cannot reach the controller at {self.target} "
                               f"({exc.details()}); set --controller or ${CONTROLLER_ENV}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RemoteError(f"{method}: no answer within --timeout {self.timeout:g} s")
        return RemoteError(f"{method}: {code.name}: {exc.details()}")

    def placements(self) -> list:
        """``PlacementState`` of every placement, sorted by name."""
        from expertplane.proto import expertplane_pb2 as pb

        resp = self.call(self.plans, "ListPlacements", pb.ListPlacementsRequest())
        return sorted(resp.placements, key=lambda p: p.spec.name)

    def placement(self, name: str):
        """The ``PlacementState`` of ``name``; ``RemoteError`` naming it when unknown."""
        state = next((p for p in self.placements() if p.spec.name == name), None)
        if state is None:
            raise RemoteError(f"placement {name!r} not found on {self.target}")
        return state

    def plan_summaries(self, name: str) -> list:
        """Every stored ``PlanSummary`` of placement ``name``, oldest first (all pages)."""
        from expertplane.proto import expertplane_pb2 as pb

        out, token = [], ""
        while True:
            resp = self.call(self.plans, "ListPlans",
                             pb.ListPlansRequest(placement=name, page_token=token))
            out.extend(resp.plans)
            token = resp.next_page_token
            if not token:
                return out

    def rollouts(self, name: str, limit: int = 0) -> list:
        """The placement's ``RolloutRecord``s, most recent first (``limit`` 0 = server's 50)."""
        from expertplane.proto import expertplane_pb2 as pb

        req = pb.ListRolloutsRequest(placement=name, limit=limit)
        return list(self.call(self.plans, "ListRollouts", req).rollouts)
