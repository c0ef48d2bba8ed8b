"""``expertplane bench engines`` on the CPU: vLLM's own policy and ours answer on DeepSeek-V3
shapes (ours with the plan in force), and the move bound counts the busiest GPU's received
bytes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("engine_env", Path(__file__).with_name("engine_env.py"))
engine_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_env)
engine_env.allow_torchvision_import()

from expertplane.benchmarks import engines  # noqa: E402


def test_move_bound_is_the_busiest_gpus_received_bytes():
    old = np.tile(np.arange(engines.SLOTS) % engines.EXPERTS, (58, 1))
    new = old.copy()
    spr = engines.SLOTS // engines.GPUS            # 9 slots per GPU
    # GPU 0 (node 0) takes, in layer 0, the experts GPU 31 (node 3) holds: 9 remote fills
    new[0, :spr] = old[0, 31 * spr:32 * spr]
    new[0, 31 * spr:32 * spr] = old[0, :spr]
    out = engines.move_bound([(None, old), (None, new)], expert_bytes=1000)
    assert out["busiest_gpu_bytes"] == spr * 1000
    assert out["move_lower_bound_ms"] == spr * 1000 / engines.NVLINK_ONE_WAY * 1e3
    assert engines.move_bound([(None, old), (None, old)], 1000)["busiest_gpu_bytes"] == 0


def test_vllm_policies_answer_on_deepseek_v3_shapes(tmp_path, monkeypatch):
    series = engines.loads(2)
    assert [p.shape for _, p in series] == [(58, engines.SLOTS)] * 3
    monkeypatch.setenv("EXPERTPLANE_PLAN_FILE", str(tmp_path / "unused.json"))
    out = engines.bench_vllm(tmp_path, series)      # raises unless ours returns each plan
    assert out["vllm_own_ms"] > 0 and out["policy_ms"] > 0
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    assert EPLB_POLICIES["default"].__name__ == "DefaultEplbPolicy"   # put back afterwards
