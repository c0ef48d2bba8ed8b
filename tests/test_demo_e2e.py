"""End to end: `expertplane demo` runs controller, agents and gloo workers and balances live."""

import json
import subprocess
import sys

import numpy as np
import pytest

from expertplane.demo.report import summary_lines, write_png
from expertplane.demo.run import DemoOptions, load_config
from expertplane.demo.timeline import RolloutEvent, Sample, Timeline


def _sample(t, balance, control):
    return Sample(t=t, plan_version=1, balance=np.array(balance), control=np.array(control),
                  predicted=np.ones(len(balance)), gpu_load=np.arange(8.0).reshape(2, 4) + 1)


def test_mean_balance_skips_the_settle_window_after_the_first_sample():
    tl = Timeline(samples=[_sample(20.0, [2.0, 2.0], [2.0, 2.0]),
                           _sample(25.0, [1.5, 1.5], [2.0, 2.0]),
                           _sample(31.0, [1.0, 1.2], [2.0, 2.2])])
    assert tl.mean_balance("balance", settle=10.0) == pytest.approx(1.1)
    assert tl.mean_balance("balance", settle=4.0) == pytest.approx((1.5 + 1.1) / 2)
    assert tl.mean_balance("control", settle=0.0) == pytest.approx((2.0 + 2.0 + 2.1) / 3)


def test_report_png_and_summary(tmp_path):
    tl = Timeline(samples=[_sample(0.0, [2.0, 1.8], [2.0, 1.8]), _sample(12.0, [1.1, 1.0], [2.0, 1.9])],
                  rollouts=[RolloutEvent(5.0, 1, 2, "committed", 12, 3 << 20, 0.4, 0.5, 0.02)],
                  steps=40, failed_steps=0, tokens_per_step=256)
    png = write_png(tl, tmp_path / "r.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = "\n".join(summary_lines(tl, settle=10.0))
    assert "failed steps: 0" in text and "rollouts committed: 1" in text
    assert "tokens routed: 10,240" in text
    assert "slots moved: 12" in text and "3.0 MiB" in text
    assert "observed 1.050" in text and "initial plan on the same load 1.950" in text


def test_config_overrides_are_checked():
    placement, workload = load_config(DemoOptions(redundant=4))
    assert placement["num_replicas"] == placement["model"]["num_experts"] + 4
    assert workload["top_k"] >= 1
    with pytest.raises(ValueError, match="redundant"):
        load_config(DemoOptions(redundant=3))  # 35 slots on 4 GPUs
    assert load_config(DemoOptions(rebalance=False))[0]["policy"]["mode"] == "off"


@pytest.mark.timeout(240)
def test_demo_runs_and_balances(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "expertplane.cli.main", "demo", "--duration", "30", "--settle", "8",
         "--out", str(out), "--no-live"],
        capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: no failed step" in proc.stdout
    timeline = json.loads((out / "timeline.json").read_text())
    assert timeline["failed_steps"] == 0 and timeline["steps"] > 0 and not timeline["errors"]
    assert timeline["tokens"] == timeline["steps"] * 256
    assert any(r["state"] == "committed" for r in timeline["rollouts"])
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    run_config = json.loads((out / "config.json").read_text())   # what bench goodput replays
    assert run_config["seed"] == 0 and run_config["model"] is None
    assert run_config["workload"]["tokens_per_step"] == 256
