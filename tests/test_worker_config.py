"""`expertplane worker --swap-step-budget-mb`: the hot-swap pacing budget reaches the engine's
config, 0 means unpaced, and a negative budget is refused naming the field."""

from __future__ import annotations

import pytest

from expertplane.cli.main import build_parser
from expertplane.cli.worker import config_from_args
from expertplane.kernels.hotswap import DEFAULT_STEP_BUDGET_BYTES

BASE = ["worker", "--rank", "0", "--world-size", "1", "--master", "h:1", "--plan", "p.json"]


def _config(*extra: str):
    return config_from_args(build_parser().parse_args([*BASE, *extra]))


def test_default_budget_is_the_engines():
    assert _config().swap_step_budget_bytes == DEFAULT_STEP_BUDGET_BYTES


@pytest.mark.parametrize("mib, expected", [("64", 64 * 2**20), ("0.5", 2**19), ("0", None)])
def test_budget_in_mib(mib, expected):
    assert _config("--swap-step-budget-mb", mib).swap_step_budget_bytes == expected


def test_negative_budget_names_the_field():
    with pytest.raises(ValueError, match="swap_step_budget_bytes"):
        _config("--swap-step-budget-mb", "-1")
