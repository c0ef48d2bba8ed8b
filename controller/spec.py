"""Placement specs: validation of the wire ``Placement`` into a typed ``PlacementSpec`` and back.

A placement is one model served on one GPU topology: ``num_layers`` MoE layers of
``num_experts`` logical experts, replicated into ``num_replicas`` physical slots per layer,
spread evenly over ``num_nodes * gpus_per_node`` GPUs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import numpy as np

from expertplane.controller.bias import RouterBiasSpec, router_bias_from_proto, router_bias_to_proto
from expertplane.errors import FieldError
from expertplane.planner.algorithms import ALGORITHMS
from expertplane.proto import expertplane_pb2 as pb
from expertplane.rpc.tensors import double_tensor, to_numpy

MODES = ("auto", "manual", "off")
DEFAULT_WINDOW_SECONDS = 30.0
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class PolicySpec:
    """When to re-plan. Times in seconds, sizes in bytes; see ``RebalancePolicy`` in the proto."""

    mode: str = "auto"
    window_seconds: float = DEFAULT_WINDOW_SECONDS
    half_life_seconds: float = 0.0
    threshold: float = 0.02
    hysteresis: float = 0.0
    cooldown_seconds: float = 0.0
    move_budget_bytes: int = 0
    min_gain_per_gib: float = 0.0
    dry_run: bool = False


@dataclass(frozen=True)
class PlacementSpec:
    """A validated placement. ``initial_load`` is ``[num_layers, num_experts]`` or None."""

    name: str
    num_layers: int
    num_experts: int
    num_nodes: int
    gpus_per_node: int
    num_replicas: int
    num_groups: int = 1
    expert_bytes: int = 0
    algorithm: str = "deepseek"
    policy: PolicySpec = field(default_factory=PolicySpec)
    initial_load: np.ndarray | None = None
    generation: int = 0
    router_bias: RouterBiasSpec | None = None

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    def same_shape(self, other: "PlacementSpec") -> bool:
        """True if plans of ``other`` stay valid for this spec (same layers, experts, slots, GPUs)."""
        return (self.num_layers, self.num_experts, self.num_replicas, self.num_nodes,
                self.gpus_per_node) == (other.num_layers, other.num_experts, other.num_replicas,
                                        other.num_nodes, other.gpus_per_node)

    def with_generation(self, generation: int) -> "PlacementSpec":
        return replace(self, generation=generation)


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise FieldError(name, f"must be >= 1, got {value}")
    return int(value)


def _non_negative(value: float, name: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise FieldError(name, f"must be a finite number >= 0, got {value}")
    return float(value)


def policy_from_proto(msg: pb.RebalancePolicy, prefix: str = "policy") -> PolicySpec:
    """Validate a ``RebalancePolicy``; window 0 means the default (30 s), mode 0 means AUTO."""
    mode = {pb.RebalancePolicy.MODE_UNSPECIFIED: "auto", pb.RebalancePolicy.AUTO: "auto",
            pb.RebalancePolicy.MANUAL: "manual", pb.RebalancePolicy.OFF: "off"}.get(msg.mode)
    if mode is None:
        raise FieldError(f"{prefix}.mode", f"unknown mode {msg.mode}")
    window = _non_negative(msg.window_seconds, f"{prefix}.window_seconds") or DEFAULT_WINDOW_SECONDS
    return PolicySpec(
        mode=mode,
        window_seconds=window,
        half_life_seconds=_non_negative(msg.half_life_seconds, f"{prefix}.half_life_seconds"),
        threshold=_non_negative(msg.threshold, f"{prefix}.threshold"),
        hysteresis=_non_negative(msg.hysteresis, f"{prefix}.hysteresis"),
        cooldown_seconds=_non_negative(msg.cooldown_seconds, f"{prefix}.cooldown_seconds"),
        move_budget_bytes=int(msg.move_budget_bytes),
        min_gain_per_gib=_non_negative(msg.min_gain_per_gib, f"{prefix}.min_gain_per_gib"),
        dry_run=bool(msg.dry_run),
    )


def spec_from_proto(msg: pb.Placement, prefix: str = "") -> PlacementSpec:
    """Validate a wire ``Placement``; raises ``FieldError`` naming the field.

    ``prefix`` is prepended to field names (e.g. ``"spec."`` inside ComputePlanRequest).
    """
    p = prefix
    if not _NAME.match(msg.name):
        raise FieldError(f"{p}name", f"must match [a-z0-9-] (1-63 chars, no leading/trailing "
                                          f"'-'), got {msg.name!r}")
    if not msg.HasField("model"):
        raise FieldError(f"{p}model", "is required")
    if not msg.HasField("topology"):
        raise FieldError(f"{p}topology", "is required")
    layers = _positive(msg.model.num_layers, f"{p}model.num_layers")
    experts = _positive(msg.model.num_experts, f"{p}model.num_experts")
    groups = msg.model.num_groups or 1
    if experts % groups:
        raise FieldError(f"{p}model.num_groups", f"must divide num_experts ({experts}), "
                                                      f"got {groups}")
    nodes = _positive(msg.topology.num_nodes, f"{p}topology.num_nodes")
    per_node = _positive(msg.topology.gpus_per_node, f"{p}topology.gpus_per_node")
    replicas = msg.num_replicas or experts
    if replicas < experts:
        raise FieldError(f"{p}num_replicas", f"must be >= num_experts ({experts}), "
                                                  f"got {replicas}")
    if replicas % (nodes * per_node):
        raise FieldError(f"{p}num_replicas", f"must be a multiple of the GPU count "
                                                  f"({nodes * per_node}), got {replicas}")
    algorithm = msg.algorithm or "deepseek"
    if algorithm not in ALGORITHMS:
        raise FieldError(f"{p}algorithm", f"must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    initial = None
    if msg.HasField("initial_load") and len(msg.initial_load.shape):
        initial = to_numpy(msg.initial_load, f"{p}initial_load", shape=(layers, experts))
        if not np.all(np.isfinite(initial)) or (initial < 0).any():
            raise FieldError(f"{p}initial_load", "must be finite and non-negative")
    return PlacementSpec(
        name=msg.name, num_layers=layers, num_experts=experts, num_nodes=nodes,
        gpus_per_node=per_node, num_replicas=replicas, num_groups=groups,
        expert_bytes=int(msg.model.expert_bytes), algorithm=algorithm,
        policy=policy_from_proto(msg.policy, f"{p}policy"), initial_load=initial,
        generation=int(msg.generation),
        router_bias=router_bias_from_proto(msg.router_bias, f"{p}router_bias")
        if msg.HasField("router_bias") else None,
    )


def spec_to_proto(spec: PlacementSpec) -> pb.Placement:
    """The wire form of ``spec`` (round-trips through ``spec_from_proto``)."""
    pol = spec.policy
    msg = pb.Placement(
        name=spec.name,
        model=pb.ModelSpec(num_layers=spec.num_layers, num_experts=spec.num_experts,
                           num_groups=spec.num_groups, expert_bytes=spec.expert_bytes),
        topology=pb.Topology(num_nodes=spec.num_nodes, gpus_per_node=spec.gpus_per_node),
        num_replicas=spec.num_replicas, algorithm=spec.algorithm,
        policy=pb.RebalancePolicy(
            mode=pb.RebalancePolicy.Mode.Value(pol.mode.upper()),
            window_seconds=pol.window_seconds, half_life_seconds=pol.half_life_seconds,
            threshold=pol.threshold, hysteresis=pol.hysteresis,
            cooldown_seconds=pol.cooldown_seconds, move_budget_bytes=pol.move_budget_bytes,
            min_gain_per_gib=pol.min_gain_per_gib, dry_run=pol.dry_run),
        generation=spec.generation,
    )
    if spec.initial_load is not None:
        msg.initial_load.CopyFrom(double_tensor(spec.initial_load))
    if spec.router_bias is not None:
        msg.router_bias.CopyFrom(router_bias_to_proto(spec.router_bias))
    return msg


@dataclass(frozen=True)
class Restore:
    """A plan to restore when the controller holds none for a placement: ``phy2log`` [L, R]
    (int64 expert ids) put in force as ``version``."""

    version: int
    phy2log: np.ndarray


def restore_from_proto(msg: pb.Placement) -> Restore | None:
    """``Placement.restore_phy2log`` / ``restore_version`` (None when no map is given); the map's
    shape and contents are checked against the spec when it is used."""
    if not msg.HasField("restore_phy2log"):
        return None
    if not 1 <= msg.restore_version <= 2 ** 63 - 1:
        raise FieldError("restore_version", f"must be between 1 and 2^63 - 1 with restore_phy2log, "
                                            f"got {msg.restore_version}")
    return Restore(int(msg.restore_version), to_numpy(msg.restore_phy2log, "restore_phy2log",
                                                      ndim=2).astype(np.int64))
