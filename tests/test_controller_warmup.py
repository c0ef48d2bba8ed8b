"""controller.planning.PlannerWarmUp: one planner warm-up per placement shape (warm_up_key),
however many placements of that shape are applied, from however many threads."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from expertplane.controller import core
from expertplane.controller.config import ControllerConfig
from expertplane.controller.planning import PlannerWarmUp, warm_up_key
from expertplane.controller.spec import PlacementSpec, PolicySpec

SPEC = PlacementSpec(name="a", num_layers=2, num_experts=8, num_nodes=2, gpus_per_node=2,
                     num_replicas=12, num_groups=2, algorithm="balanced")


class Recorder:
    """A compile function that records the names it was called with; blocks until ``release``."""

    def __init__(self, release: threading.Event | None = None):
        self.names: list[str] = []
        self._release = release
        self._lock = threading.Lock()

    def __call__(self, spec: PlacementSpec) -> None:
        with self._lock:
            self.names.append(spec.name)
        if self._release is not None:
            self._release.wait(10)


def test_same_shape_is_warmed_once():
    rec = Recorder()
    warm = PlannerWarmUp(rec)
    first = warm(SPEC)
    same = [dataclasses.replace(SPEC, name="b", num_layers=58, expert_bytes=1 << 20,
                                policy=PolicySpec(mode="manual"), initial_load=np.ones((58, 8))),
            SPEC]
    assert all(warm(s) is first for s in same)
    first.join(10)
    assert rec.names == ["a"]


@pytest.mark.parametrize("change", [dict(algorithm="deepseek"), dict(num_experts=4, num_groups=2),
                                    dict(num_replicas=16), dict(num_groups=4),
                                    dict(num_nodes=1, gpus_per_node=4), dict(gpus_per_node=1)])
def test_each_field_of_the_key_gets_its_own_warm_up(change):
    other = dataclasses.replace(SPEC, name="other", **change)
    assert warm_up_key(other) != warm_up_key(SPEC)
    rec = Recorder()
    warm = PlannerWarmUp(rec)
    threads = [warm(SPEC), warm(other)]
    for t in threads:
        t.join(10)
    assert threads[0] is not threads[1] and rec.names == ["a", "other"]


def test_concurrent_calls_start_one_thread():
    release = threading.Event()
    rec = Recorder(release)
    warm = PlannerWarmUp(rec)
    start = threading.Barrier(8)
    got: list[threading.Thread] = []

    def call(i: int) -> None:
        start.wait(10)
        got.append(warm(dataclasses.replace(SPEC, name=f"p{i}")))

    callers = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for c in callers:
        c.start()
    for c in callers:
        c.join(10)
    release.set()
    assert len(got) == 8 and len({id(t) for t in got}) == 1
    got[0].join(10)
    assert len(rec.names) == 1 and got[0].daemon


def test_controller_warms_each_shape_once(sqlite_url, monkeypatch):
    """Applying, re-applying and adding a placement of the same shape, then reopening the store:
    one warm-up; a placement of another shape: a second."""
    rec = Recorder()
    warm = PlannerWarmUp(rec)
    monkeypatch.setattr(core, "warm_up", warm)
    other_shape = dataclasses.replace(SPEC, name="c", num_replicas=16)
    ctl = core.Controller(ControllerConfig(db_url=sqlite_url))
    ctl.open()
    try:
        ctl.apply_placement(SPEC)
        ctl.apply_placement(dataclasses.replace(SPEC, policy=PolicySpec(threshold=0.2)))
        ctl.apply_placement(dataclasses.replace(SPEC, name="b", num_layers=3))
        ctl.open()                                  # loads both placements again
        ctl.apply_placement(other_shape)
    finally:
        ctl.close()
    for spec in (SPEC, other_shape):                # the threads already started for them
        warm(spec).join(10)
    assert rec.names == ["a", "c"]
