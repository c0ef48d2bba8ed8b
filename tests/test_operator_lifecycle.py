"""The rebalance lifecycle through the operator, against a real kube-apiserver and a real
controller on loopback that the tests can stop and restart: Warning events and the Degraded
column, readable mutual-exclusion messages, a large load through ``initialLoadFrom`` (and the
inline limit in the schema), worker-pod changes debounced, stop/refresh from kubectl, a restart
on an empty store that keeps version and map, reshapes that keep the version growing,
propose -> approve -> rolled out, rollback."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from expertplane.benchmarks.simagent import SimulatedAgent, load_report
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.tensors import to_numpy

from tests.k8s_fixture import (  # noqa: F401  (pytest fixtures)
    apiserver,
    condition,
    operator_kubeconfig,
    restartable_controller,
    start_operator,
    wait_for,
)

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]
NS = "default"


@pytest.fixture(scope="module")
def operator(apiserver, operator_kubeconfig, restartable_controller, tmp_path_factory):
    op = start_operator(tmp_path_factory.mktemp("operator"), restartable_controller.port,
                        operator_kubeconfig, "op-life", "--rpc-timeout-seconds", "5",
                        "--proposal-interval-seconds", "1")
    yield op
    assert op.stop() == 0, op.log()[-3000:]


@pytest.fixture(scope="module")
def channel(restartable_controller):
    channel = make_channel(f"127.0.0.1:{restartable_controller.port}")
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def plans(channel):
    return pb_grpc.PlanServiceStub(channel)


def placement(name: str, **spec) -> dict:
    base = {"model": {"layers": 2, "experts": 8, "groups": 2, "expertBytes": 1 << 20},
            "topology": {"nodes": 2, "gpusPerNode": 2}, "replicas": 12,
            "rebalancePolicy": {"mode": "Manual"}}
    base.update(spec)
    return {"apiVersion": "expertplane.io/v1alpha1", "kind": "ExpertPlacement",
            "metadata": {"name": name, "namespace": NS}, "spec": base}


def status_of(cluster, name) -> dict:
    return (cluster.get("expertplacement", name, NS) or {}).get("status") or {}


def ready(cluster, name, **expect):
    """A check: the object is Ready and its status holds ``expect``."""
    def check():
        obj = cluster.get("expertplacement", name, NS)
        c = condition(obj, "Ready")
        st = (obj or {}).get("status") or {}
        if c and c["status"] == "True" and all(st.get(k) == v for k, v in expect.items()):
            return obj
        return None
    return check


def events(cluster, name) -> list[dict]:
    out = cluster.kubectl("get", "events", "-n", NS, "--field-selector",
                          f"involvedObject.name={name}", "-o", "json").stdout
    return json.loads(out)["items"]


def warning(cluster, name, reason):
    def check():
        return next((e for e in events(cluster, name)
                     if e["type"] == "Warning" and e["reason"] == reason), None)
    return check


def test_mutually_exclusive_fields_get_a_readable_message_and_a_warning(apiserver, operator):
    apiserver.apply(placement("both", redundantExperts=4))
    c = wait_for(lambda: condition(apiserver.get("expertplacement", "both", NS), "Ready"),
                 what="Ready condition")
    assert (c["status"], c["reason"]) == ("False", "InvalidSpec")
    assert c["message"] == ("spec.replicas: give replicas or redundantExperts, not both "
                            "(replicas: 12, redundantExperts: 4)")
    event = wait_for(warning(apiserver, "both", "InvalidSpec"), what="InvalidSpec event")
    assert event["message"] == c["message"]
    assert event["source"]["component"] == "expertplane-operator"
    assert event["reportingComponent"] == "expertplane-operator"
    assert event["reportingInstance"] == "op-life"
    # Once per transition, not once per refresh.
    time.sleep(3)
    assert [e["reason"] for e in events(apiserver, "both")].count("InvalidSpec") == 1
    apiserver.kubectl("delete", "expertplacement", "both", "--timeout=30s")


def test_large_load_through_initial_load_from_and_the_inline_limit(apiserver, operator, plans,
                                                                   restartable_controller):
    rng = np.random.default_rng(0)
    load = rng.gamma(0.5, 1000.0, size=(58, 256))          # a skewed DeepSeek-V3-sized load
    text = json.dumps({"load": load.tolist()})
    assert len(text) > 256 * 1024                            # more than all annotations may hold
    apiserver.apply({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "ds-load", "namespace": NS}, "data": {"load.json": text}})
    apiserver.apply(placement("big", model={"layers": 58, "experts": 256, "groups": 8},
                              topology={"nodes": 4, "gpusPerNode": 8}, replicas=288,
                              initialLoadFrom={"configMapKeyRef": {"name": "ds-load", "key": "load.json"}}))
    obj = wait_for(ready(apiserver, "big"), timeout=120, what="big Ready")
    plan = plans.GetPlan(pb.GetPlanRequest(placement="default-big"), timeout=30)
    assert np.array_equal(to_numpy(plan.load_snapshot, "load_snapshot"), load)
    assert obj["status"]["planBalance"] < 1.2 and obj["status"]["numGPUs"] == 32
    # kopf's bookkeeping stays small, so the object can always be written back.
    annotations = obj["metadata"].get("annotations") or {}
    assert sum(len(k) + len(v) for k, v in annotations.items()) < 1024, annotations
    apiserver.kubectl("annotate", "expertplacement", "big", "-n", NS, "expertplane.io/rebalance=stop")
    wait_for(lambda: status_of(apiserver, "big").get("stopped") is True, what="stopped")
    # The same load inline is refused by the schema, which points at initialLoadFrom.
    proc = apiserver.apply(placement("big-inline", model={"layers": 58, "experts": 256, "groups": 8},
                                     topology={"nodes": 4, "gpusPerNode": 8}, replicas=288,
                                     initialLoad={"values": np.round(load, 3).tolist()}), check=False)
    assert proc.returncode != 0
    assert ("spec.initialLoad.values: Invalid value: 256: spec.initialLoad.values in body should "
            "have at most 128 items") in proc.stderr
    explain = apiserver.kubectl("explain", "expertplacement.spec.initialLoad").stdout
    assert "at most 64 layers x 128 experts" in explain and "spec.initialLoadFrom" in explain
    apiserver.kubectl("delete", "expertplacement", "big", "--timeout=60s")
    assert apiserver.get("configmap", "big-expert-location", NS) is None
    # Or a file in the controller's load directory (its volume), which the controller reads.
    np.save(restartable_controller.load_dir / "ds.npy", load)
    apiserver.apply(placement("big-file", model={"layers": 58, "experts": 256, "groups": 8},
                              topology={"nodes": 4, "gpusPerNode": 8}, replicas=288,
                              initialLoadFrom={"file": "ds.npy"}))
    wait_for(ready(apiserver, "big-file"), timeout=120, what="big-file Ready")
    plan = plans.GetPlan(pb.GetPlanRequest(placement="default-big-file"), timeout=30)
    assert np.array_equal(to_numpy(plan.load_snapshot, "load_snapshot"), load)
    apiserver.apply(placement("no-file", initialLoadFrom={"file": "missing.json"}))
    c = wait_for(lambda: condition(apiserver.get("expertplacement", "no-file", NS), "Ready"),
                 what="no-file condition")
    assert (c["reason"], c["message"]) == ("InvalidSpec", "rejected by the controller: "
                                           "spec.initialLoadFrom.file: no file 'missing.json' in "
                                           "the load directory")
    for name in ("big-file", "no-file"):
        apiserver.kubectl("delete", "expertplacement", name, "--timeout=60s")


def test_stop_and_refresh_from_kubectl(apiserver, operator, plans):
    apiserver.apply(placement("pausable", rebalancePolicy={"mode": "Auto"}))
    wait_for(ready(apiserver, "pausable"), what="pausable Ready")

    def mode():
        states = plans.ListPlacements(pb.ListPlacementsRequest(), timeout=10).placements
        return next(s.spec.policy.mode for s in states if s.spec.name == "default-pausable")
    assert mode() == pb.RebalancePolicy.AUTO
    apiserver.kubectl("annotate", "expertplacement", "pausable", "-n", NS,
                      "expertplane.io/rebalance=stop")
    obj = wait_for(lambda: (o := apiserver.get("expertplacement", "pausable", NS))["status"].get("stopped")
                   and "expertplane.io/rebalance" not in o["metadata"].get("annotations", {}) and o,
                   what="stopped, request consumed")
    assert condition(obj, "Rebalancing")["reason"] == "Stopped"
    assert mode() == pb.RebalancePolicy.OFF
    apiserver.kubectl("annotate", "expertplacement", "pausable", "-n", NS,
                      "expertplane.io/rebalance=refresh")
    wait_for(lambda: mode() == pb.RebalancePolicy.AUTO, what="resumed")
    obj = wait_for(lambda: not (o := apiserver.get("expertplacement", "pausable", NS))["status"]
                   .get("stopped") and o, what="status resumed")
    assert condition(obj, "Rebalancing")["reason"] == "Idle"
    apiserver.kubectl("annotate", "expertplacement", "pausable", "-n", NS,
                      "expertplane.io/rebalance=sometimes")
    event = wait_for(warning(apiserver, "pausable", "InvalidRequest"), what="InvalidRequest event")
    assert "use approve, refresh or stop" in event["message"]
    # A planning field changed (approval Auto): re-planned at once, said in an event. No agent
    # serves the placement, so the new version is in force at once.
    apiserver.apply(placement("pausable", algorithm="balanced", rebalancePolicy={"mode": "Auto"}))
    event = wait_for(lambda: next((e for e in events(apiserver, "pausable")
                                   if e["reason"] in ("Replanned", "NotReplanned")), None),
                     what="re-plan event")
    assert (event["reason"], event["message"]) == ("Replanned", "spec.algorithm changed: plan v2 "
                                                               "rolling out")
    wait_for(ready(apiserver, "pausable", planVersion=2), what="v2 in force")


def _worker(cluster, name: str, app: str) -> None:
    cluster.apply({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
                   "spec": {"automountServiceAccountToken": False, "containers": [{
                       "name": "engine", "image": "sglang:latest",
                       "resources": {"limits": {"nvidia.com/gpu": "4"}}}]}})


def test_rolling_restart_of_worker_pods_does_not_reshape(apiserver, operator):
    apiserver.kubectl("create", "serviceaccount", "default", "-n", NS, check=False)
    for i in range(2):
        _worker(apiserver, f"roll-{i}", "roll")
    apiserver.apply(placement("rolling", replicas=16, topology={
        "workerSelector": {"matchLabels": {"app": "roll"}}, "stableSeconds": 8}))
    obj = wait_for(ready(apiserver, "rolling", numGPUs=8), what="rolling Ready on 8 GPUs")
    version = obj["status"]["planVersion"]
    # A rolling restart: each pod goes and comes back (no kubelet: deletion is immediate).
    for i in range(2):
        apiserver.kubectl("delete", "pod", f"roll-{i}", "-n", NS, "--wait=true")
        settling = wait_for(lambda: (c := condition(apiserver.get("expertplacement", "rolling", NS),
                                                    "Rebalancing")) and c["reason"] == "WorkersSettling" and c,
                            what="WorkersSettling")
        assert "the plan keeps 8 GPUs" in settling["message"]
        time.sleep(1.5)
        _worker(apiserver, f"roll-{i}", "roll")
        wait_for(lambda: condition(apiserver.get("expertplacement", "rolling", NS),
                                   "Rebalancing")["reason"] == "Idle", what="settled back")
    st = status_of(apiserver, "rolling")
    assert (st["numGPUs"], st["planVersion"]) == (8, version)
    assert "Reshaped" not in [e["reason"] for e in events(apiserver, "rolling")]
    # A real scale-down reshapes once the pods have stayed so for stableSeconds.
    apiserver.kubectl("delete", "pod", "roll-1", "-n", NS, "--wait=true")
    gone = time.monotonic()
    wait_for(ready(apiserver, "rolling", numGPUs=4), timeout=40, what="reshaped to 4 GPUs")
    assert time.monotonic() - gone >= 7.5
    assert "Reshaped" in [e["reason"] for e in events(apiserver, "rolling")]


def configmap_map(cluster, name):
    cm = cluster.get("configmap", name, NS)
    return cm, np.array(json.loads(cm["data"]["expert_location.json"])["physical_to_logical_map"])


def test_reshape_and_a_restart_on_an_empty_store_keep_versions(apiserver, operator,
                                                                restartable_controller,
                                                                plans):
    apiserver.apply(placement("kept"))
    wait_for(ready(apiserver, "kept", planVersion=1), what="kept v1")
    apiserver.apply(placement("kept", replicas=16))                 # a reshape: the next version
    obj = wait_for(ready(apiserver, "kept", planVersion=2, replicas=16), what="kept v2")
    assert [(h["version"], h["reason"]) for h in obj["status"]["history"]] == \
        [(1, "initial"), (2, "reshape")]
    assert "plan v2 for 16 slots per layer" in " ".join(
        e["message"] for e in events(apiserver, "kept") if e["reason"] == "Reshaped")
    cm, before = configmap_map(apiserver, "kept-expert-location")
    # The controller goes away: Degraded, shown by kubectl get and a Warning event.
    restartable_controller.stop()
    wait_for(lambda: (c := condition(apiserver.get("expertplacement", "kept", NS), "Degraded"))
             and c["status"] == "True" and c["reason"] == "ControllerUnavailable", timeout=60,
             what="Degraded")
    row = apiserver.kubectl("get", "epl", "kept", "-n", NS, "--no-headers").stdout.split()
    assert row[6:8] == ["True", "True"], row                         # READY, DEGRADED
    wait_for(warning(apiserver, "kept", "ControllerUnavailable"), what="Warning event")
    # ... and comes back with an empty store: the operator restores v2 and its map.
    restartable_controller.start(empty=True)
    wait_for(lambda: (c := condition(apiserver.get("expertplacement", "kept", NS), "Degraded"))
             and c["status"] == "False", timeout=60, what="recovered")
    state = wait_for(lambda: next((p for p in plans.ListPlacements(
        pb.ListPlacementsRequest(), timeout=10).placements if p.spec.name == "default-kept"), None),
        what="kept registered again")
    assert state.plan_version == 2
    restored = plans.ListPlans(pb.ListPlansRequest(placement="default-kept"), timeout=10).plans
    assert [(p.version, p.reason) for p in restored] == [(2, "restored")]
    cm_after, after = configmap_map(apiserver, "kept-expert-location")
    assert np.array_equal(before, after)
    assert cm_after["metadata"]["resourceVersion"] == cm["metadata"]["resourceVersion"]
    assert status_of(apiserver, "kept")["planVersion"] == 2
    # Versions go on growing from there.
    apiserver.apply(placement("kept", replicas=12))
    wait_for(ready(apiserver, "kept", planVersion=3, replicas=12), what="kept v3")


def _connect_agents(channel, name: str, version: int) -> list[SimulatedAgent]:
    agents = [SimulatedAgent(channel, f"n{i}", name, (2 * i, 2 * i + 1), plan_version=version).start()
              for i in range(2)]
    wait_for(lambda: sum(len(a.workers) for a in agents) == 4, what="agents")
    return agents


def _report_skew(channel, plans, name: str, version: int) -> None:
    """Expert 0 hot in both layers, counted per slot of plan ``version``."""
    phy2log = to_numpy(plans.GetPlan(pb.GetPlanRequest(placement=name, version=version),
                                     timeout=10).phy2log, "phy2log")
    skew = np.ones((2, 8))
    skew[:, 0] = 200.0
    counts = np.array([[skew[layer, e] / np.count_nonzero(phy2log[layer] == e) for e in phy2log[layer]]
                       for layer in range(2)])
    reports = [load_report(f"n{r // 2}", r, name, version, 1, counts[:, 3 * r:3 * r + 3].astype(int))
               for r in range(4)]
    acks = list(pb_grpc.LoadServiceStub(channel).ReportLoad(iter(reports), timeout=10))
    assert {a.status for a in acks} == {pb.LoadAck.ACCEPTED}


def test_propose_approve_rollback_from_kubectl(apiserver, operator, channel, plans):
    apiserver.apply(placement("gated", rebalancePolicy={"mode": "Auto", "approval": "Manual"}))
    wait_for(ready(apiserver, "gated", planVersion=1), what="gated v1")
    _, v1 = configmap_map(apiserver, "gated-expert-location")
    agents = _connect_agents(channel, "default-gated", 1)
    try:
        _report_skew(channel, plans, "default-gated", 1)
        obj = wait_for(lambda: (o := apiserver.get("expertplacement", "gated", NS))["status"]
                       .get("proposal") and o, timeout=60, what="a proposal")
        proposal = obj["status"]["proposal"]
        assert proposal["version"] == 2 and proposal["previousVersion"] == 1
        assert proposal["predictedBalance"] < proposal["currentBalance"] and proposal["slotsMoved"] > 0
        c = condition(obj, "ProposalReady")
        assert (c["status"], c["reason"]) == ("True", "ProposalReady") and c["message"].startswith("v2: ")
        time.sleep(2)                                   # nothing is rolled out without approval
        assert status_of(apiserver, "gated")["planVersion"] == 1
        assert "2" in apiserver.kubectl("get", "epl", "gated", "-n", NS, "-o", "wide").stdout.split("\n")[1].split()
        apiserver.kubectl("annotate", "epl", "gated", "-n", NS, "expertplane.io/rebalance=approve")
        obj = wait_for(ready(apiserver, "gated", planVersion=2), timeout=60, what="v2 rolled out")
        assert "expertplane.io/rebalance" not in obj["metadata"].get("annotations", {})
        # The approved proposal is gone (the policy may already propose again against v2).
        assert (obj["status"].get("proposal") or {}).get("previousVersion", 2) == 2
        assert obj["status"].get("lastRebalanceTime")
        _, v2 = configmap_map(apiserver, "gated-expert-location")
        assert not np.array_equal(v1, v2)
        assert set(agents[0].versions().values()) == {2}
        # Roll back to v1: its map comes back as a new version (v3, or v4 if the policy
        # proposed v3 against v2 meanwhile).
        apiserver.kubectl("annotate", "epl", "gated", "-n", NS, "expertplane.io/rollback-to=1")
        obj = wait_for(lambda: (o := ready(apiserver, "gated")()) and o["status"]["planVersion"] > 2
                       and o, timeout=60, what="rolled back")
        back = obj["status"]["planVersion"]
        _, rolled_back = configmap_map(apiserver, "gated-expert-location")
        assert np.array_equal(rolled_back, v1)
        reasons = {h["version"]: h["reason"] for h in obj["status"]["history"]}
        assert (reasons[1], reasons[2], reasons[back]) == ("initial", "proposal", "rollback to v1")
        assert {"RollbackStarted", "ProposalApproved", "ProposalReady"} <= \
            {e["reason"] for e in events(apiserver, "gated")}
        # A rollback to a version that does not exist is refused with a Warning event.
        apiserver.kubectl("annotate", "epl", "gated", "-n", NS, "expertplane.io/rollback-to=42")
        event = wait_for(warning(apiserver, "gated", "RollbackFailed"), what="RollbackFailed")
        assert event["message"].startswith("v42: ")
        # The load is still skewed, so v1's map gets a proposal of its own. A planning field
        # changed: that proposal is superseded by a new one, not silence.
        first = wait_for(lambda: (status_of(apiserver, "gated").get("proposal") or {}).get("version"),
                         timeout=60, what="a proposal against the rolled-back map")
        apiserver.apply(placement("gated", algorithm="balanced",
                                  rebalancePolicy={"mode": "Auto", "approval": "Manual"}))
        try:
            obj = wait_for(lambda: ((o := apiserver.get("expertplacement", "gated", NS))["status"]
                                    .get("proposal") or {}).get("version", 0) > first and o,
                           timeout=60, what="a proposal for the new algorithm")
        except AssertionError:
            print("status:", json.dumps(status_of(apiserver, "gated"), indent=1))
            print("events:", [(e["reason"], e["message"]) for e in events(apiserver, "gated")])
            raise
        assert obj["status"]["planVersion"] == back
        assert obj["status"]["proposal"]["previousVersion"] == back
    finally:
        for a in agents:
            a.stop()
