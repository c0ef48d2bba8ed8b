"""Benchmark 'engines': what ExpertPlane's engine plugins add to one engine rebalance.

Runs the engines' own code from their PyPI wheels (SGLang, vLLM; on the CPU, one process) at
DeepSeek-V3 scale: 61 hidden layers (3 dense), 58 MoE layers x 256 experts in 8 groups,
288 slots on 32 GPUs (4 nodes). Per engine, every rebalance asks a function for the new map:

* SGLang: ``EPLBManager._compute_expert_location_metadata``. Its own answer runs DeepSeek's EPLB
  on the load (``ExpertLocationMetadata.init_by_eplb``); ours (the AROUND hook of
  ``expertplane.engines.sglang``) reads the plan file, checks and maps it onto the hidden
  layers, packs the broadcast, then builds the same metadata (``init_by_mapping``, SGLang's).
* vLLM: the EPLB policy's ``rebalance_experts``. Its own is ``DefaultEplbPolicy`` (DeepSeek's
  EPLB); ours reads the plan file and checks it against the current map.

Each plan is a new version (the hook's full path: it never short-cuts on a version it has
moved to). The move that follows is not run here (SGLang's and vLLM's movers need one GPU per
rank): it is bounded below by the bytes the busiest GPU receives over NVLink, given with the
bandwidth assumed, so the plugin's time can be set against it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

HIDDEN, DENSE, EXPERTS, GROUPS, SLOTS, NODES, GPUS = 61, 3, 256, 8, 288, 4, 32
# DeepSeek-V3 routed expert: gate, up, down = 3 x 7168 x 2048 weights, FP8 as served (1 byte)
EXPERT_BYTES = 3 * 7168 * 2048
# NVLink 4 (H100/H200 SXM): 900 GB/s per GPU in both directions together, 450 GB/s one way
NVLINK_ONE_WAY = 450e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iters", type=int, default=20, help="timed calls per variant (median)")
    parser.add_argument("--expert-bytes", type=int, default=EXPERT_BYTES,
                        help="bytes of one expert's weights for the move bound "
                             "(default: DeepSeek-V3 FP8, 3 x 7168 x 2048)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def loads(iters: int):
    """``iters + 1`` drifting DeepSeek-V3 loads, float64 [58, 256] each (Zipf 1.2, then x
    exp(0.3 N(0, 1)) per step), and ExpertPlane's plan of each, int64 [58, 288]."""
    import numpy as np

    from expertplane.planner import rebalance_experts

    rng = np.random.default_rng(0)
    weight = rng.zipf(1.2, (HIDDEN - DENSE, EXPERTS)).clip(max=1e5).astype(np.float64)
    out = []
    for _ in range(iters + 1):
        plan, _, _ = rebalance_experts(weight, SLOTS, GROUPS, NODES, GPUS)
        out.append((weight, plan.numpy()))
        weight = weight * np.exp(rng.normal(0.0, 0.3, weight.shape))
    return out


def model_dir(path: Path, hidden: int, experts: int, dense: int) -> str:
    """A DeepSeek-V3 ``config.json`` (small attention, the given layer and expert counts)."""
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(num_hidden_layers=hidden, n_routed_experts=experts,
                           first_k_dense_replace=dense, n_group=8 if experts % 8 == 0 else 1,
                           topk_group=1, num_experts_per_tok=2, hidden_size=64,
                           intermediate_size=128, moe_intermediate_size=32,
                           num_attention_heads=4, num_key_value_heads=4)
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    cfg.save_pretrained(path)
    return str(path)


def publish_server_args(model_path: str, ep: int, redundant: int, **extra):
    """SGLang's own ServerArgs override for this process (``.restore()`` undoes it): EP ``ep``
    with ``redundant`` extra slots, DeepEP static dispatch, EPLB on, CPU."""
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args(
        tp_size=ep, ep_size=ep, ep_num_redundant_experts=redundant, moe_a2a_backend="deepep",
        deepep_mode="normal", ep_dispatch_algorithm="static", device="cpu",
        model_path=model_path, enable_eplb=True, **extra)
    override.install()
    return override


class _Served:
    """What SGLang's EPLBManager asks of its model: the MoE layers' expert weights by hidden
    layer id (the plugin reads only the keys; the move is not run here)."""

    def __init__(self, moe_layers):
        self.routed_experts_weights_of_layer = {layer: [] for layer in moe_layers}


def _median_ms(fn, args_list) -> float:
    times = []
    for args in args_list:
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _plan_doc(version: int, phy2log) -> dict:
    return {"placement": "bench", "version": version, "phy2log": phy2log.tolist(),
            "moe_layers": list(range(DENSE, HIDDEN)), "num_hidden_layers": HIDDEN}


def bench_sglang(work: Path, series, iters: int) -> dict:
    """Milliseconds per rebalance: SGLang's own compute, our hook (which ends in SGLang's
    ``init_by_mapping``, timed apart), and the plugin's own part (read, check and map the plan
    file: ``PlanSource.choose``)."""
    import numpy as np
    import torch

    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.eplb_manager import EPLBManager
    from sglang.srt.eplb.expert_location import (ExpertLocationMetadata,
                                                 set_global_expert_location_metadata)

    from expertplane.engines import sglang as plugin
    from expertplane.engines.plan_file import write_plan_file

    path = model_dir(work / "dsv3", HIDDEN, EXPERTS, DENSE)
    override = publish_server_args(path, GPUS, SLOTS - EXPERTS)
    try:
        config = ModelConfig(path)
        set_global_expert_location_metadata(ExpertLocationMetadata.init_trivial(config, 0),
                                            allow_overwrite=True)
        manager = EPLBManager.__new__(EPLBManager)   # __init__ starts the GPU-only recorder
        served = _Served(range(DENSE, HIDDEN))
        manager._model_config, manager._get_model = config, (lambda: served)
        manager._elastic_global_rank = lambda: 0
        own = EPLBManager._compute_expert_location_metadata
        plugin._SOURCE.path = str(work / "plan.json")
        counts = []
        for weight, _ in series:
            full = np.zeros((HIDDEN, EXPERTS))
            full[DENSE:] = weight
            counts.append(torch.from_numpy(full).to(torch.int64)[None])
        ms_own = _median_ms(lambda c: own(manager, c, broadcast_over_world=False),
                            [(c,) for c in counts[1:]])
        versions = iter(range(2, 2 * iters + 2))

        def hooked(count, phy2log):
            write_plan_file(plugin._SOURCE.path, _plan_doc(next(versions), phy2log))
            t0 = time.perf_counter()
            meta = plugin.compute_expert_location(own, manager, count,
                                                  broadcast_over_world=False)
            elapsed = time.perf_counter() - t0
            if not np.array_equal(meta.physical_to_logical_map_cpu.numpy()[DENSE:], phy2log):
                raise AssertionError("the hook did not answer with the plan in force")
            return elapsed

        hook = statistics.median(hooked(c, p) * 1e3 for c, (_, p) in zip(counts[1:], series[1:]))
        maps = [torch.from_numpy(np.vstack([np.tile(np.arange(SLOTS) % EXPERTS, (DENSE, 1)),
                                            p])) for _, p in series[1:]]
        build = _median_ms(lambda m: ExpertLocationMetadata.init_by_mapping(
            config, m, moe_ep_rank=0), [(m,) for m in maps])
        current = maps[0].numpy()

        def choose(phy2log):
            write_plan_file(plugin._SOURCE.path, _plan_doc(next(versions), phy2log))
            t0 = time.perf_counter()
            plugin._SOURCE.choose(current, list(range(DENSE, HIDDEN)), EXPERTS)
            return time.perf_counter() - t0

        own_part = statistics.median(choose(p) * 1e3 for _, p in series[1:])
    finally:
        override.restore()
    return {"sglang_own_ms": ms_own, "hook_ms": hook, "init_by_mapping_ms": build,
            "plugin_own_ms": own_part}


def bench_vllm(work: Path, series) -> dict:
    """Milliseconds per rebalance: vLLM's DefaultEplbPolicy and our policy."""
    import torch

    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    from expertplane.engines import vllm as plugin
    from expertplane.engines.plan_file import PLAN_FILE_ENV, write_plan_file

    path = work / "vllm-plan.json"
    os.environ[PLAN_FILE_ENV] = str(path)
    result = plugin.install()
    if not result.in_effect:
        raise RuntimeError(result.message)
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    ours = EPLB_POLICIES["default"]
    try:
        args = [(torch.from_numpy(w), SLOTS, GROUPS, NODES, GPUS, torch.from_numpy(old))
                for (w, _), (_, old) in zip(series[1:], series[:-1])]
        ms_own = _median_ms(DefaultEplbPolicy.rebalance_experts, args)
        times = []
        for version, ((w, plan), (_, old)) in enumerate(zip(series[1:], series[:-1]), start=2):
            write_plan_file(path, {**_plan_doc(version, plan), "moe_layers": None,
                                   "num_hidden_layers": None})
            t0 = time.perf_counter()
            answer = ours.rebalance_experts(torch.from_numpy(w), SLOTS, GROUPS, NODES, GPUS,
                                            torch.from_numpy(old))
            times.append((time.perf_counter() - t0) * 1e3)
            if not torch.equal(answer, torch.from_numpy(plan)):
                raise AssertionError("the policy did not answer with the plan in force")
    finally:                      # vLLM's own policy back in place for the rest of the process
        EPLB_POLICIES["default"] = ours.vllm_default
    return {"vllm_own_ms": ms_own, "policy_ms": statistics.median(times)}


def move_bound(series, expert_bytes: int) -> dict:
    """Lower bound of the move after one rebalance: the busiest GPU's received bytes (the one
    definition of moved bytes, ``TransferPlan``) over one-way NVLink bandwidth."""
    import numpy as np

    from expertplane.planner.transfers import plan_transfers

    worst = []
    for (_, old), (_, new) in zip(series[:-1], series[1:]):
        received = plan_transfers(old, new, GPUS, GPUS // NODES).received_bytes(expert_bytes)
        worst.append(int(received.sum(axis=(0, 1)).max()))
    busiest = int(np.median(worst))
    return {"busiest_gpu_bytes": busiest, "nvlink_one_way_bytes_per_s": NVLINK_ONE_WAY,
            "move_lower_bound_ms": busiest / NVLINK_ONE_WAY * 1e3}


def run(args) -> int:
    import torch.distributed as dist

    from expertplane.engines.torchvision_compat import allow_torchvision_import

    allow_torchvision_import()
    series = loads(args.iters)
    with tempfile.TemporaryDirectory() as tmp:
        # the engines' code asks for its world group: one gloo rank (the broadcast is a no-op)
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        results = {"iters": args.iters, "expert_bytes": args.expert_bytes,
                   "loadavg_before": os.getloadavg()[0]}
        results["sglang"] = bench_sglang(Path(tmp), series, args.iters)
        results["vllm"] = bench_vllm(Path(tmp), series)
        dist.destroy_process_group()
    results["move"] = move_bound(series, args.expert_bytes)
    results["loadavg_after"] = os.getloadavg()[0]
    _print(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _print(r: dict) -> None:
    s, v, m = r["sglang"], r["vllm"], r["move"]
    bound = m["move_lower_bound_ms"]
    print(f"DeepSeek-V3: {HIDDEN} hidden layers ({HIDDEN - DENSE} MoE) x {EXPERTS} experts, "
          f"{SLOTS} slots on {GPUS} GPUs / {NODES} nodes; median of {r['iters']} rebalances, "
          f"ms per rebalance (CPU, one process); load {r['loadavg_before']:.1f} -> "
          f"{r['loadavg_after']:.1f}")
    print(f"  SGLang own compute (init_by_eplb)     {s['sglang_own_ms']:9.1f}")
    print(f"  SGLang + ExpertPlane hook             {s['hook_ms']:9.1f}   of which SGLang's "
          f"init_by_mapping {s['init_by_mapping_ms']:.1f}, the plugin's own part "
          f"{s['plugin_own_ms']:.1f}")
    print(f"  vLLM DefaultEplbPolicy                {v['vllm_own_ms']:9.1f}")
    print(f"  vLLM + ExpertPlane policy             {v['policy_ms']:9.1f}")
    print(f"  move lower bound: busiest GPU receives {m['busiest_gpu_bytes'] / 2**30:.2f} GiB "
          f"at {NVLINK_ONE_WAY / 1e9:.0f} GB/s one-way NVLink = {bound:.1f} ms; the plugin's own "
          f"part is {s['plugin_own_ms'] / bound:.1%} (SGLang), {v['policy_ms'] / bound:.1%} "
          f"(vLLM) of it")
