"""The router benchmark on a small model: EPLB and the bias both lower max/mean GPU load vs the
static plan, a capacity drops rows and caps the processed load, and bad options name the option."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from expertplane.benchmarks import router


def _args(*argv):
    parser = argparse.ArgumentParser()
    router.add_arguments(parser)
    return parser.parse_args(list(argv))


SMALL = ["--layers", "2", "--tokens", "256", "--steps", "80", "--warmup", "20",
         "--rebalance-every", "20", "--drift-period", "0", "--bias-speed", "0.005"]


@pytest.mark.timeout(120)
def test_variants_balance_better_than_static_and_capacity_drops():
    torch.set_num_threads(1)
    args = _args(*SMALL)
    static, eplb, bias = (router.run_variant(args, v, 0.0) for v in ("static", "eplb", "bias"))
    assert static.plans == 1 and eplb.plans == 4 and bias.plans == 1
    assert static.dropped_fraction == 0 and static.bias_abs_max == 0
    assert static.gpu_balance > 1.2
    assert eplb.gpu_balance < static.gpu_balance and bias.gpu_balance < static.gpu_balance
    assert 0 < bias.bias_abs_max <= 0.005 * 80 + 1e-6
    capped = router.run_variant(args, "static", 1.1)
    assert capped.dropped_fraction > 0
    assert capped.gpu_balance < capped.demand_balance          # drops cap the busiest GPU
    # same stream and plan: the demand differs only through dropped rows changing the residual
    # stream that later layers route
    assert capped.demand_balance == pytest.approx(static.demand_balance, rel=0.05)


def test_run_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = _args("--layers", "1", "--tokens", "64", "--steps", "6", "--warmup", "2",
                 "--rebalance-every", "3", "--variants", "static", "eplb+bias",
                 "--capacity", "0", "1.5", "--json", str(out))
    assert router.run(args) == 0
    assert "eplb+bias" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [(r["variant"], r["capacity"]) for r in data["results"]] == \
        [("static", 0.0), ("eplb+bias", 0.0), ("static", 1.5), ("eplb+bias", 1.5)]


@pytest.mark.parametrize("argv,option", [(["--replicas", "20"], "--replicas"),
                                         (["--warmup", "300"], "--warmup"),
                                         (["--capacity", "-1"], "--capacity"),
                                         (["--threads", "0"], "--threads"),
                                         (["--top-k", "0"], "--top-k")])
def test_bad_options_name_the_option(argv, option):
    with pytest.raises(ValueError, match=option):
        router.run(_args(*argv))
