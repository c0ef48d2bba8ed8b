"""planner.compiled: the mode switch, the cache check, and the background build as a real
process (a short stand-in command for the build, so the state machine is tested in seconds);
slow: the real build from an empty cache while the numpy paths serve the first plans."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from expertplane.planner import compiled, warm
from expertplane.planner.compiled import (MODE_ENV, BackgroundBuild, all_cached, forced_mode,
                                          kernels, mode, use_compiled, wait_compiled)


def test_mode_comes_from_the_environment_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv(MODE_ENV, "NumPy")
    assert mode() == "numpy" and not use_compiled()
    monkeypatch.setenv(MODE_ENV, "numba")
    assert use_compiled()
    monkeypatch.setenv(MODE_ENV, "gpu")
    with pytest.raises(ValueError, match=MODE_ENV):
        mode()
    with forced_mode("numpy"):
        assert mode() == "numpy"
    with pytest.raises(ValueError, match="mode"):
        with forced_mode("fast"):
            pass


def test_after_the_warm_steps_every_kernel_is_cached():
    found = kernels()
    names = {k.py_func.__name__ for k in found}
    assert {"_pack_kernel", "_fill_layer", "_solve_rows", "repair_row", "_previous_max",
            "water_fill", "power_q"} <= names
    assert "_swap" not in names and "excess" not in names       # inlined, never cached alone
    warm.run()
    assert all_cached()


def test_an_empty_cache_folder_holds_no_kernel(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", "from expertplane.planner.compiled import "
                          "all_cached; print(all_cached())"], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False"]


def _building(monkeypatch, command) -> BackgroundBuild:
    build = BackgroundBuild([sys.executable, "-c", command])
    monkeypatch.setattr(compiled, "build", build)
    monkeypatch.setattr(compiled, "all_cached", lambda: False)
    monkeypatch.setenv(MODE_ENV, "auto")
    return build


def test_a_missing_kernel_starts_the_build_and_numpy_serves_until_it_ends(monkeypatch, caplog):
    caplog.set_level(logging.INFO, "expertplane.planner.compiled")
    build = _building(monkeypatch, "import time; print('1/2 step one: 0.1 s', flush=True); "
                                   "time.sleep(1.5)")
    assert not use_compiled() and build.state() == "building"
    assert "building them in the background (pid" in caplog.text
    build.wait("the test", every=0.5)
    assert "still building the planner's kernels" in caplog.text
    assert "1/2 step one: 0.1 s" in caplog.text
    assert f"the test needs the planner's compiled kernels: waiting for their build (pid " \
           f"{build.pid}" in caplog.text
    assert use_compiled() and build.state() == "ready"
    assert "built in the background" in caplog.text


def test_a_wait_for_one_step_ends_when_the_build_printed_it(monkeypatch):
    build = _building(monkeypatch, "import time; print('1/2 planner global-deepseek: 0.2 s', "
                                   "flush=True); time.sleep(30)")
    assert not use_compiled()
    wait_compiled("the test", step="planner global-deepseek")   # returns long before 30 s
    assert build.state() == "building" and not use_compiled()
    build._proc.kill()
    build._proc.wait()


def test_a_failed_build_is_logged_and_the_kernels_compile_on_first_use(monkeypatch, caplog):
    build = _building(monkeypatch, "import sys; sys.exit('no compiler here')")
    assert not use_compiled()
    wait_compiled("the test")
    assert build.state() == "failed" and use_compiled()
    assert "failed (exit 1" in caplog.text and "no compiler here" in caplog.text


def test_an_unreadable_cache_or_a_build_that_cannot_start_falls_back_to_compiling(
        monkeypatch, tmp_path, caplog):
    build = _building(monkeypatch, "pass")
    build.command = [str(tmp_path / "no-such-python")]
    assert use_compiled() and build.state() == "failed" and build.pid is None
    assert "could not start the background build" in caplog.text

    def unreadable():
        raise KeyError("index layout")

    build = BackgroundBuild([sys.executable, "-c", "raise SystemExit(3)"])
    monkeypatch.setattr(compiled, "build", build)
    monkeypatch.setattr(compiled, "all_cached", unreadable)
    assert use_compiled() and build.pid is None
    assert "could not read numba's cache index" in caplog.text


def test_a_full_cache_starts_nothing(monkeypatch):
    build = BackgroundBuild([sys.executable, "-c", "raise SystemExit(3)"])
    monkeypatch.setattr(compiled, "build", build)
    monkeypatch.setattr(compiled, "all_cached", lambda: True)
    monkeypatch.setenv(MODE_ENV, "auto")
    assert use_compiled() and build.pid is None


_EMPTY_CACHE = """
import json, time
import numpy as np
from expertplane.planner import compiled
from expertplane.planner.eplb import rebalance_experts

def misses():
    return sum(sum(k.stats.cache_misses.values()) for k in compiled.kernels())

w = np.random.default_rng(0).zipf(1.2, (58, 256)).astype(np.float64)
first, seconds = {}, {}
for algorithm in ("deepseek", "balanced", "topology"):
    t = time.perf_counter()
    first[algorithm] = rebalance_experts(w, 288, 8, 4, 32, algorithm=algorithm)[0].numpy()
    seconds[algorithm] = time.perf_counter() - t
served = {"pid": compiled.build.pid, "misses": misses(), "cached": compiled.all_cached()}
compiled.wait_compiled("the test")
same = {a: bool((rebalance_experts(w, 288, 8, 4, 32, algorithm=a)[0].numpy() == p).all())
        for a, p in first.items()}
print(json.dumps({"served": served, "seconds": seconds, "state": compiled.build.state(),
                  "cached": compiled.all_cached(), "misses": misses(), "same": same}))
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_an_empty_cache_plans_at_once_and_builds_the_kernels_in_the_background(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), EXPERTPLANE_PLANNER_KERNELS="auto")
    out = subprocess.run([sys.executable, "-c", _EMPTY_CACHE], env=env, capture_output=True,
                         text=True, timeout=1700)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    # the first plans: numpy paths, nothing compiled here, the build running apart
    assert result["served"]["pid"] and result["served"]["misses"] == 0
    assert not result["served"]["cached"]
    assert "building them in the background" in out.stderr
    # after the build: every kernel cached and loaded (not compiled) here, same plans
    assert result["state"] == "ready" and result["cached"] and result["misses"] == 0
    assert result["same"] == {"deepseek": True, "balanced": True, "topology": True}
