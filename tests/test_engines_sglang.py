"""SGLang's own code (its PyPI wheel) against ExpertPlane: its loader takes our --format sglang
output for a DeepSeek-V3-shaped model; its plugin loader finds our plugin; on 2 gloo ranks its
rebalance path (EPLBManager._compute_expert_location_metadata, hooked by us, then
update_expert_location_with_recovery -> ExpertLocationUpdater -> update_expert_weights_single_layer)
carries out our plan, and answers zero moves with no plan, the same plan again, or a plan of
another shape."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("engine_env", Path(__file__).with_name("engine_env.py"))
engine_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_env)
engine_env.allow_torchvision_import()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from expertplane.engines.plan_file import write_plan_file  # noqa: E402
from expertplane.planner import rebalance_experts  # noqa: E402
from expertplane.planner.io import sglang_document  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from reliability_support import free_port  # noqa: E402
from sglang_ranks import SglangRank  # noqa: E402

H, DENSE, E, RED = 4, 1, 8, 2          # small DeepSeek-V3 shape for the 2-rank test
R = E + RED


def test_sglang_loader_takes_our_deepseek_v3_file(tmp_path):
    """61 hidden layers (3 dense), 256 experts, 32 redundant, EP 32: SGLang's
    compute_initial_expert_location_metadata loads our file; its dispatch info indexes the last
    hidden layer."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_location import compute_initial_expert_location_metadata
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo
    from sglang.srt.eplb.expert_location import set_global_expert_location_metadata

    weight = np.random.default_rng(0).zipf(1.5, size=(58, 256)).clip(max=10_000)
    phy2log, _, _ = rebalance_experts(weight, 288, 8, 4, 32)
    path = tmp_path / "init.json"
    path.write_text(json.dumps(sglang_document(phy2log.numpy(), range(3, 61), 61, 256)))
    override = engine_env.publish_server_args(engine_env.deepseek_v3_dir(tmp_path / "dsv3", 61, 256, 3), 32, 32,
                        init_expert_location=str(path))
    try:
        meta = compute_initial_expert_location_metadata(ModelConfig(str(tmp_path / "dsv3")),
                                                        moe_ep_rank=5)
        assert tuple(meta.physical_to_logical_map.shape) == (61, 288)
        assert np.array_equal(meta.physical_to_logical_map_cpu.numpy()[3:], phy2log.numpy())
        assert tuple(meta.logical_to_rank_dispatch_physical_map.shape) == (61, 256)
        set_global_expert_location_metadata(meta, allow_overwrite=True)
        info = ExpertLocationDispatchInfo.init_new(layer_id=60)
        assert info is not None and info.num_physical_experts == 288
    finally:
        override.restore()


def _rank(rank, port, model_dir, plan_path, plans, out):
    from expertplane.engines import sglang as plugin

    served = None
    try:
        served = SglangRank(rank, 2, port, model_dir, plan_path)
        steps = []
        for doc in plans:                    # rank 0 writes each plan, then every rank rebalances
            if rank == 0:
                if doc is None:
                    if os.path.exists(plan_path):
                        os.remove(plan_path)
                else:
                    write_plan_file(plan_path, doc)
            dist.barrier()
            now = served.rebalance()
            steps.append((now.tolist(), served.model.holds(now)))
        out.put((rank, plugin.in_effect(), steps, None))
    except BaseException as exc:  # reported to the test, which fails with it
        out.put((rank, False, [], repr(exc)))
    finally:
        if served is not None:
            served.close()


@pytest.mark.timeout(600)
def test_two_ranks_move_to_our_plan(tmp_path):
    model_dir = engine_env.deepseek_v3_dir(tmp_path / "small", H, E, DENSE)
    override = engine_env.publish_server_args(model_dir, 2, RED, eplb_rebalance_num_iterations=1000,
                        expert_distribution_recorder_buffer_size=100,
                        expert_distribution_recorder_mode="stat")
    try:
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.eplb.expert_location import ExpertLocationMetadata

        ExpertLocationMetadata.init_trivial(ModelConfig(model_dir), 0)   # model registry, once
        load = np.ones((H - DENSE, E))
        load[:, 3] = 40.0
        plan, _, _ = rebalance_experts(load, R, 1, 1, 2)
        plan = plan.numpy()
        doc = {"placement": "sgl", "version": 2, "phy2log": plan.tolist(),
               "moe_layers": list(range(DENSE, H)), "num_hidden_layers": H}
        wrong = {**doc, "version": 3, "phy2log": np.zeros((H - DENSE, R + 2), int).tolist(),
                 "moe_layers": None}
        older = {**doc, "version": 1, "phy2log": np.tile(np.arange(R) % E, (H - DENSE, 1)).tolist()}
        plans = [None, doc, doc, wrong, older]
        ctx = mp.get_context("fork")         # the ranks inherit SGLang's imported model registry
        out = ctx.Queue()
        port = free_port()
        ranks = [ctx.Process(target=_rank, args=(r, port, model_dir, str(tmp_path / "plan.json"),
                                                 plans, out)) for r in (0, 1)]
        for p in ranks:
            p.start()
        results = dict((r, rest) for r, *rest in (out.get(timeout=500) for _ in ranks))
        for p in ranks:
            p.join(timeout=60)
    finally:
        override.restore()
    trivial = np.tile(np.arange(R) % E, (H, 1))
    want = trivial.copy()
    want[DENSE:] = plan
    for rank in (0, 1):
        hooked, steps, error = results[rank]
        assert error is None, error
        assert hooked, "the plugin's hook is not in effect"
        maps = [np.asarray(m) for m, _ in steps]
        assert all(ok for _, ok in steps), "a slot does not hold its expert's weights"
        assert np.array_equal(maps[0], trivial)          # no plan file: zero moves
        assert np.array_equal(maps[1], want)              # our plan, dense row kept
        assert all(np.array_equal(m, want) for m in maps[2:])   # same / wrong shape / older
    assert results[0][1] == results[1][1]


def test_unsupported_version_and_missing_env_are_refused(monkeypatch):
    from expertplane.engines import sglang as plugin

    monkeypatch.setattr(plugin, "TESTED_VERSIONS", ("0.0.1",))
    result = plugin.install({"EXPERTPLANE_PLAN_FILE": "/x"})
    assert not result.in_effect and "SGLang 0.5.23 is not supported" in result.message
    monkeypatch.undo()
    result = plugin.install({})
    assert not result.in_effect and "EXPERTPLANE_PLAN_FILE is not set" in result.message
