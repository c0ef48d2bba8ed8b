"""The SGLang sample (manifests/samples/sglang-deepseek-v3.yaml): SGLang's own argument parser
takes the server's flags and they match the ExpertPlacement (EP size = GPUs, redundant experts =
slots - experts, DeepSeek-V3's hidden and MoE layers), ``--init-expert-location`` is the
operator's ConfigMap key where it is mounted, SGLang's EPLB is off, and the agent sidecar shares
the recorder directory and the plan file and names the placement as the controller does. (The
real kube-apiserver validates it server-side in test_operator_k8s.py and runs its
ExpertPlacement, whose ConfigMap SGLang's loader takes, in test_operator_sglang.py.)"""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import yaml

from tests.engine_env import allow_torchvision_import
from tests.pod_env import container_args, container_env

allow_torchvision_import()

from transformers import DeepseekV3Config  # noqa: E402

from expertplane.cli.agent import sglang_source_from_args, sidecars_from_args  # noqa: E402
from expertplane.cli.main import build_parser  # noqa: E402
from expertplane.controller.operator.crd import (  # noqa: E402
    PLAN_KEY,
    approval_of,
    placement_from_cr,
    placement_name,
    plan_configmap_name,
    topology_from_spec,
)
from expertplane.controller.operator.plan_form import PlanForm, plan_form_from_spec  # noqa: E402
from expertplane.controller.spec import spec_from_proto  # noqa: E402
from expertplane.engines.plan_file import PLAN_FILE_ENV  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "samples" / "sglang-deepseek-v3.yaml"
POD = {"metadata.namespace": "team-a", "spec.nodeName": "node-0"}     # where the pod runs
RECORDER_ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"


def _mounts(container) -> dict[str, str]:
    """mount path -> volume name."""
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}


def _volume_of(path: str, container) -> str | None:
    """The volume holding ``path`` in ``container`` (the deepest mount above it)."""
    above = [m for m in _mounts(container) if PurePosixPath(path).is_relative_to(m)]
    return _mounts(container)[max(above, key=len)] if above else None


def test_sglang_sample_placement_is_deepseek_v3_in_sglangs_form():
    placement, _ = yaml.safe_load_all(SAMPLE.read_text())
    spec = placement["spec"]
    msg = placement_from_cr(placement["metadata"]["name"], spec, topology_from_spec(spec), 1)
    spec_from_proto(msg)
    form = plan_form_from_spec(spec)
    # transformers' DeepseekV3Config defaults are DeepSeek-V3's own config.
    cfg = DeepseekV3Config()
    dense = cfg.first_k_dense_replace
    assert form == PlanForm("sglang", cfg.num_hidden_layers, tuple(range(dense, cfg.num_hidden_layers)))
    assert (msg.model.num_layers, msg.model.num_experts, msg.model.num_groups) == \
        (cfg.num_hidden_layers - dense, cfg.n_routed_experts, cfg.n_group)
    # FP8 experts: gate, up and down projections of hidden x moe_intermediate bytes.
    assert msg.model.expert_bytes == 3 * cfg.hidden_size * cfg.moe_intermediate_size


def test_sglang_server_flags_match_the_placement_and_the_agent(monkeypatch):
    from sglang.srt.server_args import ServerArgs

    placement, deployment = yaml.safe_load_all(SAMPLE.read_text())
    assert (placement["kind"], deployment["kind"]) == ("ExpertPlacement", "Deployment")
    name, spec = placement["metadata"]["name"], placement["spec"]
    msg = placement_from_cr(name, spec, topology_from_spec(spec), 1)
    pod = deployment["spec"]["template"]["spec"]
    server, agent = pod["containers"]
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(container_args(server, POD))
    gpus = int(server["resources"]["limits"]["nvidia.com/gpu"])
    assert args.tp_size == args.ep_size == gpus == spec_from_proto(msg).num_gpus
    assert args.ep_num_redundant_experts == msg.num_replicas - msg.model.num_experts
    assert args.moe_a2a_backend == "deepep"             # static dispatch from the start-up map
    assert not args.enable_eplb and args.expert_distribution_recorder_mode == "stat"
    assert approval_of(spec) == "Manual"       # plans apply at restart: approved, then restarted
    assert args.expert_distribution_recorder_buffer_size == -1     # a dump holds its whole window
    # --init-expert-location is the operator's ConfigMap key, mounted from its volume.
    [plan_volume] = [v for v in pod["volumes"]
                     if v.get("configMap", {}).get("name") == plan_configmap_name(name, spec)]
    location = PurePosixPath(args.init_expert_location)
    assert location.name == PLAN_KEY and location.suffix == ".json"     # SGLang reads .json as JSON
    assert _mounts(server)[str(location.parent)] == plan_volume["name"]
    # The agent: the controller's placement name, the server's HTTP port, the recorder directory
    # and the plan file on volumes both containers mount.
    env, agent_env = container_env(server, POD), container_env(agent, POD)
    assert "expertplane" in env["SGLANG_PLUGINS"].split(",")
    assert "expertplane" in {e.name for e in importlib.metadata.entry_points(group="sglang.srt.plugins")}
    for var, value in agent_env.items():          # the agent's defaults come from its environment
        monkeypatch.setenv(var, value)
    agent_args = build_parser().parse_args([*agent["command"][1:], *container_args(agent, POD)])
    assert agent_args.placement == placement_name("team-a", name)
    source = sglang_source_from_args(agent_args)                     # the options are accepted
    assert source.config.moe_layers == plan_form_from_spec(spec).moe_layers
    assert len(sidecars_from_args(agent_args)) == 2                  # load source, plan file
    url = urlsplit(agent_args.sglang_url)
    assert (url.hostname, url.port) == ("127.0.0.1", args.port)
    assert agent_args.sglang_recorder_dir == env[RECORDER_ENV]
    assert agent_args.plan_file == agent_env[PLAN_FILE_ENV] == env[PLAN_FILE_ENV]
    for path in (env[RECORDER_ENV], env[PLAN_FILE_ENV]):
        assert _volume_of(path, server) == _volume_of(path, agent) is not None, path
    # The recorder directory is an emptyDir's own directory (writable by all): the agent's user
    # deletes the dumps SGLang writes as root, which a directory SGLang creates would not allow.
    assert env[RECORDER_ENV] in _mounts(server) and env[RECORDER_ENV] in _mounts(agent)
    [shared] = [v for v in pod["volumes"] if v["name"] == _volume_of(env[RECORDER_ENV], server)]
    assert "emptyDir" in shared
