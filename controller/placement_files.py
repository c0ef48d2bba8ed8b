"""Placements from YAML files (``expertplane controller --placements DIR``).

Each ``*.yaml``/``*.yml`` file in the directory holds one or more YAML documents, each a placement
mirroring the ``Placement`` message (snake_case field names)::

    name: deepseek-v3              # [a-z0-9-], unique across all files
    model:
      num_layers: 58
      num_experts: 256
      num_groups: 8                # optional, default 1
      expert_bytes: 44040192       # optional, bytes of one expert (migration cost)
    topology:
      num_nodes: 4
      gpus_per_node: 8
    num_replicas: 288              # optional, default num_experts
    algorithm: deepseek            # deepseek | balanced | topology
    policy:                        # optional; every key optional
      mode: auto                   # auto | manual | off
      window_seconds: 300
      half_life_seconds: 60
      threshold: 0.05
      hysteresis: 0.02
      cooldown_seconds: 600
      move_budget_bytes: 0
      min_gain_per_gib: 0.0
      dry_run: false
    initial_load: [[...], ...]     # optional [num_layers][num_experts] token counts
    router_bias:                   # optional: controller-driven aux-loss-free router bias
      enabled: true
      speed: 0.001                 # bias step per update (score units)
      rule: sign                   # sign | proportional
      interval_seconds: 10

A document may also be an ExpertPlacement custom resource (``apiVersion``/``kind``/``metadata``/
``spec``, the same YAML ``kubectl apply`` takes; see ``placement_cr.py``). Other Kubernetes kinds
(a PipelinePlan, a Kustomization) are skipped with a note, so a folder of manifests can be read.

Errors name the file, the document and the field path.
"""

from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass, field

import jsonschema
import yaml

from expertplane.controller.placement_cr import KIND, is_custom_resource, placement_from_resource
from expertplane.controller.spec import ALGORITHMS, MODES, PlacementSpec, spec_from_proto
from expertplane.errors import FieldError, one_line
from expertplane.planner.bias_rule import BIAS_RULES
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import double_tensor

log = logging.getLogger(__name__)
_UINT = {"type": "integer", "minimum": 0}
_NUM = {"type": "number", "minimum": 0}

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "model", "topology"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
        "model": {
            "type": "object", "additionalProperties": False,
            "required": ["num_layers", "num_experts"],
            "properties": {"num_layers": {"type": "integer", "minimum": 1},
                           "num_experts": {"type": "integer", "minimum": 1},
                           "num_groups": {"type": "integer", "minimum": 1},
                           "expert_bytes": _UINT},
        },
        "topology": {
            "type": "object", "additionalProperties": False,
            "required": ["num_nodes", "gpus_per_node"],
            "properties": {"num_nodes": {"type": "integer", "minimum": 1},
                           "gpus_per_node": {"type": "integer", "minimum": 1}},
        },
        "num_replicas": {"type": "integer", "minimum": 1},
        "algorithm": {"enum": list(ALGORITHMS)},
        "policy": {
            "type": "object", "additionalProperties": False,
            "properties": {"mode": {"enum": list(MODES)}, "window_seconds": _NUM,
                           "half_life_seconds": _NUM, "threshold": _NUM, "hysteresis": _NUM,
                           "cooldown_seconds": _NUM, "move_budget_bytes": _UINT,
                           "min_gain_per_gib": _NUM, "dry_run": {"type": "boolean"}},
        },
        "initial_load": {"type": "array", "items": {"type": "array", "items": _NUM}},
        "router_bias": {
            "type": "object", "additionalProperties": False,
            "properties": {"enabled": {"type": "boolean"}, "speed": _NUM,
                           "rule": {"enum": list(BIAS_RULES)}, "interval_seconds": _NUM},
        },
    },
}


def placement_from_dict(doc: dict) -> pb.Placement:
    """Validate one YAML document against ``SCHEMA`` and build the ``Placement`` message.

    Raises ``FieldError`` whose field is the dotted path of the offending key.
    """
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(doc),
                    key=lambda e: list(e.absolute_path))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        path = ".".join(str(p) for p in err.absolute_path) or "(document)"
        raise FieldError(path, err.message)
    model, topo, pol = doc["model"], doc["topology"], doc.get("policy", {})
    msg = pb.Placement(
        name=doc["name"],
        model=pb.ModelSpec(**model),
        topology=pb.Topology(**topo),
        num_replicas=doc.get("num_replicas", 0),
        algorithm=doc.get("algorithm", ""),
        policy=pb.RebalancePolicy(
            **{k: v for k, v in pol.items() if k != "mode"},
            mode=pb.RebalancePolicy.Mode.Value(pol.get("mode", "auto").upper())),
    )
    if "router_bias" in doc:
        msg.router_bias.CopyFrom(pb.RouterBiasPolicy(**doc["router_bias"]))
    if "initial_load" in doc:
        rows = doc["initial_load"]
        if len({len(r) for r in rows}) > 1:
            raise FieldError("initial_load", "rows must all have the same length")
        msg.initial_load.CopyFrom(double_tensor(rows))
    return msg


@dataclass
class PlacementFiles:
    """What a file or folder of placements holds: ``placements`` (validated ``Placement``
    messages with ``sources``, ``"<file>#<document>"`` each), ``skipped`` notes for documents of
    other kinds, and ``files`` read."""

    placements: list[pb.Placement] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: list[pathlib.Path] = field(default_factory=list)


def _placement_of(doc, where: str) -> pb.Placement | None:
    """The placement of one document, or None for a Kubernetes object of another kind."""
    if not isinstance(doc, dict):
        raise FieldError(where, "each document must be a mapping")
    if is_custom_resource(doc) and doc.get("kind") != KIND:
        return None
    try:
        msg = placement_from_resource(doc) if is_custom_resource(doc) else placement_from_dict(doc)
        spec_from_proto(msg)
    except FieldError as exc:
        raise exc.at(f"{where} {exc.field}") from None
    return msg


def read_placement_files(path: str | pathlib.Path) -> PlacementFiles:
    """Read and validate every placement in the YAML file ``path``, or in every ``*.yaml``/
    ``*.yml`` file of the folder ``path`` (sorted by name).

    Raises ``FieldError`` (``"<file>#<doc> <field>: ..."``) or ``OSError`` for I/O problems.
    """
    root = pathlib.Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or directory")
    out = PlacementFiles(files=sorted([*root.glob("*.yaml"), *root.glob("*.yml")])
                         if root.is_dir() else [root])
    names: set[str] = set()
    for file in out.files:
        try:
            docs = list(yaml.safe_load_all(file.read_text()))
        except yaml.YAMLError as exc:
            raise FieldError(str(file), f"not valid YAML: {one_line(exc)}") from None
        for index, doc in enumerate(d for d in docs if d is not None):
            where = f"{file}#{index}"
            msg = _placement_of(doc, where)
            if msg is None:
                out.skipped.append(f"{where}: kind {doc.get('kind')!r} is not a placement, skipped")
                continue
            if msg.name in names:
                raise FieldError(f"{where} name", f"placement {msg.name!r} defined twice")
            names.add(msg.name)
            out.placements.append(msg)
            out.sources.append(where)
    return out


def load_placements(directory: str | pathlib.Path) -> list[PlacementSpec]:
    """Read and validate every placement under ``directory`` (sorted by file name); logs a
    warning when the folder holds none, and a note for each document of another kind.

    Raises ``FieldError`` (``"<file>#<doc> <field>: ..."``) or ``OSError`` for I/O problems.
    """
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"--placements: {root} is not a directory")
    found = read_placement_files(root)
    for note in found.skipped:
        log.info("%s", note)
    if not found.placements:
        log.warning("--placements %s: no placement found (%d YAML file(s)); see "
                    "examples/placements/", root, len(found.files))
    return [spec_from_proto(msg) for msg in found.placements]
