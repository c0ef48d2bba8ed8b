"""Pure placement computation: EPLB (DeepSeek-exact and better), plan utilities and metrics.

Main entry point: ``rebalance_experts`` (drop-in for DeepSeek's ``eplb.rebalance_experts``).
"""

from expertplane.errors import FieldError
from expertplane.planner.eplb import ALGORITHMS, rebalance_experts
from expertplane.planner.metrics import balance, gpu_loads
from expertplane.planner.plan import Migration, build_log2phy, migration

__all__ = ["ALGORITHMS", "Migration", "FieldError", "balance", "build_log2phy", "gpu_loads",
           "migration", "rebalance_experts"]
