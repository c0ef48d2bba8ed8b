"""Tiny random-init models of the tested MoE families, with skewed and drifting routing.

A random router gives every expert about the same load, which leaves a load balancer nothing
to do. Real routers are skewed. :func:`build_tiny` shapes the random init so that the model's
own routing is skewed: router row ``e`` of every MoE layer is scaled by ``popularity ** -a``
over a random per-layer popularity order (Zipf-like), and shifted towards a direction the
hidden states share (the mean of the token embeddings), so popular experts win the top-k for
most tokens. :func:`drifting_tokens` makes the load drift: token ids are drawn from a Zipf
law over a vocabulary order that rotates every ``period`` steps, and different tokens favour
different experts, so the hot experts change over time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from expertplane.engines.hf.adapter import TESTED_FAMILIES, find_moe_blocks

__all__ = ["TINY_MODELS", "TinySpec", "build_tiny", "drifting_tokens", "save_tiny",
           "tiny_config"]

TINY_MODELS = {f"tiny-{f.replace('_', '-')}": f for f in TESTED_FAMILIES}


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model: ``layers`` decoder layers (DeepSeek-V3: one more, the first
    dense), ``experts`` routed experts of intermediate size ``intermediate``, ``top_k`` per
    token, hidden size ``hidden``, vocabulary ``vocab``; ``skew``: router row scaling exponent;
    ``groups`` / ``topk_groups``: DeepSeek-V3's group-limited routing."""

    layers: int = 3
    experts: int = 8
    top_k: int = 2
    hidden: int = 32
    intermediate: int = 16
    vocab: int = 128
    skew: float = 1.0
    groups: int = 2
    topk_groups: int = 1


def tiny_config(family: str, spec: TinySpec = TinySpec()):
    """A transformers config of ``family`` (deepseek_v3, qwen3_moe, mixtral) at ``spec``'s
    sizes (fp32, eager attention)."""
    from transformers import AutoConfig

    common = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=spec.top_k,
                  max_position_embeddings=256, tie_word_embeddings=False)
    if family == "deepseek_v3":
        extra = dict(n_routed_experts=spec.experts, moe_intermediate_size=spec.intermediate,
                     intermediate_size=2 * spec.intermediate, n_shared_experts=1,
                     num_hidden_layers=spec.layers + 1, first_k_dense_replace=1,
                     n_group=spec.groups, topk_group=spec.topk_groups, routed_scaling_factor=2.5,
                     q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                     v_head_dim=8, num_key_value_heads=4, rope_scaling=None)
    elif family == "qwen3_moe":
        extra = dict(num_experts=spec.experts, moe_intermediate_size=spec.intermediate,
                     intermediate_size=2 * spec.intermediate, head_dim=8, decoder_sparse_step=1,
                     norm_topk_prob=True)
    elif family == "mixtral":
        extra = dict(num_local_experts=spec.experts, intermediate_size=spec.intermediate)
    else:
        raise ValueError(f"family: unknown tiny family {family!r} (known: "
                         f"{', '.join(TESTED_FAMILIES)})")
    config = AutoConfig.for_model(family, **{**common, **extra})
    config._attn_implementation = "eager"
    return config


def build_tiny(family: str, spec: TinySpec = TinySpec(), seed: int = 0):
    """A random-init ``family`` causal LM (eval mode, fp32) with skewed routing."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, spec)).eval()
    gen = np.random.default_rng([seed, 0x7147])
    shared = model.get_input_embeddings().weight.detach().mean(0)
    shared = shared / shared.norm().clamp_min(1e-12)
    with torch.no_grad():
        for block in find_moe_blocks(model):
            weight = block.router.weight
            order = gen.permutation(block.num_experts)
            scale = torch.from_numpy((1.0 + order) ** -spec.skew).to(weight)
            lean = torch.from_numpy(gen.normal(0.5, 0.5, block.num_experts)).to(weight)
            weight.mul_(scale.unsqueeze(1) * 4).add_(lean.unsqueeze(1) * scale.unsqueeze(1)
                                                     * shared * weight.norm(dim=1).mean())
    return model


def drifting_tokens(step: int, batch: int, seq: int, vocab: int, *, rank: int = 0,
                    seed: int = 0, period: int = 50, zipf: float = 1.1) -> Tensor:
    """Token ids [batch, seq] of ``step`` on ``rank``: Zipf(``zipf``) over a vocabulary order
    that rotates by a tenth of the vocabulary every ``period`` steps (0 = never)."""
    ranks = np.arange(1, vocab + 1, dtype=np.float64) ** -zipf
    base = np.random.default_rng([seed, 0xD21F]).permutation(vocab)
    shift = (step // period) * max(1, vocab // 10) if period else 0
    probs = np.empty(vocab)
    probs[np.roll(base, shift)] = ranks / ranks.sum()
    rng = np.random.default_rng([seed, rank, step])
    return torch.from_numpy(rng.choice(vocab, size=(batch, seq), p=probs)).long()


def save_tiny(name: str, directory: str | Path, spec: TinySpec = TinySpec(),
              seed: int = 0) -> Path:
    """Build the tiny model ``name`` (a key of :data:`TINY_MODELS`, e.g. ``tiny-mixtral``) and
    save it as a checkpoint directory (``save_pretrained``: config.json + safetensors)."""
    if name not in TINY_MODELS:
        raise ValueError(f"model: unknown tiny model {name!r} (known: "
                         f"{', '.join(TINY_MODELS)})")
    directory = Path(directory)
    build_tiny(TINY_MODELS[name], spec, seed).save_pretrained(directory)
    return directory
