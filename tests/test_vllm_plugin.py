"""ExpertPlane's vLLM plugin against vLLM's own code (the vllm wheel, CPU): vLLM's plugin loader
finds it through the entry point, EPLB's policy lookup then returns the plan in force (vLLM's
current map when there is none, or when the plan file is malformed or for another shape), and
vLLM's ``rearrange_expert_weights_inplace`` on 2 gloo ranks, driven by it, leaves every slot with
its expert's weights."""

from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from expertplane.engines import vllm as plugin
from expertplane.engines.plan_file import PLAN_FILE_ENV, write_plan_file

sys.path.insert(0, str(Path(__file__).parent))
from vllm_ranks import RankExperts, init_rank, same_on_every_rank  # noqa: E402

L, E, R, WORLD = 2, 8, 12, 2


def initial_map() -> np.ndarray:
    """vLLM's own initial map [L, R]: the routed experts, then the redundant ones."""
    from vllm.distributed.eplb.eplb_state import EplbState

    row = EplbState.build_initial_global_physical_to_logical_map(E, R - E)
    return np.tile(np.asarray(row, np.int64), (L, 1))


def shuffled(seed: int) -> np.ndarray:
    """A valid plan [L, R]: every expert once plus random replicas, in random slots."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, R - E)]))
                     for _ in range(L)]).astype(np.int64)


def plan_doc(version: int, phy2log: np.ndarray, placement: str = "vllm-moe") -> dict:
    return {"placement": placement, "version": version, "phy2log": np.asarray(phy2log).tolist(),
            "num_logical_experts": E}


def skewed_load() -> torch.Tensor:
    """A load window [L, E] as vLLM hands it to the policy: int64 tokens, expert 0 hot."""
    load = torch.full((L, E), 10, dtype=torch.int64)
    load[:, 0] = 500
    return load


def test_vllm_loader_installs_the_policy_and_lookup_returns_the_plan(monkeypatch, tmp_path, caplog):
    from vllm.distributed.eplb import eplb_state
    from vllm.distributed.eplb.policy import EPLB_POLICIES
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    path = tmp_path / "plan.json"
    monkeypatch.setenv(PLAN_FILE_ENV, str(path))
    monkeypatch.delenv(plugin.AGENT_ENV, raising=False)
    monkeypatch.setenv(plugin.PLACEMENT_ENV, "vllm-moe")
    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)     # vLLM's loader, entry points
    assert "expertplane" in plugins
    with caplog.at_level(logging.INFO, logger="vllm.plugins.expertplane"):
        plugins["expertplane"]()                                # as vLLM calls it
    assert "EPLB policy in effect on vLLM 0.34" in caplog.text
    policy = eplb_state.EPLB_POLICIES["default"]                # what EplbState.add_model looks up
    assert policy is EPLB_POLICIES["default"] and policy.__name__ == "ExpertPlaneEplbPolicy"

    old = torch.from_numpy(initial_map())
    def rebalance(current):
        return policy.rebalance_experts(skewed_load(), R, 2, 1, WORLD, current)

    assert torch.equal(rebalance(old), old)                     # no plan file yet: zero moves
    plan = shuffled(1)
    write_plan_file(path, plan_doc(3, plan))
    new = rebalance(old)
    assert new.dtype == old.dtype and new.device.type == "cpu"
    assert new.tolist() == plan.tolist()
    assert torch.equal(rebalance(new), new)                     # in place: zero moves
    for bad in ("{not json", json.dumps(plan_doc(4, shuffled(2)[:, :8])),    # another shape
                json.dumps(plan_doc(4, np.zeros((L + 1, R), np.int64))),     # 3 layers
                json.dumps(plan_doc(4, shuffled(3), placement="another"))):  # not this server's
        path.write_text(bad)
        assert torch.equal(rebalance(new), new)
    path.unlink()
    assert torch.equal(rebalance(new), new)                     # missing again
    write_plan_file(path, plan_doc(2, shuffled(5)))             # older than v3: never moved back
    assert torch.equal(rebalance(new), new)
    no_slot = shuffled(6)
    no_slot[1][no_slot[1] == 7] = 6                             # expert 7 of layer 1 has no slot
    write_plan_file(path, plan_doc(9, no_slot))
    assert torch.equal(rebalance(new), new)
    # vLLM asks for another slot count (elastic EP): vLLM's own policy answers
    grown = policy.rebalance_experts(skewed_load(), R + 2, 2, 1, WORLD, new)
    assert grown.shape == (L, R + 2) and int(grown.max()) < E


def test_unsupported_vllm_or_missing_plan_file_is_refused_in_one_line(monkeypatch, caplog):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.35.1")
    with caplog.at_level(logging.INFO, logger="vllm.plugins.expertplane"):
        plugin.register()
    refused = [r for r in caplog.records if r.name == "vllm.plugins.expertplane"]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    assert refused[0].getMessage().startswith("expertplane: vLLM 0.35.1 is not supported")
    assert "\n" not in refused[0].getMessage() and "NOT in effect" in refused[0].getMessage()
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    monkeypatch.delenv(PLAN_FILE_ENV, raising=False)
    result = plugin.install()
    assert not result.in_effect and PLAN_FILE_ENV in result.message


def _rearrange_rank(rank: int, store: str, plan_path: str) -> None:
    # only EP rank 0 reads the plan file; rank 1 is pointed at a file that never exists
    env = {PLAN_FILE_ENV: plan_path if rank == 0 else plan_path + ".nowhere"}
    eplb = init_rank(rank, WORLD, store, env)
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    policy = EPLB_POLICIES["default"]
    assert policy.__name__ == "ExpertPlaneEplbPolicy"
    old = torch.from_numpy(initial_map())
    experts = RankExperts(eplb, initial_map())

    def rebalance(current):
        new = policy.rebalance_experts(skewed_load(), R, 2, 1, WORLD, current)
        assert same_on_every_rank(new.tolist())
        return new

    def rank0_writes(text_or_doc) -> None:
        if rank == 0:
            if isinstance(text_or_doc, dict):
                write_plan_file(plan_path, text_or_doc)
            else:
                with open(plan_path, "w") as f:
                    f.write(text_or_doc)
        dist.barrier()

    assert torch.equal(rebalance(old), old)                     # no plan file: zero moves
    for version, seed in ((1, 11), (2, 12)):
        plan = shuffled(seed)
        rank0_writes(plan_doc(version, plan))
        new = rebalance(old)
        assert new.tolist() == plan.tolist()
        experts.move(old, new)
        assert experts.mismatches(new) == []
        old = new
    assert torch.equal(rebalance(old), old)                     # no newer plan: zero moves
    # async EPLB calls the policy from its worker thread: the broadcast works there too
    plan = shuffled(15)
    rank0_writes(plan_doc(3, plan))
    answer = {}
    worker = threading.Thread(target=lambda: answer.setdefault("new", rebalance(old)))
    worker.start()
    worker.join(120)
    assert answer["new"].tolist() == plan.tolist()
    experts.move(old, answer["new"])
    old = answer["new"]
    assert experts.mismatches(old) == []
    for bad in ("{\"version\": 4", plan_doc(4, shuffled(13)[:, :10]), plan_doc(1, shuffled(14))):
        rank0_writes(bad)                                       # malformed, shape, older
        new = rebalance(old)
        assert torch.equal(new, old)
        experts.move(old, new)                                  # zero moves: weights unchanged
        assert experts.mismatches(old) == []
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_rearrange_on_two_gloo_ranks_carries_out_the_plan(tmp_path):
    mp.spawn(_rearrange_rank, args=(str(tmp_path / "store"), str(tmp_path / "plan.json")),
             nprocs=WORLD, join=True)
