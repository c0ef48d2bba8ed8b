"""The selection-bias update rule of DeepSeek-V3's auxiliary-loss-free balancing (pure).

The router adds a per-expert bias to the scores used for top-k selection only; after each step
(worker: ``kernels.moe``) or window (controller: ``controller.bias``) the bias moves against the
load: ``rule="sign"`` (DeepSeek-V3): ``bias -= speed * sign(load - mean(load))``;
``rule="proportional"``: ``bias -= speed * (load - mean) / mean``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BIAS_RULES", "BalancingError", "BiasUpdate"]

BIAS_RULES = ("sign", "proportional")


class BalancingError(ValueError):
    """A balancing setting or input is invalid; the message names the field."""


@dataclass(frozen=True)
class BiasUpdate:
    """The selection-bias update rule: ``speed`` (gamma, > 0) and ``rule`` (see module doc)."""

    speed: float = 1e-3
    rule: str = "sign"

    def __post_init__(self) -> None:
        if not self.speed > 0 or not math.isfinite(self.speed):
            raise BalancingError(f"speed must be a finite number > 0, got {self.speed}")
        if self.rule not in BIAS_RULES:
            raise BalancingError(f"rule must be one of {BIAS_RULES}, got {self.rule!r}")

    def step(self, bias: Tensor, load: Tensor) -> Tensor:
        """New bias [E] (fp32) from the current bias [E] and one step's expert load [E]."""
        if bias.shape != load.shape or bias.dim() != 1:
            raise BalancingError(f"load must be [{bias.shape[0] if bias.dim() else '?'}] like "
                                 f"bias, got {list(load.shape)}")
        load = load.to(device=bias.device, dtype=torch.float32)
        mean = load.mean()
        error = load - mean
        if self.rule == "sign":
            delta = torch.sign(error)
        else:
            delta = error / mean.clamp_min(1.0)
        return bias.float() - self.speed * delta
