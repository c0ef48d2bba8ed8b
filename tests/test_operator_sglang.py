"""``engine: sglang`` through the operator, against a real kube-apiserver and a real controller:
the SGLang sample's ConfigMap holds SGLang's hidden-layer map (61 rows for DeepSeek-V3), which
SGLang's own loader takes; switching the engine rewrites the ConfigMap in the other form; a
controller back on an empty store gets the plan restored from the SGLang form (dense rows
dropped); bad layer fields are named in the Ready condition (the schema's refusals are in
test_operator_k8s.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from expertplane.controller.operator.crd import placement_name
from expertplane.proto import expertplane_pb2 as pb
from expertplane.proto import expertplane_pb2_grpc as pb_grpc
from expertplane.rpc.channels import make_channel
from expertplane.rpc.tensors import to_numpy

from tests.k8s_fixture import (  # noqa: F401  (pytest fixtures)
    REPO,
    apiserver,
    condition,
    operator_kubeconfig,
    restartable_controller,
    start_operator,
    wait_for,
)
from tests.engine_env import allow_torchvision_import, deepseek_v3_dir, publish_server_args

pytestmark = [pytest.mark.k8s, pytest.mark.timeout(300)]
NS = "default"
SAMPLE = REPO / "manifests" / "samples" / "sglang-deepseek-v3.yaml"
PLACEMENT, _ = yaml.safe_load_all(SAMPLE.read_text())
NAME = PLACEMENT["metadata"]["name"]
CM = f"{NAME}-expert-location"


@pytest.fixture(scope="module")
def operator(apiserver, operator_kubeconfig, restartable_controller, tmp_path_factory):
    op = start_operator(tmp_path_factory.mktemp("operator"), restartable_controller.port,
                        operator_kubeconfig, "op-sglang", "--rpc-timeout-seconds", "5")
    yield op
    assert op.stop() == 0, op.log()[-3000:]
    assert f'File "{REPO / "controller" / "operator"}' not in op.log(), op.log()[-5000:]


@pytest.fixture(scope="module")
def plans(restartable_controller):
    channel = make_channel(f"127.0.0.1:{restartable_controller.port}")
    yield pb_grpc.PlanServiceStub(channel)
    channel.close()


def sample_placement(name: str = NAME, **change) -> dict:
    doc = json.loads(json.dumps(PLACEMENT))
    doc["metadata"] = {"name": name, "namespace": NS}
    doc["spec"].update(change)
    if "replicas" in change:
        del doc["spec"]["redundantExperts"]
    return doc


def published(cluster, name: str = CM) -> tuple[dict, np.ndarray]:
    cm = cluster.get("configmap", name, NS)
    return cm, np.array(json.loads(cm["data"]["expert_location.json"])["physical_to_logical_map"])


def ready(cluster, name: str, generation: int):
    def check():
        obj = cluster.get("expertplacement", name, NS)
        c = condition(obj, "Ready")
        if c and c["status"] == "True" and obj["status"]["observedGeneration"] == generation:
            return obj
        return None
    return check


def sglang_loads(document: str, tmp_path, spec: dict) -> np.ndarray:
    """SGLang's own start-up path for ``--init-expert-location FILE`` on a DeepSeek-V3-shaped
    model of ``spec``'s layers and slots, one GPU's EP rank of ``spec.topology``; returns
    SGLang's physical-to-logical map [hidden layers, slots]."""
    allow_torchvision_import()
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_location import (compute_initial_expert_location_metadata,
                                                 set_global_expert_location_metadata)
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    model, topo = spec["model"], spec["topology"]
    hidden, experts = model["hiddenLayers"], model["experts"]
    ep = topo["nodes"] * topo["gpusPerNode"]
    path = tmp_path / "expert_location.json"        # the ConfigMap key, mounted as a file
    path.write_text(document)
    config = deepseek_v3_dir(tmp_path / "model", hidden, experts, hidden - model["layers"])
    override = publish_server_args(config, ep, spec["redundantExperts"],
                                   init_expert_location=str(path))
    try:
        meta = compute_initial_expert_location_metadata(ModelConfig(config), moe_ep_rank=ep - 1)
        set_global_expert_location_metadata(meta, allow_overwrite=True)
        info = ExpertLocationDispatchInfo.init_new(layer_id=hidden - 1)
        assert info is not None and info.num_physical_experts == experts + spec["redundantExperts"]
        assert tuple(meta.logical_to_rank_dispatch_physical_map.shape) == (hidden, experts)
        return meta.physical_to_logical_map_cpu.numpy()
    finally:
        override.restore()


def test_sample_configmap_is_sglangs_map_and_is_restored_from_it(apiserver, operator,
                                                                 restartable_controller,
                                                                 plans, tmp_path):
    spec = PLACEMENT["spec"]
    layers, hidden, experts = spec["model"]["layers"], spec["model"]["hiddenLayers"], spec["model"]["experts"]
    slots = experts + spec["redundantExperts"]
    apiserver.kubectl("apply", "--server-side", "-f", str(SAMPLE), "-n", NS)
    obj = wait_for(ready(apiserver, NAME, 1), timeout=120, what="SGLang sample Ready")
    pname = placement_name(NS, NAME)
    assert obj["status"]["placement"] == pname and obj["status"]["planVersion"] == 1
    cm, rows = published(apiserver)
    assert list(cm["data"]) == ["expert_location.json"]
    assert list(json.loads(cm["data"]["expert_location.json"])) == ["physical_to_logical_map"]
    assert rows.shape == (hidden, slots) == (61, 288)
    plan = to_numpy(plans.GetPlan(pb.GetPlanRequest(placement=pname), timeout=30).phy2log, "phy2log")
    assert plan.shape == (layers, slots)
    assert np.array_equal(rows[hidden - layers:], plan)                 # MoE layers 3..60
    for dense in range(hidden - layers):
        assert np.array_equal(rows[dense], np.arange(slots) % experts)
    assert json.loads(cm["metadata"]["annotations"]["expertplane.io/plan-form"]) == {
        "engine": "sglang", "hiddenLayers": 61, "moeLayers": list(range(3, 61))}
    # SGLang's own loader takes the ConfigMap's content as it is.
    assert np.array_equal(sglang_loads(cm["data"]["expert_location.json"], tmp_path, spec), rows)

    # The controller comes back on an empty store: the operator restores v1 from the SGLang form
    # (its MoE rows), and the ConfigMap stays as it was.
    restartable_controller.stop()
    restartable_controller.start(empty=True)
    state = wait_for(lambda: next((p for p in plans.ListPlacements(
        pb.ListPlacementsRequest(), timeout=10).placements if p.spec.name == pname), None),
        timeout=60, what="placement registered again")
    assert state.plan_version == 1
    restored = plans.ListPlans(pb.ListPlansRequest(placement=pname), timeout=10).plans
    assert [(p.version, p.reason) for p in restored] == [(1, "restored")]
    assert np.array_equal(to_numpy(plans.GetPlan(pb.GetPlanRequest(placement=pname), timeout=10)
                                   .phy2log, "phy2log"), plan)
    cm_after, _ = published(apiserver)
    assert cm_after["metadata"]["resourceVersion"] == cm["metadata"]["resourceVersion"]

    # Another engine: the same plan, rewritten one row per MoE layer; and back.
    apiserver.apply(sample_placement(engine="expertplane"))
    wait_for(ready(apiserver, NAME, 2), what="engine expertplane Ready")
    cm_moe, moe_rows = wait_for(lambda: (r := published(apiserver))[1].shape == (layers, slots) and r,
                                what="MoE-layer rows")
    assert np.array_equal(moe_rows, plan)
    assert cm_moe["metadata"]["annotations"]["expertplane.io/plan-version"] == "1"
    assert json.loads(cm_moe["metadata"]["annotations"]["expertplane.io/plan-form"]) == \
        {"engine": "expertplane"}
    apiserver.apply(sample_placement())
    wait_for(ready(apiserver, NAME, 3), what="engine sglang again")
    _, back = wait_for(lambda: (r := published(apiserver))[1].shape == (hidden, slots) and r,
                       what="hidden-layer rows again")
    assert np.array_equal(back, rows)
    apiserver.kubectl("delete", "expertplacement", NAME, "-n", NS, "--wait=true", "--timeout=60s")


@pytest.mark.parametrize("model, message", [
    ({"layers": 3, "experts": 8}, "spec.model.hiddenLayers: required with engine sglang: SGLang's "
                                  "map has one row per hidden layer (DeepSeek-V3: 61, of which "
                                  "the first 3 are dense)"),
    ({"layers": 3, "experts": 8, "hiddenLayers": 2},
     "spec.model.hiddenLayers: must be >= spec.model.layers (3, the MoE layers), got 2"),
    ({"layers": 3, "experts": 8, "hiddenLayers": 6, "moeLayers": [1, 3]},
     "spec.model.moeLayers: must list one hidden-layer id per MoE layer (spec.model.layers: 3), got 2"),
    ({"layers": 3, "experts": 8, "hiddenLayers": 6, "moeLayers": [1, 3, 6]},
     "spec.model.moeLayers: must be increasing hidden-layer ids in [0, 6), got [1, 3, 6]"),
])
def test_operator_names_bad_layer_fields(apiserver, operator, model, message):
    apiserver.apply(sample_placement("bad-layers", model=model, replicas=8,
                                     topology={"nodes": 1, "gpusPerNode": 4}))
    obj = wait_for(lambda: (o := apiserver.get("expertplacement", "bad-layers", NS))
                   and (c := condition(o, "Ready")) and c["reason"] == "InvalidSpec" and o,
                   what="InvalidSpec")
    assert condition(obj, "Ready")["message"] == message
    assert apiserver.get("configmap", "bad-layers-expert-location", NS) is None
    apiserver.kubectl("delete", "expertplacement", "bad-layers", "-n", NS, "--wait=true",
                      "--timeout=60s")
