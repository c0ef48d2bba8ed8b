"""SGLang's own EPLB rebalance path on gloo ranks, for the tests: SGLang's plugin loader (ours
through the entry point), ``EPLBManager._compute_expert_location_metadata`` (hooked by ours),
``update_expert_location_with_recovery`` -> ``ExpertLocationUpdater`` ->
``update_expert_weights_single_layer``, on expert weights whose values name their (layer,
expert), so a test can tell whether every slot holds its expert after a move.

Only SGLang's model object is ours (``ServedExperts``): SGLang's serving model needs CUDA; the
updater reads nothing from it but ``routed_experts_weights_of_layer``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class ServedExperts(torch.nn.Module):
    """The MoE weights an SGLang model hands its updater: per MoE (hidden) layer, ``[w13, w2]``
    with this rank's slots first (``[n, 3, 2]`` and ``[n, 5]``, n = slots per rank); a slot of
    logical expert e in layer l holds ``1000 l + e`` (w13) and its negative (w2)."""

    def __init__(self, phy2log, rank: int, world: int, moe_layers):
        super().__init__()
        self.rank, self.moe_layers = rank, list(moe_layers)
        self.n = phy2log.shape[1] // world
        self.routed_experts_weights_of_layer = {}
        for layer in self.moe_layers:
            ids = self._ids(phy2log, layer)
            self.routed_experts_weights_of_layer[layer] = [
                ids[:, None, None].expand(self.n, 3, 2).contiguous(),
                -ids[:, None].expand(self.n, 5).contiguous()]

    def _ids(self, phy2log, layer):
        mine = phy2log[layer, self.rank * self.n:(self.rank + 1) * self.n]
        return torch.as_tensor(mine).double() + 1000 * layer

    def holds(self, phy2log) -> bool:
        """True when every local slot holds the weights of its expert in ``phy2log`` [H, R]."""
        for layer in self.moe_layers:
            want = self._ids(phy2log, layer)
            w13, w2 = self.routed_experts_weights_of_layer[layer]
            if not (torch.equal(w13, want[:, None, None].expand_as(w13))
                    and torch.equal(w2, -want[:, None].expand_as(w2))):
                return False
        return True

    def update_weights_from_disk(self, *args, **kwargs):
        raise AssertionError("a plan that covers every expert never reloads from disk")


class SglangRank:
    """One SGLang EP rank: process group, SGLang's trivial initial expert location, the plugins
    loaded, the model's experts, and ``rebalance()`` = one pass of SGLang's EPLB rebalance."""

    def __init__(self, rank: int, world: int, port: int, model_dir: str, plan_path: str):
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.eplb.eplb_manager import EPLBManager
        from sglang.srt.eplb.expert_location import (ExpertLocationMetadata,
                                                     set_global_expert_location_metadata)
        from sglang.srt.eplb.expert_location_updater import ExpertLocationUpdater
        from sglang.srt.plugins import load_plugins
        from sglang.srt.runtime_context import get_parallel

        os.environ["EXPERTPLANE_PLAN_FILE"] = plan_path
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        get_parallel().override_permanently(tp_rank=rank)
        self.rank, self.config = rank, ModelConfig(model_dir)
        set_global_expert_location_metadata(
            ExpertLocationMetadata.init_trivial(self.config, rank), allow_overwrite=True)
        load_plugins()                       # entry point group sglang.srt.plugins
        self.num_logical = self.config.hf_config.n_routed_experts
        moe = range(self.config.hf_config.first_k_dense_replace,
                    self.config.hf_config.num_hidden_layers)
        self.model = ServedExperts(self.phy2log(), rank, world, moe)
        self.updater = ExpertLocationUpdater()
        self.updater._first_execution = False   # its first call empties the CUDA cache
        self.manager = EPLBManager.__new__(EPLBManager)   # __init__ starts the GPU-only recorder
        self.manager._model_config, self.manager._get_model = self.config, (lambda: self.model)

    @staticmethod
    def phy2log():
        """SGLang's current map, numpy int64 [hidden layers, slots]."""
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        return get_global_expert_location_metadata().physical_to_logical_map_cpu.numpy()

    def rebalance(self):
        """One EPLB rebalance as SGLang runs it (every rank at once); returns the map after it,
        numpy [hidden layers, slots]."""
        from sglang.srt.eplb.eplb_manager import update_expert_location_with_recovery

        hidden = self.config.hf_config.num_hidden_layers
        new = self.manager._compute_expert_location_metadata(
            torch.zeros(1, hidden, self.num_logical), broadcast_over_world=False)
        update_expert_location_with_recovery(
            expert_location_updater=self.updater, model=self.model,
            new_expert_location_metadata=new, update_layer_ids=self.model.moe_layers,
            tp_rank=self.rank, expert_backup_client=None,
            update_weights_from_disk_callable=self.model.update_weights_from_disk,
            ep_dispatch_algorithm="static", init_lplb_solvers_callable=None)
        return self.phy2log()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
