"""Load aggregation: slot counts mapped through the plan they were counted under, dedupe,
staleness, bad input, window expiry and decay, and bounded state under an endless stream."""

import numpy as np
import pytest

from expertplane.benchmarks.simagent import load_report
from expertplane.controller import aggregation
from expertplane.controller.aggregation import BUCKETS, PlacementWindow
from expertplane.controller.spec import PlacementSpec, PolicySpec
from expertplane.proto import expertplane_pb2 as pb

Ack = pb.LoadAck
# 2 layers, 4 experts, 8 slots on 4 GPUs (2 slots per GPU)
SPEC = PlacementSpec(name="m", num_layers=2, num_experts=4, num_nodes=1, gpus_per_node=4,
                     num_replicas=8, policy=PolicySpec(window_seconds=64.0))
V1 = np.array([[0, 1, 2, 3, 0, 1, 2, 3], [3, 2, 1, 0, 3, 2, 1, 0]])
V2 = np.array([[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 2, 2, 3, 3]])


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


class Window:
    """A placement's window driven as the controller drives it: reports counted at the clock's
    time, views read under the version in force (``in_force``)."""

    def __init__(self, spec, lookup, clock, in_force):
        self.win = PlacementWindow(spec, lookup)
        self.clock = clock
        self.in_force = in_force

    def add_plan(self, version, phy2log, *, in_force=False):
        self.win.add_plan(version, phy2log)
        if in_force:
            self.in_force = version
        return self

    def ingest(self, r):
        return self.win.ingest(r, self.clock())

    def view(self, name="m"):
        assert name == self.win.spec.name
        return self.win.view(self.clock(), self.in_force)


@pytest.fixture
def agg():
    stored = {1: V1, 2: V2}
    agg = Window(SPEC, lambda name, v: stored.get(v), Clock(), 1)
    agg.add_plan(1, V1, in_force=True)
    agg.add_plan(2, V2)
    return agg


def report(agg, rank, version, seq, counts, **kw):
    return load_report("n0", rank, "m", version, seq, np.asarray(counts),
                       window_end=agg.clock.t, **kw)


def test_counts_map_through_their_own_plan_version(agg):
    # rank 1 holds slots 2,3: under v1 layer0 -> experts 2,3; layer1 -> experts 1,0
    assert agg.ingest(report(agg, 1, 1, 1, [[10, 20], [30, 40]])).status == Ack.ACCEPTED
    # under v2 rank 1's slots 2,3 hold expert 1 twice (layer 0 and 1)
    assert agg.ingest(report(agg, 1, 2, 2, [[1, 2], [3, 4]])).status == Ack.ACCEPTED
    view = agg.view("m")
    np.testing.assert_allclose(view.load, [[0, 3, 10, 20], [40, 30 + 7, 0, 0]])
    # only counts taken under the plan in force (v1) count towards GPU loads
    np.testing.assert_allclose(view.gpu_load, [[0, 30, 0, 0], [0, 70, 0, 0]])
    assert view.reports == 2


def test_duplicates_and_epochs(agg):
    assert agg.ingest(report(agg, 0, 1, 5, [[1, 1], [1, 1]])).status == Ack.ACCEPTED
    dup = agg.ingest(report(agg, 0, 1, 5, [[1, 1], [1, 1]]))
    assert dup.status == Ack.DUPLICATE and dup.message.startswith("sequence:")
    assert agg.ingest(report(agg, 0, 1, 4, [[1, 1], [1, 1]])).status == Ack.DUPLICATE
    # a restarted agent (new epoch) starts its sequence again
    assert agg.ingest(report(agg, 0, 1, 1, [[1, 1], [1, 1]], epoch=2)).status == Ack.ACCEPTED
    assert agg.view("m").load.sum() == 8


@pytest.mark.parametrize("kw, status, field", [
    ({"worker_rank": 4}, Ack.REJECTED, "worker_rank"),
    ({"plan_version": 0}, Ack.REJECTED, "plan_version"),
    ({"plan_version": 3}, Ack.REJECTED, "plan_version"),        # from the future
    ({"counts": [[1, 2, 3], [4, 5, 6]]}, Ack.REJECTED, "slot_counts"),
    ({"counts": [[1, -2], [4, 5]]}, Ack.REJECTED, "slot_counts"),
])
def test_bad_reports_are_rejected_naming_the_field(agg, kw, status, field):
    counts = kw.pop("counts", [[1, 2], [3, 4]])
    msg = report(agg, 0, kw.pop("plan_version", 1), 1, counts)
    for k, v in kw.items():
        setattr(msg, k, v)
    res = agg.ingest(msg)
    assert res.status == status and res.message.startswith(field + ":")
    assert agg.view("m").reports == 0


def test_stale_reports(agg):
    old = report(agg, 0, 1, 1, [[1, 1], [1, 1]])
    old.window_end.FromSeconds(int(agg.clock.t - 100))      # older than the 64 s window
    res = agg.ingest(old)
    assert res.status == Ack.STALE and res.message.startswith("window_end:")
    agg.win._slot_maps.pop(1)                                   # evicted from the cache: looked up again
    assert agg.ingest(report(agg, 0, 1, 2, [[1, 1], [1, 1]])).status == Ack.ACCEPTED
    stored = {}
    lost = Window(SPEC, lambda n, v: stored.get(v), agg.clock, 2)
    lost.add_plan(2, V2, in_force=True)
    res = lost.ingest(report(agg, 0, 1, 1, [[1, 1], [1, 1]]))   # v1 not stored anywhere
    assert res.status == Ack.STALE and res.message.startswith("plan_version:")


def test_window_expiry_and_decay():
    clock = Clock()
    spec = PlacementSpec(name="m", num_layers=2, num_experts=4, num_nodes=1, gpus_per_node=4,
                         num_replicas=8, policy=PolicySpec(window_seconds=64.0, half_life_seconds=8.0))
    agg = Window(spec, lambda n, v: V1, clock, 1).add_plan(1, V1, in_force=True)
    assert agg.ingest(report(agg, 0, 1, 1, [[100, 0], [0, 0]])).status == Ack.ACCEPTED
    assert agg.view("m").load[0, 0] == 100        # no decay within the first half bucket
    clock.t += 8.0
    before = agg.view("m").load[0, 0]
    assert before < 100
    clock.t += 8.0                                  # one half-life later: half of it
    assert agg.view("m").load[0, 0] == pytest.approx(before / 2)
    clock.t += 64.0 + 2 * 64.0 / BUCKETS
    assert agg.view("m").load.sum() == 0
    # buckets older than the window are dropped when new reports land
    assert agg.ingest(report(agg, 0, 1, 2, [[1, 0], [0, 0]])).status == Ack.ACCEPTED
    assert agg.win.sizes()["buckets"] == 1


def test_plan_change_restarts_gpu_loads_but_keeps_expert_loads(agg):
    agg.ingest(report(agg, 0, 1, 1, [[5, 5], [5, 5]]))
    agg.add_plan(2, V2, in_force=True)
    view = agg.view("m")
    assert view.load.sum() == 20 and view.gpu_load.sum() == 0


def test_state_stays_bounded_under_an_endless_stream(monkeypatch):
    """Many agents (epochs), many plan versions and many windows of reports: dedupe entries,
    cached slot maps and buckets stay within their limits, and the view holds exactly what is
    inside the window."""
    monkeypatch.setattr(aggregation, "MAX_SEQUENCES", 50)
    monkeypatch.setattr(aggregation, "MAX_CACHED_VERSIONS", 3)
    clock = Clock()
    plans = {v: np.roll(V1, v, axis=1) for v in range(1, 11)}
    agg = Window(SPEC, lambda n, v: plans.get(v), clock, 1)
    for v in plans:
        agg.add_plan(v, plans[v], in_force=v == 1)
    highest = {"buckets": 0, "slot_maps": 0, "sequences": 0}
    recent = []
    for n in range(3000):
        clock.t += 0.25                            # 750 s: more than 11 windows of 64 s
        version = 1 + n % 10
        msg = report(agg, n % 4, version, 1, [[1, 2], [3, 4]], epoch=n)
        assert agg.ingest(msg).status == Ack.ACCEPTED
        recent.append(clock.t)
        highest = {k: max(highest[k], v) for k, v in agg.win.sizes().items()}
    assert highest["sequences"] == 50 and highest["slot_maps"] == 3
    assert highest["buckets"] == BUCKETS + 2
    # no decay: the view holds the reports of the buckets whose middle is within the 64 s
    # window (2 s buckets), i.e. all from the last 63 s and none from before the last 65 s
    total = agg.view("m").load.sum()
    assert 10 * sum(t > clock.t - 63 for t in recent) <= total
    assert total <= 10 * sum(t >= clock.t - 65 for t in recent) and total % 10 == 0
