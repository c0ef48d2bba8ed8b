"""Finding the MoE blocks of a transformers model and checking that ExpertPlane can serve them.

transformers' MoE families (DeepSeek-V3, Qwen3-MoE, Mixtral, OLMoE, GLM-4-MoE, ...) share one
shape: a block with a router ``gate`` (forward -> ``(logits, top-k weights, top-k index)``) and
``experts``, a class decorated by ``@use_experts_implementation`` that holds fused 3D weights
``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I] and runs
``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``. ExpertPlane
serves exactly that layout with a SiLU gate and no biases; anything else is refused with one
line naming the family and what is unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MoEBlock", "UnsupportedModelError", "find_moe_blocks"]

# Families whose tiny configs the tests run end to end (others of the same layout also load).
TESTED_FAMILIES = ("deepseek_v3", "qwen3_moe", "mixtral")


class UnsupportedModelError(ValueError):
    """The model is not an MoE model ExpertPlane can serve; the message is one line."""


@dataclass(frozen=True)
class MoEBlock:
    """One MoE block: its module path, the block, its router and its experts module.
    num_experts E, hidden H, intermediate I of the experts."""

    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    hidden: int
    intermediate: int


def _family(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The MoE blocks of ``model`` in module order (= layer order). Raises
    :class:`UnsupportedModelError` for a dense model, an MoE model whose experts do not go
    through transformers' experts interface, or experts of another layout."""
    family = _family(model)
    blocks, foreign = [], []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        if not hasattr(experts, "is_concatenated"):      # set by @use_experts_implementation
            foreign.append(f"{name}.experts ({type(experts).__name__})")
            continue
        blocks.append(_check(family, name, module, experts))
    if foreign:
        raise UnsupportedModelError(
            f"{family}: unsupported MoE architecture: {foreign[0]} does not use transformers' "
            f"experts interface (@use_experts_implementation); supported families have it, "
            f"e.g. {', '.join(TESTED_FAMILIES)}")
    if not blocks:
        raise UnsupportedModelError(
            f"{family} ({type(model).__name__}) is not a Mixture-of-Experts model: no MoE "
            f"blocks found (supported: {', '.join(TESTED_FAMILIES)} and other families with "
            f"transformers' experts interface)")
    return blocks


def _is_silu(act) -> bool:
    """Whether ``act`` computes SiLU (transformers has its own SiLU classes)."""
    probe = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    try:
        return callable(act) and torch.allclose(act(probe), torch.nn.functional.silu(probe))
    except (TypeError, RuntimeError):
        return False


def _check(family: str, name: str, block: nn.Module, experts: nn.Module) -> MoEBlock:
    problems = []
    if not experts.has_gate:
        problems.append("experts without a gate projection")
    if experts.has_bias:
        problems.append("expert biases")
    if experts.is_transposed:
        problems.append("transposed expert weights")
    if not experts.is_concatenated:
        problems.append("interleaved gate/up weights")
    act = getattr(experts, "act_fn", None)
    if not _is_silu(act):
        problems.append(f"activation {type(act).__name__} (SiLU only)")
    if type(experts)._apply_gate.__name__ != "_default_apply_gate":
        problems.append("a custom gating function")
    if problems:
        raise UnsupportedModelError(f"{family}: unsupported experts in {name} "
                                    f"({type(experts).__name__}): {', '.join(problems)}")
    router = getattr(block, "gate", None)
    if not isinstance(router, nn.Module):
        raise UnsupportedModelError(
            f"{family}: MoE block {name} ({type(block).__name__}) has no router `gate`")
    served = getattr(experts, "expert_parallel", None)    # already expert-parallel
    if served is not None:
        return MoEBlock(name, block, router, experts, served.num_experts, served.hidden,
                        served.intermediate)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    e, two_i, h = gate_up.shape
    if down.shape != (e, h, two_i // 2):
        raise UnsupportedModelError(
            f"{family}: {name}.experts down_proj is {list(down.shape)}, expected "
            f"[{e}, {h}, {two_i // 2}] for gate_up_proj {list(gate_up.shape)}")
    return MoEBlock(name, block, router, experts, e, h, two_i // 2)
