"""Acknowledged counter pulls (issue 6): the worker keeps its last snapshot until the agent names it
in a later pull, so a lost PullCounters answer loses no tokens, and the agent counts a snapshot
sent again only once. Ledger rules in isolation, then a real agent pulling an in-process worker
over gRPC through a client interceptor that drops answers and replays stale acknowledgements."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from expertplane.agent import registry as agent_registry
from expertplane.worker.service import (
    CounterLedger,
    WorkerIdentity,
    WorkerServicer,
    serve_worker_service,
)
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.security import SecurityConfig

_spec = importlib.util.spec_from_file_location("agent_e2e_support",
                                               Path(__file__).with_name("test_agent_e2e.py"))
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)
make_agent = e2e.make_agent                              # fixture shared with the agent e2e tests

LAYERS, SLOTS, AGENT, OTHER_AGENT = 2, 3, 101, 202


def ones(k: int = 1) -> np.ndarray:
    return np.full((LAYERS, SLOTS), k, dtype=np.int64)


def test_a_window_is_sent_again_until_acknowledged():
    ledger = CounterLedger(LAYERS, SLOTS, version=1)
    ledger.add(1, ones())
    first = ledger.pull(AGENT)
    assert first.sequence == 1 and first.counts.sum() == LAYERS * SLOTS
    ledger.add(1, ones(2))                               # counted while the answer is lost
    again = ledger.pull(AGENT, (0, 0))                   # the agent never received sequence 1
    assert (again.sequence, again.counts.sum()) == (1, LAYERS * SLOTS) and ledger.resent == 1
    second = ledger.pull(AGENT, (ledger.epoch, 1))       # acknowledged: the next window
    assert (second.sequence, second.counts.sum()) == (2, 2 * LAYERS * SLOTS)


def test_an_acknowledgement_of_another_worker_process_drops_nothing():
    ledger = CounterLedger(LAYERS, SLOTS, version=1)
    ledger.add(1, ones())
    assert ledger.pull(AGENT).sequence == 1
    # same sequence number, but counted by a previous process of this worker (another epoch)
    assert ledger.pull(AGENT, (ledger.epoch + 1, 1)).sequence == 1
    assert CounterLedger(LAYERS, SLOTS, version=1).epoch != ledger.epoch


def test_a_new_agent_does_not_get_its_predecessors_window():
    """A restarted agent: the old one received the pending window (and reported it) or lost it
    with its own unsent reports; sending it again would count it twice at the controller."""
    ledger = CounterLedger(LAYERS, SLOTS, version=1)
    ledger.add(1, ones())
    assert ledger.pull(AGENT).sequence == 1
    ledger.add(1, ones(3))
    fresh = ledger.pull(OTHER_AGENT)
    assert (fresh.sequence, fresh.counts.sum()) == (2, 3 * LAYERS * SLOTS) and ledger.resent == 0


def test_pulls_without_an_agent_epoch_keep_nothing():
    ledger = CounterLedger(LAYERS, SLOTS, version=1)
    ledger.add(1, ones())
    first = ledger.pull()
    ledger.add(1, ones(2))
    second = ledger.pull()
    assert (first.sequence, second.sequence) == (0, 0)
    assert (first.counts.sum(), second.counts.sum()) == (LAYERS * SLOTS, 2 * LAYERS * SLOTS)


def _servicer(ledger: CounterLedger) -> WorkerServicer:
    return WorkerServicer(WorkerIdentity("node-a", 0, 1, "demo", LAYERS, 4, SLOTS),
                          SimpleNamespace(version=1, prepared_version=0), ledger,
                          address=lambda: "", on_bias=lambda bias: None)


def test_drained_once_the_last_window_is_acknowledged():
    """A stopping worker waits until every step is delivered: its last window must have been
    acknowledged; a window without steps has nothing to lose and is not kept."""
    ledger = CounterLedger(LAYERS, SLOTS, version=1)
    servicer = _servicer(ledger)
    ledger.add(1, ones())
    last = servicer.PullCounters(pb.PullCountersRequest(agent_epoch=AGENT), context=None)
    assert last.sequence == 1 and ledger.pending and not ledger.wait_delivered(0)
    empty = servicer.PullCounters(pb.PullCountersRequest(
        agent_epoch=AGENT, ack_epoch=last.epoch, ack_sequence=last.sequence), context=None)
    assert (empty.sequence, empty.steps) == (0, 0) and not ledger.pending
    assert ledger.wait_delivered(0) and ledger.undelivered_steps == 0


@pytest.mark.parametrize("agent_epoch", [0, AGENT], ids=["no-acks", "acks"])
def test_a_stopping_worker_waits_for_every_window_of_a_plan_change(agent_epoch):
    """Steps under plan v1, a switch to v2, more steps, then the serving loop ends: the ledger
    holds two windows and one pull takes one, so the drain must wait for a second pull (a
    worker that stopped after the first lost the v2 window's counts)."""
    ledger = CounterLedger(LAYERS, SLOTS, version=1)
    servicer = _servicer(ledger)
    ledger.add(1, ones())
    ledger.add(2, ones(2))
    ledger.add(2, ones(2))
    assert ledger.undelivered_steps == 3
    done = threading.Event()
    waiter = threading.Thread(target=lambda: ledger.wait_delivered(10) and done.set())
    waiter.start()
    received, ack = [], {}
    while not done.wait(0.05):
        snap = servicer.PullCounters(pb.PullCountersRequest(agent_epoch=agent_epoch, **ack),
                                     context=None)
        received.append((snap.plan_version, snap.steps))
        ack = dict(ack_epoch=snap.epoch, ack_sequence=snap.sequence) if agent_epoch else {}
        assert len(received) <= 3
    waiter.join()
    assert [r for r in received if r[1]] == [(1, 1), (2, 2)]
    assert ledger.undelivered_steps == 0


@pytest.mark.timeout(60)
def test_a_stopping_agent_pulls_every_window_its_worker_holds(make_agent):
    """Agent and worker stop together after a plan change the agent has not pulled yet: the
    worker holds a v1 and a v2 window, and the agent's final pulls take both (one final pull
    took only the v1 window) and acknowledge the last, so the worker's drain ends too."""
    controller = e2e.TestController()
    controller.start()
    ledger = CounterLedger(LAYERS, SLOTS, version=1)
    address = ["127.0.0.1:0"]
    servicer = WorkerServicer(WorkerIdentity("node-a", 0, 1, "demo", LAYERS, 4, SLOTS),
                              SimpleNamespace(version=1, prepared_version=0), ledger,
                              address=lambda: address[0], on_bias=lambda bias: None)
    server, address[0] = serve_worker_service(servicer, address[0], SecurityConfig())
    try:
        agent = make_agent(controller.port, interval=300.0)   # no pull before stop
        with make_channel(agent.start()) as ch:
            pb_grpc.AgentServiceStub(ch).Register(pb.RegisterRequest(worker=servicer.info()),
                                                  timeout=5)
        ledger.add(1, ones())
        ledger.add(2, ones(2))
        ledger.add(2, ones(3))
        assert agent.stop(flush_timeout=10)
        reports = controller.reports(0)
        assert sorted((r.plan_version, sum(r.slot_counts.values)) for r in reports if r.steps) \
            == [(1, LAYERS * SLOTS), (2, 5 * LAYERS * SLOTS)]
        assert ledger.wait_delivered(0)
    finally:
        server.stop(0)
        controller.stop()


class LostAnswer(grpc.RpcError):
    """What the agent's stub raises when the test drops an answer the worker already sent."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "answer dropped by the test"


class FaultyPulls(grpc.UnaryUnaryClientInterceptor):
    """On the agent's channel to the worker: every ``lose_every``-th PullCounters is answered by
    the worker and then raises DEADLINE_EXCEEDED in the agent (``lost`` counts those that held
    counts); every ``stale_every``-th (not lost) carries no acknowledgement, as a delayed copy of
    an old request would, so the worker sends its pending, already counted snapshot again."""

    def __init__(self, lose_every: int = 3, stale_every: int = 5):
        self.lose_every, self.stale_every = lose_every, stale_every
        self.pulls = self.lost = self.stale = 0
        self.lock = threading.Lock()

    def intercept_unary_unary(self, continuation, client_call_details, request):
        if not client_call_details.method.endswith("/PullCounters"):
            return continuation(client_call_details, request)
        with self.lock:
            self.pulls += 1
            lose = self.pulls % self.lose_every == 0
            stale = not lose and self.pulls % self.stale_every == 0
            self.stale += stale
        if stale:
            request = pb.PullCountersRequest(agent_epoch=request.agent_epoch)
        call = continuation(client_call_details, request)
        if lose:
            answer = call.result()                       # the worker answered ...
            with self.lock:
                self.lost += bool(answer.sequence)       # (windows without steps: nothing lost)
            raise LostAnswer()                           # ... and the answer never arrived
        return call


@pytest.mark.timeout(60)
def test_lost_answers_and_replayed_snapshots_lose_and_double_count_nothing(make_agent, monkeypatch):
    faults = FaultyPulls()
    real_make_channel = agent_registry.make_channel
    monkeypatch.setattr(agent_registry, "make_channel",
                        lambda target, security=None: grpc.intercept_channel(
                            real_make_channel(target, security), faults))
    controller = e2e.TestController()
    controller.start()
    ledger = CounterLedger(LAYERS, SLOTS, version=1)
    ident = WorkerIdentity("node-a", 0, 1, "demo", LAYERS, 4, SLOTS)
    address = ["127.0.0.1:0"]
    servicer = WorkerServicer(ident, SimpleNamespace(version=1, prepared_version=0), ledger,
                              address=lambda: address[0], on_bias=lambda bias: None)
    server, address[0] = serve_worker_service(servicer, address[0], SecurityConfig())
    try:
        agent = make_agent(controller.port, interval=0.05, lost_after=3)
        agent_address = agent.start()

        def register() -> None:
            with make_channel(agent_address) as ch:
                pb_grpc.AgentServiceStub(ch).Register(pb.RegisterRequest(worker=servicer.info()),
                                                      timeout=5)

        register()
        rejoined = False
        rng = np.random.default_rng(0)
        added = np.zeros((LAYERS, SLOTS), dtype=np.int64)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline or faults.lost < 3 or faults.stale < 3:
            step = rng.integers(0, 50, size=(LAYERS, SLOTS))
            ledger.add(1, step)
            added += step
            time.sleep(0.005)
            if faults.pulls >= 20 and not rejoined:
                # dropped and registered again (the same worker process, its last snapshot
                # counted but not yet acknowledged): the new handle must not count it again
                agent.registry.lose(agent.registry.handles()[0], "dropped by the test")
                register()
                rejoined = True

        def reported() -> np.ndarray:
            return sum((np.array(r.slot_counts.values).reshape(LAYERS, SLOTS)
                        for r in controller.reports(0)), np.zeros((LAYERS, SLOTS), dtype=np.int64))

        e2e.wait_for(lambda: (reported() >= added).all(), timeout=15,
                     what="every token counted at the controller")
        time.sleep(0.5)                                  # ~10 more pulls: nothing counted twice
        assert (reported() == added).all(), reported() - added
        # each lost answer was sent again; a stale pull right after a good one got a duplicate
        # (right after a lost one it got the missing snapshot instead, new to the agent)
        duplicates = agent.metrics.snapshots_duplicate._value.get()
        assert ledger.resent >= faults.lost and 1 <= duplicates <= faults.stale
        assert agent.metrics.pull_failures._value.get() >= faults.lost
        assert len(agent.registry) == 1                  # a lost answer is no lost worker
    finally:
        server.stop(0)
        controller.stop()
