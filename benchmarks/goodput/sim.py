"""The step loop: one policy with its mover on one trace, step by step.

At every step boundary the policy may ask for a new placement (phy2log [L, R]); the mover turns
the change into stalls, slower steps and the layers whose new placement holds. A step's time is
the cost model's on the tick's load under the placement in force, plus the mover's effects:

    step_s[s] = stall (serving stopped) + step time of the placement in force + extra (copies)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from expertplane.benchmarks.goodput.cost import CostModel
from expertplane.benchmarks.goodput.movers import Mover, plan_move
from expertplane.benchmarks.goodput.traces import Trace
from expertplane.controller.spec import PlacementSpec
from expertplane.planner.metrics import gpu_loads


@dataclass(frozen=True)
class Cluster(PlacementSpec):
    """A placement (``PlacementSpec``: layers, experts, groups, nodes, GPUs, slots, bytes per
    expert) plus ``top_k``, the experts each token is routed to."""

    top_k: int = 8


def deepseek_v3(name: str, num_nodes: int, gpus_per_node: int, num_replicas: int) -> Cluster:
    """DeepSeek-V3 on a cluster: 58 MoE layers, 256 experts in 8 groups, top-8, bf16 experts of
    H 7168 x I 2048 (gate, up, down) = 88.1 MB."""
    return Cluster(name=name, num_layers=58, num_experts=256, num_nodes=num_nodes,
                   gpus_per_node=gpus_per_node, num_replicas=num_replicas, num_groups=8,
                   expert_bytes=3 * 7168 * 2048 * 2, top_k=8)


class LoadHistory:
    """Prefix sums of a trace in steps: ``between(lo, hi)`` -> [L, E] float64 rows routed to
    each expert over steps ``lo .. hi - 1``."""

    def __init__(self, trace: Trace):
        self.trace = trace
        k = trace.steps_per_tick
        self._cum = np.zeros((trace.num_ticks + 1, *trace.load.shape[1:]))
        np.cumsum(trace.load.astype(np.float64) * k, axis=0, out=self._cum[1:])

    def upto(self, step: int) -> np.ndarray:
        tick, rest = divmod(min(max(step, 0), self.trace.num_steps), self.trace.steps_per_tick)
        if rest == 0:
            return self._cum[tick]
        return self._cum[tick] + rest * self.trace.load[tick].astype(np.float64)

    def between(self, lo: int, hi: int) -> np.ndarray:
        return self.upto(hi) - self.upto(lo)


@dataclass
class View:
    """What a policy sees at the boundary before step ``step``: the clock (seconds since the
    start), whether a move is in progress, and the load history with each step's start time."""

    history: LoadHistory
    starts: np.ndarray  # [N + 1] start time of each step (valid up to ``step``)
    step: int = 0
    clock: float = 0.0
    moving: bool = False

    def last_steps(self, n: int) -> np.ndarray:
        """[L, E] rows over the last ``n`` steps (fewer at the start)."""
        return self.history.between(self.step - n, self.step)

    def next_steps(self, n: int) -> np.ndarray:
        """[L, E] rows over the next ``n`` steps (the oracle's knowledge)."""
        return self.history.between(self.step, self.step + n)

    def last_seconds(self, seconds: float, half_life: float = 0.0) -> np.ndarray:
        """[L, E] rows of the steps started in the last ``seconds``, each tick's steps weighted
        by ``2 ** (-age / half_life)`` (age of the tick's part in the window; 1 if 0)."""
        lo = int(np.searchsorted(self.starts[:self.step + 1], self.clock - seconds))
        if half_life <= 0:
            return self.history.between(lo, self.step)
        k = self.history.trace.steps_per_tick
        out = np.zeros(self.history.trace.load.shape[1:])
        a = lo
        while a < self.step:
            b = min((a // k + 1) * k, self.step)
            age = self.clock - self.starts[(a + b) // 2]
            out += self.history.between(a, b) * 2.0 ** (-age / half_life)
            a = b
        return out


@dataclass
class RunResult:
    """One policy's run. ``step_s`` [N] seconds of each step with its stalls and slowdowns;
    ``plans``: every placement [L, R] it put in force (the initial one first)."""

    policy: str
    step_s: np.ndarray
    tokens: float
    stall_s: float = 0.0
    extra_s: float = 0.0
    bytes_moved: int = 0
    slots_moved: int = 0
    rebalances: list[int] = field(default_factory=list)
    plans: list[np.ndarray] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return float(self.step_s.sum())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def replica_counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] replicas of each expert in ``phy2log`` [L, R]."""
    layers = phy2log.shape[0]
    flat = (phy2log + num_experts * np.arange(layers)[:, None]).ravel()
    return np.bincount(flat, minlength=layers * num_experts).reshape(layers, num_experts)


class Placement:
    """The placement in force, layer by layer, with its step time per tick (cached)."""

    def __init__(self, cluster: Cluster, cost: CostModel, trace: Trace, phy2log: np.ndarray):
        self.cluster, self.cost, self.trace = cluster, cost, trace
        self.phy2log = np.array(phy2log, dtype=np.int64)
        self._tick = -1
        self._step_s = 0.0

    def switch(self, layers: np.ndarray, target: np.ndarray) -> None:
        self.phy2log[layers] = target[layers]
        self._tick = -1

    def step_seconds(self, tick: int) -> float:
        if tick != self._tick:
            c = self.cluster
            loads = gpu_loads(self.trace.load[tick], self.phy2log,
                              replica_counts(self.phy2log, c.num_experts), c.num_gpus)
            self._step_s, self._tick = self.cost.step_seconds(loads), tick
        return self._step_s


def simulate(cluster: Cluster, trace: Trace, history: LoadHistory, cost: CostModel, policy,
             mover: Mover, initial: np.ndarray) -> RunResult:
    """Run ``policy`` (``at_step(view, phy2log) -> new phy2log or None``) with ``mover``."""
    n, k = trace.num_steps, trace.steps_per_tick
    placement = Placement(cluster, cost, trace, initial)
    view = View(history, np.zeros(n + 1))
    tokens = float(trace.tokens.sum()) * k * cluster.num_gpus
    result = RunResult(policy.name, np.zeros(n), tokens, plans=[placement.phy2log.copy()])
    transition, target, clock = None, None, 0.0
    for s in range(n):
        view.step, view.clock, view.moving = s, clock, transition is not None
        view.starts[s] = clock
        asked = policy.at_step(view, placement.phy2log)
        if asked is not None:
            move = plan_move(placement.phy2log, asked, cluster.num_gpus, cluster.gpus_per_node,
                             cluster.expert_bytes)
            result.rebalances.append(s)
            result.bytes_moved += move.bytes
            result.slots_moved += move.slots
            transition, target = mover.begin(move), np.asarray(asked, dtype=np.int64)
            result.plans.append(target)
        base = placement.step_seconds(s // k)
        stall = extra = 0.0
        if transition is not None:
            effect = transition.advance(base)
            if effect.switch is not None:
                placement.switch(effect.switch, target)
                base = placement.step_seconds(s // k)
            stall, extra = effect.stall_s, effect.extra_s
            if effect.done:
                transition = None
        result.stall_s += stall
        result.extra_s += extra
        result.step_s[s] = stall + base + extra
        clock += result.step_s[s]
    return result
