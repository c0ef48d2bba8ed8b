"""The plan store on SQLite and PostgreSQL: migrations, versions, rollouts, deletes."""

import dataclasses

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from expertplane.controller.planning import compute_candidate
from expertplane.controller.spec import PlacementSpec
from expertplane.controller.store import PlanRecord, RolloutRecord, Store, utcnow
from expertplane.controller.tables import Base
from expertplane.errors import FailedPrecondition, NotFound

SPEC = PlacementSpec(name="m", num_layers=2, num_experts=8, num_nodes=1, gpus_per_node=4,
                     num_replicas=12, num_groups=2, expert_bytes=100)


def plan_for(spec, load=None, reason="initial") -> PlanRecord:
    c = compute_candidate(spec, load)
    return PlanRecord(placement=spec.name, version=0, algorithm=c.algorithm, reason=reason,
                      previous_version=0, num_nodes=spec.num_nodes,
                      gpus_per_node=spec.gpus_per_node, phy2log=c.phy2log, log2phy=c.log2phy,
                      logcnt=c.logcnt, load_snapshot=c.load,
                      predicted_balance=c.predicted_balance.tolist(),
                      current_balance=c.current_balance.tolist(), slots_moved=0, bytes_moved=0,
                      created_at=utcnow())


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


def test_migrations_match_the_models(db_url):
    Store(db_url).close()
    Store(db_url).close()                      # upgrading twice is a no-op
    engine = create_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_plans_get_increasing_versions_and_round_trip(store):
    store.upsert_placement(SPEC)
    first = store.add_plan(plan_for(SPEC), in_force=True)
    second = store.add_plan(plan_for(SPEC, np.arange(16.0).reshape(2, 8), reason="auto"))
    assert (first.version, second.version) == (1, 2)
    got = store.get_plan("m")                   # latest
    assert got.version == 2 and got.reason == "auto"
    np.testing.assert_array_equal(got.phy2log, second.phy2log)
    np.testing.assert_array_equal(got.log2phy, second.log2phy)
    np.testing.assert_allclose(got.load_snapshot, np.arange(16.0).reshape(2, 8))
    assert got.created_at.tzinfo is not None
    assert store.get_placement("m").plan_version == 1     # v2 stored, not in force
    assert [p.version for p in store.list_plans("m", after_version=1)] == [2]
    with pytest.raises(NotFound, match="version: placement 'm' has no plan version 7"):
        store.get_plan("m", 7)
    with pytest.raises(NotFound, match="placement: unknown placement 'x'"):
        store.get_plan("x")


def test_placement_update_and_shape_change(store):
    store.upsert_placement(SPEC)
    store.add_plan(plan_for(SPEC), in_force=True)
    updated = dataclasses.replace(SPEC, generation=5,
                                  policy=dataclasses.replace(SPEC.policy, threshold=0.3))
    assert store.upsert_placement(updated).plan_version == 1
    got = store.get_placement("m").spec
    assert (got.generation, got.policy.threshold) == (5, 0.3)
    # A new shape: no plan in force until one of the new shape is stored; history kept.
    reshaped = dataclasses.replace(SPEC, num_replicas=16)
    assert store.upsert_placement(reshaped).plan_version == 0
    assert store.get_plan("m").version == 1     # nothing lost
    stored = store.add_plan(plan_for(reshaped), in_force=True)
    assert stored.version == 2 and store.get_placement("m").plan_version == 2
    # A version given only raises the floor (a restored plan keeps its number).
    assert store.add_plan(dataclasses.replace(plan_for(reshaped), version=9)).version == 9
    assert store.add_plan(dataclasses.replace(plan_for(reshaped), version=3)).version == 10


def test_rollout_decision_is_atomic_with_plan_in_force(store):
    store.upsert_placement(SPEC)
    store.add_plan(plan_for(SPEC), in_force=True)
    store.add_plan(plan_for(SPEC, np.ones((2, 8))))
    rec = RolloutRecord(id="r1", placement="m", from_version=1, to_version=2, state="preparing")
    store.create_rollout(rec)
    assert [r.id for r in store.active_rollouts()] == ["r1"]
    rec.acks["prepared"] = {0: "n0", 1: "n0", 2: "n1", 3: "n1"}
    store.decide_commit(rec)
    assert store.get_placement("m").plan_version == 2
    with pytest.raises(FailedPrecondition):
        store.decide_commit(rec)                # only once
    rec.acks["committed"] = {0: "n0", 1: "n0"}
    store.finish_rollout(rec, "committed")
    [got] = store.list_rollouts("m")
    assert got.state == "committed" and got.finished_at is not None
    assert got.acks["prepared"] == {0: "n0", 1: "n0", 2: "n1", 3: "n1"}
    assert got.acks["committed"] == {0: "n0", 1: "n0"}
    assert store.active_rollouts() == []


def test_load_snapshots_are_bounded(store):
    store.upsert_placement(SPEC)
    for i in range(5):
        store.add_load_snapshot("m", np.full((2, 8), float(i)), i, keep=3)
    load, reports, _ = store.latest_load_snapshot("m")
    assert reports == 4 and load[0, 0] == 4.0


def test_delete_cascades(store):
    store.upsert_placement(SPEC)
    store.add_plan(plan_for(SPEC), in_force=True)
    store.create_rollout(RolloutRecord(id="r", placement="m", from_version=0, to_version=1,
                                       state="preparing"))
    store.add_load_snapshot("m", np.zeros((2, 8)), 0)
    assert store.delete_placement("m") is True
    assert store.delete_placement("m") is False
    assert store.list_rollouts("") == [] and store.latest_load_snapshot("m") is None
    store.upsert_placement(SPEC)                # re-created: versions start again at 1
    assert store.add_plan(plan_for(SPEC)).version == 1


def test_observer_sees_every_operation(db_url):
    seen = []
    s = Store(db_url, observe=lambda op, sec: seen.append((op, sec)))
    s.list_placements()
    s.close()
    assert seen and seen[0][0] == "list_placements" and seen[0][1] >= 0
