"""The agent's side of rollout protocol BATCHED: it waits for the controller to answer its HELLO
(a clear error while it does not: the controller down, or one that never answers), a rollout
started right after the answer commits on its worker processes, a command naming ranks goes to
those local workers only, and the CLI says when the agent is registered (or why not yet)."""

from __future__ import annotations

import importlib.util
import logging
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from expertplane.controller.config import ControllerConfig
from expertplane.controller.convert import plan_message
from expertplane.controller.server import ControllerServer
from expertplane.controller.store import PlanRecord, utcnow
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc

_spec = importlib.util.spec_from_file_location("agent_e2e_support",
                                               Path(__file__).with_name("test_agent_e2e.py"))
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)
make_agent, workers, controller = e2e.make_agent, e2e.workers, e2e.controller   # fixtures

PLACEMENT = pb.Placement(
    name="demo", model=pb.ModelSpec(num_layers=e2e.LAYERS, num_experts=4, num_groups=1),
    topology=pb.Topology(num_nodes=1, gpus_per_node=2), num_replicas=2 * e2e.SLOTS,
    algorithm="deepseek",
    policy=pb.RebalancePolicy(mode=pb.RebalancePolicy.MANUAL, window_seconds=300))


def start_controller(db: Path, port: int = 0) -> ControllerServer:
    server = ControllerServer(ControllerConfig(listen=f"127.0.0.1:{port}", db_url=f"sqlite:///{db}",
                                               policy_interval_seconds=3600.0,
                                               snapshot_interval_seconds=3600.0,
                                               rollout_timeout_seconds=20.0))
    server.start()
    return server


@pytest.mark.timeout(120)
def test_a_rollout_right_after_the_controller_registered_the_agent_commits(tmp_path, make_agent,
                                                                           workers):
    """The agent and its two worker processes run while the controller is down; the controller
    comes up, the agent's HELLO lists both workers, and as soon as ``wait_registered`` returns a
    rollout to both ranks starts and commits."""
    db = tmp_path / "controller.db"
    first = start_controller(db)
    port = first.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        pb_grpc.PlanServiceStub(ch).ApplyPlacement(PLACEMENT, timeout=60)
    first.stop(grace=0)
    agent = make_agent(port)
    address = agent.start()
    workers += [e2e.start_worker(tmp_path, address, r) for r in (0, 1)]
    e2e.wait_for(lambda: len(agent.registry) == 2, timeout=30, what="workers registered")
    with pytest.raises(TimeoutError, match=r"has not registered node node-a within 0.2 s: "
                                           r"rollout stream (closed|connecting)"):
        agent.wait_registered(0.2)
    server = start_controller(db, port)
    try:
        agent.wait_registered(30)
        c = server.controller
        base = c.get_plan("demo", 1)
        rec = PlanRecord(**{**base.__dict__, "version": 0, "reason": "api", "previous_version": 1,
                            "created_at": utcnow(), "phy2log": np.roll(base.phy2log, 1, axis=1)})
        started = c.rollouts.start("demo", plan_message(c.store.add_plan(rec)), 1, 2)
        assert started.state == "preparing", started.reason
        assert c.rollouts.wait(started.id, 30)
        [done] = [r for r in c.store.list_rollouts("demo", 5) if r.id == started.id]
        assert (done.state, sorted(done.acks["committed"])) == ("committed", [0, 1])
    finally:
        server.stop(grace=0)


@pytest.mark.timeout(60)
def test_a_controller_that_never_answers_hello_is_a_clear_error(controller, make_agent, caplog):
    """The test controller plays one older than protocol BATCHED: it reads the HELLO (which
    announces BATCHED) and never answers; the agent logs an error once and keeps its stream."""
    agent = make_agent(controller.port, hello_timeout=0.3)
    caplog.set_level(logging.ERROR, logger="expertplane.agent.rollout")
    agent.start()
    hello = controller.wait_event(pb.RolloutEvent.HELLO)
    assert hello.protocol == pb.ROLLOUT_PROTOCOL_BATCHED
    with pytest.raises(TimeoutError, match="HELLO not answered .a controller older than rollout "
                                           "protocol BATCHED never answers it."):
        agent.wait_registered(1.5)
    errors = [r.getMessage() for r in caplog.records if "has not acknowledged" in r.getMessage()]
    assert len(errors) == 1 and "within 0.3 s" in errors[0]
    # the answer, when it comes, registers the agent
    controller.commands.put(pb.RolloutCommand(hello=pb.HelloAck(protocol=1)))
    agent.wait_registered(5)


@pytest.mark.timeout(60)
def test_a_command_naming_ranks_goes_to_those_workers_only(controller, make_agent, workers,
                                                           tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="expertplane.agent.rollout")
    agent = make_agent(controller.port)
    address = agent.start()
    workers += [e2e.start_worker(tmp_path, address, r) for r in (0, 1)]
    for rank in (0, 1):
        controller.wait_event(pb.RolloutEvent.WORKER_JOINED, rank)
    plan = pb.Plan(summary=pb.PlanSummary(placement="demo", version=2))
    controller.commands.put(pb.RolloutCommand(rollout_id="s1", placement="demo", prepare=plan,
                                              ranks=[1]))
    prepared = controller.wait_event(pb.RolloutEvent.PREPARED, 1)
    assert prepared.workers[0].prepared_version == 2
    controller.commands.put(pb.RolloutCommand(rollout_id="s1", placement="demo", commit=2,
                                              ranks=[1]))
    assert controller.wait_event(pb.RolloutEvent.COMMITTED, 1).workers[0].plan_version == 2
    controller.commands.put(pb.RolloutCommand(rollout_id="s2", placement="demo", abort=4,
                                              ranks=[0]))
    assert controller.wait_event(pb.RolloutEvent.ABORTED, 0).rollout_id == "s2"
    relayed = [r.getMessage() for r in caplog.records if " -> " in r.getMessage()]
    assert relayed == ["rollout s1: prepare v2 for 'demo' -> 1 local workers",
                       "rollout s1: commit v2 for 'demo' -> 1 local workers",
                       "rollout s2: abort v4 for 'demo' -> 1 local workers"]
    answered = sorted((pb.RolloutEvent.Kind.Name(e.kind), e.workers[0].rank)
                      for e in controller.events if e.rollout_id in ("s1", "s2"))
    assert answered == [("ABORTED", 0), ("COMMITTED", 1), ("PREPARED", 1)]


@pytest.mark.timeout(60)
def test_cli_agent_says_when_it_is_registered_and_when_it_is_not(controller, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "expertplane.cli.main", "agent", "--controller",
         f"127.0.0.1:{controller.port}", "--node", "node-a", "--socket",
         str(tmp_path / "agent.sock"), "--hello-timeout", "300ms"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving workers at unix:" in proc.stdout.readline()
        controller.wait_event(pb.RolloutEvent.HELLO)
        error = proc.stderr.readline()
        while not error.startswith("error:"):                   # after the log lines
            error = proc.stderr.readline()
        assert error.startswith(f"error: the controller at 127.0.0.1:{controller.port} has not "
                                "registered node node-a within 0.3 s: rollout stream open, "
                                "HELLO not answered")
        controller.commands.put(pb.RolloutCommand(hello=pb.HelloAck(protocol=1)))
        assert proc.stdout.readline().strip() == (
            f"agent node-a ready: registered with the controller at 127.0.0.1:{controller.port}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
