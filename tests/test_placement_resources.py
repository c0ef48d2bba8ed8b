"""Placement files in both formats: the controller's own YAML and ExpertPlacement custom
resources (the README's folder, the Kubernetes samples), and a warning for an empty folder."""

from __future__ import annotations

import logging
import pathlib
import re

import pytest
import yaml

from expertplane.controller.placement_files import load_placements, read_placement_files
from expertplane.errors import FieldError

REPO = pathlib.Path(__file__).resolve().parent.parent
RESOURCE = """
apiVersion: expertplane.io/v1alpha1
kind: ExpertPlacement
metadata: {name: m}
spec:
  model: {layers: 3, experts: 16, groups: 4, expertBytes: 1024}
  topology: {nodes: 2, gpusPerNode: 4}
  replicas: 24
  algorithm: balanced
  rebalancePolicy: {mode: Manual, threshold: 0.1, cooldownSeconds: 30}
  initialLoad: {values: [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
                         [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
                         [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]}
"""
OWN = """
name: m
model: {num_layers: 3, num_experts: 16, num_groups: 4, expert_bytes: 1024}
topology: {num_nodes: 2, gpus_per_node: 4}
num_replicas: 24
algorithm: balanced
policy: {mode: manual, threshold: 0.1, cooldown_seconds: 30}
initial_load: [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
               [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
               [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
"""


def _one(tmp_path, text: str, name: str):
    (tmp_path / name).mkdir()
    (tmp_path / name / "p.yaml").write_text(text)
    [spec] = load_placements(tmp_path / name)
    return spec


def test_custom_resource_means_the_same_as_the_own_schema(tmp_path):
    cr, own = _one(tmp_path, RESOURCE, "cr"), _one(tmp_path, OWN, "own")
    assert (cr.initial_load == own.initial_load).all()
    # the resource's policy defaults (window 30 s) are the CRD's, the own schema's the message's
    assert cr.policy.mode == own.policy.mode == "manual"
    assert (cr.name, cr.num_layers, cr.num_experts, cr.num_groups, cr.expert_bytes, cr.num_nodes,
            cr.gpus_per_node, cr.num_replicas, cr.algorithm, cr.policy.threshold,
            cr.policy.cooldown_seconds) == \
           (own.name, own.num_layers, own.num_experts, own.num_groups, own.expert_bytes,
            own.num_nodes, own.gpus_per_node, own.num_replicas, own.algorithm,
            own.policy.threshold, own.policy.cooldown_seconds)


def test_readme_placements_folder_and_kubernetes_samples_load():
    readme = (REPO / "README.md").read_text()
    folders = re.findall(r"--placements (\S+)", readme)
    assert folders, "the README shows no --placements command"
    for folder in folders:
        assert {s.name for s in load_placements(REPO / folder)} == {"deepseek-v3", "small-moe"}
    folder = REPO / "manifests" / "samples"
    docs = [d for f in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    names = sorted(d["metadata"]["name"] for d in docs if d.get("kind") == "ExpertPlacement")
    assert "deepseek-v3" in names          # the sample the README applies
    samples = read_placement_files(folder)
    # every ExpertPlacement sample loads without Kubernetes; every other object is skipped, by file
    assert sorted(p.name for p in samples.placements) == names
    assert len(samples.skipped) == len(docs) - len(names)   # PipelinePlan, Kustomization, pods...


@pytest.mark.parametrize("change, field", [
    (("nodes: 2, gpusPerNode: 4", "workerSelector: {matchLabels: {app: w}}"),
     "spec.topology.workerSelector: needs Kubernetes"),
    (("initialLoad: {values:", "initialLoadFrom: {configMapKeyRef: {name: a, key: b}}\n  x: {values:"),
     "spec.initialLoadFrom: needs Kubernetes"),
    (("replicas: 24", "replicas: 25"), "spec.replicas"),
    (("metadata: {name: m}", "metadata: {}"), "metadata.name: is required"),
    (("apiVersion: expertplane.io/v1alpha1", "apiVersion: v1"), "apiVersion: must be"),
    (("layers: 3", "layers: three"), "spec.model.layers: 'three' is not of type 'integer'"),
    (("layers: 3,", "layers: 3, hiddenLayers: 4, moeLayers: [0, 2, 4],"),
     "spec.model.moeLayers: must be increasing hidden-layer ids in [0, 4), got [0, 2, 4]"),
    (("replicas: 24", "replicas: 24\n  engine: sglang"), "spec.model.hiddenLayers: required"),
])
def test_bad_resources_name_the_field(tmp_path, change, field):
    (tmp_path / "p.yaml").write_text(RESOURCE.replace(*change))
    with pytest.raises(FieldError, match=re.escape(f"{tmp_path / 'p.yaml'}#0 {field}")):
        read_placement_files(tmp_path / "p.yaml")


def test_empty_folder_warns(tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("not yaml")
    with caplog.at_level(logging.WARNING):
        assert load_placements(tmp_path) == []
    assert "no placement found (0 YAML file(s))" in caplog.text
