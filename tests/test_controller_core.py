"""Controller operations without gRPC: load snapshots, on-demand plans, watches, deletes; plans
stay consistent with the plan in force when the policy and API calls meet."""

import threading

import numpy as np
import pytest

from expertplane.benchmarks.simagent import load_report
from expertplane.controller.config import ControllerConfig
from expertplane.controller.core import Controller
from expertplane.controller.planning import compute_candidate
from expertplane.controller.spec import PlacementSpec
from expertplane.errors import FailedPrecondition, FieldError, NotFound
from expertplane.proto import expertplane_pb2 as pb

Event = pb.RolloutEvent
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


def _skew(expert: int) -> np.ndarray:
    load = np.ones((SPEC.num_layers, SPEC.num_experts))
    load[:, expert] = 50
    return load


def test_concurrent_rebalances_roll_out_every_plan_they_store(ctl):
    """The policy thread and a TriggerRebalance call rebalance at the same time while workers
    are connected (so the first rollout stays in prepare): one stores and rolls out a plan, the
    other finds the rollout in progress; neither stores a plan that is never rolled out."""
    session = ctl.rollouts.connect()
    ctl.rollouts.handle(session, Event(kind=Event.HELLO, node="n0", workers=[
        pb.WorkerInfo(node="n0", rank=r, placement="m", plan_version=1) for r in range(4)]))
    both_planned = threading.Barrier(2, timeout=1.0)
    add_plan = ctl.store.add_plan

    def add_plan_once_both_planned(plan, **kw):
        try:     # lets the two calls meet here if nothing orders them; else the first goes on
            both_planned.wait()
        except threading.BrokenBarrierError:
            pass
        return add_plan(plan, **kw)

    ctl.store.add_plan = add_plan_once_both_planned
    outcomes, errors = [], []

    def rebalance(manual: bool) -> None:
        try:
            outcomes.append(ctl.rebalance("m", manual=manual, force=True))
        except Exception as exc:  # noqa: BLE001 - the test reports every failure
            errors.append(exc)

    threads = [threading.Thread(target=rebalance, args=(manual,)) for manual in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    stored = {p.version for p in ctl.store.list_plans("m", after_version=1, limit=10)}
    rolled = {r.to_version for r in ctl.store.list_rollouts("m", 10)}
    assert stored == rolled and len(stored) == 1
    assert sorted(o.decision.reason for o in outcomes if not o.decision.rebalance) == \
        ["a rollout is in progress"]


def test_compute_plan_scores_against_the_plan_in_force(ctl):
    """A stored plan that never went into force (not rolled out, or its rollout aborted) is not
    the baseline of the next on-demand plan: the plan in force is, as for the policy."""
    v2 = ctl.compute_plan("m", None, _skew(3), None, store=True, rollout=False)
    in_force = ctl.plan_in_force("m")
    assert v2.version == 2 and in_force.version == 1
    assert not np.array_equal(v2.phy2log, in_force.phy2log)
    load = _skew(5)
    plan = ctl.compute_plan("m", None, load, None, store=False, rollout=False)
    expected = compute_candidate(SPEC, load, in_force.phy2log)
    assert plan.previous_version == 1
    np.testing.assert_array_equal(plan.phy2log, expected.phy2log)
    np.testing.assert_allclose(plan.current_balance, expected.current_balance)
    assert plan.slots_moved == expected.slots_moved
