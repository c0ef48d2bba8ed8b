"""The vLLM sample (manifests/samples/vllm-deepseek-v3.yaml): its ExpertPlacement is one the
controller accepts, with as many slots as the vLLM server's EPLB has, and the vLLM container and
the agent sidecar share the plan file and the agent's socket as the plugin expects. (The real
kube-apiserver validates every sample server-side in test_operator_k8s.py.)"""

import json
from pathlib import Path

import yaml

from expertplane.cli.main import build_parser
from expertplane.controller.operator.crd import placement_from_cr, placement_name, topology_from_spec
from expertplane.controller.spec import spec_from_proto
from expertplane.engines import vllm as plugin
from expertplane.engines.plan_file import PLAN_FILE_ENV
from tests.pod_env import container_args, container_env

SAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "samples" / "vllm-deepseek-v3.yaml"
POD = {"metadata.namespace": "team-a", "spec.nodeName": "node-0"}     # where the pod runs


def test_vllm_sample_placement_matches_the_server_and_shares_the_plan_file():
    placement, deployment = yaml.safe_load_all(SAMPLE.read_text())
    assert (placement["kind"], deployment["kind"]) == ("ExpertPlacement", "Deployment")
    spec = placement["spec"]
    msg = placement_from_cr(placement["metadata"]["name"], spec, topology_from_spec(spec), 1)
    parsed = spec_from_proto(msg)
    pod = deployment["spec"]["template"]["spec"]
    server, agent = pod["containers"]
    assert agent["command"] == ["expertplane", "agent"]          # the sidecar
    args = dict(a.lstrip("-").split("=", 1) for a in server["args"] if "=" in a)
    eplb = json.loads(args["eplb-config"])
    assert {"enable-eplb", "enable-expert-parallel"} <= {a.lstrip("-") for a in server["args"]}
    # slots: vLLM has experts + num_redundant_experts per MoE layer, over data-parallel ranks
    assert msg.num_replicas == msg.model.num_experts + eplb["num_redundant_experts"]
    assert parsed.num_gpus == int(args["data-parallel-size"]) == int(server["resources"]["limits"]["nvidia.com/gpu"])
    assert msg.num_replicas % parsed.num_gpus == 0
    env, agent_env = container_env(server, POD), container_env(agent, POD)
    assert env[PLAN_FILE_ENV] == agent_env[PLAN_FILE_ENV]
    controller_name = placement_name("team-a", placement["metadata"]["name"])
    assert env[plugin.PLACEMENT_ENV] == controller_name
    agent_args = build_parser().parse_args([*agent["command"][1:], *container_args(agent, POD)])
    assert agent_args.placement == controller_name and agent_args.node == "node-0"
    socket = agent_args.socket
    assert env[plugin.AGENT_ENV] == f"unix:{socket}"
    shared = {m["mountPath"] for m in agent["volumeMounts"]} & \
        {m["mountPath"] for m in server["volumeMounts"]}
    assert any(Path(env[PLAN_FILE_ENV]).parent == Path(p) for p in shared)
    assert any(Path(socket).parent == Path(p) for p in shared)
