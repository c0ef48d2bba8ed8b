"""Controller operations without gRPC: load snapshots, on-demand plans, watches, deletes."""

import numpy as np
import pytest

from expertplane.controller.config import ControllerConfig
from expertplane.controller.core import Controller
from expertplane.controller.simagent import load_report
from expertplane.controller.spec import PlacementSpec
from expertplane.errors import FailedPrecondition, FieldError, NotFound
from expertplane.proto import expertplane_pb2 as pb

SPEC = PlacementSpec(name="m", num_layers=2, num_experts=8, num_nodes=1, gpus_per_node=4,
                     num_replicas=12, num_groups=2, expert_bytes=100)


@pytest.fixture
def ctl(sqlite_url):
    c = Controller(ControllerConfig(db_url=sqlite_url))
    c.open()
    c.apply_placement(SPEC)
    yield c
    c.close()


def test_snapshots_follow_new_reports(ctl):
    ctl.snapshot_loads()
    assert ctl.store.latest_load_snapshot("m") is None          # nothing reported yet
    r = load_report("n0", 0, "m", 1, 1, np.full((2, 3), 5))
    assert ctl.ingest(r).status == pb.LoadAck.ACCEPTED
    ctl.snapshot_loads()
    load, reports, _ = ctl.store.latest_load_snapshot("m")
    assert reports == 1 and load.sum() == 30
    np.testing.assert_allclose(load, ctl.load_window("m")[0].load)


def test_compute_plan_unstored_and_inline(ctl):
    skew = np.ones((2, 8))
    skew[:, 3] = 50
    plan = ctl.compute_plan("m", None, skew, None, store=False, rollout=False)
    assert plan.version == 0 and plan.previous_version == 1
    assert np.mean(plan.current_balance) > np.mean(plan.predicted_balance)
    assert ctl.store.latest_version("m") == 1
    with pytest.raises(FieldError, match="^load: must have shape"):
        ctl.compute_plan("m", None, np.ones((2, 7)), None, store=False, rollout=False)
    with pytest.raises(FieldError, match="^previous_phy2log"):
        ctl.compute_plan("m", None, None, np.zeros((2, 5), int), store=False, rollout=False)
    with pytest.raises(FailedPrecondition, match="^store:"):
        ctl.compute_plan("", SPEC, None, None, store=True, rollout=False)


def test_watch_sees_backlog_then_new_plans(ctl):
    watch, backlog = ctl.watch("m", 0)
    assert [p.version for p in backlog] == [1]
    ctl.compute_plan("m", None, np.arange(16.0).reshape(2, 8), None, store=True, rollout=False)
    assert watch.queue.get(timeout=5).version == 2
    ctl.unwatch(watch)
    with pytest.raises(NotFound):
        ctl.watch("zzz", 0)


def test_delete_forgets_everything(ctl):
    ctl.ingest(load_report("n0", 0, "m", 1, 1, np.ones((2, 3), int)))
    assert ctl.delete_placement("m")
    with pytest.raises(NotFound):
        ctl.placement("m")
    assert ctl.ingest(load_report("n0", 0, "m", 1, 2, np.ones((2, 3), int))).status == \
        pb.LoadAck.REJECTED
    view = ctl.apply_placement(SPEC)                              # re-created from scratch
    assert view.stored.plan_version == 1 and ctl.load_window("m")[0].reports == 0


def test_reports_of_unknown_placements_are_rejected_naming_the_field(ctl):
    res = ctl.ingest(load_report("n0", 0, "other", 1, 1, np.ones((2, 3), int)))
    assert res.status == pb.LoadAck.REJECTED and res.message.startswith("placement:")
    assert ctl.load_window("m")[0].reports == 0


def test_ingest_gate_holds_at_most_its_limit():
    from expertplane.controller.ingest import IngestGate

    gate = IngestGate(2)
    assert gate.enter() and gate.enter() and not gate.enter() and gate.held == 2
    gate.leave()
    assert gate.enter() and not gate.enter()
    assert not IngestGate(0).enter()


def test_shed_reports_are_counted_as_overloaded_not_ingested(ctl):
    r = load_report("n0", 0, "m", 1, 1, np.full((2, 3), 5))
    assert ctl.shed(r).status == pb.LoadAck.OVERLOADED
    assert ctl.load_window("m")[0].reports == 0
    assert ctl.metrics.registry.get_sample_value(
        "expertplane_controller_reports_total", {"placement": "m", "status": "OVERLOADED"}) == 1
