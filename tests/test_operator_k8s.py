"""The operator against a real kube-apiserver: manifests applied server-side, the operator as a
local process with its ServiceAccount's RBAC, a real controller on loopback; samples reconciled,
invalid specs rejected (schema) or reported (conditions), plans re-published after a rollout,
deletion cleaned up, least privilege of every ServiceAccount."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from expertplane.benchmarks.simagent import SimulatedAgent, load_report
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.tensors import to_numpy

from tests.k8s_fixture import (  # noqa: F401  (pytest fixtures)
    NAMESPACE,
    REPO,
    OperatorProcess,
    apiserver,
    condition,
    controller,
    operator_kubeconfig,
    wait_for,
)

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(240)]
SAMPLES = REPO / "manifests" / "samples"
WORKERS_NS = "workers"


@pytest.fixture(scope="module")
def operator(apiserver, operator_kubeconfig, controller, tmp_path_factory):
    """One operator for the module, watching namespaces default and workers."""
    apiserver.kubectl("create", "namespace", WORKERS_NS)
    op = OperatorProcess(tmp_path_factory.mktemp("operator") / "operator.log",
                         "--controller", f"127.0.0.1:{controller.port}",
                         "--kubeconfig", operator_kubeconfig, "--namespace", "default",
                         "--namespace", WORKERS_NS, "--refresh-seconds", "1",
                         "--lease-namespace", NAMESPACE, "--identity", "op-main")
    wait_for(lambda: "op-main leads" in op.log(), timeout=60, what="operator start")
    yield op
    code = op.stop()
    assert code == 0, op.log()[-3000:]
    # kopf may log transient API errors with tracebacks; our own code must never raise.
    assert f'File "{REPO / "controller" / "operator"}' not in op.log(), op.log()[-5000:]


@pytest.fixture(scope="module")
def stub(controller):
    channel = make_channel(f"127.0.0.1:{controller.port}")
    yield pb_grpc.PlanServiceStub(channel), pb_grpc.PlanningServiceStub(channel), channel
    channel.close()


def placement_doc(name: str, namespace: str = "default", **spec) -> dict:
    base = {"model": {"layers": 2, "experts": 8, "groups": 2, "expertBytes": 1 << 20},
            "topology": {"nodes": 2, "gpusPerNode": 2}, "replicas": 12,
            "rebalancePolicy": {"mode": "Manual"}}
    base.update(spec)
    return {"apiVersion": "expertplane.io/v1alpha1", "kind": "ExpertPlacement",
            "metadata": {"name": name, "namespace": namespace}, "spec": base}


def ready(cluster, name, namespace="default", generation=None):
    def check():
        obj = cluster.get("expertplacement", name, namespace)
        c = condition(obj, "Ready")
        if c and c["status"] == "True" and (generation is None or
                                            obj["status"]["observedGeneration"] == generation):
            return obj
        return None
    return check


def plan_configmap(cluster, name, namespace="default"):
    cm = cluster.get("configmap", name, namespace)
    if cm is None:
        return None, None
    return cm, np.array(json.loads(cm["data"]["expert_location.json"])["physical_to_logical_map"])


# ------------------------------------------------------------------ install


def test_manifests_install_and_samples_validate(apiserver):
    crds = apiserver.kubectl("get", "crd", "-o", "name").stdout.split()
    assert {"customresourcedefinition.apiextensions.k8s.io/expertplacements.expertplane.io",
            "customresourcedefinition.apiextensions.k8s.io/pipelineplans.expertplane.io"} <= set(crds)
    for kind, name in [("deployment", "expertplane-controller"), ("deployment", "expertplane-operator"),
                       ("daemonset", "expertplane-agent"), ("service", "expertplane-controller")]:
        assert apiserver.get(kind, name, NAMESPACE) is not None, (kind, name)
    # The controller's store lives on a PersistentVolumeClaim, not an emptyDir.
    assert apiserver.get("persistentvolumeclaim", "expertplane-controller-data", NAMESPACE) is not None
    pod = apiserver.get("deployment", "expertplane-controller", NAMESPACE)["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "expertplane-controller-data"}} \
        in pod["volumes"]
    svc = apiserver.get("service", "expertplane-controller", NAMESPACE)
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 50051, "metrics": 9090}
    # The samples pass server-side validation (dry run: nothing is created).
    out = apiserver.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(SAMPLES)).stdout
    assert "expertplacement.expertplane.io/deepseek-v3" in out
    assert "pipelineplan.expertplane.io/deepseek-v3-pp8" in out
    for engine in ("vllm", "sglang"):
        assert f"expertplacement.expertplane.io/deepseek-v3-{engine}" in out
        assert f"deployment.apps/deepseek-v3-{engine}" in out


def test_postgresql_overlay(apiserver):
    """examples/postgresql: the controller's --db comes from Secret expertplane-db, no claim."""
    from expertplane.cli.main import build_parser

    out = apiserver.kubectl("kustomize", str(REPO / "examples" / "postgresql")).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    [dep] = [d for d in docs if d["metadata"]["name"] == "expertplane-controller"
             and d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["env"] == [{"name": "EXPERTPLANE_DB_URL", "valueFrom": {
        "secretKeyRef": {"name": "expertplane-db", "key": "url"}}}]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/tmp"]
    url = "postgresql+psycopg://ep@db:5432/expertplane"
    args = build_parser().parse_args(
        [*c["command"][1:], *(a.replace("$(EXPERTPLANE_DB_URL)", url) for a in c["args"])])
    assert args.db == url
    apiserver.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=out)


def _can_i_list(cluster, sa: str, namespace: str) -> dict[str, set[str]]:
    out = cluster.kubectl("auth", "can-i", "--list", "-n", namespace,
                          f"--as=system:serviceaccount:{NAMESPACE}:{sa}").stdout
    rules: dict[str, set[str]] = {}
    for line in out.splitlines()[1:]:
        if line.startswith(" "):        # non-resource URLs (discovery, health): same for everyone
            continue
        resource, rest = line.split(None, 1)
        names_verbs = rest.split("[")
        verbs = set(names_verbs[-1].rstrip("] ").split())
        names = names_verbs[-2].rstrip("] ").strip()
        key = f"{resource}:{names}" if names else resource
        rules.setdefault(key, set()).update(verbs)
    return rules


SELF_REVIEW = {"selfsubjectaccessreviews.authorization.k8s.io": {"create"},
               "selfsubjectrulesreviews.authorization.k8s.io": {"create"}}


def test_service_accounts_have_least_privilege(apiserver):
    operator_rules = {
        **SELF_REVIEW,
        "expertplacements.expertplane.io": {"get", "list", "watch", "patch"},
        "pipelineplans.expertplane.io": {"get", "list", "watch", "patch"},
        "expertplacements.expertplane.io/status": {"get", "patch"},
        "pipelineplans.expertplane.io/status": {"get", "patch"},
        "configmaps": {"get", "create", "update", "patch", "delete"},
        "pods": {"list"},
        "events": {"create", "patch"},
        "events.events.k8s.io": {"create", "patch"},
    }
    assert _can_i_list(apiserver, "expertplane-operator", "default") == operator_rules
    # In its own namespace it may also create Leases and read/update only its own.
    assert _can_i_list(apiserver, "expertplane-operator", NAMESPACE) == {
        **operator_rules, "leases.coordination.k8s.io": {"create"},
        "leases.coordination.k8s.io:expertplane-operator": {"get", "update"}}
    # The controller and the agents never call the Kubernetes API: nothing beyond self-review.
    for sa in ("expertplane-controller", "expertplane-agent"):
        for ns in ("default", NAMESPACE):
            assert _can_i_list(apiserver, sa, ns) == SELF_REVIEW, (sa, ns)
        assert apiserver.get("serviceaccount", sa, NAMESPACE)["automountServiceAccountToken"] is False

    def can(sa, *args):
        return apiserver.kubectl("auth", "can-i", *args, f"--as=system:serviceaccount:{NAMESPACE}:{sa}",
                                 check=False).stdout.strip()
    assert can("expertplane-operator", "get", "secrets", "-n", NAMESPACE) == "no"
    assert can("expertplane-operator", "delete", "expertplacements", "-n", "default") == "no"
    assert can("expertplane-operator", "update", "leases/other", "-n", NAMESPACE) == "no"
    assert can("expertplane-operator", "update", "leases/expertplane-operator", "-n", NAMESPACE) == "yes"
    assert can("expertplane-operator", "create", "leases", "-n", "default") == "no"


# ------------------------------------------------------------------ schema validation


@pytest.mark.parametrize("patch, needle", [
    ({"model": {"layers": 0, "experts": 8}}, "spec.model.layers"),
    ({"rebalancePolicy": {"mode": "Sometimes"}}, 'spec.rebalancePolicy.mode: Unsupported value: "Sometimes"'),
    ({"algorithm": "random"}, "spec.algorithm: Unsupported value"),
    ({"topology": {}}, "spec.topology"),
    ({"topology": {"nodes": 2}}, "spec.topology"),
    ({"topology": {"nodes": 2, "gpusPerNode": 128}}, "spec.topology.gpusPerNode"),
    ({"initialLoad": {"values": [[1, -2]]}}, "spec.initialLoad.values"),
    ({"engine": "tgi"}, 'spec.engine: Unsupported value: "tgi"'),
    ({"model": {"layers": 2, "experts": 8, "hiddenLayers": 0}}, "spec.model.hiddenLayers"),
    ({"model": {"layers": 2, "experts": 8, "hiddenLayers": 4, "moeLayers": [2, 2]}},
     "spec.model.moeLayers: duplicate entries for key [=2]"),        # a set: no duplicates
    ({"model": {"layers": 2, "experts": 8, "hiddenLayers": 4, "moeLayers": [-1, 2]}},
     "spec.model.moeLayers"),
])
def test_schema_rejects_invalid_placements(apiserver, patch, needle):
    proc = apiserver.apply(placement_doc("bad", **patch), check=False)
    if proc.returncode == 0:
        apiserver.kubectl("delete", "expertplacement", "bad", "--wait=false")
    assert proc.returncode != 0, proc.stdout
    assert needle in proc.stderr, proc.stderr
    assert apiserver.get("expertplacement", "bad") is None


def test_schema_rejects_invalid_pipeline_plans(apiserver):
    doc = yaml.safe_load((SAMPLES / "deepseek-v3-pipeline.yaml").read_text())
    doc["metadata"] = {"name": "bad-pp", "namespace": "default"}
    for field, value, needle in [("schedule", "gpipe", "spec.schedule: Unsupported value"),
                                 ("stages", 0, "spec.stages"),
                                 ("memoryLimit", "lots", "spec.memoryLimit")]:
        bad = json.loads(json.dumps(doc))
        bad["spec"][field] = value
        proc = apiserver.apply(bad, check=False)
        assert proc.returncode != 0 and needle in proc.stderr, proc.stderr


# ------------------------------------------------------------------ reconcile


def test_sample_placement_is_planned_and_published(apiserver, operator, stub):
    apiserver.kubectl("apply", "--server-side", "-f", str(SAMPLES / "deepseek-v3-placement.yaml"),
                      "-n", "default")
    obj = wait_for(ready(apiserver, "deepseek-v3"), timeout=90, what="deepseek-v3 Ready")
    st = obj["status"]
    assert st["placement"] == "default-deepseek-v3"
    assert st["planVersion"] >= 1 and st["observedGeneration"] == 1
    assert st["numGPUs"] == 32 and st["replicas"] == 288
    assert st["currentBalance"] >= 1.0 and st["predictedBalance"] >= 1.0
    assert st["planRef"] == {"controller": st["planRef"]["controller"], "placement": "default-deepseek-v3",
                             "version": st["planVersion"], "configMap": "deepseek-v3-expert-location",
                             "key": "expert_location.json"}
    assert {c["type"] for c in st["conditions"]} == {"Ready", "Rebalancing", "Degraded"}
    for c in st["conditions"]:
        assert c["observedGeneration"] == 1 and c["lastTransitionTime"].endswith("Z")
    assert condition(obj, "Degraded")["status"] == "False"
    assert obj["metadata"]["finalizers"] == ["expertplane.io/finalizer"]
    # The ConfigMap holds the controller's plan in SGLang's format and is owned by the CR.
    cm, phy2log = plan_configmap(apiserver, "deepseek-v3-expert-location")
    plans, _, _ = stub
    plan = plans.GetPlan(pb.GetPlanRequest(placement="default-deepseek-v3"), timeout=30)
    assert np.array_equal(phy2log, to_numpy(plan.phy2log, "phy2log"))
    assert phy2log.shape == (58, 288)
    assert all(set(row) == set(range(256)) for row in phy2log)
    [owner] = cm["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("ExpertPlacement", "deepseek-v3",
                                                            obj["metadata"]["uid"])
    assert cm["metadata"]["annotations"]["expertplane.io/plan-version"] == str(st["planVersion"])
    # Printer columns.
    table = apiserver.kubectl("get", "epl", "deepseek-v3").stdout.split("\n")
    assert table[0].split()[:7] == ["NAME", "VERSION", "BALANCE", "PREDICTED", "GPUS", "SLOTS", "READY"]
    assert table[1].split()[:7] == ["deepseek-v3", str(st["planVersion"]), "1", "1", "32", "288", "True"]


def test_divisibility_is_reported_in_a_condition(apiserver, operator, stub):
    apiserver.apply(placement_doc("indivisible", replicas=10))       # 10 slots on 4 GPUs
    apiserver.apply(placement_doc("badgroups", model={"layers": 2, "experts": 8, "groups": 3}))

    def invalid(name):
        def check():
            c = condition(apiserver.get("expertplacement", name), "Ready")
            return c if c and c["reason"] == "InvalidSpec" else None
        return check
    c = wait_for(invalid("indivisible"), what="InvalidSpec condition")
    assert c["status"] == "False"
    assert c["message"] == "spec.replicas: must be a multiple of the GPU count (4), got 10"
    c = wait_for(invalid("badgroups"), what="InvalidSpec condition")
    assert c["message"].startswith("spec.model.groups: must divide num_experts (8), got 3")
    listed = {p.spec.name for p in stub[0].ListPlacements(pb.ListPlacementsRequest(), timeout=10).placements}
    assert not {"default-indivisible", "default-badgroups"} & listed
    # Fixing the spec makes it Ready (level-triggered: the same handler, a new generation).
    apiserver.apply(placement_doc("indivisible", replicas=12))
    obj = wait_for(ready(apiserver, "indivisible", generation=2), what="fixed placement Ready")
    assert obj["status"]["replicas"] == 12
    for name in ("indivisible", "badgroups"):
        apiserver.kubectl("delete", "expertplacement", name, "--wait=true", "--timeout=30s")


def test_update_replans_and_rollout_is_reflected(apiserver, operator, stub):
    plans, planning, channel = stub
    apiserver.apply(placement_doc("small"))
    obj = wait_for(ready(apiserver, "small"), what="small Ready")
    assert obj["status"]["planVersion"] == 1 and obj["status"]["replicas"] == 12
    # A rollout done by the controller (agents commit plan v2) shows up in status and ConfigMap.
    agents = [SimulatedAgent(channel, f"n{i}", "default-small", (2 * i, 2 * i + 1), plan_version=1).start()
              for i in range(2)]
    try:
        v1 = to_numpy(plans.GetPlan(pb.GetPlanRequest(placement="default-small", version=1),
                                    timeout=10).phy2log, "phy2log")
        skew = np.ones((2, 8))
        skew[:, 0] = 200.0
        counts = np.array([[skew[layer, e] / np.count_nonzero(v1[layer] == e) for e in v1[layer]]
                           for layer in range(2)])
        reports = [load_report(f"n{r // 2}", r, "default-small", 1, 1, counts[:, 3 * r:3 * r + 3].astype(int))
                   for r in range(4)]
        acks = list(pb_grpc.LoadServiceStub(channel).ReportLoad(iter(reports), timeout=10))
        assert {a.status for a in acks} == {pb.LoadAck.ACCEPTED}
        wait_for(lambda: sum(len(a.workers) for a in agents) == 4, what="agents")
        d = wait_for(lambda: planning.TriggerRebalance(
            pb.TriggerRebalanceRequest(placement="default-small", force=True), timeout=30), what="rebalance")
        assert d.rebalance and d.new_version == 2, d
        obj = wait_for(lambda: (o := apiserver.get("expertplacement", "small"))["status"]["planVersion"] == 2 and o,
                       what="planVersion 2 in status")
    finally:
        for a in agents:
            a.stop()
    st = obj["status"]
    assert st["slotsMoved"] > 0 and st["planRef"]["version"] == 2
    assert st["currentBalance"] > 1.0 and st["predictedBalance"] >= 1.0   # the skew is observed
    _, phy2log = wait_for(lambda: (r := plan_configmap(apiserver, "small-expert-location"))[0]
                          ["metadata"]["annotations"]["expertplane.io/plan-version"] == "2" and r,
                          what="ConfigMap v2")
    assert np.array_equal(phy2log, to_numpy(plans.GetPlan(pb.GetPlanRequest(placement="default-small"),
                                                           timeout=10).phy2log, "phy2log"))
    assert np.count_nonzero(phy2log == 0) > np.count_nonzero(v1 == 0)   # the hot expert got replicas
    events = apiserver.kubectl("get", "events", "-n", "default", "--field-selector",
                               "involvedObject.name=small", "-o", "json").stdout
    assert "plan v2" in events
    # A spec change (new generation) re-plans with the new shape.
    apiserver.apply(placement_doc("small", replicas=16, planConfigMap="small-plan"))
    obj = wait_for(ready(apiserver, "small", generation=2), what="generation 2 Ready")
    _, phy2log = plan_configmap(apiserver, "small-plan")
    assert phy2log.shape == (2, 16) and obj["status"]["replicas"] == 16
    assert wait_for(lambda: apiserver.get("configmap", "small-expert-location") is None or None,
                    what="old ConfigMap removed") is None or True


def test_deletion_cleans_up_controller_and_configmap(apiserver, operator, stub):
    apiserver.apply(placement_doc("doomed"))
    wait_for(ready(apiserver, "doomed"), what="doomed Ready")
    assert apiserver.get("configmap", "doomed-expert-location") is not None
    apiserver.kubectl("delete", "expertplacement", "doomed", "--wait=true", "--timeout=60s")
    assert apiserver.get("expertplacement", "doomed") is None
    assert apiserver.get("configmap", "doomed-expert-location") is None
    names = {p.spec.name for p in stub[0].ListPlacements(pb.ListPlacementsRequest(), timeout=10).placements}
    assert "default-doomed" not in names


def test_worker_selector_topology(apiserver, operator):
    apiserver.kubectl("create", "serviceaccount", "default", "-n", WORKERS_NS, check=False)
    for i in range(2):
        apiserver.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"worker-{i}", "namespace": WORKERS_NS, "labels": {"app": "moe"}},
            "spec": {"automountServiceAccountToken": False, "containers": [{
                "name": "engine", "image": "sglang:latest",
                "resources": {"limits": {"nvidia.com/gpu": "4"}}}]}})
    doc = placement_doc("selected", WORKERS_NS, topology={"workerSelector": {"matchLabels": {"app": "moe"}}},
                        replicas=16)
    apiserver.apply(doc)
    obj = wait_for(ready(apiserver, "selected", WORKERS_NS), what="selected Ready")
    assert obj["status"]["numGPUs"] == 8
    apiserver.apply(placement_doc("nobody", WORKERS_NS,
                                  topology={"workerSelector": {"matchLabels": {"app": "none"}}}))
    c = wait_for(lambda: condition(apiserver.get("expertplacement", "nobody", WORKERS_NS), "Ready"),
                 what="NoWorkers condition")
    assert (c["status"], c["reason"]) == ("False", "NoWorkers")


def test_pipeline_plan_invalid_stage_count_and_missing_profile(apiserver, operator):
    doc = yaml.safe_load((SAMPLES / "deepseek-v3-pipeline.yaml").read_text())
    doc["metadata"] = {"name": "too-many-stages", "namespace": "default"}
    doc["spec"]["stages"] = 100
    apiserver.apply(doc)
    c = wait_for(lambda: condition(apiserver.get("pipelineplan", "too-many-stages"), "Ready"),
                 what="pipeline condition")
    assert (c["status"], c["reason"]) == ("False", "InvalidSpec")
    assert c["message"] == "spec.stages: must be <= the number of layers (63), got 100"
    doc["metadata"]["name"] = "missing-profile"
    doc["spec"]["stages"] = 4
    doc["spec"]["profile"] = {"configMapRef": {"name": "nope", "key": "profile.yaml"}}
    apiserver.apply(doc)
    c = wait_for(lambda: condition(apiserver.get("pipelineplan", "missing-profile"), "Ready"),
                 what="pipeline condition")
    assert c["reason"] == "InvalidSpec"
    assert "spec.profile.configMapRef: ConfigMap 'nope' not found" in c["message"]


def test_sample_pipeline_plan_is_computed(apiserver, operator):
    apiserver.kubectl("apply", "--server-side", "-f", str(SAMPLES / "deepseek-v3-pipeline.yaml"),
                      "-n", "default")

    def settled():
        obj = apiserver.get("pipelineplan", "deepseek-v3-pp8")
        c = condition(obj, "Ready")
        d = condition(obj, "Degraded")
        return obj if (c and c["status"] == "True") or (d and d["status"] == "True") else None
    obj = wait_for(settled, timeout=60, what="pipeline plan computed")
    assert condition(obj, "Degraded")["status"] == "False", condition(obj, "Degraded")["message"]
    st = obj["status"]
    assert len(st["boundaries"]) == 9 and st["boundaries"][0] == 0 and st["boundaries"][-1] == 63
    assert st["boundaries"] == sorted(st["boundaries"]) and st["layers"] == 63
    assert st["stepTime"] > 0 and 0 <= st["bubbleFraction"] < 1
    assert len(st["peakMemoryBytes"]) == 8 and max(st["peakMemoryBytes"]) <= 80 * 2**30


def test_initial_load_from_a_configmap(apiserver, operator, stub):
    load = [[50, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 30]]
    apiserver.apply({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "warm-load", "namespace": "default"},
                     "data": {"load.json": json.dumps({"load": load})}})
    apiserver.apply(placement_doc("warm", initialLoadFrom={"configMapKeyRef": {"name": "warm-load",
                                                                               "key": "load.json"}}))
    obj = wait_for(ready(apiserver, "warm"), what="warm Ready")
    plan = stub[0].GetPlan(pb.GetPlanRequest(placement="default-warm"), timeout=10)
    assert np.array_equal(to_numpy(plan.load_snapshot, "load_snapshot"), np.array(load, float))
    _, phy2log = plan_configmap(apiserver, "warm-expert-location")
    assert np.count_nonzero(phy2log[0] == 0) > 1 and np.count_nonzero(phy2log[1] == 7) > 1
    assert obj["status"]["planBalance"] == obj["status"]["currentBalance"] > 1.0
    apiserver.apply(placement_doc("cold", initialLoadFrom={"configMapKeyRef": {"name": "warm-load",
                                                                               "key": "missing"}}))
    c = wait_for(lambda: condition(apiserver.get("expertplacement", "cold"), "Ready"), what="condition")
    assert c["reason"] == "InvalidSpec"
    assert c["message"] == "spec.initialLoadFrom.configMapKeyRef: ConfigMap 'warm-load' has no key " \
                           "'missing' (keys: ['load.json'])"


def test_pipeline_plan_from_a_profile_configmap_follows_its_edits(apiserver, operator):
    profile = (REPO / "planner" / "profiles" / "llama-like.yaml").read_text()

    def put_profile(text):
        apiserver.apply({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "llama-profile", "namespace": "default"},
                         "data": {"profile.yaml": text}})
    put_profile(profile)
    apiserver.apply({"apiVersion": "expertplane.io/v1alpha1", "kind": "PipelinePlan",
                     "metadata": {"name": "llama-pp4", "namespace": "default"},
                     "spec": {"stages": 4, "schedule": "1f1b", "microBatches": 8,
                              "profile": {"configMapRef": {"name": "llama-profile", "key": "profile.yaml"}}}})

    def computed(layers):
        def check():
            obj = apiserver.get("pipelineplan", "llama-pp4")
            st = (obj or {}).get("status") or {}
            return obj if st.get("layers") == layers and condition(obj, "Ready")["status"] == "True" else None
        return check
    obj = wait_for(computed(82), timeout=60, what="llama-like partition")
    first_version = obj["status"]["profileVersion"]
    assert len(obj["status"]["boundaries"]) == 5 and obj["status"]["bubbleFraction"] > 0
    put_profile(profile.replace("repeat: 80", "repeat: 40"))      # level-triggered on the ConfigMap
    obj = wait_for(computed(42), timeout=60, what="partition of the edited profile")
    assert obj["status"]["profileVersion"] != first_version
    assert obj["metadata"]["generation"] == obj["status"]["observedGeneration"] == 1
