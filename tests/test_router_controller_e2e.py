"""Controller-driven router bias end to end: the REAL controller, the REAL agent and 2 REAL
`expertplane worker` processes (synthetic MoE model, gloo). Enabling ``router_bias`` on the
placement makes the controller compute the bias from the global window and push it; the agent
relays it (WorkerService.SetBias), the workers' routing changes, and GetLoad / GetBiasHistory
show the bias; the workers' step counts and capacity drops (workers run with a capacity factor)
reach GetLoad."""

from __future__ import annotations

import importlib.util
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.tensors import to_numpy


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


real = _load("agent_workers_support", "test_agent_workers.py")
support, e2e = real.support, real.e2e
make_agent, workers = e2e.make_agent, e2e.workers      # fixtures shared with the e2e tests


def _logical(reports: list[pb.LoadReport], phy2log: np.ndarray) -> np.ndarray:
    """Share of tokens per logical expert [L, E] over ``reports`` (all counted under plan 1)."""
    layers, slots = phy2log.shape
    per_rank = slots // real.WORLD
    load = np.zeros((layers, real.EXPERTS))
    for r in reports:
        counts = to_numpy(r.slot_counts, "slot_counts")
        for layer in range(layers):
            ids = phy2log[layer, r.worker_rank * per_rank:(r.worker_rank + 1) * per_rank]
            np.add.at(load[layer], ids, counts[layer])
    return load / load.sum(axis=1, keepdims=True)


@pytest.mark.timeout(120)
def test_enabling_router_bias_pushes_global_bias_to_real_workers(tmp_path, make_agent, workers,
                                                                  monkeypatch):
    popen = subprocess.Popen      # the shared launcher, with a capacity (drops to report)
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: popen(
        [*cmd, "--capacity-factor", "1.0"], **kw))
    c, spy = support.start_controller(tmp_path / "controller.db")
    placement = pb.Placement()
    placement.CopyFrom(real.PLACEMENT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{c.port}") as ch:
            plans = pb_grpc.PlanServiceStub(ch)
            plans.ApplyPlacement(placement, timeout=30)
            phy2log = to_numpy(plans.GetPlan(pb.GetPlanRequest(placement="demo"), timeout=10)
                               .phy2log, "phy2log")
            agent = make_agent(c.port, interval=0.2, lost_after=3)
            workers.extend(real.start_real_workers(tmp_path, agent.start(), c.port))
            e2e.wait_for(lambda: all(len(spy.accepted(rank)) >= 4 for rank in (0, 1)), timeout=60,
                         what="reports of both real workers (see worker*.log)")
            assert not len(plans.GetLoad(pb.GetLoadRequest(placement="demo"), timeout=10)
                           .router_bias.shape)
            before = _logical([r for rank in (0, 1) for r in spy.accepted(rank)], phy2log)
            # enable the controller-driven bias (a strong speed so a few updates move routing)
            placement.router_bias.CopyFrom(pb.RouterBiasPolicy(
                enabled=True, speed=0.25, rule="sign", interval_seconds=0.3))
            plans.ApplyPlacement(placement, timeout=30)
            e2e.wait_for(lambda: len(plans.GetBiasHistory(pb.GetBiasHistoryRequest(placement="demo"),
                                                          timeout=10).points) >= 4,
                         timeout=20, what="four bias updates")
            switched = time.time()
            e2e.wait_for(lambda: all(sum(r.window_start.ToNanoseconds() > switched * 1e9
                                         for r in spy.accepted(rank)) >= 4 for rank in (0, 1)),
                         timeout=20, what="reports taken under the pushed bias")
            after = _logical([r for rank in (0, 1) for r in spy.accepted(rank)
                              if r.window_start.ToNanoseconds() > switched * 1e9], phy2log)
            window = plans.GetLoad(pb.GetLoadRequest(placement="demo"), timeout=10)
            history = plans.GetBiasHistory(pb.GetBiasHistoryRequest(placement="demo"), timeout=10)
    finally:
        c.stop(grace=0)
    bias = to_numpy(window.router_bias, "router_bias")
    assert bias.shape == (real.LAYERS, real.EXPERTS) and np.abs(bias).max() > 0
    seqs = [p.sequence for p in history.points]
    assert seqs == sorted(set(seqs)) and len(history.points[-1].max_over_mean) == real.LAYERS
    assert all(min(p.max_over_mean) >= 1.0 for p in history.points)
    # the bias drives the most loaded experts' bias down: it is the global (both ranks) signal
    first = to_numpy(history.points[0].bias, "bias")
    assert np.allclose(np.abs(first[first != 0]), 0.25)
    # routing changed on the workers: the token shares per expert moved
    assert np.abs(after - before).sum(axis=1).max() > 0.1, (before, after)
    # steps of every accepted report reach GetLoad (summed over both ranks)
    steps = sum(r.steps for rank in (0, 1) for r in spy.accepted(rank))
    assert window.steps > 0 and window.steps <= steps and window.failed_steps == 0
    # capacity drops reported by the workers reach GetLoad per layer and GPU
    dropped = to_numpy(window.dropped_tokens, "dropped_tokens")
    assert dropped.shape == (real.LAYERS, real.WORLD) and dropped.sum() > 0
    reported = sum(to_numpy(r.dropped_tokens, "dropped_tokens").sum()
                   for rank in (0, 1) for r in spy.accepted(rank))
    assert dropped.sum() <= reported
