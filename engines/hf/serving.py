"""A HuggingFace checkpoint as the worker's served model: the same surface as the synthetic
model (``layers`` for the hot-swap engine, ``forward(batch)``, ``read_counters``, ``pretune``)
over a causal LM loaded expert-parallel from a checkpoint directory, fed token ids that drift
(:func:`~expertplane.engines.hf.tiny.drifting_tokens` with the worker's stream settings)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from expertplane.engines.hf.adapter import find_moe_blocks
from expertplane.engines.hf.layer import ep_layers
from expertplane.engines.hf.load import CheckpointError, load_expert_parallel
from expertplane.engines.hf.tiny import drifting_tokens
from expertplane.kernels.moe import LayerPlacement

__all__ = ["HFBatch", "HFServedModel", "HFStepResult", "moe_shape"]

SEQUENCE = 64        # tokens per sequence of a step's batch


def moe_shape(directory: str | Path) -> tuple[int, int]:
    """(MoE layers, experts per layer) of the checkpoint at ``directory`` (the model is built
    on the meta device: no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (Path(directory) / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json (need a HuggingFace checkpoint "
                              "directory: config.json + safetensors)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    blocks = find_moe_blocks(model)
    return len(blocks), blocks[0].num_experts


@dataclass(frozen=True)
class HFBatch:
    """One rank's token ids [B, SEQUENCE] of one step."""

    step: int
    input_ids: Tensor


@dataclass(frozen=True)
class HFStepResult:
    """logits [B, T, V] of a step; ``max_error`` is None (no dense reference is held)."""

    hidden: Tensor
    max_error: float | None = None


class HFServedModel:
    """A checkpoint served expert-parallel on this rank (every rank builds one)."""

    tolerance = float("inf")

    def __init__(self, directory: str | Path, placements: Sequence[LayerPlacement], *,
                 tokens_per_step: int, zipf: float, drift_period: int, seed: int, rank: int,
                 gpus_per_node: int | None = None, device: str | torch.device = "cpu",
                 group: dist.ProcessGroup | None = None) -> None:
        phy2log = torch.stack([p.phy2log for p in placements])
        self.model = load_expert_parallel(directory, phy2log, group, device=device,
                                          gpus_per_node=gpus_per_node)
        self.layers = ep_layers(self.model)
        self.vocab = self.model.config.vocab_size
        self.device = torch.device(device)
        self.batch_size = max(1, -(-tokens_per_step // SEQUENCE))
        self.stream = dict(zipf=zipf, period=drift_period, seed=seed, rank=rank)
        self.tokens_per_step = self.batch_size * SEQUENCE
        self.top_k = getattr(self.model.config, "num_experts_per_tok", 1)

    def batch(self, step: int) -> HFBatch:
        """This rank's token ids of ``step`` (drifting Zipf over the vocabulary)."""
        ids = drifting_tokens(step, self.batch_size, SEQUENCE, self.vocab, **self.stream)
        return HFBatch(step, ids.to(self.device))

    @torch.no_grad()
    def __call__(self, batch: HFBatch, verify: bool = False) -> HFStepResult:
        """One forward of the causal LM (collective over the ranks)."""
        return HFStepResult(self.model(batch.input_ids, use_cache=False).logits)

    def read_counters(self) -> Tensor:
        """Tokens per local slot since the last read, all MoE layers: host LongTensor [L, S]."""
        return torch.stack([layer.read_counters(reset=True) for layer in self.layers])

    def pretune(self, world_size: int) -> bool:
        """Tune the expert GEMMs for the most rows a step can bring to this rank's slots."""
        experts = self.layers[0].experts
        rows = self.tokens_per_step * world_size * self.top_k
        return experts.pretune(-(-rows // experts.num_slots))
