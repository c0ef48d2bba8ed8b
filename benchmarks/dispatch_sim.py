"""Routing model and dispatch evaluator: what a placement does to GPU load and network sends.
Used by the topology benchmark and its tests; it lives here, not in the planner, because it
routes with the workers' own kernels.

* ``generate_trace``: tokens originate on GPUs; each picks its experts with DeepSeek-V3's
  group-limited routing (``kernels.routing.route``: top-M groups by the sum of their two best
  scores, then top-k experts inside them, sigmoid scoring) from router logits
  ``log(popularity) + Gumbel noise``, so experts are chosen in proportion to a (skewed)
  popularity.
* ``simulate_dispatch(plan, trace, topology)``: sends every (token, expert) pair to one replica
  with the workers' own rule (``kernels.replica_choice.choose_replicas``: own node, else a node
  the token already sends to, else any replica, spread round-robin) and reports the per-GPU
  load, its max/mean, and the mean number of remote nodes each token is sent to (DeepEP-style
  dispatch sends one copy per destination node, so a node counts once per token).

Shapes: L layers, T tokens, k experts per token, E logical experts, R physical slots, P GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from expertplane.errors import FieldError
from expertplane.kernels.replica_choice import choose_replicas
from expertplane.kernels.routing import RouterConfig, route
from expertplane.planner.plan import build_log2phy
from expertplane.planner.validation import as_array, as_int, check_phy2log


@dataclass(frozen=True)
class Topology:
    """``num_gpus`` GPUs in ``num_nodes`` equal nodes; GPU g sits on node g // gpus_per_node."""

    num_nodes: int
    num_gpus: int

    def __post_init__(self) -> None:
        as_int(self.num_nodes, "num_nodes")
        as_int(self.num_gpus, "num_gpus")
        if self.num_gpus % self.num_nodes:
            raise FieldError("num_gpus", f"must be a multiple of num_nodes "
                                             f"({self.num_nodes}), got {self.num_gpus}")

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    def slot_gpu(self, num_replicas: int) -> np.ndarray:
        """[R] GPU of each physical slot (equal contiguous slot ranges per GPU)."""
        if num_replicas % self.num_gpus:
            raise FieldError("num_replicas", f"must be a multiple of num_gpus "
                                                 f"({self.num_gpus}), got {num_replicas}")
        return np.arange(num_replicas) // (num_replicas // self.num_gpus)


@dataclass(frozen=True)
class RoutingModel:
    """DeepSeek-V3-style router: ``topk`` of ``num_experts`` experts per token, chosen inside
    the ``topk_groups`` best of ``num_groups`` groups."""

    num_experts: int = 256
    num_groups: int = 8
    topk_groups: int = 4
    topk: int = 8

    def router(self) -> RouterConfig:
        return RouterConfig(num_experts=self.num_experts, top_k=self.topk,
                            num_groups=self.num_groups, topk_groups=self.topk_groups,
                            scoring="sigmoid")


@dataclass(frozen=True)
class Trace:
    """Routed tokens: ``source_gpu`` int64 [T] (GPU each token starts on) and ``topk_ids`` int64
    [L, T, k] (its experts per layer, best first)."""

    source_gpu: np.ndarray
    topk_ids: np.ndarray

    def expert_loads(self, num_experts: int) -> np.ndarray:
        """float64 [L, E]: tokens routed to each logical expert (the planner's input)."""
        layers = self.topk_ids.shape[0]
        flat = (self.topk_ids.reshape(layers, -1) + num_experts * np.arange(layers)[:, None])
        return np.bincount(flat.ravel(), minlength=layers * num_experts).reshape(
            layers, num_experts).astype(np.float64)


@dataclass(frozen=True)
class DispatchResult:
    """Outcome of dispatching a trace: ``gpu_load`` float64 [L, P] (token-expert pairs per GPU),
    ``balance`` [L] max/mean GPU load, ``remote_nodes`` [L] mean remote nodes per token."""

    gpu_load: np.ndarray
    balance: np.ndarray
    remote_nodes: np.ndarray

    @property
    def mean_balance(self) -> float:
        return float(self.balance.mean())

    @property
    def mean_remote_nodes(self) -> float:
        return float(self.remote_nodes.mean())


def zipf_popularity(num_layers: int, num_experts: int, exponent: float,
                    rng: np.random.Generator) -> np.ndarray:
    """[L, E] popularity ~ 1 / rank**exponent, ranks shuffled independently per layer."""
    base = 1.0 / np.arange(1, num_experts + 1) ** float(exponent)
    return np.stack([rng.permutation(base) for _ in range(num_layers)])


def drift_popularity(popularity: np.ndarray, amount: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Popularity after a drift: each weight scaled by exp(amount * N(0, 1)), so ``amount`` is
    the log-scale spread (0.3 moves a typical weight by about 30%)."""
    return popularity * np.exp(float(amount) * rng.standard_normal(popularity.shape))


def generate_trace(popularity, num_tokens: int, num_gpus: int, model: RoutingModel,
                   seed: int = 0) -> Trace:
    """Route ``num_tokens`` tokens per layer through ``model`` with expert popularity [L, E].

    Tokens start on GPUs round-robin (token t on GPU t % num_gpus); router logits are
    log(popularity) + Gumbel(0, 1) noise drawn from ``seed``. Deterministic for a seed.
    """
    pop = as_array(popularity, "popularity").astype(np.float64)
    if pop.ndim != 2 or pop.shape[1] != model.num_experts:
        raise FieldError("popularity", f"must be [layers, {model.num_experts}], got "
                                           f"{list(pop.shape)}")
    if not np.all(np.isfinite(pop)) or (pop <= 0).any():
        raise FieldError("popularity", "must be finite and > 0")
    num_tokens = as_int(num_tokens, "num_tokens")
    num_gpus = as_int(num_gpus, "num_gpus")
    gen = torch.Generator().manual_seed(int(seed))
    config = model.router()
    ids = []
    for layer_pop in torch.from_numpy(np.log(pop)):
        u = torch.rand(num_tokens, model.num_experts, generator=gen, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12)))
        topk_ids, _ = route((layer_pop + gumbel).float(), config)
        ids.append(topk_ids.numpy())
    return Trace(source_gpu=np.arange(num_tokens, dtype=np.int64) % num_gpus,
                 topk_ids=np.stack(ids).astype(np.int64))


def _plan_maps(plan, num_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(phy2log, log2phy, logcnt) from a ``rebalance_experts`` triple or a bare phy2log."""
    if isinstance(plan, (tuple, list)) and len(plan) == 3:
        phy2log, log2phy, logcnt = (as_array(x, "plan").astype(np.int64) for x in plan)
    else:
        phy2log = check_phy2log(plan, np.iinfo(np.int64).max, field="plan")
        log2phy, logcnt = build_log2phy(phy2log, int(phy2log.max()) + 1)
    if phy2log.ndim != 2 or phy2log.shape[0] != num_layers:
        raise FieldError("plan", f"phy2log must be [{num_layers}, R], got "
                                     f"{list(phy2log.shape)}")
    return phy2log, log2phy, logcnt


def simulate_dispatch(plan, trace: Trace, topology: Topology) -> DispatchResult:
    """Dispatch ``trace`` under ``plan`` on ``topology``.

    plan: ``(phy2log [L, R], log2phy [L, E, X], logcnt [L, E])`` as returned by
    ``rebalance_experts`` (the replica order in log2phy is what the workers use), or phy2log
    alone (log2phy then lists replicas in slot order).
    """
    layers, tokens, _ = trace.topk_ids.shape
    phy2log, log2phy, logcnt = _plan_maps(plan, layers)
    if trace.topk_ids.max() >= logcnt.shape[1]:
        raise FieldError("trace", f"routes to expert {trace.topk_ids.max()} but the plan has "
                                      f"{logcnt.shape[1]} experts")
    if trace.source_gpu.shape != (tokens,) or trace.source_gpu.max() >= topology.num_gpus:
        raise FieldError("trace", f"source_gpu must be [{tokens}] GPU ids < "
                                      f"{topology.num_gpus}")
    slot_gpu = topology.slot_gpu(phy2log.shape[1])
    gpn = topology.gpus_per_node
    src = torch.from_numpy(trace.source_gpu)
    src_node = trace.source_gpu // gpn
    gpu_load = np.zeros((layers, topology.num_gpus))
    remote = np.zeros(layers)
    for layer in range(layers):
        slots = choose_replicas(torch.from_numpy(trace.topk_ids[layer]), src,
                                torch.from_numpy(log2phy[layer]), torch.from_numpy(logcnt[layer]),
                                torch.from_numpy(slot_gpu), gpn).numpy()
        gpu = slot_gpu[slots]                                           # [T, k]
        gpu_load[layer] = np.bincount(gpu.ravel(), minlength=topology.num_gpus)
        sends = np.zeros((tokens, topology.num_nodes), dtype=bool)
        sends[np.arange(tokens)[:, None], gpu // gpn] = True
        sends[np.arange(tokens), src_node] = False                      # own node is local
        remote[layer] = sends.sum(1).mean()
    mean = gpu_load.mean(1)
    bal = np.divide(gpu_load.max(1), mean, out=np.ones(layers), where=mean > 0)
    return DispatchResult(gpu_load=gpu_load, balance=bal, remote_nodes=remote)
