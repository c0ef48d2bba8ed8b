"""The controller's router-bias update (controller/bias.py, controller/router_balancer.py): on a
skewed synthetic router spread over several data-parallel ranks, the bias computed from the
global (summed) load brings max/mean expert load below a target within bounded rounds and keeps
it there; gating weights never change; specs, YAML and report totals validate their fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from expertplane.controller.aggregation import WindowView
from expertplane.controller.bias import (RouterBiasSpec, global_bias_step, max_over_mean,
                                         router_bias_from_proto)
from expertplane.controller.placement_files import placement_from_dict
from expertplane.controller.router_balancer import ReportTotals, RouterBalancer
from expertplane.controller.spec import spec_from_proto, spec_to_proto
from expertplane.errors import FieldError
from expertplane.kernels.balancing import BiasUpdate, expert_load
from expertplane.kernels.routing import RouterConfig, gating_weights, route, router_scores
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import int64_tensor

LAYERS, EXPERTS, RANKS, TOKENS = 2, 16, 4, 512
CFG = RouterConfig(num_experts=EXPERTS, top_k=2, scoring="sigmoid")


def skewed_logits(seed: int = 0) -> list[list[torch.Tensor]]:
    """[L][W] router logits [T, E]: a shared per-layer popularity skew plus a per-rank one (so
    no rank's own load equals the global load)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(LAYERS):
        skew = torch.linspace(2.5, 0, EXPERTS)[torch.randperm(EXPERTS, generator=gen)]
        out.append([torch.randn(TOKENS, EXPERTS, generator=gen) + skew +
                    0.5 * torch.randn(EXPERTS, generator=gen) for _ in range(RANKS)])
    return out


def global_load(logits, bias: np.ndarray) -> np.ndarray:
    """[L, E] selections per expert summed over the ranks, routed with ``bias`` [L, E]."""
    return np.stack([
        sum(expert_load(route(logits[l][r], CFG, torch.tensor(bias[l], dtype=torch.float32))[0],
                        EXPERTS) for r in range(RANKS)).numpy()
        for l in range(LAYERS)]).astype(np.float64)


@pytest.mark.parametrize("rule,speed,target,within,bound", [("sign", 0.003, 1.25, 40, 1.3),
                                                             ("proportional", 0.01, 1.10, 25, 1.1)])
def test_global_bias_converges_without_oscillation(rule, speed, target, within, bound):
    """max/mean of the global load drops below ``target`` within ``within`` rounds, never
    exceeds ``bound`` after that, and settles (the last 100 rounds vary by < 0.1)."""
    logits = skewed_logits()
    bias = np.zeros((LAYERS, EXPERTS))
    update = BiasUpdate(speed, rule)
    ratios = []
    for _ in range(200):
        load = global_load(logits, bias)
        ratios.append(float(max_over_mean(load).max()))
        bias = global_bias_step(bias, load, update)
    assert ratios[0] > 2.5                                  # heavily skewed without a bias
    first = next(i for i, r in enumerate(ratios) if r < target)
    assert first <= within, ratios[:within + 1]
    assert max(ratios[first:]) < bound, ratios
    assert max(ratios[-100:]) - min(ratios[-100:]) < 0.1, ratios[-100:]
    assert np.isfinite(bias).all()
    if rule == "sign":
        assert np.abs(bias).max() <= speed * 200 + 1e-6


def test_global_bias_never_changes_gating_weights():
    logits = skewed_logits(1)
    load = global_load(logits, np.zeros((LAYERS, EXPERTS)))
    bias = global_bias_step(np.zeros((LAYERS, EXPERTS)), load, BiasUpdate(0.3, "sign"))
    for l in range(LAYERS):
        x = logits[l][0]
        ids, weights = route(x, CFG, torch.tensor(bias[l], dtype=torch.float32))
        assert torch.equal(weights, gating_weights(router_scores(x, "sigmoid"), ids, CFG))
        assert not torch.equal(ids, route(x, CFG)[0])        # the selection did change


def test_global_step_rules_and_layers_without_load():
    bias = np.zeros((2, 4))
    load = np.array([[4.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    out = global_bias_step(bias, load, BiasUpdate(0.1, "sign"))
    assert np.allclose(out[0], [-0.1, 0.0, 0.1, 0.1]) and np.array_equal(out[1], bias[1])
    prop = global_bias_step(bias, load, BiasUpdate(0.1, "proportional"))
    assert np.allclose(prop[0], -0.1 * (load[0] - 2.0) / 2.0, atol=1e-7)
    assert np.allclose(max_over_mean(load), [2.0, 1.0])
    with pytest.raises(FieldError, match="load"):
        global_bias_step(bias, load[:, :3], BiasUpdate())
    # per replica: expert 0 has two replicas, so 4 tokens on it are 2 per replica
    per_replica = global_bias_step(bias, load, BiasUpdate(0.1, "sign"),
                                   replicas=np.array([[2, 1, 1, 1], [1, 1, 1, 1]]))
    assert np.allclose(per_replica[0], [-0.1, -0.1, 0.1, 0.1])
    with pytest.raises(FieldError, match="replicas"):
        global_bias_step(bias, load, BiasUpdate(), replicas=np.zeros((2, 4)))


def test_router_bias_spec_validation_and_round_trip():
    base = dict(name="p", model=pb.ModelSpec(num_layers=2, num_experts=4),
                topology=pb.Topology(num_nodes=1, gpus_per_node=2))
    assert spec_from_proto(pb.Placement(**base)).router_bias is None
    spec = spec_from_proto(pb.Placement(**base, router_bias=pb.RouterBiasPolicy(enabled=True)))
    assert spec.router_bias == RouterBiasSpec(True, 1e-3, "sign", 10.0)
    assert spec_from_proto(spec_to_proto(spec)).router_bias == spec.router_bias
    for field, kw in (("router_bias.rule", {"rule": "cubic"}), ("router_bias.speed", {"speed": -1}),
                      ("router_bias.interval_seconds", {"interval_seconds": float("nan")})):
        with pytest.raises(FieldError, match=field.replace(".", r"\.")):
            router_bias_from_proto(pb.RouterBiasPolicy(enabled=True, **kw))
    doc = {"name": "p", "model": {"num_layers": 2, "num_experts": 4},
           "topology": {"num_nodes": 1, "gpus_per_node": 2},
           "router_bias": {"enabled": True, "speed": 0.01, "rule": "proportional",
                           "interval_seconds": 2}}
    assert spec_from_proto(placement_from_dict(doc)).router_bias == \
        RouterBiasSpec(True, 0.01, "proportional", 2.0)
    with pytest.raises(FieldError, match="router_bias"):
        placement_from_dict({**doc, "router_bias": {"enabled": True, "gamma": 1}})


def _spec(**rb):
    return spec_from_proto(pb.Placement(
        name="p", model=pb.ModelSpec(num_layers=2, num_experts=4),
        topology=pb.Topology(num_nodes=1, gpus_per_node=2), num_replicas=6,
        router_bias=pb.RouterBiasPolicy(**rb)))


def test_router_balancer_interval_history_and_metrics():
    now = [100.0]
    load = np.array([[6.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    pushed = []
    registry = CollectorRegistry()
    rb = RouterBalancer(lambda name: WindowView(load, np.zeros((2, 2)), 3, now[0]),
                        lambda name, bias, seq: pushed.append((name, bias, seq)) or 2, registry,
                        replicas=lambda name: np.array([[2, 2, 1, 1], [2, 2, 1, 1]]),
                        history=3, clock=lambda: now[0], wall=lambda: now[0])
    specs = {"p": _spec(enabled=True, speed=0.5, interval_seconds=5), "off": _spec()}
    assert rb.tick(specs) == ["p"] and rb.tick(specs) == []        # not due again yet
    now[0] += 5
    assert rb.tick(specs) == ["p"]
    assert [p[0] for p in pushed] == ["p", "p"] and pushed[0][2] < pushed[1][2]
    # per replica of the plan (2, 2, 1, 1): layer 0 [3, .5, 1, 0], layer 1 [1, 1, 2, 2]
    assert np.allclose(pushed[1][1], [[-1.0, 1.0, 1.0, 1.0], [1.0, 1.0, -1.0, -1.0]])
    for _ in range(3):
        now[0] += 5
        rb.tick(specs)
    hist = rb.history("p")
    assert len(hist) == 3 and [h.sequence for h in hist] == [p[2] for p in pushed[-3:]]
    assert np.allclose(hist[-1].max_over_mean, [3.0, 1.0]) and hist[-1].agents == 2
    assert registry.get_sample_value("expertplane_controller_router_bias_spread",
                                     {"placement": "p", "layer": "0"}) == pytest.approx(2.5 * 2)
    assert registry.get_sample_value("expertplane_controller_router_load_max_over_mean",
                                     {"placement": "p", "layer": "0"}) == pytest.approx(3.0)
    rb.forget("p")
    assert rb.history("p") == [] and registry.get_sample_value(
        "expertplane_controller_router_bias_spread", {"placement": "p", "layer": "0"}) is None


def test_report_totals_sum_steps_failures_and_drops():
    spec = _spec()
    totals = ReportTotals()
    assert totals.get().steps == 0 and totals.get().dropped is None
    totals.add(pb.LoadReport(placement="p", worker_rank=1, steps=5, failed_steps=1,
                             dropped_tokens=int64_tensor(np.array([[1, 2, 3], [0, 0, 4]]))), spec)
    totals.add(pb.LoadReport(placement="p", worker_rank=0, steps=7), spec)
    totals.add(pb.LoadReport(placement="p", worker_rank=0, steps=1,      # malformed drops ignored
                             dropped_tokens=int64_tensor(np.array([1, 2]))), spec)
    t = totals.get()
    assert (t.steps, t.failed_steps) == (13, 1)
    assert np.array_equal(t.dropped, [[0, 6], [0, 4]])
