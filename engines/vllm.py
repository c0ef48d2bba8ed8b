"""ExpertPlane's vLLM plugin: vLLM's own EPLB carries out ExpertPlane's plan in force.

Registered as entry point ``expertplane = expertplane.engines.vllm:register`` in the group
``vllm.general_plugins``; vLLM calls ``register()`` in every process it starts. ``register``
replaces ``EPLB_POLICIES["default"]`` in place (vLLM asserts the keys against
``EPLBPolicyOption`` and async EPLB needs "default") with a policy that, each time vLLM
rebalances (``--enable-eplb``, every ``eplb_config.step_interval`` steps):

- forwards the load window vLLM hands it (``weight`` [MoE layers, logical experts], tokens,
  already all-reduced over the EP ranks) from EP rank 0 to the node's agent
  (``LoadForwarder``: bounded, in the background, dropped and counted when the agent is
  unreachable), which reports it to the controller as load per logical expert;
- returns the plan in force read from the plan file the agent writes, instead of vLLM's own
  computation, so vLLM's mover (``rearrange_expert_weights_inplace`` or the async worker)
  carries it out. vLLM's current map comes back unchanged (zero moves) when there is no newer
  plan, or the file is missing, malformed, or for another shape.

Every rank moves to the same version: EP rank 0 reads the file and broadcasts (version, map) on
vLLM's EPLB CPU group, from the thread that runs the policy (the main thread in sync mode, the
async worker in async mode, which runs its own collectives on that group). Each process also
pins the highest version it moved to and never moves back to an older one. Only a local file is
read: no forward pass waits on the network.

Environment: ``EXPERTPLANE_PLAN_FILE`` (required), ``EXPERTPLANE_AGENT`` (the agent's
AgentService address, ``unix:/path`` or ``host:port``; without it no load is forwarded),
``EXPERTPLANE_PLACEMENT`` (the placement the load is reported for; default: the plan file's),
``EXPERTPLANE_LOCAL_TOKEN`` (node-local bearer token, if the agent asks for one).
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

from expertplane.engines.load_forwarder import LoadForwarder
from expertplane.engines.plan_file import PLAN_FILE_ENV
from expertplane.engines.plugin_status import InstallResult, announce
from expertplane.engines.vllm_plan import PlanChoice, choose_map

log = logging.getLogger("vllm.plugins.expertplane")   # printed by vLLM's own log handler

TESTED_VERSIONS = ("0.34",)       # major.minor of the vLLM releases this plugin is tested with
AGENT_ENV = "EXPERTPLANE_AGENT"
PLACEMENT_ENV = "EXPERTPLANE_PLACEMENT"



def register() -> None:
    """vLLM's plugin hook: install the policy and say, in one line, whether it is in effect."""
    announce(install(), log)


def install() -> InstallResult:
    """Replace vLLM's default EPLB policy with ExpertPlane's (idempotent), then check it took."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if ".".join(version.split(".")[:2]) not in TESTED_VERSIONS:
        return InstallResult(False, f"expertplane: vLLM {version} is not supported (tested: "
                                    f"{', '.join(v + '.x' for v in TESTED_VERSIONS)}); ExpertPlane's "
                                    f"EPLB policy is NOT in effect, vLLM balances on its own")
    path = os.environ.get(PLAN_FILE_ENV, "")
    if not path:
        return InstallResult(False, f"expertplane: {PLAN_FILE_ENV} is not set; ExpertPlane's EPLB "
                                    f"policy is NOT in effect, vLLM balances on its own")
    from vllm.distributed.eplb import eplb_state
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    policy = _policy_class()
    if EPLB_POLICIES.get("default") is not policy:
        policy.vllm_default = EPLB_POLICIES["default"]
        EPLB_POLICIES["default"] = policy
    policy.source = PlanSource(path, os.environ.get(AGENT_ENV, ""),
                               os.environ.get(PLACEMENT_ENV, ""))
    if eplb_state.EPLB_POLICIES.get("default") is not policy:
        return InstallResult(False, "expertplane: vLLM's EPLB looks its policy up elsewhere; "
                                    "ExpertPlane's EPLB policy is NOT in effect")
    agent = os.environ.get(AGENT_ENV) or f"nowhere ({AGENT_ENV} not set)"
    return InstallResult(True, f"expertplane: EPLB policy in effect on vLLM {version}: plans from "
                               f"{path}, load windows to {agent}")


_POLICY = None
_POLICY_LOCK = threading.Lock()


def _policy_class():
    """The policy class (built once, after the version check, on vLLM's AbstractEplbPolicy)."""
    global _POLICY
    with _POLICY_LOCK:
        if _POLICY is None:
            from vllm.distributed.eplb.policy import AbstractEplbPolicy

            class ExpertPlaneEplbPolicy(AbstractEplbPolicy):
                """vLLM EPLB policy returning ExpertPlane's plan in force (see module doc)."""

                source: PlanSource | None = None
                vllm_default = None

                @classmethod
                def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_ranks,
                                      old_global_expert_indices=None):
                    """weight [L, E] tokens per logical expert; returns phy2log [L, num_replicas]
                    (CPU int64): the plan in force, or ``old_global_expert_indices`` unchanged."""
                    old = old_global_expert_indices
                    if cls.source is None or old is None or old.shape[-1] != num_replicas:
                        # vLLM asks for another slot count (elastic EP) or gives no map: its
                        # own policy answers (keeping slots in place only within one shape)
                        log.warning("expertplane: vLLM's own EPLB computes this rebalance (%s)",
                                    "no plan source" if cls.source is None else
                                    "no current map" if old is None else
                                    f"{num_replicas} slots asked, map has {old.shape[-1]}")
                        same = old is not None and old.shape[-1] == num_replicas
                        return cls.vllm_default.rebalance_experts(
                            weight, num_replicas, num_groups, num_nodes, num_ranks,
                            old if same else None)
                    return cls.source.rebalance(weight, old)

            _POLICY = ExpertPlaneEplbPolicy
        return _POLICY


class PlanSource:
    """Per process: reads the plan file on EP rank 0, shares it with the other ranks, pins the
    version moved to, forwards load windows from EP rank 0."""

    def __init__(self, path: str, agent: str, placement: str):
        self.path = path
        self.agent = agent
        self.placement = placement
        self.pinned = 0
        self.last: PlanChoice | None = None
        self.forwarder: LoadForwarder | None = None

    def rebalance(self, weight, old):
        """``weight`` [L, E] and ``old`` [L, R] CPU tensors -> the map to move to [L, R]."""
        import torch

        group = _eplb_group()
        leader = group is None or group.rank_in_group == 0
        shared = self._read() if leader else None
        if group is not None:
            shared = group.broadcast_object(shared, src=0)
        plan, missing, placement = shared
        if leader:
            try:
                self._forward(weight, placement)
            except Exception:          # a lost sample, never a failed rebalance
                log.exception("expertplane: load window not forwarded")
        choice = choose_map(plan, old.numpy(), int(weight.shape[-1]), self.pinned, missing)
        self.pinned = max(self.pinned, choice.version)
        if leader and (self.last is None or choice.reason != self.last.reason):
            log.info("expertplane: %s", choice.reason if choice.phy2log is not None
                     else f"zero moves: {choice.reason}")
        self.last = choice
        if choice.phy2log is None:
            return old.clone()
        return torch.from_numpy(choice.phy2log).to(old.dtype)

    def _read(self) -> tuple[tuple[int, np.ndarray] | None, str, str]:
        """(version, phy2log) of the plan file or None, the reason when None, its placement."""
        from expertplane.engines.plan_file import read_plan_file

        try:
            doc = read_plan_file(self.path)
        except Exception as exc:   # the engine must keep serving whatever the file holds
            return None, f"plan file {self.path}: {exc}", ""
        if doc is None:
            return None, f"no plan file at {self.path} yet", ""
        if self.placement and doc.placement != self.placement:
            return None, (f"plan file {self.path} is for placement {doc.placement!r}, this "
                          f"server serves {self.placement!r} ({PLACEMENT_ENV})"), ""
        return (int(doc.version), np.asarray(doc.phy2log, np.int64)), "", doc.placement

    def _forward(self, weight, placement: str) -> None:
        """Queue the window for the agent (not the all-zero window of vLLM's profile run)."""
        placement = self.placement or placement
        if not self.agent or not placement or not bool(weight.any()):
            return
        if self.forwarder is None or self.forwarder.placement != placement:
            self.forwarder = LoadForwarder(self.agent, placement)
        self.forwarder.offer(weight.double().numpy())


def _eplb_group():
    """vLLM's EPLB group coordinator when it spans several ranks, else None (one process)."""
    try:
        from vllm.distributed.parallel_state import get_eplb_group

        group = get_eplb_group()
    except AssertionError:            # EPLB group not initialised: a single process
        return None
    return group if group.world_size > 1 else None
