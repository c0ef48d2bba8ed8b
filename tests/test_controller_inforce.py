"""PlanService.GetPlan with ``in_force``: the plan the placement's workers run (the initial plan
or the last committed rollout's), never the latest stored plan of an aborted rollout; over real
gRPC on loopback."""

import grpc
import pytest

from expertplane.controller.spec import spec_from_proto
from expertplane.controller.store import Store
from expertplane.proto import expertplane_pb2 as pb
from tests.test_controller_grpc import (  # noqa: F401  (pytest fixtures: server, agents)
    PLAN_TIMEOUT, Client, _wait, agents, code_of, placement, server, start)
from tests.test_controller_store import plan_for

pytestmark = pytest.mark.timeout(300)


def in_force(c, name="m") -> int:
    """Version of the plan GetPlan(in_force) returns for ``name``."""
    return c.plans.GetPlan(pb.GetPlanRequest(placement=name, in_force=True),
                           timeout=10).summary.version


def latest(c, name="m") -> int:
    return c.plans.GetPlan(pb.GetPlanRequest(placement=name), timeout=10).summary.version


def test_in_force_follows_commits_not_aborts(server, agents):
    srv, c = server
    assert in_force(c) == 1                              # the initial plan
    force = pb.TriggerRebalanceRequest(placement="m", force=True)
    assert c.planning.TriggerRebalance(force, timeout=PLAN_TIMEOUT).new_version == 2
    for a in agents:
        assert a.wait_for(lambda ag: set(ag.versions().values()) == {2})
    _wait(lambda: in_force(c) == 2)                      # committed by every rank
    full = c.plans.GetPlan(pb.GetPlanRequest(placement="m", version=2), timeout=10)
    assert c.plans.GetPlan(pb.GetPlanRequest(placement="m", in_force=True),
                           timeout=10) == full           # the same message as by version
    agents[1].workers[3].fail_prepare = True
    assert c.planning.TriggerRebalance(force, timeout=PLAN_TIMEOUT).new_version == 3
    _wait(lambda: c.plans.ListRollouts(pb.ListRolloutsRequest(placement="m"), timeout=5)
          .rollouts[0].state == "aborted")
    assert latest(c) == 3 and in_force(c) == 2          # the aborted v3 is stored, not in force


def test_no_plan_in_force_is_not_found_naming_the_placement(sqlite_url):
    """A placement whose only stored plan was never put in force (as a store may hold it)."""
    spec = spec_from_proto(placement())
    store = Store(sqlite_url)
    store.upsert_placement(spec)
    store.add_plan(plan_for(spec, reason="api"))          # stored, not in force
    store.close()
    srv, port = start(sqlite_url)
    c = Client(port)
    try:
        assert latest(c) == 1
        assert code_of(c.plans.GetPlan, pb.GetPlanRequest(placement="m", in_force=True)) == (
            grpc.StatusCode.NOT_FOUND, "placement: placement 'm' has no plan in force")
        got, details = code_of(c.plans.GetPlan, pb.GetPlanRequest(placement="zzz", in_force=True))
        assert got == grpc.StatusCode.NOT_FOUND and details.startswith("placement:")
    finally:
        srv.stop(0.5)


def test_version_and_in_force_together_are_invalid(server):
    srv, c = server
    c.plans.ApplyPlacement(placement(), timeout=30)
    assert code_of(c.plans.GetPlan, pb.GetPlanRequest(placement="m", version=1, in_force=True)) \
        == (grpc.StatusCode.INVALID_ARGUMENT, "in_force: give either version or in_force, not both")
