"""ExpertPlane's SGLang plugin: SGLang's own EPLB moves the weights to ExpertPlane's plan in force.

Registered as entry point ``expertplane = expertplane.engines.sglang:register`` in the group
``sglang.srt.plugins``; SGLang's ``load_plugins()`` calls ``register()`` in every process, then
applies the hooks registered with its ``HookRegistry``. ``register`` wraps (AROUND hook)
``EPLBManager._compute_expert_location_metadata``: with ``--enable-eplb``, every
``--eplb-rebalance-num-iterations`` forward passes SGLang asks it for the new expert location and
hands the answer to its ``ExpertLocationUpdater``, which moves the weights (P2P). Our hook answers
with the plan in force:

* rank 0 reads the plan file the node agent writes (``EXPERTPLANE_PLAN_FILE``: a local file, no
  network) and maps the plan's rows (MoE layers) onto SGLang's rows (hidden layers: the MoE
  layers are the keys of the model's ``routed_experts_weights_of_layer``; dense rows keep
  their current layout);
* rank 0 broadcasts ``[apply, version, map...]`` (int64 ``2 + H * R``) over SGLang's world group,
  so every rank moves to the same version;
* no newer plan (or a missing, malformed, wrong-shaped file): SGLang's current location comes
  back as is, the updater finds zero moves. A process never moves back to an older version.

SGLang's ``load_plugins`` only logs a plugin's exceptions, so ``register`` checks its own work
and logs one ERROR line when it is not in effect (unsupported SGLang version, no plan file
configured, hook target missing); ``in_effect()`` tells whether the hook is applied.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os

import numpy as np

from expertplane.engines.plan_file import PLAN_FILE_ENV, read_plan_file
from expertplane.engines.plugin_status import InstallResult, announce
from expertplane.engines.vllm_plan import PlanChoice, choose_map

log = logging.getLogger("sglang.srt.plugins.expertplane")

TESTED_VERSIONS = ("0.5.23",)
TARGET = "sglang.srt.eplb.eplb_manager.EPLBManager._compute_expert_location_metadata"
_APPLY = 1



def register() -> None:
    """SGLang's plugin hook: register ours and say, in one line, whether it is in effect."""
    announce(install(), log)


def install(environ=os.environ) -> InstallResult:
    """Register the AROUND hook on ``TARGET`` (SGLang applies it after all plugins ran)."""
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    not_in_effect = "ExpertPlane's plan is NOT in effect, SGLang balances on its own"
    if version not in TESTED_VERSIONS:
        return InstallResult(False, f"expertplane: SGLang {version} is not supported (tested: "
                                    f"{', '.join(TESTED_VERSIONS)}); {not_in_effect}")
    path = environ.get(PLAN_FILE_ENV, "").strip()
    if not path:
        return InstallResult(False, f"expertplane: {PLAN_FILE_ENV} is not set; {not_in_effect}")
    from sglang.srt.eplb.eplb_manager import EPLBManager
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    target = getattr(EPLBManager, "_compute_expert_location_metadata", None)
    params = list(inspect.signature(target).parameters) if target is not None else []
    if params[:3] != ["self", "logical_count", "broadcast_over_world"]:
        return InstallResult(False, f"expertplane: SGLang {version} has no "
                                    f"{TARGET.rsplit('.', 2)[1]}._compute_expert_location_metadata"
                                    f"(self, logical_count, *, broadcast_over_world); "
                                    f"{not_in_effect}")
    _SOURCE.path = path
    if not in_effect():
        HookRegistry.register(TARGET, compute_expert_location, HookType.AROUND)
    return InstallResult(True, f"expertplane: rebalances follow the plan in {path} "
                               f"(SGLang {version}, --enable-eplb needed)")


def in_effect() -> bool:
    """True once SGLang applied our hook to ``EPLBManager._compute_expert_location_metadata``."""
    from sglang.srt.eplb.eplb_manager import EPLBManager

    fn = EPLBManager.__dict__.get("_compute_expert_location_metadata")
    while fn is not None:
        if _is_ours(fn):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _is_ours(wrapper) -> bool:
    cells = getattr(wrapper, "__closure__", None) or ()
    return any(getattr(c, "cell_contents", None) is compute_expert_location for c in cells)


def compute_expert_location(original, manager, logical_count, *, broadcast_over_world: bool,
                            **kwargs):
    """AROUND hook: the ``ExpertLocationMetadata`` of the plan in force (every rank the same), or
    SGLang's current one (zero moves). Elastic-EP scale-ups (``broadcast_over_world``) keep
    SGLang's own computation: the plan was made for the old world."""
    if broadcast_over_world:
        log.warning("expertplane: SGLang's own EPLB computes this post-scale rebalance")
        return original(manager, logical_count, broadcast_over_world=broadcast_over_world,
                        **kwargs)
    return _SOURCE.metadata(manager)


class PlanSource:
    """Per process: reads the plan file on rank 0, broadcasts it, pins the version moved to."""

    def __init__(self):
        self.path = ""
        self.pinned = 0
        self.last: PlanChoice | None = None

    def metadata(self, manager):
        import torch
        import torch.distributed as dist

        from sglang.srt.eplb.expert_location import (ExpertLocationMetadata,
                                                     get_global_expert_location_metadata)

        current = get_global_expert_location_metadata()
        old = current.physical_to_logical_map
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            moe = sorted(manager._get_model().routed_experts_weights_of_layer)
            choice = self.choose(current.physical_to_logical_map_cpu.numpy(), moe,
                                 current.num_logical_experts)
            packet = np.full(2 + old.numel(), -1, dtype=np.int64)
            packet[1] = choice.version
            if choice.phy2log is not None:
                packet[0] = _APPLY
                packet[2:] = choice.phy2log.ravel()
            message = torch.from_numpy(packet).to(old.device)
            self.note(choice)
        else:
            message = torch.empty(2 + old.numel(), dtype=torch.int64, device=old.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(message, src=0)
        version = int(message[1])
        self.pinned = max(self.pinned, version)
        if int(message[0]) != _APPLY:
            return current
        new_map = message[2:].view(old.shape).to(old.dtype)
        return ExpertLocationMetadata.init_by_mapping(
            manager._model_config, new_map, moe_ep_rank=manager._elastic_global_rank())

    def choose(self, old: np.ndarray, moe: list[int], num_logical: int) -> PlanChoice:
        """The hidden-layer map ``[H, R]`` to move to (or None: stay), from the plan file.

        ``old``: SGLang's current map ``[H, R]``; ``moe``: its MoE layers (hidden indices)."""
        try:
            plan = read_plan_file(self.path)
        except Exception as exc:   # the engine must keep serving whatever the file holds
            return PlanChoice(None, f"plan file {self.path}: {exc}")
        if plan is None:
            return PlanChoice(None, f"no plan file at {self.path} yet")
        if plan.moe_layers is not None and list(plan.moe_layers) != moe:
            return PlanChoice(None, f"plan v{plan.version} is for MoE layers "
                                    f"{_span(plan.moe_layers)}, SGLang's are {_span(moe)}")
        if plan.moe_layers is None and plan.phy2log.shape[0] == old.shape[0] != len(moe):
            moe = list(range(old.shape[0]))          # a plan of every hidden layer
        choice = choose_map((plan.version, plan.phy2log), old[moe], num_logical, self.pinned)
        if choice.phy2log is None:
            return choice
        full = old.copy()
        full[moe] = choice.phy2log
        return PlanChoice(full, choice.reason, choice.version)

    def note(self, choice: PlanChoice) -> None:
        if self.last is None or choice.reason != self.last.reason:
            log.info("expertplane: %s", choice.reason if choice.phy2log is not None
                     else f"zero moves: {choice.reason}")
        self.last = choice


def _span(layers) -> str:
    layers = list(layers)
    return f"{layers[0]}..{layers[-1]} ({len(layers)})" if layers else "none"


_SOURCE = PlanSource()
