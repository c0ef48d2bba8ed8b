"""When each engine re-plans, on what load, with which algorithm; written from their public
descriptions and source, with the parameters their docs name.

Every policy has ``name``, ``mover`` (the mover kind of its engine) and ``at_step(view,
phy2log)``, called at the boundary before each step with the placement in force; it returns a
new phy2log [L, R] or None. ``view.step`` passes have completed at that boundary.

* ``Static``: the initial placement forever.
* ``SGLangEPLB`` (``--enable-eplb``): ``EPLBManager`` runs ``rebalance`` from the forward-pass
  hook of every ``eplb_rebalance_num_iterations + 1``-th pass (its generator yields
  ``num_iterations`` times, then rebalances in the next call): passes 1001, 2001, ... with the
  default 1000. The load is the expert-distribution recorder's buffer, whose size defaults to
  ``eplb_rebalance_num_iterations`` (the last 1000 passes). Algorithm ``auto``: DeepSeek's,
  hierarchical when ``num_groups % nnodes == 0``, else global (``planner`` ``deepseek`` is
  bit-exact with it). All layers in one update (``eplb_rebalance_layers_per_chunk`` unset),
  blocking.
* ``VLLMEPLB`` (``--enable-eplb``, ``EPLBConfig``): ``window_size`` 1000 steps,
  ``step_interval`` 3000; the step counter starts at ``step_interval - step_interval // 4``, so
  the first rearrangement follows step 750, then every 3000. ``policy="default"``: DeepSeek's
  algorithm, then each GPU's experts keep their old slots where they stay on that GPU
  (``preserve_intragpu_slots``; ``planner.alignment.keep_gpu_slots``). ``use_async`` False:
  blocking; True: layer by layer in the background, and a due rearrangement waits while the
  previous one is still moving.
* ``ExpertPlanePolicy``: the controller's own code: every ``policy_interval_seconds`` the
  candidate of ``controller.policy.candidate_for`` (the placement's algorithm, movement-aware
  against the plan in force once a fresh plan gains enough) on the window (``window_seconds``,
  ``half_life_seconds``), judged by ``controller.policy.decide`` / ``record``; not while a
  rollout is in progress. Paced hot-swap.
The oracle (the ceiling) is ``oracle.simulate_oracle``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from expertplane.benchmarks.goodput.sim import Cluster, View
from expertplane.controller.policy import PolicyState, candidate_for, decide, record
from expertplane.controller.spec import PolicySpec
from expertplane.planner.eplb import rebalance_experts
from expertplane.planner.alignment import keep_gpu_slots


def plan(cluster: Cluster, load: np.ndarray, algorithm: str) -> np.ndarray:
    """A fresh phy2log [L, R] of ``algorithm`` for ``load`` [L, E] on ``cluster``."""
    phy2log, _, _ = rebalance_experts(load, cluster.num_replicas, cluster.num_groups,
                                      cluster.num_nodes, cluster.num_gpus, algorithm=algorithm)
    return phy2log.numpy()


class Static:
    name, mover = "static", "free"

    def at_step(self, view: View, phy2log: np.ndarray) -> None:
        return None


@dataclass
class SGLangEPLB:
    cluster: Cluster
    num_iterations: int = 1000      # --eplb-rebalance-num-iterations
    buffer_size: int | None = None  # --expert-distribution-recorder-buffer-size (default: above)
    name: str = "sglang"
    mover: str = "blocking"

    def at_step(self, view: View, phy2log: np.ndarray) -> np.ndarray | None:
        s = view.step
        if s <= self.num_iterations or (s - 1) % self.num_iterations:
            return None
        return plan(self.cluster, view.last_steps(self.buffer_size or self.num_iterations),
                    "deepseek")


@dataclass
class VLLMEPLB:
    cluster: Cluster
    use_async: bool = False
    window_size: int = 1000
    step_interval: int = 3000
    name: str = ""
    mover: str = ""
    _counter: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.name = self.name or ("vllm-async" if self.use_async else "vllm-sync")
        self.mover = "async" if self.use_async else "blocking"
        self._counter = max(0, self.step_interval - self.step_interval // 4)

    def at_step(self, view: View, phy2log: np.ndarray) -> np.ndarray | None:
        if view.step == 0:
            return None
        self._counter += 1  # EplbState.step() after each pass
        if self._counter < self.step_interval or (self.use_async and view.moving):
            return None
        self._counter = 0
        fresh = plan(self.cluster, view.last_steps(self.window_size), "deepseek")
        return keep_gpu_slots(fresh, phy2log, self.cluster.num_gpus)


@dataclass
class ExpertPlanePolicy:
    cluster: Cluster
    policy: PolicySpec = field(default_factory=PolicySpec)
    algorithm: str = "balanced"
    interval_s: float = 10.0  # ControllerConfig.policy_interval_seconds
    name: str = "expertplane"
    mover: str = "paced"
    decisions: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.spec = replace(self.cluster, algorithm=self.algorithm, policy=self.policy)
        self.state = PolicyState()
        self._next = self.interval_s

    def at_step(self, view: View, phy2log: np.ndarray) -> np.ndarray | None:
        if view.clock < self._next:
            return None
        self._next = view.clock + self.interval_s
        if view.moving:
            return None
        load = view.last_seconds(self.policy.window_seconds, self.policy.half_life_seconds)
        cand = candidate_for(self.spec, load, phy2log, self.state)
        decision = decide(self.policy, cand, self.state, view.clock)
        record(self.state, decision, self.policy, view.clock, rolled_out=decision.rebalance)
        self.decisions.append((view.step, decision))
        return cand.phy2log if decision.rebalance else None
