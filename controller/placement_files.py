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

Errors name the file, the document and the field path.
"""

from __future__ import annotations

import pathlib

import jsonschema
import yaml

from expertplane.controller.spec import ALGORITHMS, MODES, PlacementSpec, spec_from_proto
from expertplane.errors import FieldError, one_line
from expertplane.kernels.balancing import BIAS_RULES
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import double_tensor

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


def load_placements(directory: str | pathlib.Path) -> list[PlacementSpec]:
    """Read and validate every placement under ``directory`` (sorted by file name).

    Raises ``FieldError`` (``"<file>#<doc> <field>: ..."``) or ``OSError`` for I/O problems.
    """
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"--placements: {root} is not a directory")
    specs: dict[str, PlacementSpec] = {}
    files = sorted([*root.glob("*.yaml"), *root.glob("*.yml")])
    for path in files:
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise FieldError(str(path), f"not valid YAML: {one_line(exc)}") from None
        for index, doc in enumerate(d for d in docs if d is not None):
            where = f"{path}#{index}"
            if not isinstance(doc, dict):
                raise FieldError(where, "each document must be a mapping")
            try:
                spec = spec_from_proto(placement_from_dict(doc))
            except FieldError as exc:
                raise exc.at(f"{where} {exc.field}") from None
            if spec.name in specs:
                raise FieldError(f"{where} name", f"placement {spec.name!r} defined twice")
            specs[spec.name] = spec
    return list(specs.values())
