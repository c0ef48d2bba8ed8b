"""The controller's router-bias update: DeepSeek-V3's auxiliary-loss-free balancing computed from
the GLOBAL load window (all data-parallel ranks summed), which no single rank sees.

Pure computation. ``global_bias_step`` applies ``planner.bias_rule.BiasUpdate`` (the same rule
the workers use for local updates: ``sign`` or ``proportional``) to every layer of the
window's logical load [L, E]. The bias only enters top-k expert selection on the workers; the
gating weights stay those of the unbiased scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from expertplane.errors import FieldError
from expertplane.planner.bias_rule import BIAS_RULES, BiasUpdate
from expertplane.proto import expertplane_pb2 as pb

__all__ = ["DEFAULT_INTERVAL_SECONDS", "DEFAULT_SPEED", "RouterBiasSpec", "global_bias_step",
           "max_over_mean", "router_bias_from_proto", "router_bias_to_proto"]

DEFAULT_SPEED = 1e-3
DEFAULT_INTERVAL_SECONDS = 10.0


@dataclass(frozen=True)
class RouterBiasSpec:
    """Controller-driven bias of one placement: every ``interval_seconds`` (s) move each
    expert's bias by ``speed`` (score units) per ``rule`` against its window load."""

    enabled: bool = False
    speed: float = DEFAULT_SPEED
    rule: str = "sign"
    interval_seconds: float = DEFAULT_INTERVAL_SECONDS

    @property
    def update(self) -> BiasUpdate:
        return BiasUpdate(speed=self.speed, rule=self.rule)


def router_bias_from_proto(msg: pb.RouterBiasPolicy, prefix: str = "router_bias") -> RouterBiasSpec:
    """Validate a ``RouterBiasPolicy`` (0 / empty fields take the defaults); raises
    ``FieldError`` naming the field."""
    speed = msg.speed or DEFAULT_SPEED
    if not math.isfinite(speed) or speed <= 0:
        raise FieldError(f"{prefix}.speed", f"must be a finite number > 0, got {msg.speed}")
    rule = msg.rule or "sign"
    if rule not in BIAS_RULES:
        raise FieldError(f"{prefix}.rule", f"must be one of {list(BIAS_RULES)}, got {rule!r}")
    interval = msg.interval_seconds or DEFAULT_INTERVAL_SECONDS
    if not math.isfinite(interval) or interval <= 0:
        raise FieldError(f"{prefix}.interval_seconds",
                              f"must be a finite number > 0, got {msg.interval_seconds}")
    return RouterBiasSpec(bool(msg.enabled), float(speed), rule, float(interval))


def router_bias_to_proto(spec: RouterBiasSpec) -> pb.RouterBiasPolicy:
    return pb.RouterBiasPolicy(enabled=spec.enabled, speed=spec.speed, rule=spec.rule,
                               interval_seconds=spec.interval_seconds)


def global_bias_step(bias: np.ndarray, load: np.ndarray, update: BiasUpdate,
                     replicas: np.ndarray | None = None) -> np.ndarray:
    """New bias [L, E] (float64) from the current bias [L, E] and the global window load
    [L, E] (tokens per logical expert, all ranks). Layers without load keep their bias.

    ``replicas`` [L, E] (the plan's logcnt, >= 1): balance the load per replica
    (``load / replicas``) instead of per expert, so an expert with two replicas is steered
    towards twice the tokens of one with a single replica: what equalises physical slots and
    GPUs (and capacity drops) under a replicated plan."""
    bias = np.asarray(bias, dtype=np.float64)
    load = np.asarray(load, dtype=np.float64)
    if bias.ndim != 2 or load.shape != bias.shape:
        raise FieldError("load", f"must have the bias's shape {list(bias.shape)}, "
                                      f"got {list(load.shape)}")
    if replicas is not None:
        replicas = np.asarray(replicas, dtype=np.float64)
        if replicas.shape != bias.shape or (replicas < 1).any():
            raise FieldError("replicas", f"must be >= 1 with shape {list(bias.shape)}, "
                                              f"got shape {list(replicas.shape)}")
        load = load / replicas
    out = bias.copy()
    for layer in range(bias.shape[0]):
        if load[layer].sum() > 0:
            out[layer] = update.step(torch.from_numpy(bias[layer]),
                                     torch.from_numpy(load[layer])).double().numpy()
    return out


def max_over_mean(load: np.ndarray) -> np.ndarray:
    """Per-layer max / mean load [L] of load [L, E] (1.0 for a layer without load)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=1)
    return np.where(mean > 0, load.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)
