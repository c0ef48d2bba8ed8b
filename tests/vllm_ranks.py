"""What the vLLM tests run in each spawned gloo rank: vLLM's own plugin loader, EPLB group, policy
lookup, communicator and ``rearrange_expert_weights_inplace``, on CPU tensors.

Expert weights are made so that every row names its expert: slot ``s`` of layer ``l`` holding
logical expert ``e`` carries ``expert_rows(l, e)`` in each of its two weight tensors.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

HIDDEN = (6, 4)          # widths of the two weight tensors of every expert


def expert_rows(layer: int, expert: int) -> list[torch.Tensor]:
    """The weights of logical ``expert`` of ``layer``: one row per weight tensor."""
    return [torch.full((w,), float(1000 * layer + expert)) + torch.arange(w) / 10 for w in HIDDEN]


def init_rank(rank: int, world: int, store_path: str, env: dict[str, str]):
    """Join the gloo group, load vLLM's general plugins (ours among them) and make vLLM's EPLB
    group over all ranks; returns that group coordinator."""
    os.environ.update(env)
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"    # vLLM's CPU platform: no pinned host memory
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world)
    from vllm.distributed import parallel_state
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    eplb = parallel_state.init_model_parallel_group(
        [list(range(world))], local_rank=rank, backend="gloo", use_device_communicator=False,
        group_name="eplb")
    parallel_state._replace_active_groups(world=None, dp=None, ep=None, eplb=eplb, node_count=1)
    return eplb


class RankExperts:
    """One rank's expert weights under vLLM's layout: per MoE layer, two tensors
    [local slots, width], plus vLLM's receive buffer and communicator (vLLM's default
    "torch_nccl" backend, which for CPU tensors runs torch.distributed P2P on the EPLB group's
    gloo CPU group; its "torch_gloo" one stages through accelerator streams)."""

    def __init__(self, eplb, phy2log: np.ndarray):
        from vllm.distributed.eplb.eplb_communicator import create_eplb_communicator

        self.rank, self.world = eplb.rank_in_group, eplb.world_size
        self.group = eplb.cpu_group
        layers, slots = phy2log.shape
        self.local = slots // self.world
        self.weights = [[torch.zeros(self.local, w) for w in HIDDEN] for _ in range(layers)]
        for layer in range(layers):
            for j in range(self.local):
                expert = int(phy2log[layer, self.rank * self.local + j])
                for tensor, row in zip(self.weights[layer], expert_rows(layer, expert)):
                    tensor[j] = row
        self.buffer = [torch.empty(self.local, w) for w in HIDDEN]
        self.communicator = create_eplb_communicator(eplb, "torch_nccl", self.weights, self.buffer)

    def move(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """vLLM's own mover, from map ``old`` to ``new`` [L, R]."""
        from vllm.distributed.eplb.rebalance_execute import rearrange_expert_weights_inplace

        rearrange_expert_weights_inplace(old, new, self.weights, self.buffer, self.group,
                                         self.communicator)

    def mismatches(self, phy2log: torch.Tensor) -> list[tuple[int, int]]:
        """(layer, global slot) of every local slot not holding its expert's weights."""
        bad = []
        for layer, tensors in enumerate(self.weights):
            for j in range(self.local):
                slot = self.rank * self.local + j
                want = expert_rows(layer, int(phy2log[layer, slot]))
                if not all(torch.equal(t[j], w) for t, w in zip(tensors, want)):
                    bad.append((layer, slot))
        return bad


def same_on_every_rank(value) -> bool:
    """True when every rank passed an equal ``value`` (compared as Python objects)."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)
