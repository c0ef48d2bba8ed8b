"""Placement specs: wire validation naming the field, YAML files, round trips."""

import numpy as np
import pytest

from expertplane.controller.placement_files import load_placements
from expertplane.controller.spec import spec_from_proto, spec_to_proto
from expertplane.errors import FieldError
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import double_tensor


def placement(**kw) -> pb.Placement:
    msg = pb.Placement(name="m", model=pb.ModelSpec(num_layers=2, num_experts=8, num_groups=2,
                                                    expert_bytes=10),
                       topology=pb.Topology(num_nodes=2, gpus_per_node=2), num_replicas=12)
    for k, v in kw.items():
        if isinstance(v, dict):
            getattr(msg, k).MergeFrom(type(getattr(msg, k))(**v))
        else:
            setattr(msg, k, v)
    return msg


def test_round_trip_keeps_every_field():
    msg = placement(algorithm="balanced", policy={"mode": pb.RebalancePolicy.MANUAL,
                                                  "threshold": 0.1, "cooldown_seconds": 5},
                    generation=3)
    msg.initial_load.CopyFrom(double_tensor(np.arange(16.0).reshape(2, 8)))
    spec = spec_from_proto(msg)
    assert (spec.num_gpus, spec.slots_per_gpu, spec.policy.mode) == (4, 3, "manual")
    again = spec_from_proto(spec_to_proto(spec))
    assert again.policy == spec.policy and again.generation == 3
    np.testing.assert_array_equal(again.initial_load, spec.initial_load)


@pytest.mark.parametrize("change, field", [
    ({"name": "Bad_Name"}, "name"),
    ({"num_replicas": 6}, "num_replicas"),           # < experts
    ({"num_replicas": 10}, "num_replicas"),          # not a multiple of 4 GPUs
    ({"algorithm": "magic"}, "algorithm"),
    ({"model": {"num_groups": 3}}, "model.num_groups"),
    ({"topology": {"num_nodes": 0, "gpus_per_node": 2}}, "topology.num_nodes"),
    ({"policy": {"threshold": -1}}, "policy.threshold"),
    ({"policy": {"window_seconds": float("nan")}}, "policy.window_seconds"),
])
def test_bad_specs_name_the_field(change, field):
    msg = placement()
    if "topology" in change:
        msg.topology.CopyFrom(pb.Topology(**change.pop("topology")))
    for k, v in change.items():
        if isinstance(v, dict):
            getattr(msg, k).MergeFrom(type(getattr(msg, k))(**v))
        else:
            setattr(msg, k, v)
    with pytest.raises(FieldError) as exc:
        spec_from_proto(msg)
    assert exc.value.field == field and str(exc.value).startswith(field + ":")


def test_initial_load_shape_and_sign_checked():
    msg = placement()
    msg.initial_load.CopyFrom(double_tensor(np.ones((3, 8))))
    with pytest.raises(FieldError, match="initial_load: must have shape"):
        spec_from_proto(msg)
    msg.initial_load.CopyFrom(double_tensor(-np.ones((2, 8))))
    with pytest.raises(FieldError, match="initial_load: must be finite and non-negative"):
        spec_from_proto(msg)


GOOD = """
name: alpha
model: {num_layers: 2, num_experts: 8, num_groups: 2, expert_bytes: 1024}
topology: {num_nodes: 1, gpus_per_node: 4}
num_replicas: 12
algorithm: deepseek
policy: {mode: manual, window_seconds: 60, threshold: 0.1, dry_run: true}
initial_load: [[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]]
---
name: beta
model: {num_layers: 1, num_experts: 4}
topology: {num_nodes: 1, gpus_per_node: 2}
"""


def test_yaml_directory_loads_all_documents(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    specs = {s.name: s for s in load_placements(tmp_path)}
    assert set(specs) == {"alpha", "beta"}
    a = specs["alpha"]
    assert (a.policy.mode, a.policy.window_seconds, a.policy.dry_run) == ("manual", 60, True)
    assert a.initial_load.shape == (2, 8) and a.expert_bytes == 1024
    assert specs["beta"].num_replicas == 4 and specs["beta"].policy.mode == "auto"


@pytest.mark.parametrize("text, field", [
    ("name: x\nmodel: {num_layers: 1, num_experts: 4}\n", "(document)"),   # no topology
    ("name: x\nmodel: {num_layers: 0, num_experts: 4}\ntopology: {num_nodes: 1, gpus_per_node: 1}\n",
     "model.num_layers"),
    ("name: x\nmodel: {num_layers: 1, num_experts: 4}\ntopology: {num_nodes: 1, gpus_per_node: 1}\n"
     "policy: {mode: sometimes}\n", "policy.mode"),
    ("name: x\nmodel: {num_layers: 1, num_experts: 4}\ntopology: {num_nodes: 1, gpus_per_node: 3}\n",
     "num_replicas"),
    ("name: x\nmodel: {num_layers: 2, num_experts: 4}\ntopology: {num_nodes: 1, gpus_per_node: 1}\n"
     "initial_load: [[1, 2, 3, 4]]\n", "initial_load"),
])
def test_yaml_errors_name_file_and_field(tmp_path, text, field):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(FieldError) as exc:
        load_placements(tmp_path)
    assert "p.yaml#0" in str(exc.value) and field in exc.value.field


def test_yaml_duplicate_names_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yml").write_text(GOOD.split("---")[1])
    with pytest.raises(FieldError, match="'beta' defined twice"):
        load_placements(tmp_path)


def test_yaml_missing_directory(tmp_path):
    with pytest.raises(OSError):
        load_placements(tmp_path / "nope")
