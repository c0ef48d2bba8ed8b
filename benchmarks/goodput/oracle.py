"""The ceiling: a policy that knows the load ahead and moves for free.

Every ``window`` steps it plans afresh on the *next* ``window`` steps' load (DeepSeek's
``deepseek`` and our ``balanced``); on top of those it may use every placement any other policy
put in force in the same run (``pool``). For each tick and each layer it runs the fastest of
all of them, switching for free. Each step of another policy runs, layer by layer, one of the
pool's placements (a layer-by-layer move mixes two of them) on the same tick's load, plus stalls
and slowdowns that are never negative, so no policy can take less time for any step: the oracle
is a ceiling by construction, and ``pool_share`` says how often a pool placement was the fastest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertplane.benchmarks.goodput.cost import CostModel
from expertplane.benchmarks.goodput.sim import Cluster, LoadHistory, RunResult, replica_counts
from expertplane.benchmarks.goodput.traces import Trace
from expertplane.planner.eplb import rebalance_experts


def layer_seconds_per_tick(cluster: Cluster, cost: CostModel, trace: Trace,
                           phy2log: np.ndarray, chunk: int = 64) -> np.ndarray:
    """[T, L] seconds of each layer at each tick under ``phy2log`` [L, R] (float64, ``chunk``
    ticks at a time)."""
    cnt = np.maximum(replica_counts(phy2log, cluster.num_experts), 1)             # [L, E]
    out = np.empty(trace.load.shape[:2])
    for a in range(0, trace.num_ticks, chunk):
        load = trace.load[a:a + chunk].astype(np.float64) / cnt[None]
        per_slot = np.take_along_axis(load, phy2log[None], axis=2)                # [t, L, R]
        gpu = per_slot.reshape(*per_slot.shape[:2], cluster.num_gpus, -1).sum(-1)
        out[a:a + chunk] = cost.layer_seconds(gpu.max(-1))
    return out


@dataclass
class OracleResult(RunResult):
    """``pool_share``: fraction of (tick, layer) pairs where another policy's placement won."""

    pool_share: float = 0.0


def simulate_oracle(cluster: Cluster, trace: Trace, history: LoadHistory, cost: CostModel,
                    pool: list[np.ndarray], window: int = 1000) -> OracleResult:
    """Run the oracle; ``pool``: placements [L, R] the other policies used (may be empty)."""
    k, ticks = trace.steps_per_tick, trace.num_ticks
    best = np.full((ticks, cluster.num_layers), np.inf)
    choice = np.zeros((ticks, cluster.num_layers), dtype=np.int64)
    plans: list[np.ndarray] = []
    from_pool = np.zeros((ticks, cluster.num_layers), dtype=bool)

    def consider(phy2log: np.ndarray, first: int, last: int, pooled: bool) -> None:
        sec = layer_seconds_per_tick(cluster, cost, trace, phy2log)[first:last]
        better = sec < best[first:last]
        best[first:last] = np.where(better, sec, best[first:last])
        choice[first:last][better] = len(plans)
        from_pool[first:last][better] = pooled
        plans.append(phy2log)

    rebalances = list(range(0, trace.num_steps, window))
    for start in rebalances:
        load = history.between(start, start + window)
        first, last = start // k, min(-(-(start + window) // k), ticks)
        for algorithm in ("deepseek", "balanced"):
            phy2log, _, _ = rebalance_experts(load, cluster.num_replicas, cluster.num_groups,
                                              cluster.num_nodes, cluster.num_gpus,
                                              algorithm=algorithm)
            consider(phy2log.numpy(), first, last, False)
    for phy2log in pool:
        consider(np.asarray(phy2log, dtype=np.int64), 0, ticks, True)
    step_s = np.repeat(best.sum(axis=1), k)
    layers = np.arange(cluster.num_layers)
    chosen = [np.stack(plans)[choice[t], layers] for t in range(ticks)]   # [L, R] per tick
    changed = [int((a != b).sum()) for a, b in zip(chosen, chosen[1:])]  # moves are free
    return OracleResult("oracle", step_s, float(trace.tokens.sum()) * k * cluster.num_gpus,
                        slots_moved=sum(changed),
                        rebalances=[t * k for t, n in enumerate(changed, 1) if n],
                        pool_share=float(from_pool.mean()))
