"""The operator's pure parts: CR spec -> controller messages with field paths in errors,
conditions per Kubernetes conventions, configuration checks."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import yaml

from expertplane.controller.operator import conditions as cond
from expertplane.controller.operator.config import OperatorConfig, add_operator_arguments, config_from_args
from expertplane.controller.operator.crd import (
    SpecError,
    Topology,
    initial_load_source,
    label_selector,
    memory_limit_bytes,
    parse_load_document,
    pipeline_request_from_cr,
    placement_from_cr,
    placement_name,
    plan_configmap_name,
    replicas_of,
    topology_from_spec,
)
from expertplane.controller.operator.kube import plan_identity
from expertplane.controller.spec import spec_from_proto
from expertplane.proto import expertplane_pb2 as pb
from tests.k8s_fixture import REPO

SAMPLES = REPO / "manifests" / "samples"


def sample(name):
    return yaml.safe_load((SAMPLES / name).read_text())


def test_deepseek_sample_becomes_a_valid_placement():
    spec = sample("deepseek-v3-placement.yaml")["spec"]
    topo = topology_from_spec(spec)
    assert topo == Topology(4, 8) and replicas_of(spec) == 288
    msg = placement_from_cr("default-deepseek-v3", spec, topo, generation=3)
    assert (msg.model.num_layers, msg.model.num_experts, msg.model.num_groups) == (58, 256, 8)
    assert msg.num_replicas == 288 and msg.generation == 3 and msg.algorithm == "deepseek"
    assert msg.policy.mode == pb.RebalancePolicy.AUTO and msg.policy.move_budget_bytes == 4227858432
    assert msg.policy.window_seconds == 600 and msg.policy.cooldown_seconds == 300
    parsed = spec_from_proto(msg)                       # the controller accepts it as is
    assert parsed.slots_per_gpu == 9
    assert plan_identity(msg, 2) == "v2 58x288 4x8"


@pytest.mark.parametrize("change, message", [
    ({"replicas": 300}, "spec.replicas: must be a multiple of the GPU count (32), got 300"),
    ({"replicas": 128}, "spec.replicas: must be >= num_experts (256), got 128"),
    ({"redundantExperts": 4}, "spec.redundantExperts: must be a multiple of the GPU count (32), got 260"),
    ({"model": {"layers": 58, "experts": 256, "groups": 7}},
     "spec.model.groups: must divide num_experts (256), got 7"),
])
def test_divisibility_errors_name_the_cr_field(change, message):
    spec = {**sample("deepseek-v3-placement.yaml")["spec"], **change}
    if "replicas" in change:
        spec.pop("redundantExperts")
    with pytest.raises(SpecError) as err:
        placement_from_cr("p", spec, Topology(4, 8), 1)
    assert str(err.value) == message


def test_one_of_rules():
    with pytest.raises(SpecError, match=r"^spec.replicas: give replicas or redundantExperts, not both "
                                        r"\(replicas: 4, redundantExperts: 0\)$"):
        replicas_of({"model": {"experts": 4}, "replicas": 4, "redundantExperts": 0})
    with pytest.raises(SpecError, match="^spec.initialLoadFrom: give initialLoad or initialLoadFrom"):
        initial_load_source({"initialLoad": {"values": [[1]]},
                             "initialLoadFrom": {"configMapKeyRef": {"name": "a", "key": "b"}}})
    assert initial_load_source({}) is None
    assert initial_load_source({"initialLoadFrom": {"configMapKeyRef": {"name": "a", "key": "b"}}}) \
        == ("spec.initialLoadFrom.configMapKeyRef", {"name": "a", "key": "b"})
    with pytest.raises(SpecError, match="give nodes or workerSelector, not both"):
        topology_from_spec({"topology": {"nodes": 1, "gpusPerNode": 1, "workerSelector": {}}})
    with pytest.raises(SpecError, match="needs nodes and gpusPerNode"):
        topology_from_spec({"topology": {"nodes": 1}})
    assert topology_from_spec({"topology": {"workerSelector": {"matchLabels": {"a": "b"}}}}) is None


def test_initial_load_shape_and_documents():
    spec = {"model": {"layers": 2, "experts": 4}, "replicas": 4}
    load = parse_load_document('{"load": [[1, 2, 3, 4], [4, 3, 2, 1]]}', "f")
    msg = placement_from_cr("p", spec, Topology(1, 2), 1, load)
    assert list(msg.initial_load.shape) == [2, 4]
    assert parse_load_document("- [1, 2]\n- [3, 4]\n", "f").shape == (2, 2)
    with pytest.raises(SpecError, match=r"spec.initialLoad.values: must have shape \[2, 4\], got \[1, 4\]"):
        placement_from_cr("p", spec, Topology(1, 2), 1, np.ones((1, 4)))
    with pytest.raises(SpecError, match=r"^spec.initialLoadFrom.configMapKeyRef: must have shape"):
        placement_from_cr("p", spec, Topology(1, 2), 1, np.ones((1, 4)),
                          load_field="spec.initialLoadFrom.configMapKeyRef")
    with pytest.raises(SpecError, match="^f: must be a list of equally long lists"):
        parse_load_document("[[1, 2], [3]]", "f")
    with pytest.raises(SpecError, match="^f: a mapping must hold the matrix under key 'load'"):
        parse_load_document("{other: 1}", "f")


def test_label_selector_strings():
    sel = {"matchLabels": {"b": "2", "a": "1"},
           "matchExpressions": [{"key": "tier", "operator": "In", "values": ["x", "y"]},
                                {"key": "gpu", "operator": "Exists"},
                                {"key": "old", "operator": "DoesNotExist"},
                                {"key": "z", "operator": "NotIn", "values": ["q"]}]}
    assert label_selector(sel) == "a=1,b=2,tier in (x,y),gpu,!old,z notin (q)"
    with pytest.raises(SpecError, match="needs values"):
        label_selector({"matchExpressions": [{"key": "k", "operator": "In"}]})
    with pytest.raises(SpecError, match="must have matchLabels or matchExpressions"):
        label_selector({})


def test_names():
    assert placement_name("default", "deepseek-v3") == "default-deepseek-v3"
    long = placement_name("n" * 40, "m" * 40)
    assert len(long) <= 63 and long != placement_name("n" * 40, "m" * 39 + "x")
    assert plan_configmap_name("x", {}) == "x-expert-location"
    assert plan_configmap_name("x", {"planConfigMap": "mine"}) == "mine"


def test_pipeline_sample_request():
    spec = sample("deepseek-v3-pipeline.yaml")["spec"]
    req = pipeline_request_from_cr(spec)
    assert len(req.layers) == 1 + 3 + 58 + 1
    assert [req.layers[i].kind for i in (0, 1, 3, 4, 61, 62)] == ["embedding", "dense", "dense", "moe",
                                                                   "moe", "head"]
    assert req.layers[10].ep_imbalance == pytest.approx(1.15)
    assert (req.num_stages, req.schedule, req.micro_batches) == (8, "dualpipe", 16)
    assert req.memory_limit_bytes == 80 * 2**30 and req.p2p_seconds == pytest.approx(0.0005)
    by_ref = pipeline_request_from_cr({**spec, "profile": {"configMapRef": {"name": "p", "key": "k"}}},
                                      "layers: []")
    assert by_ref.profile_yaml == "layers: []" and not by_ref.layers


def test_memory_limit_quantities():
    assert memory_limit_bytes(None) == 0
    assert memory_limit_bytes(1024) == 1024
    assert memory_limit_bytes("1Ki") == 1024 and memory_limit_bytes("2G") == 2 * 10**9
    with pytest.raises(SpecError, match="spec.memoryLimit"):
        memory_limit_bytes("lots")


def test_conditions_keep_transition_time_until_status_changes(monkeypatch):
    times = iter(["2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"])
    monkeypatch.setattr(cond, "now_rfc3339", lambda: next(times))
    c = cond.set_condition([], cond.READY, False, "Pending", "waiting", 1)
    c = cond.set_condition(c, cond.READY, False, "Pending", "still waiting", 2)
    ready = cond.get_condition(c, cond.READY)
    assert ready == {"type": "Ready", "status": "False", "reason": "Pending", "message": "still waiting",
                     "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}
    c = cond.set_condition(c, cond.READY, True, "PlanPublished", "ok", 2)
    c = cond.set_condition(c, cond.DEGRADED, None, "Unknown", "?", 2)
    assert cond.get_condition(c, cond.READY)["lastTransitionTime"] == "2026-01-01T00:01:00Z"
    assert [x["type"] for x in c] == ["Ready", "Degraded"]
    assert cond.get_condition(c, cond.DEGRADED)["status"] == "Unknown"


def test_config_from_args_and_checks():
    parser = argparse.ArgumentParser()
    add_operator_arguments(parser)
    args = parser.parse_args(["--controller", "c:1", "--namespace", "a", "--namespace", "b",
                              "--identity", "me", "--refresh-seconds", "3"])
    cfg = config_from_args(args)
    assert (cfg.controller, cfg.namespaces, cfg.identity, cfg.refresh_seconds) == ("c:1", ("a", "b"), "me", 3)
    with pytest.raises(ValueError, match="controller"):
        OperatorConfig(controller="")
    with pytest.raises(ValueError, match="renew_deadline_seconds"):
        OperatorConfig(controller="c:1", lease_duration_seconds=5, renew_deadline_seconds=6)
    with pytest.raises(ValueError, match="refresh_seconds"):
        OperatorConfig(controller="c:1", refresh_seconds=0)


def _containers():
    for path in sorted((REPO / "manifests").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in ("Deployment", "DaemonSet"):
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    yield doc["metadata"]["name"], c


def test_manifest_commands_parse_with_the_real_clis():
    """The container args in manifests/ are accepted by the CLIs they run (env vars substituted)."""
    import re

    from expertplane.cli.main import build_parser

    seen = set()
    for name, c in _containers():
        argv = [re.sub(r"\$\((\w+)\)", "x", a) for a in c["command"][1:] + c["args"]]
        assert c["command"][0] == "expertplane", c["command"]
        args = build_parser().parse_args(argv)
        assert args.func is not None
        if name == "expertplane-operator":
            assert config_from_args(args).controller == \
                "expertplane-controller.expertplane-system.svc:50051"
        seen.add(name)
    assert seen == {"expertplane-controller", "expertplane-operator", "expertplane-agent"}



def test_diff_base_is_a_digest_of_the_essence():
    """kopf's diff base stays 71 characters whatever the spec's size; an unchanged object reads
    back as unchanged, a changed one as changed, a never-handled one as new."""
    import kopf
    from kopf._cogs.structs import bodies, patches

    from expertplane.controller.operator.storage import DigestDiffBaseStorage

    storage = DigestDiffBaseStorage()
    raw = {"apiVersion": "expertplane.io/v1alpha1", "kind": "ExpertPlacement",
           "metadata": {"name": "x", "namespace": "d", "annotations": {"expertplane.io/rebalance": "stop"}},
           "spec": {"initialLoad": {"values": np.ones((64, 128)).tolist()}}}
    assert storage.fetch(body=bodies.Body(raw)) is None
    patch = patches.Patch()
    storage.store(body=bodies.Body(raw), patch=patch, essence=storage.build(body=bodies.Body(raw)))
    annotations = patch["metadata"]["annotations"]
    digest = annotations["kopf.expertplane.io/last-handled-digest"]
    assert digest.startswith("sha256:") and len(digest) == 71
    handled = {**raw, "metadata": {**raw["metadata"], "annotations": {**raw["metadata"]["annotations"],
                                                                      **annotations}}}
    assert storage.fetch(body=bodies.Body(handled)) == storage.build(body=bodies.Body(raw))
    # Our own annotation is part of the essence: annotating the object is a change kopf handles.
    edited = {**handled, "metadata": {**handled["metadata"], "annotations": {
        k: v for k, v in handled["metadata"]["annotations"].items() if k != "expertplane.io/rebalance"}}}
    assert storage.fetch(body=bodies.Body(edited)) != storage.build(body=bodies.Body(edited))
    assert isinstance(storage, kopf.AnnotationsDiffBaseStorage)


def test_worker_settle_debounces_pod_changes():
    from expertplane.controller.operator.workers import WorkerSettle

    now = [0.0]
    settle = WorkerSettle(clock=lambda: now[0]).settle
    two, one = Topology(2, 4), Topology(1, 4)
    assert settle("p", one, None, 60).topology == one              # first registration: at once
    assert settle("p", two, two, 60).topology == two
    s = settle("p", one, two, 60)                                    # a pod goes (rolling restart)
    assert (s.topology, s.waiting, s.observed) == (two, True, one)
    now[0] = 30
    assert settle("p", None, two, 60).topology == two                # none for a moment: still two
    now[0] = 40
    assert settle("p", two, two, 60) .waiting is False               # back: nothing pending
    now[0] = 50
    assert settle("p", one, two, 60).waiting                         # a real scale-down ...
    now[0] = 109
    assert settle("p", one, two, 60).topology == two
    now[0] = 110
    assert settle("p", one, two, 60).topology == one                 # ... once stable for 60 s


def test_warnings_follow_condition_transitions():
    from expertplane.controller.operator.reconcile import health, warnings

    ok = health([], 1, True, "PlanPublished", "plan v1", None)
    down = health(ok, 1, None, "", "", ("ControllerUnavailable", "ApplyPlacement: UNAVAILABLE"))
    assert warnings(ok, down) == [("Warning", "ControllerUnavailable", "ApplyPlacement: UNAVAILABLE")]
    assert warnings(down, health(down, 1, None, "", "", ("ControllerUnavailable", "again"))) == []
    bad = health(ok, 2, False, "InvalidSpec", "spec.replicas: x", None)
    assert warnings(ok, bad) == [("Warning", "InvalidSpec", "spec.replicas: x")]
    assert warnings(bad, bad) == []
    long = health([], 1, False, "InvalidSpec", "y" * 5000, None)
    assert len(cond.get_condition(long, cond.READY)["message"]) == 1024
