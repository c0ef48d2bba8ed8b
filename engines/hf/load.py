"""Loading a HuggingFace MoE checkpoint on one rank: every weight except the routed experts,
and of the experts only this rank's slots.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Routed experts are stored per expert
(``{block}.experts.{e}.gate_proj|up_proj|down_proj.weight``; Mixtral ``w1|w3|w2``; this is
what ``save_pretrained`` writes) or fused (``{block}.experts.gate_up_proj`` [E, 2I, H],
``{block}.experts.down_proj`` [E, H, I]). The model is built on the meta device from its
config (transformers' classes), the experts are replaced by ExpertPlane's layer reading only
the experts of this rank's slots (safetensors reads tensors and slices lazily), the other
tensors are assigned from the files (renamed by transformers' own checkpoint conversion
rules, e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``), and the non-persistent buffers
(rotary frequencies) are made by the model's own ``_init_weights``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from expertplane.engines.hf.adapter import UnsupportedModelError, find_moe_blocks
from expertplane.engines.hf.layer import ExpertSource, expert_parallel, from_hf_layout
from expertplane.kernels.experts import ExpertWeightFn

__all__ = ["CheckpointError", "Checkpoint", "load_expert_parallel"]

_PER_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<e>\d+)\."
                         r"(?P<w>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_FUSED = re.compile(r"^(?P<block>.+)\.experts\.(?P<w>gate_up_proj|down_proj)$")
_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down",
         "w2": "down", "gate_up_proj": "gate_up"}


class CheckpointError(ValueError):
    """A checkpoint directory cannot be served; the message is one line naming the problem."""


class Checkpoint:
    """The safetensors files of a checkpoint directory, read lazily: ``keys`` (as stored) and
    :meth:`get` (a tensor, or ``rows`` of its first dimension)."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / "model.safetensors").exists():
            with safe_open(self.directory / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"{self.directory}: no model.safetensors or "
                                  "model.safetensors.index.json (only safetensors checkpoints)")
        self._file_of = weight_map
        self._handles = {name: safe_open(self.directory / name, "pt")
                         for name in sorted(set(weight_map.values()))}

    @property
    def keys(self) -> list[str]:
        return list(self._file_of)

    def get(self, key: str, rows: int | None = None) -> Tensor:
        """Tensor ``key``, or its row ``rows`` of the first dimension (only that is read)."""
        handle = self._handles[self._file_of[key]]
        if rows is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[rows]


def _renamer(model_type: str) -> Callable[[str], str]:
    """transformers' own key renamings for ``model_type`` (its WeightRenaming rules)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    rules = []
    for entry in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(entry, WeightRenaming):
            for src, dst in zip(entry.source_patterns, entry.target_patterns):
                rules.append((re.compile(src), dst))

    def rename(key: str) -> str:
        for pattern, target in rules:
            key = pattern.sub(target, key)
        return key
    return rename


def _expert_source(ckpt: Checkpoint, blocks: list[str], rename: Callable[[str], str],
                   dtype: torch.dtype | None, device: torch.device) -> tuple[ExpertSource, set]:
    """A reader of this rank's experts, and the set of checkpoint keys that hold experts."""
    index_of = {name: i for i, name in enumerate(blocks)}
    found: dict[tuple[int, str], dict] = {}    # (layer, role) -> {expert or None: key}
    expert_keys = set()
    for key in ckpt.keys:
        match = _PER_EXPERT.match(rename(key)) or _FUSED.match(rename(key))
        if not match:
            continue
        expert_keys.add(key)
        layer = _block_index(match["block"], index_of)
        if layer is None:       # e.g. DeepSeek-V3's multi-token-prediction layer: not served
            continue
        expert = int(match["e"]) if "e" in match.groupdict() else None
        found.setdefault((layer, _ROLE[match["w"]]), {})[expert] = key

    def read(layer: int, role: str, expert: int) -> Tensor:
        keys = found.get((layer, role))
        if keys is None:
            raise CheckpointError(f"{blocks[layer]}: no {role} expert weights in the checkpoint")
        if None in keys:
            return ckpt.get(keys[None], rows=expert)
        if expert not in keys:
            raise CheckpointError(f"{blocks[layer]}: expert {expert} has no {role} weights")
        return ckpt.get(keys[expert])

    def source(layer: int) -> ExpertWeightFn:
        def weights(expert: int) -> tuple[Tensor, Tensor]:
            if (layer, "gate_up") in found:
                gate_up = read(layer, "gate_up", expert)
            else:
                gate_up = torch.cat([read(layer, "gate", expert), read(layer, "up", expert)])
            w13, w2 = from_hf_layout(gate_up, read(layer, "down", expert))
            return w13.to(device, dtype or w13.dtype), w2.to(device, dtype or w2.dtype)
        return weights
    return source, expert_keys


def _block_index(block: str, index_of: dict[str, int]) -> int | None:
    for name, i in index_of.items():
        if block == name or block.endswith("." + name) or name.endswith("." + block):
            return i
    return None


def load_expert_parallel(directory: str | Path, phy2log, group: dist.ProcessGroup | None = None,
                         *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         gpus_per_node: int | None = None) -> nn.Module:
    """The causal LM of checkpoint ``directory`` served expert-parallel under ``phy2log``
    ([MoE layers, R]) over ``group``, holding only this rank's slots' experts (eval mode).
    dtype: cast the weights (default: as stored). Raises :class:`CheckpointError`,
    :class:`~expertplane.engines.hf.adapter.UnsupportedModelError` (dense or unknown MoE
    architecture) or :class:`~expertplane.kernels.moe.PlacementError` with one line."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json (need a HuggingFace checkpoint "
                              "directory: config.json + safetensors)")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"{directory}/config.json: {str(exc).splitlines()[0]}") \
            from None
    device = torch.device(device)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise UnsupportedModelError(f"{config.model_type}: {str(exc).splitlines()[0]}") \
                from None
    blocks = [b.name for b in find_moe_blocks(model)]
    ckpt = Checkpoint(directory)
    rename = _renamer(config.model_type)
    source, expert_keys = _expert_source(ckpt, blocks, rename, dtype, device)
    for block in find_moe_blocks(model):
        block.router.to_empty(device=device)   # the layer lives on its router's device
    expert_parallel(model, phy2log, group, gpus_per_node=gpus_per_node, weights=source)
    _load_rest(model, ckpt, expert_keys, rename, dtype, device)
    return model.eval()


def _load_rest(model: nn.Module, ckpt: Checkpoint, skip: set, rename: Callable[[str], str],
               dtype: torch.dtype | None, device: torch.device) -> None:
    """Assign every non-expert tensor from the checkpoint; make the non-persistent buffers;
    refuse to serve with any weight left unloaded."""
    wanted = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "model")
    state = {}
    for key in ckpt.keys:
        if key in skip:
            continue
        name = rename(key)
        for candidate in (name, f"{prefix}.{name}", name.removeprefix(prefix + ".")):
            if candidate in wanted:
                value = ckpt.get(key).to(device)
                floating = value.is_floating_point() and wanted[candidate].is_floating_point()
                state[candidate] = value.to(dtype or wanted[candidate].dtype) if floating \
                    else value
                break
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    with torch.no_grad():
        for module in model.modules():
            if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
                module.to_empty(device=device, recurse=False)
                model._init_weights(module)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise CheckpointError(f"{ckpt.directory}: no weights for {left[0]} "
                              f"({len(left)} tensors missing)")
