"""The planner's numba cache: seeding it from a warmed copy, the notice printed when a kernel
must be compiled, and (slow) ``expertplane warm`` leaving nothing to compile at DeepSeek-V3 scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import numba
import pytest

from expertplane import numba_cache
from expertplane.numba_cache import COMPILE_NOTICE, SEED_ENV, announce_compiles, seed_cache


def test_seed_copies_missing_files_only(tmp_path, monkeypatch):
    seed, cache = tmp_path / "seed", tmp_path / "cache"
    (seed / "planner_abc").mkdir(parents=True)
    (seed / "planner_abc" / "f.nbi").write_bytes(b"index")
    (seed / "planner_abc" / "f.nbc").write_bytes(b"code")
    (cache / "planner_abc").mkdir(parents=True)
    (cache / "planner_abc" / "f.nbi").write_bytes(b"newer index")
    monkeypatch.setenv(SEED_ENV, str(seed))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(cache))
    assert seed_cache() == 1
    assert (cache / "planner_abc" / "f.nbc").read_bytes() == b"code"
    assert (cache / "planner_abc" / "f.nbi").read_bytes() == b"newer index"
    monkeypatch.delenv(SEED_ENV)
    assert seed_cache() == 0


def test_notice_once_at_the_first_compile_of_a_package_kernel(monkeypatch):
    """Real numba compiles: a function of another package says nothing; the first of ours
    announces itself, the second does not."""
    monkeypatch.setattr(numba_cache, "_notice", None)
    said: list[str] = []
    announce_compiles(said.append)

    def make(module: str):
        fn = types.FunctionType((lambda x: x + 1).__code__, {}, "kernel")
        fn.__module__ = module
        return numba.njit(fn)

    make("other.module")(1)
    assert said == []
    make("expertplane.planner.fake")(1)
    make("expertplane.planner.fake2")(2.0)
    assert said == [COMPILE_NOTICE]


_PLAN_ALL = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from numba.core.dispatcher import Dispatcher
    from expertplane.planner import rebalance_experts
    w = np.random.default_rng(0).zipf(1.2, (58, 256)).astype(np.float64)
    times = {}
    for algorithm in ("deepseek", "balanced", "topology"):
        t = time.perf_counter()
        p, _, _ = rebalance_experts(w, 288, 8, 4, 32, algorithm=algorithm)
        rebalance_experts(w[::-1].copy(), 288, 8, 4, 32, algorithm=algorithm, previous=p.numpy())
        times[algorithm] = time.perf_counter() - t
    misses = {f"{n}.{a}": sum(o.stats.cache_misses.values())
              for n, m in list(sys.modules.items()) if n.startswith("expertplane.")
              for a, o in vars(m).items() if isinstance(o, Dispatcher)}
    print(json.dumps({"times": times, "misses": {k: v for k, v in misses.items() if v}}))
""")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_warm_leaves_nothing_to_compile(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    warm = subprocess.run([sys.executable, "-m", "expertplane.cli.main", "warm"], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert warm.returncode == 0, warm.stderr
    assert "planner compiled and cached" in warm.stdout
    out = subprocess.run([sys.executable, "-c", _PLAN_ALL], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["misses"] == {}
