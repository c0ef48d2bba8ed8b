"""The EPLB-aware expert-parallel MoE layer.

forward(x [T, H]) on each rank of ``group``: router top-k over logical experts (optional
group-limited routing and selection bias) -> replica choice (``kernels.replica_choice``) ->
all_to_all dispatch -> SwiGLU grouped GEMM over this rank's S slots -> all_to_all combine ->
top-k weighted sum. Per-slot token counters accumulate on the device.
:class:`ExpertParallelExperts` is everything after the router (a model's own router feeds it:
``engines.hf``); :class:`EPMoELayer` adds ExpertPlane's router, selection bias and capacity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from expertplane.errors import FieldError
from expertplane.kernels.balancing import (BiasUpdate, CapacityConfig, enforce_capacity,
                                           expert_load)
from expertplane.kernels.counters import SlotCounters
from expertplane.kernels.dispatch import combine, dispatch, plan_dispatch, world_of
from expertplane.kernels.experts import ExpertWeightFn, LocalExperts, seeded_expert_weights
from expertplane.kernels.replica_choice import choose_replicas
from expertplane.kernels.routing import RouterConfig, gating_weights, ranked_experts, route
from expertplane.kernels.triton_ops import histogram

__all__ = ["EPMoELayer", "ExpertParallelExperts", "LayerPlacement", "PlacementError", "seeded_router_weight"]


class PlacementError(FieldError):
    """A layer placement is inconsistent with itself or with the layer; ``field`` names the
    offending tensor (``phy2log``, ``log2phy[e]``, ``logcnt``) or argument."""


@dataclass(frozen=True)
class LayerPlacement:
    """One layer's placement (the planner's output for that layer).

    phy2log: [R] logical expert of each physical slot.
    log2phy: [E, X] physical slots of each logical expert, -1 padded.
    logcnt: [E] number of replicas of each logical expert (>= 1).
    """

    phy2log: Tensor
    log2phy: Tensor
    logcnt: Tensor

    def __post_init__(self) -> None:
        for name in ("phy2log", "log2phy", "logcnt"):
            value = torch.as_tensor(getattr(self, name), dtype=torch.int64).cpu()
            object.__setattr__(self, name, value)
        phy2log, log2phy, logcnt = self.phy2log, self.log2phy, self.logcnt
        if phy2log.dim() != 1 or phy2log.numel() == 0:
            raise PlacementError("phy2log", "must be a non-empty [R] tensor, "
                                            f"got {list(phy2log.shape)}")
        if log2phy.dim() != 2:
            raise PlacementError("log2phy", f"must be [E, X], got {list(log2phy.shape)}")
        experts = log2phy.shape[0]
        if logcnt.shape != (experts,):
            raise PlacementError("logcnt", f"must be [{experts}], got {list(logcnt.shape)}")
        if int(logcnt.min()) < 1 or int(logcnt.max()) > log2phy.shape[1]:
            raise PlacementError("logcnt", f"must be in [1, {log2phy.shape[1]}]")
        if int(logcnt.sum()) != phy2log.numel():
            raise PlacementError("logcnt", f"must sum to R={phy2log.numel()}, got {int(logcnt.sum())}")
        if int(phy2log.min()) < 0 or int(phy2log.max()) >= experts:
            raise PlacementError("phy2log", f"values must be in [0, {experts})")
        for e in range(experts):
            slots = log2phy[e, :int(logcnt[e])]
            if int((log2phy[e, int(logcnt[e]):] != -1).sum()):
                raise PlacementError(f"log2phy[{e}]", "must be -1 after its logcnt entries")
            if int(slots.min()) < 0 or int(slots.max()) >= phy2log.numel() or \
                    bool((phy2log[slots] != e).any()):
                raise PlacementError(f"log2phy[{e}]", "disagrees with phy2log")

    @property
    def num_slots(self) -> int:
        return self.phy2log.numel()

    @property
    def num_experts(self) -> int:
        return self.log2phy.shape[0]

    @classmethod
    def from_phy2log(cls, phy2log: Sequence[int] | Tensor, num_experts: int) -> LayerPlacement:
        """Build log2phy and logcnt from phy2log [R] (replicas listed in slot order)."""
        phy2log = torch.as_tensor(phy2log, dtype=torch.int64)
        logcnt = torch.bincount(phy2log, minlength=num_experts)
        if logcnt.numel() != num_experts:
            raise PlacementError("phy2log", f"values must be in [0, {num_experts})")
        log2phy = torch.full((num_experts, max(1, int(logcnt.max()))), -1, dtype=torch.int64)
        fill = [0] * num_experts
        for slot, e in enumerate(phy2log.tolist()):
            log2phy[e, fill[e]] = slot
            fill[e] += 1
        return cls(phy2log, log2phy, logcnt)


def seeded_router_weight(seed: int, layer: int, num_experts: int, hidden: int,
                         device: str | torch.device = "cpu") -> Tensor:
    """Deterministic router weight [E, H] (fp32) for (seed, layer)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + layer + 7)
    return torch.randn(num_experts, hidden, generator=gen, device=device) / hidden ** 0.5


class ExpertParallelExperts(nn.Module):
    """The expert-parallel part of an MoE layer over ``group``, for a router's choices (all
    ranks call forward together).

    forward(x [T, H], topk_ids [T, k] logical experts, weights [T, k]) -> [T, H]: replica
    choice, all_to_all dispatch, SwiGLU grouped GEMM over this rank's S slots, all_to_all
    combine and the top-k weighted sum. hidden H, intermediate I, num_experts E; placement:
    this layer's :class:`LayerPlacement` with R slots, S = R / world size of them on each rank
    (rank r holds r*S .. r*S+S-1). gpus_per_node: ranks per node for the replica choice (None:
    one node). expert_weights: logical expert id -> (w13 [H, 2I], w2 [I, H]) for this rank's
    slots (and for hot-swap sources). Per-slot token counts (:meth:`read_counters`) and
    per-logical-expert selections of this rank's tokens (:meth:`read_selections`) accumulate
    on the device.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int,
                 placement: LayerPlacement, expert_weights: ExpertWeightFn, *,
                 group: dist.ProcessGroup | None = None, gpus_per_node: int | None = None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.group = group
        self.rank, self.world_size = world_of(group)
        self.device = torch.device(device)
        self.num_experts = num_experts
        if gpus_per_node is not None and gpus_per_node < 1:
            raise PlacementError("gpus_per_node", f"must be >= 1, got {gpus_per_node}")
        self.gpus_per_node = gpus_per_node or self.world_size
        self.expert_weights = expert_weights
        self.hidden, self.intermediate = hidden, intermediate
        self._check_placement(placement)
        self.num_slots = placement.num_slots
        self.slots_per_rank = placement.num_slots // self.world_size
        self.slot_gpu = torch.arange(self.num_slots, device=self.device) // self.slots_per_rank
        self.counters = SlotCounters(self.slots_per_rank, self.device)
        self.selections = SlotCounters(num_experts, self.device)
        self._set_placement(placement)
        self.experts = LocalExperts.from_logical(self.local_logical_ids(), self.expert_weights)

    def forward(self, x: Tensor, topk_ids: Tensor, weights: Tensor) -> Tensor:
        """x [T, H], topk_ids [T, k] int logical experts, weights [T, k] -> [T, H] (x's dtype).
        Every rank of the group must call it (T and k may differ between ranks, not k)."""
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be [T, {self.hidden}], got {list(x.shape)}")
        if topk_ids.shape != weights.shape or topk_ids.shape[:1] != x.shape[:1]:
            raise ValueError(f"topk_ids and weights must be [{x.shape[0]}, k], got "
                             f"{list(topk_ids.shape)} and {list(weights.shape)}")
        topk_ids = topk_ids.long()
        self.selections.add(histogram(topk_ids.reshape(-1), self.num_experts))
        return self.run_experts(x, self._replicas(topk_ids), weights)

    def run_experts(self, x: Tensor, phys: Tensor, weights: Tensor) -> Tensor:
        """Dispatch x [T, H] to physical slots ``phys`` [T, k] (-1: not sent), the experts,
        combine with ``weights`` [T, k] -> [T, H] (x's dtype); counts the rows per local slot."""
        layout = plan_dispatch(phys, self.num_slots, self.group)
        x_local = dispatch(x.to(self.experts.dtype), layout, phys.shape[1], self.group)
        self.counters.add(layout.tokens_per_slot)
        y_local = self.experts(x_local, layout.tokens_per_slot, layout.slot_counts)
        return combine(y_local, layout, weights, self.group).to(x.dtype)

    def read_selections(self, reset: bool = True) -> Tensor:
        """Router selections of each logical expert by this rank's tokens since the last reset:
        host LongTensor [E]."""
        return self.selections.read(reset)

    def local_logical_ids(self, placement: LayerPlacement | None = None) -> list[int]:
        """Logical expert of each of this rank's S slots under ``placement`` (default: current)."""
        placement = placement or self.placement
        start = self.rank * (placement.num_slots // self.world_size)
        return placement.phy2log[start:start + placement.num_slots // self.world_size].tolist()

    def read_counters(self, reset: bool = True) -> Tensor:
        """Tokens processed by each local slot since the last reset: host LongTensor [S]."""
        return self.counters.read(reset)

    def swap(self, placement: LayerPlacement, experts: LocalExperts) -> None:
        """Switch to ``placement`` with this rank's new slot weights ``experts`` (call at a step
        boundary, on every rank). Counts taken under the old placement are read out first by
        the caller; the counters keep running (the slot count does not change)."""
        self._check_placement(placement)
        if placement.num_slots != self.num_slots:
            raise PlacementError("phy2log", f"must keep R={self.num_slots} slots, "
                                            f"got {placement.num_slots}")
        expected = (self.slots_per_rank, self.hidden, self.intermediate)
        got = (experts.num_slots, experts.hidden, experts.intermediate)
        if got != expected:
            raise ValueError(f"experts must have (slots, hidden, intermediate) {expected}, "
                             f"got {got}")
        self._set_placement(placement)
        self.experts = experts

    def _replicas(self, topk_ids: Tensor) -> Tensor:
        if self._single_replica:    # one candidate per expert: the rule has nothing to choose
            return self._log2phy[topk_ids, 0]
        return choose_replicas(topk_ids, self.rank, self._log2phy, self._logcnt, self.slot_gpu,
                               self.gpus_per_node)

    def _check_placement(self, placement: LayerPlacement) -> None:
        if placement.num_experts != self.num_experts:
            raise PlacementError("log2phy", f"must have {self.num_experts} rows, "
                                            f"got {placement.num_experts}")
        if placement.num_slots % self.world_size:
            raise PlacementError("phy2log", f"length {placement.num_slots} must be a multiple of "
                                            f"the world size {self.world_size}")

    def _set_placement(self, placement: LayerPlacement) -> None:
        self.placement = placement
        self._log2phy = placement.log2phy.to(self.device)
        self._logcnt = placement.logcnt.to(self.device)
        self._single_replica = int(placement.logcnt.max()) == 1


class EPMoELayer(ExpertParallelExperts):
    """Expert-parallel MoE layer with its own router over ``group`` (all ranks call forward
    together): :class:`ExpertParallelExperts` behind a top-k router.

    hidden H, intermediate I, num_experts E, placement, gpus_per_node: as
    :class:`ExpertParallelExperts`. router_weight: [E, H] (default:
    :func:`seeded_router_weight`); expert_weights: logical expert id -> (w13 [H, 2I],
    w2 [I, H]) (default: :func:`seeded_expert_weights`), so any placement of the same
    (seed, layer) computes the same function.
    capacity: optional per-slot capacity (``kernels.balancing``; drops counted per local slot,
    :meth:`read_dropped`). bias_update: the rule :meth:`update_selection_bias` applies.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int,
                 placement: LayerPlacement, *, group: dist.ProcessGroup | None = None,
                 top_k: int = 8, num_groups: int = 1, topk_groups: int = 1,
                 gpus_per_node: int | None = None, scoring: str = "softmax",
                 normalize: bool = True, scaling: float = 1.0, layer: int = 0, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 router_weight: Tensor | None = None,
                 expert_weights: ExpertWeightFn | None = None,
                 capacity: CapacityConfig | None = None,
                 bias_update: BiasUpdate | None = None) -> None:
        device = torch.device(device)
        if router_weight is None:
            router_weight = seeded_router_weight(seed, layer, num_experts, hidden, device)
        if router_weight.shape != (num_experts, hidden):
            raise ValueError(f"router_weight must be [{num_experts}, {hidden}], "
                             f"got {list(router_weight.shape)}")
        super().__init__(hidden, intermediate, num_experts, placement,
                         expert_weights or seeded_expert_weights(
                             seed, layer, hidden, intermediate, dtype=dtype, device=device),
                         group=group, gpus_per_node=gpus_per_node, device=device)
        self.router = RouterConfig(num_experts=num_experts, top_k=top_k, num_groups=num_groups,
                                   topk_groups=topk_groups, scoring=scoring,
                                   normalize=normalize, scaling=scaling)
        self.router_weight = nn.Parameter(router_weight.to(self.device, torch.float32),
                                          requires_grad=False)
        self.selection_bias: Tensor | None = None
        self.capacity = capacity
        self.bias_update = bias_update
        self._selections = torch.zeros(num_experts, dtype=torch.int64, device=self.device)
        self.dropped = SlotCounters(self.slots_per_rank, self.device)

    def set_selection_bias(self, bias: Tensor | None) -> None:
        """Per-logical-expert selection bias [E] (top-k selection only), or None."""
        if bias is not None and bias.shape != (self.router.num_experts,):
            raise ValueError(f"bias must be [{self.router.num_experts}], got {list(bias.shape)}")
        self.selection_bias = None if bias is None else bias.to(self.device, torch.float32)

    def route_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Router and replica choice for x [T, H] (no capacity): (physical slots [T, k] int64,
        gating weights [T, k] fp32)."""
        topk_ids, weights = route(self._logits(x), self.router, self.selection_bias)
        return self._replicas(topk_ids), weights

    def forward(self, x: Tensor) -> Tensor:
        """x [T, H] -> [T, H] (same dtype). Every rank of the group must call it."""
        phys, weights = self.assign(x)
        return self.run_experts(x, phys, weights)

    def assign(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One step's routing of x [T, H]: router, replica choice and capacity. Returns
        (physical slot [T, k] int64, -1 for dropped rows; gating weights [T, k] fp32, 0 there).
        Records the selections (for :meth:`update_selection_bias`) and the drops (counters).
        Collective when a capacity is set."""
        logits = self._logits(x)
        if self.capacity is not None and self.capacity.mode == "next_best":
            count = self.router.top_k * (1 + self.capacity.max_reroutes)
            ranked, eligible, scores = ranked_experts(logits, self.router, self.selection_bias,
                                                      count)
            topk_ids = ranked[:, :self.router.top_k]
            weights = gating_weights(scores, topk_ids, self.router)
        else:
            topk_ids, weights = route(logits, self.router, self.selection_bias)
        self._selections += expert_load(topk_ids, self.router.num_experts)
        phys = self._replicas(topk_ids)
        if self.capacity is None:
            return phys, weights
        reroute = None
        if self.capacity.mode == "next_best":
            reroute = self._rerouter(ranked, eligible, scores, topk_ids, weights)
        result = enforce_capacity(phys, weights, self.capacity, self.num_slots, self.rank,
                                  self.group, reroute)
        start = self.rank * self.slots_per_rank
        self.dropped.add(result.dropped_per_slot[start:start + self.slots_per_rank])
        return result.phys, result.weights

    def update_selection_bias(self, load: Tensor | None = None) -> Tensor:
        """Apply ``bias_update`` once: with ``load`` [E] (e.g. the global load the controller
        computed), or else this layer's own selections per logical expert since the last
        update. Returns the new bias [E]."""
        if self.bias_update is None:
            raise ValueError("bias_update is not set on this layer")
        if load is None:
            load, self._selections = self._selections, torch.zeros_like(self._selections)
        bias = self.selection_bias
        if bias is None:
            bias = torch.zeros(self.router.num_experts, device=self.device)
        self.set_selection_bias(self.bias_update.step(bias, load.to(self.device)))
        return self.selection_bias

    def read_dropped(self, reset: bool = True) -> Tensor:
        """Rows dropped by the capacity at each local slot: host LongTensor [S]."""
        return self.dropped.read(reset)

    def _logits(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be [T, {self.hidden}], got {list(x.shape)}")
        return x.float() @ self.router_weight.t()

    def _rerouter(self, ranked: Tensor, eligible: Tensor, scores: Tensor, topk_ids: Tensor,
                  weights: Tensor):
        """Next-best re-routing for :func:`enforce_capacity`: each refused row of a token takes
        the token's next unused expert of ``ranked`` [T, C] (in column order); its replica is
        chosen by the replica rule applied to the substitutes as one column; its gating weight
        is its unbiased score times the token's normaliser (weights / scores of the top-k)."""
        next_free = torch.full((ranked.shape[0],), self.router.top_k, device=ranked.device)
        norm = weights[:, :1] / scores.gather(1, topk_ids[:, :1]).clamp_min(1e-20)   # [T, 1]
        last = ranked.shape[1] - 1

        def reroute(denied: Tensor) -> tuple[Tensor, Tensor]:
            nonlocal next_free
            index = next_free.unsqueeze(1) + torch.cumsum(denied.long(), dim=1) - 1
            has = denied & (index <= last) & eligible.gather(1, index.clamp(max=last))
            substitute = ranked.gather(1, index.clamp(max=last))
            next_free = next_free + denied.sum(dim=1)
            phys = torch.full_like(substitute, -1)
            if bool(has.any()):
                phys[has] = self._replicas(substitute[has].unsqueeze(1)).squeeze(1)
            return phys, scores.gather(1, substitute) * norm
        return reroute
