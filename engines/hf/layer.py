"""ExpertPlane's expert-parallel layer inside a transformers MoE model.

Hook: transformers' own experts interface. ``use_experts_implementation`` makes every experts
module's forward look up ``config._experts_implementation`` in ``ExpertsInterface``; we
register one more implementation there, ``"expertplane"``, and switch the model to it with
``model.set_experts_implementation``. The model's classes, its MoE blocks' forward and its
routers stay transformers' own: each experts module gets an ``expert_parallel`` child (an
:class:`~expertplane.kernels.moe.ExpertParallelExperts` holding this rank's slots) and loses
its full ``gate_up_proj`` / ``down_proj`` tensors; the registered forward hands it the
router's choices. Shared experts (DeepSeek-V3) are ordinary modules and stay local.

Weights: transformers keeps gate_up_proj [E, 2I, H] (gate rows first) and down_proj
[E, H, I] (``nn.functional.linear`` layout); ExpertPlane's grouped GEMM takes w13 [H, 2I]
(gate columns first) and w2 [I, H] per expert: the transposes, made once per local slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers.integrations.moe import ExpertsInterface

from expertplane.engines.hf.adapter import MoEBlock, find_moe_blocks
from expertplane.kernels.experts import ExpertWeightFn
from expertplane.kernels.moe import ExpertParallelExperts, LayerPlacement, PlacementError

__all__ = ["IMPLEMENTATION", "ExpertSource", "expert_load", "expert_parallel", "ep_layers",
           "from_hf_layout"]

IMPLEMENTATION = "expertplane"

# MoE layer index (0-based, in model order) -> the layer's weights per logical expert.
ExpertSource = Callable[[int], ExpertWeightFn]


def _experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                     top_k_weights: Tensor) -> Tensor:
    """The ``"expertplane"`` experts implementation: hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k] -> [T, H] through this experts module's expert-parallel layer."""
    layer = getattr(self, "expert_parallel", None)
    if layer is None:
        raise RuntimeError(f"{type(self).__name__}: experts_implementation={IMPLEMENTATION!r} "
                           "needs expertplane.engines.hf.expert_parallel(model, phy2log) first")
    return layer(hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(IMPLEMENTATION, _experts_forward)


def from_hf_layout(gate_up: Tensor, down: Tensor) -> tuple[Tensor, Tensor]:
    """One expert's transformers weights gate_up [2I, H], down [H, I] -> ExpertPlane's
    (w13 [H, 2I], w2 [I, H]) (contiguous copies)."""
    return gate_up.t().contiguous(), down.t().contiguous()


def _module_source(blocks: Sequence[MoEBlock]) -> ExpertSource:
    """Weights read from the experts modules' own gate_up_proj / down_proj."""
    def layer_weights(index: int) -> ExpertWeightFn:
        experts = blocks[index].experts
        return lambda e: from_hf_layout(experts.gate_up_proj[e].detach(),
                                        experts.down_proj[e].detach())
    return layer_weights


def _placements(phy2log, blocks: Sequence[MoEBlock], world: int) -> list[LayerPlacement]:
    plan = torch.as_tensor(np.asarray(phy2log), dtype=torch.int64)
    experts = blocks[0].num_experts
    need = f"[{len(blocks)}, R] (R a multiple of the world size {world}, values < {experts})"
    if plan.dim() != 2 or plan.shape[0] != len(blocks) or plan.shape[1] % world \
            or plan.shape[1] < experts:
        raise PlacementError("phy2log", f"shape {list(plan.shape)} does not match the model: "
                                        f"{len(blocks)} MoE layers of {experts} experts need "
                                        f"{need}")
    if any(b.num_experts != experts for b in blocks):
        raise PlacementError("model", "MoE layers with different expert counts are not supported")
    layers = []
    for layer, row in enumerate(plan):
        try:
            layers.append(LayerPlacement.from_phy2log(row, experts))
        except PlacementError as exc:
            raise exc.at(f"phy2log[{layer}]") from None
    return layers


def expert_parallel(model: nn.Module, phy2log, group: dist.ProcessGroup | None = None, *,
                    gpus_per_node: int | None = None,
                    weights: ExpertSource | None = None) -> nn.Module:
    """Serve every MoE block of ``model`` (a transformers MoE model) expert-parallel over
    ``group`` (default: the world; no process group: one rank), in place; returns ``model``.

    phy2log: [L, R] logical expert of each physical slot, one row per MoE layer in model
    order (redundant replicas allowed); rank r holds slots r*S .. r*S+S-1, S = R / world.
    weights: where this rank's slots' weights come from (default: the experts modules' own
    tensors, which are then dropped; :mod:`expertplane.engines.hf.load` passes a checkpoint
    reader). The routers stay the model's own. Every rank must then run the model's forward
    the same number of times (batches may differ); raises
    :class:`~expertplane.engines.hf.adapter.UnsupportedModelError` or
    :class:`~expertplane.kernels.moe.PlacementError` naming what does not fit.
    """
    blocks = find_moe_blocks(model)
    if any(hasattr(b.experts, "expert_parallel") for b in blocks):
        raise ValueError("model: already expert-parallel (swap plans with the hot-swap engine)")
    world = dist.get_world_size(group) if group is not None or dist.is_initialized() else 1
    placements = _placements(phy2log, blocks, world)
    source = weights or _module_source(blocks)
    for index, (block, placement) in enumerate(zip(blocks, placements)):
        device = block.router.weight.device
        layer = ExpertParallelExperts(block.hidden, block.intermediate, block.num_experts,
                                      placement, source(index), group=group,
                                      gpus_per_node=gpus_per_node, device=device)
        layer.expert_weights = _no_local_source
        for name in ("gate_up_proj", "down_proj"):
            delattr(block.experts, name)
        block.experts.expert_parallel = layer
    if hasattr(model, "set_experts_implementation"):     # a PreTrainedModel
        model.set_experts_implementation(IMPLEMENTATION)
    else:                                                  # a bare MoE block
        for block in blocks:
            block.experts.config._experts_implementation = IMPLEMENTATION
    return model


def _no_local_source(expert: int):
    """After the load, a hot-swap brings moved experts from the ranks that hold them."""
    raise RuntimeError(f"expert {expert}: weights come from peers through the hot-swap")


def ep_layers(model: nn.Module) -> list[ExpertParallelExperts]:
    """The expert-parallel layers of ``model`` in MoE-layer order (for the hot-swap engine
    and the per-slot counters)."""
    layers = [m.expert_parallel for m in model.modules()
              if isinstance(getattr(m, "expert_parallel", None), ExpertParallelExperts)]
    if not layers:
        raise ValueError("model: no expert-parallel layers; call expert_parallel(model, ...) first")
    return layers


def expert_load(model: nn.Module) -> np.ndarray:
    """Router selections per logical expert by this rank's own tokens since the last call:
    [moe_layers, E] numpy int64 (a second call at once returns zeros). Not collective."""
    return torch.stack([layer.read_selections(reset=True) for layer in ep_layers(model)]
                       ).numpy().astype(np.int64)
